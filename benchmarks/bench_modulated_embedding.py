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
Group C-interp: interpolate_weights forward + backward (gradients for new and sigma) over a model's
parameter list, MoFot / LKGE-style snapshot interpolation (3 entity tables [15k, 256], 3 relation
tables [237, 256] and 30 small tensors [256], i = 3):
  eager_reference      the PyTorch way: a loop of norm, scale and add per tensor
  compiled_reference   torch.compile of the same function
  ours[backend]        mmcl_fast.ops.interpolate_weights (one multi-tensor op)
Group C-anchor: anchor_penalty forward + backward over the same list, LKGE's per-row weights on the
tables and per-element weights (EWC) on the small tensors; the same three kinds of competitor.
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


# -- interpolate_weights and anchor_penalty over a parameter list ---------------------------------
def make_params(device):
    g = torch.Generator().manual_seed(1)
    shapes = [(50 if small() else 15_000, D)] * 3 + [(7 if small() else 237, D)] * 3 + [(D,)] * 30
    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)
    prev = [r(*s) for s in shapes]
    new = [r(*s).requires_grad_(True) for s in shapes]
    sigma = (1 + torch.rand(len(shapes), generator=g)).to(device).requires_grad_(True)
    weights = [torch.rand(s[0], generator=g).to(device) if len(s) == 2 else torch.rand(*s, generator=g).to(device)
               for s in shapes]
    douts = [r(*s) for s in shapes]
    return dict(prev=prev, new=new, sigma=sigma, anchors=prev, weights=weights, douts=douts)


def _interp_eager(t):
    return me.reference_interpolate_weights(t["prev"], t["new"], t["sigma"], 3)


def _anchor_eager(t):
    return me.reference_anchor_penalty(t["new"], t["anchors"], t["weights"], 0.5)


def _with_backend(backend, fn):
    def run(t):
        with mmcl_fast.use_backend(backend):
            return fn(t)
    return run


LIST_OPS = {
    "interp": (_interp_eager, lambda t: mmcl_fast.ops.interpolate_weights(t["prev"], t["new"], t["sigma"], 3)),
    "anchor": (_anchor_eager, lambda t: mmcl_fast.ops.anchor_penalty(t["new"], t["anchors"], t["weights"], 0.5)),
}
_compiled_list = {}


def list_competitor(op, name):
    eager, call = LIST_OPS[op]
    if name == "eager_reference":
        return eager
    if name == "compiled_reference":
        return _compiled_list.setdefault(op, torch.compile(eager))
    return _with_backend(name[5:-1], call)


def list_step(op, fn, t):
    res = fn(t)
    if op == "interp":  # the upstream gradients go straight in: no loss temporaries in the step
        torch.autograd.grad(res, t["new"] + [t["sigma"]], grad_outputs=t["douts"])
    else:
        torch.autograd.grad(res, t["new"])


LIST_NAMES = ["eager_reference", "compiled_reference"] + [f"ours[{b}]" for b in BACKENDS]


@pytest.mark.parametrize("op", list(LIST_OPS))
@pytest.mark.parametrize("name", LIST_NAMES)
def test_parameter_list_ops_fwd_bwd(benchmark, device, op, name):
    benchmark.group = f"C-{op}"
    fn = list_competitor(op, name)
    t = make_params(device)
    if device.type == "cuda":
        peak = None if small() else cuda_step_peak_mb(lambda: list_step(op, fn, t))
    else:
        peak = peak_mb_in_subprocess(__file__, f"{op}:{name}", "0")
    run_bench(benchmark, device, lambda: list_step(op, fn, t), rounds=ROUNDS, peak_mb=peak)


if __name__ == "__main__":  # one step in a fresh process: its peak resident memory
    import json

    name, N = sys.argv[1], int(sys.argv[2])
    if ":" in name:  # a parameter-list op
        op, name = name.split(":")
        t = make_params(torch.device("cpu"))
        fn = list_competitor(op, name)

        def one():
            list_step(op, fn, t)
    else:
        t = make(N, torch.device("cpu"))
        fn = competitor(name)

        def one():
            step(fn, t)
    if name == "compiled_reference":
        one()  # compile first: the compiler's memory is not the step's
    print(json.dumps({"peak_mb": cpu_step_peak_mb(one)}))
