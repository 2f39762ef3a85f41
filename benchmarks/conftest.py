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
