"""Turn a pytest-benchmark JSON file into a table: per group, each competitor's median, its ratio
to the group's baseline (the first row, a PyTorch way) and, where the benchmark recorded the bytes
it must move, the achieved GB/s.

    python benchmarks/report.py out.json [--markdown]
"""
import argparse
import json
import sys

# the competitor every other row of a group is compared with
BASELINES = {
    "A-noise": "test_noise_seed_style_loop",
    "A-plain-k": "test_plain_k_foreach_mul_fused_adamw",
}


def rows(data):
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"] or "-", []).append(b)
    for group, items in groups.items():
        base_name = BASELINES.get(group)
        base = next((b for b in items if b["name"] == base_name), items[0])
        items.sort(key=lambda b: (b is not base, b["stats"]["median"]))
        for b in items:
            med = b["stats"]["median"]
            nbytes = b.get("extra_info", {}).get("bytes")
            yield {
                "group": group,
                "name": b["name"].replace("test_", ""),
                "median_ms": med * 1e3,
                "speedup": base["stats"]["median"] / med,
                "gbps": nbytes / med / 1e9 if nbytes else None,
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
    header = ("group", "competitor", "median ms", "x vs baseline", "GB/s")
    lines = []
    for r in rows(data):
        lines.append((r["group"], r["name"], f"{r['median_ms']:.2f}", f"{r['speedup']:.2f}",
                      "" if r["gbps"] is None else f"{r['gbps']:.1f}"))
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
