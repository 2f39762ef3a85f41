"""Several strategies and seeds of one method on the same data, in one table and one figure.

    mmcl-fast compare mofot --strategies mofot,finetune,retrain,ewc,lkge --seeds 0,1,2 -o runs/cmp --set kg=umls

A key given as `<strategy>.<key>` (`--set ewc.reg_lambda=0.1`) applies to that strategy only, so that
each strategy can run with the hyper-parameters chosen for it (on the valid facts: `eval_split=valid`).

Each (strategy, seed) is an ordinary run (`run_experiment`) in `<output>/<strategy>/seed<k>/`, so a
stopped comparison resumes run by run, and every run keeps its own log, results and pictures. The
method's config must have the keys `strategy` and `seed`; everything else (the data, the
snapshots' seed, the budget) is shared, so the strategies see the same snapshots and the same
number of epochs. Then `<output>/comparison.json` (every run's figures and the aggregates),
`comparison.md` (the table: mean +- sample std over seeds) and `comparison.png` (the average score
after each task, mean +- std band per strategy; the final average and test-size-weighted average
with error bars) are written.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .config import config_to_dict, fields
from .experiment import run_experiment
from .results import jsonable

# (key in a run's row, column title, higher is better)
COLUMNS = (
    ("average", "avg {metric}", True),
    ("weighted_average", "whole {metric}", True),
    ("hits@10", "whole Hits@10", True),
    ("bwt", "BWT", True),
    ("fwt", "FWT", True),
    ("forgetting", "forgetting", False),
    ("train_seconds", "train s", False),
    ("eval_seconds", "eval s", False),
)


def run_row(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one finished run (what results.json holds) that the table compares."""
    m = payload["metrics"]
    extra = payload.get("extra_metrics") or {}
    hits = extra.get("hits@10", {})
    training = payload.get("training") or []
    return {
        "average": m.get("average"),
        "weighted_average": m.get("weighted_average"),
        "hits@10": hits.get("weighted_average", hits.get("average")),
        "bwt": m.get("bwt"),
        "fwt": m.get("fwt"),
        "forgetting": m.get("forgetting"),
        "train_seconds": sum(t["train_seconds"] for t in training),
        "eval_seconds": sum(t["eval_seconds"] for t in training),
        "average_curve": m.get("average_curve"),
        "weighted_average_curve": m.get("weighted_average_curve"),
    }


def _stats(values: Sequence[float | None]) -> tuple[float, float, int]:
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def aggregate(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{strategy: {column: {"mean", "std", "n"}}} over the seeds of each strategy."""
    out = {}
    for strategy, runs in rows.items():
        out[strategy] = {}
        for key, _, _ in COLUMNS:
            mean, std, n = _stats([r.get(key) for r in runs])
            out[strategy][key] = {"mean": mean, "std": std, "n": n}
    return out


def format_table(agg: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str, seeds: int,
                 markdown: bool = True) -> str:
    """The comparison as a markdown (or aligned text) table: mean +- std over the seeds; the best
    mean of each score column in bold (markdown)."""
    cols = [(k, t.format(metric=metric.upper() if metric == "mrr" else metric), hb) for k, t, hb in COLUMNS
            if any(math.isfinite(agg[s][k]["mean"]) for s in agg)]
    best = {}
    for k, _, hb in cols:
        means = [agg[s][k]["mean"] for s in agg if math.isfinite(agg[s][k]["mean"])]
        if means and not k.endswith("seconds"):
            best[k] = max(means) if hb else min(means)
    header = ["strategy"] + [t for _, t, _ in cols]
    lines = []
    for s in agg:
        row = [s]
        for k, _, _ in cols:
            c = agg[s][k]
            if not math.isfinite(c["mean"]):
                row.append("-")
                continue
            digits = 1 if k.endswith("seconds") else 4
            cell = f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}" if seeds > 1 else f"{c['mean']:.{digits}f}"
            if markdown and best.get(k) == c["mean"]:
                cell = f"**{cell}**"
            row.append(cell)
        lines.append(row)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in lines]
        return "\n".join(out)
    widths = [max(len(r[c]) for r in [header] + lines) for c in range(len(header))]
    return "\n".join("  ".join(x.ljust(w) if c == 0 else x.rjust(w) for c, (x, w) in enumerate(zip(r, widths)))
                     for r in [header] + lines)


def plot_comparison(rows: Mapping[str, Sequence[Mapping[str, Any]]], agg, path: str, metric: str,
                    task_names: Sequence[str], title: str = "") -> str:
    """Left: the average score after each task (mean over seeds, +- std band) per strategy.
    Right: the final average and test-size-weighted average per strategy with std error bars."""
    from .report import _figure

    fig = _figure(10.0, 3.8)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for strategy, runs in rows.items():
        curves = [r["average_curve"] for r in runs if r.get("average_curve")]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        a = np.array([[np.nan if v is None else v for v in c[:n]] for c in curves], dtype=np.float64)
        mean, std = np.nanmean(a, 0), (np.nanstd(a, 0, ddof=1) if a.shape[0] > 1 else np.zeros(n))
        x = np.arange(n)
        left.plot(x, mean, marker="o", label=strategy)
        left.fill_between(x, mean - std, mean + std, alpha=0.2)
    left.set_xticks(range(len(task_names)), labels=list(task_names), rotation=30)
    left.set_title(f"average {metric} after each task")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names = list(agg)
    x = np.arange(len(names))
    for off, key, label in ((-0.2, "average", "average"), (0.2, "weighted_average", "test-size weighted")):
        means = [agg[s][key]["mean"] for s in names]
        if all(math.isnan(v) for v in means):
            continue
        right.bar(x + off, means, width=0.4, yerr=[agg[s][key]["std"] for s in names], capsize=3, label=label)
    right.set_xticks(x, labels=names)
    right.set_title(f"final {metric}")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def split_overrides(overrides: Mapping[str, Any], strategies: Sequence[str]):
    """(shared overrides, {strategy: its own overrides}) from keys `key` and `<strategy>.key`."""
    shared: dict[str, Any] = {}
    own: dict[str, dict[str, Any]] = {s: {} for s in strategies}
    for key, value in overrides.items():
        prefix, dot, rest = key.partition(".")
        if not dot:
            shared[key] = value
        elif prefix in own and rest:
            own[prefix][rest] = value
        else:
            raise ValueError(f"override {key!r}: a dotted key must be <strategy>.<key> with a strategy of this "
                             f"comparison ({', '.join(strategies)})")
    return shared, own


def run_comparison(spec, output_dir: str, strategies: Sequence[str], seeds: Sequence[int], *,
                   file: str | None = None, values: Mapping[str, Any] | None = None,
                   overrides: Mapping[str, Any] | None = None, fresh: bool = False, progress: bool | None = None,
                   print_fn: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run every (strategy, seed) of method `spec` into output_dir (see the module docstring) and
    write the comparison; returns what comparison.json holds. Every config is built (and so
    checked) before the first run starts."""
    keys = fields(spec.config_cls)
    for key in ("strategy", "seed"):
        if key not in keys:
            raise ValueError(f"method {spec.name!r} has no config key {key!r}: it cannot be compared by strategy and seed")
    if not strategies:
        raise ValueError("--strategies needs at least one strategy")
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    if len(set(strategies)) != len(strategies) or len(set(seeds)) != len(seeds):
        raise ValueError("strategies and seeds must not repeat")
    shared, own = split_overrides(overrides or {}, strategies)
    configs = {(s, k): spec.make_config(values, file=file, overrides={**shared, **own[s], "strategy": s, "seed": k})
               for s in strategies for k in seeds}
    os.makedirs(output_dir, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    runs = []
    metric, task_names = "score", []
    for (s, k), config in configs.items():
        folder = os.path.join(output_dir, s, f"seed{k}")
        if print_fn is not None:
            print_fn(f"== {spec.name} strategy={s} seed={k} -> {folder}")
        payload = run_experiment(spec.build(config), folder, method_name=spec.name, config=config_to_dict(config),
                                 progress=progress, resume=not fresh, print_fn=None)
        metric = payload["metric"]
        task_names = payload["result_matrix"]["task_names"]
        row = run_row(payload)
        rows[s].append(row)
        runs.append({"strategy": s, "seed": k, "folder": folder, **row})
        if print_fn is not None:
            print_fn(f"   average {row['average']:.4f}, test-size weighted {row['weighted_average'] or math.nan:.4f}, "
                     f"train {row['train_seconds']:.1f} s")
    agg = aggregate(rows)
    table = format_table(agg, metric, len(seeds))
    per_keys = {"strategy", "seed"} | {k for d in own.values() for k in d}
    common = {k: v for k, v in config_to_dict(next(iter(configs.values()))).items() if k not in per_keys}
    payload = {"method": spec.name, "metric": metric, "strategies": list(strategies), "seeds": list(seeds),
               "config": common, "per_strategy": own, "runs": runs, "aggregate": agg, "table": table}
    tmp = os.path.join(output_dir, "comparison.json.tmp")
    with open(tmp, "w") as f:
        json.dump(jsonable(payload), f, indent=2)
    os.replace(tmp, os.path.join(output_dir, "comparison.json"))
    with open(os.path.join(output_dir, "comparison.md"), "w") as f:
        f.write(table + "\n")
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        plot_comparison(rows, agg, os.path.join(output_dir, "comparison.png"), metric, task_names,
                        title=f"{spec.name}: {len(seeds)} seed(s)")
    if print_fn is not None:
        print_fn(format_table(agg, metric, len(seeds), markdown=False))
        print_fn(f"wrote {output_dir}: comparison.json, comparison.md, comparison.png")
    return payload
