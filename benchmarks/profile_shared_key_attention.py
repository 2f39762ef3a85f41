"""Where the time of op family B goes: each backend's attention forward alone, forward + backward,
forward + backward with the distillation loss, the raw kernel ops without the Python wrapper (the
forward, the backward with the map gradients, the score maps; the forward and backward with
dropout 0.1 and the backward without, the mask's cost), and SDPA, at two MSPT shapes; then
torch.profiler's table of one backend's full step. On a GPU the cuda and triton backends; without
one (or with `cpu`) the C++ CPU backend. Medians (mean of n calls on a GPU) in ms.

    python benchmarks/profile_shared_key_attention.py [cuda|triton|cpu]

(MMCL_FAST_PORTABLE_DROPOUT=1: the C++ kernel draws the dropout mask with its portable loop
instead of AVX2 intrinsics, to compare the two forms.)
"""
import importlib
import sys
import time

import torch

import mmcl_fast
from mmcl_fast.ops import shared_key_attention

import bench_shared_key_attention as b

ska = importlib.import_module("mmcl_fast.ops.shared_key_attention")


def timeit(fn, n=50):
    if not GPU:  # the CPU: the median of n calls (the machine is shared and noisy)
        for _ in range(3):
            fn()
        ts = []
        for _ in range(n // 2):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2] * 1e3
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


GPU = torch.cuda.is_available()


def main(profiled=None):
    global GPU
    GPU = GPU and profiled != "cpu"
    profiled = profiled or ("cuda" if GPU else "cpu")
    dev = torch.device("cuda" if GPU else "cpu")
    params = ["q", "k", "v", "bias"]
    for B, L in [(32, 128), (8, 61)]:
        t = b.make(B, L, dev)
        for be in (("cuda", "triton") if GPU else ("cpu",)):
            with mmcl_fast.use_backend(be):
                def attn():
                    return shared_key_attention(t["q"], t["k"], t["v"], t["bias"], t["kpm"])

                def fwd_only():
                    with torch.no_grad():
                        attn()

                fwd, bwd, maps = ska._kernel_ops(be)
                args = (t["q"].detach(), t["k"].detach().unsqueeze(0), t["v"].detach(),
                        t["bias"].detach().unsqueeze(0), t["kpm"], None, b.D ** -0.5, False)
                out, lse, _ = fwd(*args)
                tw, th = t["tw"].contiguous(), t["th"].contiguous()
                _, _, _, gw, gu = maps(*args[:2], args[3], args[4], None, tw, th, args[6], True)
                print(f"B {B} L {L} {be:6s} attention fwd {timeit(fwd_only):.3f} ms, "
                      f"fwd+bwd {timeit(lambda: torch.autograd.grad((attn() * t['dout']).sum(), [t[p] for p in params])):.3f} ms, "
                      f"with the loss {timeit(lambda: b.step(b.ours(be), t)):.3f} ms; raw ops: fwd "
                      f"{timeit(lambda: fwd(*args)):.3f} ms, bwd "
                      f"{timeit(lambda: bwd(t['dout'], *args[:5], None, out, lse, None, gw, gu, args[6], True)):.3f} ms, "
                      f"maps {timeit(lambda: maps(*args[:2], args[3], args[4], None, tw, th, args[6], True)):.3f} ms")
                seed = torch.tensor([7], device=dev)
                dargs = args + (0.1, seed)
                dout_, dlse, _ = fwd(*dargs)
                print(f"B {B} L {L} {be:6s} raw ops with dropout 0.1: fwd {timeit(lambda: fwd(*dargs)):.3f} ms, bwd "
                      f"{timeit(lambda: bwd(t['dout'], *args[:5], None, dout_, dlse, None, None, None, args[6], True, 0.1, seed)):.3f} ms"
                      f"; without: bwd {timeit(lambda: bwd(t['dout'], *args[:5], None, out, lse, None, None, None, args[6], True)):.3f} ms")
        print(f"B {B} L {L} sdpa   fwd+bwd {timeit(lambda: b.step(b.sdpa_float_bias, t)):.3f} ms")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if GPU else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(10):
            b.step(b.ours(profiled), t)
        if GPU:
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total" if GPU else "self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main(*sys.argv[1:])
