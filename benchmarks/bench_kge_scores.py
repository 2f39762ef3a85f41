"""Op family C benchmarks, the training side of KG embedding: kge_scores forward + backward.

Groups C-kge-<score>-<b>x<K>x<D> (a MoFot / LKGE training batch: b 1024 positives, K 16 negatives
each, half replacing the head and half the tail, D 200; the entity rows are the distinct ids of the
batch drawn from N = 15,000 entities, about 10,500 of them; relation rows [b, Dr]), one step = the
scores, a margin loss on them, and the gradients of the entity and relation rows:
  eager_reference      the PyTorch way (as mmcl_fast/nn/kge.py scores today): gather the head,
                       tail and negative rows ([b, K, D]), the score formulas, autograd (whose
                       backward scatter-adds the gathered rows)
  compiled_reference   torch.compile of the same function
  ours[backend]        mmcl_fast.ops.kge_scores on each of our backends present
Each records `peak_mb` (CPU: peak resident memory of one step in a fresh process beyond that before
it; GPU: max_memory_allocated beyond that before) and `bytes`: the rows the step must read (the
b (K + 2) entity rows and the relation rows, twice: forward and backward) plus grad_entities
written, for the achieved GB/s. MMCL_FAST_BENCH_MEMORY=0 skips the memory figure.

    pytest benchmarks/bench_kge_scores.py --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json
"""
import importlib
import sys

import pytest
import torch

import mmcl_fast
from mmcl_fast.ops import kge_scores

from conftest import cpu_step_peak_mb, cuda_step_peak_mb, peak_mb_in_subprocess, present_backends, run_bench, small

ks = importlib.import_module("mmcl_fast.ops.kge_scores")

B, K, D, N = (16, 4, 8, 100) if small() else (1024, 16, 200, 15_000)
NUM_HEAD = K // 2
SCORES = ["transe_l1", "transe_l2", "distmult", "complex", "rotate"]
MARGIN = 6.0
ROUNDS = 2 if small() else 15


def make(score, device):
    g = torch.Generator().manual_seed(0)
    h, t = torch.randint(0, N, (B,), generator=g), torch.randint(0, N, (B,), generator=g)
    neg = torch.randint(0, N, (B, K), generator=g)
    rows, inverse = torch.unique(torch.cat([h, t, neg.reshape(-1)]), return_inverse=True)
    U = rows.numel()
    Dr = D // 2 if score == "rotate" else D
    entities = (0.1 * torch.randn(U, D, generator=g)).to(device).requires_grad_(True)
    relations = (0.1 * torch.randn(B, Dr, generator=g)).to(device).requires_grad_(True)
    heads, tails, negatives = inverse[:B], inverse[B:2 * B], inverse[2 * B:].view(B, K)
    return dict(entities=entities, relations=relations, heads=heads.to(device), tails=tails.to(device),
                negatives=negatives.to(device), score=score)


def _args(t):
    return t["entities"], t["relations"], t["heads"], t["tails"], t["negatives"], NUM_HEAD, t["score"]


def eager_reference(t):
    return ks.reference_kge_scores(*_args(t))


_compiled = {}


def compiled_reference(t):
    fn = _compiled.setdefault(t["score"], torch.compile(ks.reference_kge_scores))
    return fn(*_args(t))


def ours(backend):
    def fn(t):
        with mmcl_fast.use_backend(backend):
            return kge_scores(*_args(t))
    return fn


COMPETITORS = {"eager_reference": eager_reference, "compiled_reference": compiled_reference}


def competitor(name):
    return COMPETITORS[name] if name in COMPETITORS else ours(name[5:-1])


def step(fn, t):
    pos, neg = fn(t)
    loss = torch.relu(MARGIN - pos[:, None] + neg).mean()
    torch.autograd.grad(loss, [t["entities"], t["relations"]])


def bytes_moved(t):
    e, r = t["entities"], t["relations"]
    rows = B * (K + 2) * D * e.element_size() + r.numel() * r.element_size()
    return 2 * rows + e.numel() * e.element_size()


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = list(COMPETITORS) + [f"ours[{b}]" for b in present_backends(DEVICE)]


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("name", NAMES)
def test_kge_scores_fwd_bwd(benchmark, device, name, score):
    benchmark.group = f"C-kge-{score}-{B}x{K}x{D}"
    fn = competitor(name)
    t = make(score, device)
    if device.type == "cuda":
        peak = None if small() else cuda_step_peak_mb(lambda: step(fn, t))
    else:
        peak = peak_mb_in_subprocess(__file__, name, score)
    run_bench(benchmark, device, lambda: step(fn, t), rounds=ROUNDS, peak_mb=peak, bytes=bytes_moved(t),
              distinct_entities=t["entities"].shape[0])


if __name__ == "__main__":  # one step in a fresh process: its peak resident memory
    import json

    name, score = sys.argv[1], sys.argv[2]
    t = make(score, torch.device("cpu"))
    fn = competitor(name)

    def one():
        step(fn, t)

    if name == "compiled_reference":
        one()  # compile first: the compiler's memory is not the step's
    print(json.dumps({"peak_mb": cpu_step_peak_mb(one)}))
