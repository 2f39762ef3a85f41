"""Benchmark tables: turn a pytest-benchmark JSON file into a table of medians and ratios, and run
the benchmark files (`mmcl-fast bench`).

Per group, each competitor's median, its ratio to the group's baseline (a PyTorch way: named in
BASELINES by group, or in BASELINE_BY_PREFIX by group prefix, the baseline row being the one
whose name contains that string; else the group's first row) and, where the benchmark recorded
the bytes it must move, the achieved GB/s, and its peak memory where recorded. On top: the
machine, the torch version and the backends present.

    python benchmarks/report.py out.json [--markdown]       (a checkout)
    mmcl-fast bench [--benchmarks DIR] [--json FILE] [-k EXPR] [pytest args]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

# the competitor every other row of a group is compared with: by group, or by group prefix (the
# benchmark's name contains the value)
BASELINES = {
    "A-noise": "test_noise_seed_style_loop",
    "A-plain-k": "test_plain_k_foreach_mul_fused_adamw",
    "A-rows": "test_rows_torch_adam_dense_grad",
}
BASELINE_BY_PREFIX = {
    "B-": "[eager_reference-",
    "C-modemb": "[eager_reference",
    "C-interp": "[eager_reference",
    "C-anchor": "[eager_reference",
    "C-rank": "[lkge",
    "C-kge": "[eager_reference",
    "E-kge-epoch": "[pykeen",
    "E-mofot-epoch": "[reference",
    "E-eval": "[pykeen",
    "E-mspt-step": "[seed_code",
}


def _baseline(group: str, items: list[dict]) -> dict:
    name = BASELINES.get(group)
    if name is not None:
        return next((b for b in items if b["name"] == name), items[0])
    for prefix, part in BASELINE_BY_PREFIX.items():
        if group.startswith(prefix):
            return next((b for b in items if part in b["name"]), items[0])
    return items[0]


def _short(name: str) -> str:
    """test_x[ours[cpu]-8x61] -> x[ours[cpu]]: the group already says the shape."""
    name = name.replace("test_", "", 1)
    if "[" in name and name.endswith("]"):
        head, params = name.split("[", 1)
        params = params[:-1]
        parts = params.rsplit("-", 1)
        if len(parts) == 2 and "x" in parts[1] and parts[1].replace("x", "").isdigit():
            params = parts[0]
        return f"{head}[{params}]"
    return name


def rows(data: dict) -> Iterator[dict[str, object]]:
    """One dict per benchmark: group, name, median_ms, speedup (baseline median / median), gbps,
    peak_mb; the baseline first in each group, then by median."""
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"] or "-", []).append(b)
    for group, items in groups.items():
        base = _baseline(group, items)
        items.sort(key=lambda b: (b is not base, b["stats"]["median"]))
        for b in items:
            med = b["stats"]["median"]
            nbytes = b.get("extra_info", {}).get("bytes")
            yield {
                "group": group,
                "name": _short(b["name"]),
                "median_ms": med * 1e3,
                "speedup": base["stats"]["median"] / med,
                "gbps": nbytes / med / 1e9 if nbytes else None,
                "peak_mb": b.get("extra_info", {}).get("peak_mb"),
            }


def format_report(data: dict, markdown: bool = False) -> str:
    """The whole report (header lines and the table) as text."""
    out = []
    mi = data.get("machine_info", {})
    out.append(f"# {mi.get('node', '?')}: {mi.get('cpu', {}).get('brand_raw', '?')}, "
               f"python {mi.get('python_version', '?')}")
    if data["benchmarks"]:
        info = data["benchmarks"][0].get("extra_info", {})
        out.append(f"# device {info.get('device', '?')}, torch {info.get('torch', '?')}, "
                   f"{info.get('threads', '?')} threads, backends present: {info.get('backends', '?')}")
    header = ("group", "competitor", "median ms", "x vs baseline", "GB/s", "peak MB")
    lines = []
    for r in rows(data):
        lines.append((r["group"], r["name"], f"{r['median_ms']:.2f}", f"{r['speedup']:.2f}",
                      "" if r["gbps"] is None else f"{r['gbps']:.1f}",
                      "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"))
    if markdown:
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for line in lines:
            out.append("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(str(x[i])) for x in [header] + lines) for i in range(len(header))]
        for line in [header] + lines:
            out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    return "\n".join(out)


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"benchmark JSON {path!r} does not exist")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path!r} is not a pytest-benchmark JSON file: {exc}") from None
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path!r} is not a pytest-benchmark JSON file (no 'benchmarks' list)")
    return data


def report_main(argv: Sequence[str] | None = None) -> int:
    """`python benchmarks/report.py out.json [--markdown]`."""
    ap = argparse.ArgumentParser(description="Turn a pytest-benchmark JSON file into a table of medians and ratios.")
    ap.add_argument("json_file")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    try:
        data = load(args.json_file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(data, args.markdown))
    return 0


def run_benchmarks(benchmarks: str = "benchmarks", json_file: str | None = None, k: str | None = None,
                   pytest_args: Sequence[str] = (), markdown: bool = False) -> int:
    """Run `python -m pytest DIR --benchmark-only --benchmark-json FILE [-k EXPR] [args]`, then
    print the table. Returns pytest's exit status (the table is printed whenever a JSON came out).
    Without `json_file` the JSON goes to a temporary file."""
    if not os.path.isdir(benchmarks) and not os.path.isfile(benchmarks):
        raise ValueError(f"benchmark directory {benchmarks!r} does not exist: `mmcl-fast bench` runs the "
                         "benchmarks/ folder of a source checkout; run it from the checkout's root or pass "
                         "--benchmarks DIR")
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise ValueError("pytest-benchmark is not installed (pip install 'mmcl_fast[bench]')") from None
    with tempfile.TemporaryDirectory() as tmp:
        out = json_file or os.path.join(tmp, "bench.json")
        if os.path.isfile(out):
            # a run that fails before writing its JSON must not print an older run's table
            os.remove(out)
        cmd = [sys.executable, "-m", "pytest", benchmarks, "--benchmark-only", f"--benchmark-json={out}"]
        if k:
            cmd += ["-k", k]
        cmd += list(pytest_args)
        print("+ " + " ".join(cmd), flush=True)
        # PYTHONSAFEPATH (Python >= 3.11): the checkout's root stays off sys.path, or its kernels/
        # folder would shadow the PyPI package `kernels` that transformers imports
        rc = subprocess.call(cmd, env={**os.environ, "PYTHONSAFEPATH": "1"})
        if os.path.isfile(out):
            data = load(out)
            if data["benchmarks"]:
                print(format_report(data, markdown))
            else:
                print("no benchmark ran (check -k and the benchmark files)")
        elif rc == 0:
            rc = 1
    return rc
