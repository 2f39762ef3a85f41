"""Turn a pytest-benchmark JSON file into a table: per group, each competitor's median, its ratio
to the group's baseline (a PyTorch way) and, where the benchmark recorded the bytes it must move,
the achieved GB/s. The logic lives in mmcl_fast/bench.py (installed with the package, and behind
`mmcl-fast bench`); this is the checkout's wrapper.

    python benchmarks/report.py out.json [--markdown]
"""
import importlib.util
import os
import sys

_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "mmcl_fast", "bench.py")


def _bench_module():
    # bench.py is standalone (no torch): load the checkout's file directly, so that printing a
    # table does not import torch and the package; fall back to the installed package
    if os.path.isfile(_BENCH):
        spec = importlib.util.spec_from_file_location("_mmcl_fast_bench", _BENCH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from mmcl_fast import bench

    return bench


if __name__ == "__main__":
    sys.exit(_bench_module().report_main())
