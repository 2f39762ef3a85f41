import os

import pytest
import torch

import mmcl_fast


def pytest_report_header(config):
    av = mmcl_fast.available_backends()
    return [f"torch {torch.__version__}, threads {torch.get_num_threads()}, backends: "
            + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in av.items())]


def small() -> bool:
    """MMCL_FAST_BENCH_SMALL=1: tiny shapes, so that CI can check that every benchmark runs."""
    return os.environ.get("MMCL_FAST_BENCH_SMALL", "0") == "1"


def present_backends(device: torch.device):
    """Our kernel backends that can run on this device. The reference backend is the spec (its
    Philox noise is plain int64 tensor arithmetic), not a competitor; the PyTorch way is the
    seed-style loop. The triton interpreter is not a benchmark."""
    names = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    return [n for n in names if not mmcl_fast.backend.why_not(n, device, torch.float32)
            and not (n == "triton" and device.type == "cpu")]


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_bench(benchmark, device, fn, setup=None, rounds=15, **extra_info):
    """Time fn (synchronised on a GPU) `rounds` times after one warm-up round, recording the
    machine, torch, threads, backends and any extra figures (bytes to move, peak memory...)."""
    benchmark.extra_info.update(extra_info)
    benchmark.extra_info["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    benchmark.extra_info["torch"] = torch.__version__
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["backends"] = ",".join(k for k, v in mmcl_fast.available_backends().items() if v)

    def run():
        fn()
        sync(device)

    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_step_peak_mb(step) -> float:
    """Peak resident memory of one call of step() beyond the memory resident before it (Linux):
    the high-water mark is reset first (writing 5 to /proc/self/clear_refs), so earlier peaks (the
    inputs' construction) do not hide the step's. Run it in a fresh process, before any warm-up:
    memory freed earlier and kept by the allocator would otherwise be reused unseen."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    step()
    return (_status_kb("VmHWM") - before) / 1024


def peak_mb_in_subprocess(script: str, *args: str):
    """Run `python script *args` (whose main prints {"peak_mb": x} as its last line) -> x or None.
    MMCL_FAST_BENCH_MEMORY=0 or small shapes skip it."""
    import json
    import subprocess
    import sys

    if os.environ.get("MMCL_FAST_BENCH_MEMORY", "1") == "0" or small():
        return None
    # the script imports conftest from its own folder: PYTHONSAFEPATH (set by the test commands to
    # keep the checkout's root off sys.path) would hide it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    res = subprocess.run([sys.executable, os.path.abspath(script), *args], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(script)), timeout=900, env=env)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def cuda_step_peak_mb(step) -> float:
    """Peak CUDA memory allocated by one call of step() (after one warm-up call) beyond that before."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
