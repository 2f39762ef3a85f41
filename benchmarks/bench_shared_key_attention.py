"""Op family B benchmarks: shared-key attention + asymmetric ReLU distillation, forward + backward.

One group per shape, B-<B>x<L> (H 12, D 64; a key bank [H, L, D] shared by the batch, a bias
[H, L, L], padded keys in every other batch element, the loss in "scores" space, pool "both"):
  eager_reference      the seed code's way: S and P materialised, pooled maps from S, the loss
  compiled_reference   torch.compile of the same function
  sdpa_float_bias      F.scaled_dot_product_attention with the bias and mask as a float mask:
                       the attention alone, no distillation loss (the PyTorch-native peer)
  ours[backend]        shared_key_attention_distill on each of our backends present
Groups B-drop-<B>x<L>: the attention alone (no loss) with dropout 0.1 on P, as in training:
eager_dropout (S, P materialised, F.dropout), compiled_dropout (torch.compile of it), sdpa_dropout
(SDPA's dropout_p), ours, and ours_p0 (ours without dropout: what the mask costs).
Each records `peak_mb`: on a GPU torch.cuda.max_memory_allocated over one step beyond the inputs;
on the CPU the peak resident memory of one step in a fresh process beyond that before the step
(its high-water mark reset first)
(MMCL_FAST_BENCH_MEMORY=0 skips it).

    pytest benchmarks/bench_shared_key_attention.py --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json
"""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mmcl_fast
from mmcl_fast.ops import shared_key_attention, shared_key_attention_distill

from conftest import cpu_step_peak_mb, present_backends, run_bench, small

ska = importlib.import_module("mmcl_fast.ops.shared_key_attention")

H, D = 12, 64
SHAPES = [(2, 7)] if small() else [(8, 61), (8, 80), (8, 128), (32, 61), (32, 80), (32, 128), (8, 197)]
ROUNDS = 2 if small() else 10
HERE = os.path.dirname(os.path.abspath(__file__))


def make(B, L, device, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(0)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device, dtype).requires_grad_(requires_grad)

    q, k, v = r(B, H, L, D), r(H, L, D), r(B, H, L, D)
    bias = r(H, L, L, s=0.1)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1::2, L - L // 4:] = True
    kpm = kpm.to(device)
    with torch.no_grad():  # closed forms: no [B, H, L, L] map before the step is measured
        tw, th = ska._closed_form_maps(q * 0.9, k, bias, kpm, None, D ** -0.5)
    dout = torch.randn(B, H, L, D, generator=g).to(device, dtype)
    return dict(q=q, k=k, v=v, bias=bias, kpm=kpm, tw=tw, th=th, dout=dout)


def eager_reference(t):
    """The seed code's way: materialised S and P, the pooled maps of S, then the loss."""
    with mmcl_fast.use_backend("reference"):
        out, loss = shared_key_attention_distill(t["q"], t["k"], t["v"], t["tw"], t["th"], t["bias"], t["kpm"],
                                                 pool="both")
    return out, loss


def _reference_fn(q, k, v, bias, kpm, tw, th):
    out = ska.reference_attention(q, k, v, bias, kpm)
    w, u = ska.reference_pooled_maps(q, k, bias, kpm, None)
    return out, ska.distill_loss(w, u, tw, th, "both", True)


_compiled = {}


def compiled_reference(t):
    fn = _compiled.setdefault("fn", torch.compile(_reference_fn))
    return fn(t["q"], t["k"], t["v"], t["bias"], t["kpm"], t["tw"], t["th"])


def sdpa_float_bias(t):
    B = t["q"].shape[0]
    mask = t["bias"].unsqueeze(0).expand(B, -1, -1, -1).masked_fill(t["kpm"][:, None, None, :], float("-inf"))
    return F.scaled_dot_product_attention(t["q"], t["k"].unsqueeze(0).expand(B, -1, -1, -1), t["v"], attn_mask=mask), None


def ours(backend):
    def fn(t):
        with mmcl_fast.use_backend(backend):
            return shared_key_attention_distill(t["q"], t["k"], t["v"], t["tw"], t["th"], t["bias"], t["kpm"],
                                                pool="both")
    return fn


COMPETITORS = {"eager_reference": eager_reference, "compiled_reference": compiled_reference,
               "sdpa_float_bias": sdpa_float_bias}


def step(fn, t):
    out, loss = fn(t)
    total = (out * t["dout"]).sum()
    if loss is not None:
        total = total + loss
    params = [t["q"], t["k"], t["v"], t["bias"]]
    torch.autograd.grad(total, params)


def _peak_mb(name, B, L, device):
    if os.environ.get("MMCL_FAST_BENCH_MEMORY", "1") == "0" or small():
        return None
    if device.type == "cuda":
        t = make(B, L, device)
        fn = COMPETITORS.get(name) or ours(name)
        step(fn, t)  # warm (compilation, workspaces)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, t)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    res = subprocess.run([sys.executable, os.path.abspath(__file__), name, str(B), str(L)], capture_output=True,
                         text=True, cwd=HERE, timeout=600)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


BACKENDS = present_backends(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("B,L", SHAPES, ids=[f"{b}x{n}" for b, n in SHAPES])
@pytest.mark.parametrize("name", list(COMPETITORS) + [f"ours[{b}]" for b in BACKENDS])
def test_attention_distill_fwd_bwd(benchmark, device, name, B, L):
    benchmark.group = f"B-{B}x{L}"
    backend = name[5:-1] if name.startswith("ours[") else None
    fn = ours(backend) if backend else COMPETITORS[name]
    t = make(B, L, device)
    peak = _peak_mb(backend or name, B, L, device)
    run_bench(benchmark, device, lambda: step(fn, t), rounds=ROUNDS, peak_mb=peak)


# -- attention with dropout on P (training), no loss: groups B-drop-<B>x<L> -------------------------
DROP_P = 0.1
DROP_SHAPES = [(2, 7)] if small() else [(8, 61), (32, 128), (8, 197)]


def eager_dropout(t):
    """The PyTorch way (and what SharedKeyAttention did before the kernels had dropout): S and P
    materialised, F.dropout on P."""
    S = t["q"] @ t["k"].transpose(-1, -2) * D ** -0.5 + t["bias"]
    P = torch.softmax(S.masked_fill(t["kpm"][:, None, None, :], float("-inf")), -1)
    return F.dropout(P, DROP_P, training=True) @ t["v"]


def sdpa_dropout(t):
    B = t["q"].shape[0]
    mask = t["bias"].unsqueeze(0).expand(B, -1, -1, -1).masked_fill(t["kpm"][:, None, None, :], float("-inf"))
    return F.scaled_dot_product_attention(t["q"], t["k"].unsqueeze(0).expand(B, -1, -1, -1), t["v"], attn_mask=mask,
                                          dropout_p=DROP_P)


def ours_dropout(backend, p=DROP_P):
    def fn(t):
        with mmcl_fast.use_backend(backend):
            return shared_key_attention(t["q"], t["k"], t["v"], t["bias"], t["kpm"], dropout_p=p)
    return fn


def compiled_dropout(t):
    return _compiled.setdefault("dropout", torch.compile(eager_dropout))(t)


DROP_COMPETITORS = {"eager_dropout": eager_dropout, "compiled_dropout": compiled_dropout,
                    "sdpa_dropout": sdpa_dropout}


@pytest.mark.parametrize("B,L", DROP_SHAPES, ids=[f"{b}x{n}" for b, n in DROP_SHAPES])
@pytest.mark.parametrize("name", list(DROP_COMPETITORS) + [f"ours[{b}]" for b in BACKENDS]
                         + [f"ours_p0[{b}]" for b in BACKENDS])
def test_attention_dropout_fwd_bwd(benchmark, device, name, B, L):
    """Forward + backward of the attention alone with dropout 0.1 on P (peak memory not recorded);
    ours_p0 is ours without dropout, the cost of the mask."""
    benchmark.group = f"B-drop-{B}x{L}"
    if name.startswith("ours"):
        fn = ours_dropout(name[name.index("[") + 1:-1], 0.0 if name.startswith("ours_p0") else DROP_P)
    else:
        fn = DROP_COMPETITORS[name]
    t = make(B, L, device)
    run_bench(benchmark, device, lambda: step(lambda x: (fn(x), None), t), rounds=ROUNDS)


def _measure_rss(name, B, L):
    """One step in this fresh process: its peak resident memory beyond that before it."""
    t = make(B, L, torch.device("cpu"))
    fn = COMPETITORS.get(name) or ours(name)
    if name == "compiled_reference":
        step(fn, t)  # compile first: its own memory is not the step's
    return cpu_step_peak_mb(lambda: step(fn, t))


if __name__ == "__main__":
    name, B, L = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps({"peak_mb": _measure_rss(name, B, L)}))
