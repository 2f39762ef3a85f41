"""Op family C benchmarks, the evaluation side: filtered ranking of B test queries among N entities.

Group C-rank-<B>x<N> (D 200, TransE L1, queries h + r composed, a filter of ~8 other true answers
per query, realistic ties; all ranks of the B queries):
  lkge                the LKGE way (its BaseModel.predict and test loop): float64 embeddings, per
                      chunk of 100 queries torch.norm(q.unsqueeze(1) - E, p=1, dim=2) (the
                      [100, N, D] differences materialised), the filtered answers pushed to the
                      bottom, then argsort twice to read the target's rank
  full_score_matrix   PyKEEN's way with the fastest PyTorch scorer: the [B, N] score matrix
                      (torch.cdist p=1), filtered entries set to NaN, then PyKEEN's rank
                      definitions (counts of > and >= the true score)
  compiled_full_score_matrix  torch.compile of the same function
  ours[backend]       mmcl_fast.ops.filtered_rank on each of our backends present: streamed, no
                      [B, N] matrix
Each records `peak_mb` (CPU: peak resident memory of one call in a fresh process beyond that before
it; GPU: max_memory_allocated beyond that before). MMCL_FAST_BENCH_MEMORY=0 skips it.

    pytest benchmarks/bench_filtered_rank.py --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json
"""
import sys

import pytest
import torch

import mmcl_fast
from mmcl_fast.ops import filtered_rank

from conftest import cpu_step_peak_mb, cuda_step_peak_mb, peak_mb_in_subprocess, present_backends, run_bench, small

D = 16 if small() else 200
SHAPES = [(20, 300)] if small() else [(1000, 15_000)]
ROUNDS = 2 if small() else 5


def make(B, N, device):
    g = torch.Generator().manual_seed(0)
    E = torch.randn(N, D, generator=g)
    R = torch.randn(8, D, generator=g)
    h = torch.randint(0, N, (B,), generator=g)
    r = torch.randint(0, 8, (B,), generator=g)
    t = torch.randint(0, N, (B,), generator=g)
    q = E[h] + R[r]
    counts = torch.randint(0, 17, (B,), generator=g)
    indptr = torch.zeros(B + 1, dtype=torch.int64)
    indptr[1:] = counts.cumsum(0)
    indices = torch.randint(0, N, (int(indptr[-1]),), generator=g)
    return dict(q=q.to(device), E=E.to(device), t=t.to(device), indptr=indptr.to(device),
                indices=indices.to(device), E64=E.double().to(device))  # LKGE keeps float64 embeddings


def lkge(d):
    """LKGE's evaluation (its test loop): float64 [chunk, N, D] differences, filtered answers
    pushed down, the rank from a double argsort."""
    B = d["q"].shape[0]
    rows_all = torch.repeat_interleave(torch.arange(B, device=d["q"].device), d["indptr"].diff())
    ranks = []
    for s in range(0, B, 100):
        q = d["q"][s:s + 100].double()
        e = min(s + 100, B)
        pred = -torch.norm(q.unsqueeze(1) - d["E64"], p=1, dim=2)  # LKGE's form: [chunk, N, D] materialised
        b_range = torch.arange(e - s, device=q.device)
        target = d["t"][s:e]
        keep = pred[b_range, target].clone()
        sel = (rows_all >= s) & (rows_all < e)
        pred[rows_all[sel] - s, d["indices"][sel]] = -1e30
        pred[b_range, target] = keep
        ranks.append(1 + torch.argsort(torch.argsort(pred, dim=1, descending=True), dim=1)[b_range, target])
    return torch.cat(ranks)


def full_score_matrix(d):
    scores = -torch.cdist(d["q"], d["E"], p=1)  # [B, N]
    B = scores.shape[0]
    b_range = torch.arange(B, device=scores.device)
    true = scores[b_range, d["t"]].clone()
    rows = torch.repeat_interleave(b_range, d["indptr"].diff())
    scores[rows, d["indices"]] = float("nan")
    scores[b_range, d["t"]] = true
    optimistic = (scores > true[:, None]).sum(1) + 1
    pessimistic = (scores >= true[:, None]).sum(1)
    return (optimistic + pessimistic).float() * 0.5


def ours(backend):
    def fn(d):
        with mmcl_fast.use_backend(backend):
            return filtered_rank(d["q"], d["E"], d["t"], d["indptr"], d["indices"], "transe_l1")
    return fn


_compiled = {}


def compiled_full_score_matrix(d):
    return _compiled.setdefault("fn", torch.compile(full_score_matrix))(d)


COMPETITORS = {"lkge": lkge, "full_score_matrix": full_score_matrix,
               "compiled_full_score_matrix": compiled_full_score_matrix}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = list(COMPETITORS) + [f"ours[{b}]" for b in present_backends(DEVICE)]


def competitor(name):
    return COMPETITORS[name] if name in COMPETITORS else ours(name[5:-1])


@pytest.mark.parametrize("B,N", SHAPES, ids=[f"{b}x{n}" for b, n in SHAPES])
@pytest.mark.parametrize("name", NAMES)
def test_filtered_rank(benchmark, device, name, B, N):
    benchmark.group = f"C-rank-{B}x{N}"
    fn = competitor(name)
    d = make(B, N, device)
    if device.type == "cuda":
        peak = None if small() else cuda_step_peak_mb(lambda: fn(d))
    else:
        peak = peak_mb_in_subprocess(__file__, name, str(B), str(N))
    run_bench(benchmark, device, lambda: fn(d), rounds=ROUNDS, peak_mb=peak)


if __name__ == "__main__":  # one call in a fresh process: its peak resident memory
    import json

    name, B, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    d = make(B, N, torch.device("cpu"))
    fn = competitor(name)
    if name.startswith("compiled"):
        fn(d)  # compile first: the compiler's memory is not the call's
    print(json.dumps({"peak_mb": cpu_step_peak_mb(lambda: fn(d))}))
