"""Op family C benchmarks, the modulation side: modulated_embedding forward + backward.

Groups C-modemb-<N> (B 4096 ids with duplicates, M 3 modalities, D 256, per-sample gates [B, M],
a modality mask; gradients for the tables (dense), gamma, beta and the gate logits):
  eager_reference      the PyTorch way: tables[:, index] gather, FiLM, softmax gates, einsum;
                       autograd scatters the table gradient with index_put_(accumulate) (index_add)
  compiled_reference   torch.compile of the same function
  ours[backend]        mmcl_fast.ops.modulated_embedding on each of our backends present
Groups C-modemb-<N>-sparse, the same with a sparse COO table gradient (as SparseAdam takes):
  eager_reference_sparse   the reference with sparse=True (gather whose backward is a sparse COO)
  ours_sparse[backend]     ours with sparse=True
Each records `peak_mb` (CPU: peak resident memory of one step in a fresh process beyond that
before it; GPU: max_memory_allocated beyond that before). MMCL_FAST_BENCH_MEMORY=0 skips it.

    pytest benchmarks/bench_modulated_embedding.py --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json
"""
import importlib
import sys

import pytest
import torch

import mmcl_fast
from mmcl_fast.ops import modulated_embedding

from conftest import cpu_step_peak_mb, cuda_step_peak_mb, peak_mb_in_subprocess, present_backends, run_bench, small

me = importlib.import_module("mmcl_fast.ops.modulated_embedding")

M, D = (2, 8) if small() else (3, 256)
B = 16 if small() else 4096
SIZES = [("15k", 50 if small() else 15_000)] + ([] if small() else [("1M", 1_000_000)])
ROUNDS = 2 if small() else 10


def make(N, device):
    g = torch.Generator().manual_seed(0)
    tables = torch.randn(M, N, D, generator=g).to(device).requires_grad_(True)
    gamma = (1 + 0.1 * torch.randn(M, D, generator=g)).to(device).requires_grad_(True)
    beta = (0.1 * torch.randn(M, D, generator=g)).to(device).requires_grad_(True)
    index = torch.randint(0, N, (B,), generator=g)
    index[B // 2:] = index[: B - B // 2].clone()  # duplicates, as in a KGE batch (heads and tails)
    logits = torch.randn(B, M, generator=g).to(device).requires_grad_(True)
    mask = torch.rand(N, M, generator=g) > 0.2
    mask[:, 0] = True
    dout = torch.randn(B, D, generator=g).to(device)
    return dict(tables=tables, index=index.to(device), gamma=gamma, beta=beta, logits=logits, mask=mask.to(device),
                dout=dout)


def _call(t, sparse=False):
    return modulated_embedding(t["tables"], t["index"], t["gamma"], t["beta"], t["logits"], t["mask"], sparse=sparse)


def eager_reference(t):
    return me.reference_modulated_embedding(t["tables"], t["index"], t["gamma"], t["beta"], t["logits"], t["mask"])


def eager_reference_sparse(t):
    """The PyTorch way with a sparse table gradient (what nn.Embedding(sparse=True) gives)."""
    return me.reference_modulated_embedding(t["tables"], t["index"], t["gamma"], t["beta"], t["logits"], t["mask"],
                                            sparse=True)


_compiled = {}


def compiled_reference(t):
    fn = _compiled.setdefault("fn", torch.compile(me.reference_modulated_embedding))
    return fn(t["tables"], t["index"], t["gamma"], t["beta"], t["logits"], t["mask"])


def ours(backend, sparse=False):
    def fn(t):
        with mmcl_fast.use_backend(backend):
            return _call(t, sparse)
    return fn


COMPETITORS = {"eager_reference": eager_reference, "compiled_reference": compiled_reference,
               "eager_reference_sparse": eager_reference_sparse}


def competitor(name):
    if name in COMPETITORS:
        return COMPETITORS[name]
    kind, backend = name[:-1].split("[")
    return ours(backend, sparse=kind == "ours_sparse")


def step(fn, t):
    out = fn(t)
    torch.autograd.grad((out * t["dout"]).sum(), [t["tables"], t["gamma"], t["beta"], t["logits"]])


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = present_backends(DEVICE)
NAMES = list(COMPETITORS) + [f"ours[{b}]" for b in BACKENDS] + [f"ours_sparse[{b}]" for b in BACKENDS]


@pytest.mark.parametrize("size,N", SIZES, ids=[s for s, _ in SIZES])
@pytest.mark.parametrize("name", NAMES)
def test_modulated_embedding_fwd_bwd(benchmark, device, name, size, N):
    sparse = name.startswith(("ours_sparse", "eager_reference_sparse"))
    benchmark.group = f"C-modemb-{size}" + ("-sparse" if sparse else "")  # sparse against sparse
    if name == "compiled_reference" and N > 100_000 and device.type == "cpu":
        pytest.skip("torch.compile of the reference at N = 1M on the CPU: minutes of compile per shape")
    fn = competitor(name)
    t = make(N, device)
    if device.type == "cuda":
        peak = None if small() else cuda_step_peak_mb(lambda: step(fn, t))
    else:
        peak = peak_mb_in_subprocess(__file__, name, str(N))
    run_bench(benchmark, device, lambda: step(fn, t), rounds=ROUNDS, peak_mb=peak)


if __name__ == "__main__":  # one step in a fresh process: its peak resident memory
    import json

    name, N = sys.argv[1], int(sys.argv[2])
    t = make(N, torch.device("cpu"))
    fn = competitor(name)
    if name == "compiled_reference":
        step(fn, t)  # compile first: the compiler's memory is not the step's
    print(json.dumps({"peak_mb": cpu_step_peak_mb(lambda: step(fn, t))}))
