"""Reports of a run: the result matrix as a terminal table and as a PNG heat map, and the curves of
the average score and forgetting over tasks (PNG).

The pictures are drawn on matplotlib's Agg canvas directly (no pyplot): no display is needed and
the caller's matplotlib backend is left alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import metrics


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def format_table(R, task_names: Sequence[str], metric: str = "score", summary: dict[str, Any] | None = None,
                 init: Sequence[float] | None = None) -> str:
    """R (rows: after training task i; columns: task evaluated) as an aligned text table, with
    the average score of each row, then the summary metrics. '-' marks a missing score."""
    a = np.array(R, dtype=np.float64)
    rows_done = a.shape[0]
    names = [str(n) for n in task_names]
    header = [f"{metric} after \\ on"] + names + ["avg"]
    lines: list[list[str]] = []
    if init is not None and not all(math.isnan(float(v)) for v in init):
        lines.append(["init"] + [_fmt(float(v)) for v in init] + [""])
    for i in range(rows_done):
        avg = metrics.average_score(a[: i + 1], i) if rows_done else math.nan
        lines.append([names[i]] + [_fmt(a[i, j]) for j in range(a.shape[1])] + [_fmt(avg)])
    widths = [max(len(r[c]) for r in [header] + lines) for c in range(len(header))]
    out = ["  ".join(h.rjust(w) if c else h.ljust(w) for c, (h, w) in enumerate(zip(header, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for r in lines:
        out.append("  ".join(x.rjust(w) if c else x.ljust(w) for c, (x, w) in enumerate(zip(r, widths))))
    if summary:
        out.append("")
        out.append(summary_line(summary))
    return "\n".join(out)


def summary_line(summary: dict[str, Any]) -> str:
    parts = [f"average {_fmt(summary.get('average'))}"]
    if summary.get("weighted_average") is not None:
        parts.append(f"test-size weighted {_fmt(summary['weighted_average'])}")
    parts.append(f"forgetting ({summary.get('forgetting_variant', 'max')}) {_fmt(summary.get('forgetting'))}")
    parts.append(f"BWT {_fmt(summary.get('bwt'))}")
    if summary.get("fwt") is not None:
        parts.append(f"FWT {_fmt(summary['fwt'])}")
    return ", ".join(parts)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_result_matrix(R, task_names: Sequence[str], path: str, metric: str = "score",
                       title: str | None = None) -> str:
    """A heat map of R with each score written in its cell (missing ones left blank), as PNG."""
    a = np.array(R, dtype=np.float64)
    names = [str(n) for n in task_names]
    T = a.shape[1]
    fig = _figure(1.2 + 0.75 * T, 1.0 + 0.65 * max(a.shape[0], 1))
    ax = fig.add_subplot(1, 1, 1)
    finite = a[np.isfinite(a)]
    vmin, vmax = (0.0, 1.0) if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1) else \
        (float(finite.min()), float(finite.max()))
    im = ax.imshow(np.ma.masked_invalid(a), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(T), labels=names, rotation=45 if T > 6 else 0, ha="right" if T > 6 else "center")
    ax.set_yticks(range(a.shape[0]), labels=names[: a.shape[0]])
    ax.set_xlabel("task evaluated")
    ax.set_ylabel("after training")
    mid = (vmin + vmax) / 2
    for i in range(a.shape[0]):
        for j in range(T):
            if np.isfinite(a[i, j]):
                ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if a[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(title or f"{metric}: result matrix")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_curves(R, task_names: Sequence[str], path: str, metric: str = "score", forgetting_variant: str = "max",
                weights: Sequence[float] | None = None, title: str | None = None) -> str:
    """The average score A_t and the forgetting F_t after each task t (two panels), as PNG; with
    `weights` (test sizes) the weighted average is drawn too."""
    a = np.array(R, dtype=np.float64)
    names = [str(n) for n in task_names][: a.shape[0]]
    x = np.arange(a.shape[0])
    fig = _figure(9.0, 3.6)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.plot(x, metrics.average_curve(a), marker="o", label="average")
    if weights is not None:
        left.plot(x, metrics.average_curve(a, weights), marker="s", linestyle="--", label="test-size weighted")
    left.set_title(f"average {metric}")
    left.legend(loc="best", fontsize=8)
    right.plot(x, metrics.forgetting_curve(a, forgetting_variant), marker="o", color="tab:red")
    right.set_title(f"forgetting ({forgetting_variant})")
    for ax in (left, right):
        ax.set_xticks(x, labels=names)
        ax.set_xlabel("after training")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path
