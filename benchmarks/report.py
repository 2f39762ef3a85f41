"""Turn a pytest-benchmark JSON file into a table: per group, each competitor's median, its ratio
to the group's baseline (the first row, a PyTorch way) and, where the benchmark recorded the bytes
it must move, the achieved GB/s.

    python benchmarks/report.py out.json [--markdown]
"""
import argparse
import json
import sys

# the competitor every other row of a group is compared with: by group, or by group prefix (the
# benchmark's name contains the value)
BASELINES = {
    "A-noise": "test_noise_seed_style_loop",
    "A-plain-k": "test_plain_k_foreach_mul_fused_adamw",
}
BASELINE_BY_PREFIX = {"B-": "[eager_reference-"}


def _baseline(group, items):
    name = BASELINES.get(group)
    if name is not None:
        return next((b for b in items if b["name"] == name), items[0])
    for prefix, part in BASELINE_BY_PREFIX.items():
        if group.startswith(prefix):
            return next((b for b in items if part in b["name"]), items[0])
    return items[0]


def _short(name):
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


def rows(data):
    groups = {}
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_file")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    with open(args.json_file) as f:
        data = json.load(f)
    mi = data.get("machine_info", {})
    print(f"# {mi.get('node', '?')}: {mi.get('cpu', {}).get('brand_raw', '?')}, python {mi.get('python_version', '?')}")
    if data["benchmarks"]:
        info = data["benchmarks"][0].get("extra_info", {})
        print(f"# device {info.get('device', '?')}, torch {info.get('torch', '?')}, "
              f"{info.get('threads', '?')} threads, backends present: {info.get('backends', '?')}")
    header = ("group", "competitor", "median ms", "x vs baseline", "GB/s", "peak MB")
    lines = []
    for r in rows(data):
        lines.append((r["group"], r["name"], f"{r['median_ms']:.2f}", f"{r['speedup']:.2f}",
                      "" if r["gbps"] is None else f"{r['gbps']:.1f}",
                      "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"))
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(str(x[i])) for x in [header] + lines) for i in range(len(header))]
        for line in [header] + lines:
            print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
