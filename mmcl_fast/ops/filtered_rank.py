"""Op family C, the evaluation side (DESIGN.md 6.4): filtered link-prediction ranks without the
score matrix, the metrics over them, and the filter (the other true answers) built from triples.

For query b (already composed: TransE h + r, DistMult h * r, ComplEx / RotatE complex products in
[re | im] halves), candidates c < C = num_candidates (the first C rows of entities), target t_b:

    s_b(c): transe_l1 -sum|q - e|;  transe_l2 -||q - e||  (squared inside the kernels: same order);
            distmult, complex, dot  q . e  (for ComplEx in [re | im] halves this is Re<q, conj e>);
            rotate  -sum_k |q_k - e_k| over the D/2 complex coordinates
    greater_b = #{c != t_b, c not in filter_b : s_b(c) >  s_b(t_b)}
    equal_b   = #{c != t_b, c not in filter_b : s_b(c) == s_b(t_b)}
    optimistic = 1 + greater;  pessimistic = 1 + greater + equal;  realistic = 1 + greater + equal/2

(the definitions of PyKEEN's RankBasedEvaluator; realistic is the expected rank under random
tie-breaking). The kernels stream candidate tiles and count: memory O(B + tile * D), never a [B, N]
score matrix. The target's score is computed by the same code as every candidate's, so exact ties
(duplicate entity rows) are counted exactly. A NaN target score counts nothing (rank 1).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from .. import backend as _backend
from ._util import acc_dtype, checking_values, has_op, shape_str

SCORES = ("transe_l1", "transe_l2", "distmult", "complex", "rotate", "dot")
TIES = ("optimistic", "pessimistic", "realistic")
_GPU_PREFERENCE = ("cuda", "triton")


# -- validation -----------------------------------------------------------------------------------
def _check(queries, entities, target, filter_indptr, filter_indices, score, num_candidates, ties):
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
        raise ValueError(f"queries must be a 2-D tensor [B, D], got {shape_str(queries)}")
    if not queries.is_floating_point():
        raise TypeError(f"queries must be floating point, got {queries.dtype}")
    B, D = queries.shape
    if not isinstance(entities, torch.Tensor) or entities.dim() != 2 or entities.shape[1] != D:
        raise ValueError(f"entities must be [N, D] with D = {D} (the queries' width), got {shape_str(entities)}")
    if entities.dtype != queries.dtype:
        raise TypeError(f"entities must have the queries' dtype {queries.dtype}, got {entities.dtype}")
    N = entities.shape[0]
    if N == 0:
        raise ValueError("entities is empty: there is no candidate to rank")
    if score in ("complex", "rotate") and D % 2:
        raise ValueError(f"score {score!r} needs an even width ([re | im] halves), got D = {D}")
    C = N if num_candidates is None else num_candidates
    if isinstance(C, bool) or not isinstance(C, int) or not (1 <= C <= N):
        raise ValueError(f"num_candidates must be an int in [1, N = {N}], got {num_candidates!r}")
    for name, t, shape in (("target", target, (B,)), ("filter_indptr", filter_indptr, (B + 1,))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be a 1-D tensor of {shape[0]} ints, got {shape_str(t)}")
    if not isinstance(filter_indices, torch.Tensor) or filter_indices.dim() != 1:
        raise ValueError(f"filter_indices must be a 1-D tensor, got {shape_str(filter_indices)}")
    for name, t in (("target", target), ("filter_indptr", filter_indptr), ("filter_indices", filter_indices)):
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be int64 or int32, got {t.dtype}")
    for name, t in (("entities", entities), ("target", target), ("filter_indptr", filter_indptr),
                    ("filter_indices", filter_indices)):
        if t.device != queries.device:
            raise ValueError(f"{name} is on {t.device} but queries on {queries.device}")
    if checking_values():
        lo, hi = (int(target.min()), int(target.max())) if B else (0, 0)
        if lo < 0 or hi >= C:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target holds id {bad}, outside the candidates [0, {C})"
                             + (" (num_candidates)" if C < N else ""))
        nnz = filter_indices.shape[0]
        if int(filter_indptr[0]) != 0 or int(filter_indptr[-1]) != nnz:
            raise ValueError(f"filter_indptr must start at 0 and end at len(filter_indices) = {nnz}, "
                             f"got {int(filter_indptr[0])} ... {int(filter_indptr[-1])}")
        if B and bool((filter_indptr[1:] < filter_indptr[:-1]).any()):
            raise ValueError("filter_indptr must be non-decreasing (a CSR row pointer)")
        lo, hi = (int(filter_indices.min()), int(filter_indices.max())) if nnz else (0, 0)
        if lo < 0 or hi >= N:
            bad = lo if lo < 0 else hi
            raise ValueError(f"filter_indices holds id {bad}, outside the entities [0, {N})")
    return C


def _sorted_rows(indptr: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """The filter's indices with every row sorted ascending (what the kernels read)."""
    nnz = indices.shape[0]
    if nnz == 0:
        return indices
    rows = torch.repeat_interleave(torch.arange(indptr.shape[0] - 1, device=indices.device), indptr.diff(),
                                   output_size=nnz)
    key = rows * n + indices
    if checking_values() and not bool((key[1:] < key[:-1]).any()):
        return indices
    return indices[torch.argsort(key, stable=True)]


# -- the reference (the spec) ---------------------------------------------------------------------
def _score_block(q: torch.Tensor, e: torch.Tensor, score: str) -> torch.Tensor:
    """s(q_b, e_c) for a block of queries [b, D] and candidates [c, D] -> [b, c] (acc dtype)."""
    q, e = q[:, None, :], e[None, :, :]
    if score == "transe_l1":
        return -(q - e).abs().sum(-1)
    if score == "transe_l2":
        return -((q - e) ** 2).sum(-1)
    if score == "rotate":
        d = q - e
        h = d.shape[-1] // 2
        return -torch.sqrt(d[..., :h] ** 2 + d[..., h:] ** 2).sum(-1)
    return (q * e).sum(-1)  # distmult, complex, dot


def reference_scores(queries, entities, score="transe_l1", num_candidates=None) -> torch.Tensor:
    """All scores [B, C] in the accumulation dtype (materialised: for tests and small problems)."""
    dt = acc_dtype(queries.dtype)
    q, e = queries.to(dt), entities[: (num_candidates or entities.shape[0])].to(dt)
    out = q.new_empty((q.shape[0], e.shape[0]))
    for i in range(0, q.shape[0], 64):  # blocks bound the [b, c, D] temporaries
        for j in range(0, e.shape[0], 256):
            out[i:i + 64, j:j + 256] = _score_block(q[i:i + 64], e[j:j + 256], score)
    return out


def reference_filtered_rank_counts(queries, entities, target, filter_indptr, filter_indices, score="transe_l1",
                                   num_candidates=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The spec: (greater, equal) [B] int64 from the materialised score matrix."""
    C = num_candidates or entities.shape[0]
    s = reference_scores(queries, entities, score, C)
    B = s.shape[0]
    t = target.long()
    st = s.gather(1, t[:, None])
    excluded = torch.zeros((B, C), dtype=torch.bool, device=s.device)
    excluded[torch.arange(B, device=s.device), t] = True
    rows = torch.repeat_interleave(torch.arange(B, device=s.device), filter_indptr.long().diff())
    cols = filter_indices.long()
    keep = cols < C
    excluded[rows[keep], cols[keep]] = True
    greater = ((s > st) & ~excluded).sum(1)
    equal = ((s == st) & ~excluded).sum(1)
    return greater, equal


def ranks_from_counts(greater: torch.Tensor, equal: torch.Tensor, ties: str = "realistic",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g, e = greater.to(dtype), equal.to(dtype)
    if ties == "optimistic":
        return 1 + g
    if ties == "pessimistic":
        return 1 + g + e
    return 1 + g + e / 2


# -- the kernels ----------------------------------------------------------------------------------
def _fake_counts(queries, entities, target, filter_indptr, filter_indices, score, num_candidates):
    B = queries.shape[0]
    return queries.new_empty((B,), dtype=torch.int64), queries.new_empty((B,), dtype=torch.int64)


def _register() -> None:
    if _backend.extension_loaded() and has_op("filtered_rank_counts"):
        torch.library.register_fake("mmcl_fast::filtered_rank_counts")(_fake_counts)


def _counts_op(backend: str):
    if backend == "triton":
        from ..kernels import filtered_rank as _tk  # noqa: F401  (defines the op and its fake)

        return torch.ops.mmcl_fast.filtered_rank_counts_triton
    return torch.ops.mmcl_fast.filtered_rank_counts


def filtered_rank_counts(queries, entities, target, filter_indptr, filter_indices, score="transe_l1",
                         num_candidates=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(greater, equal) [B] int64: the filtered candidates scoring above / exactly at the target."""
    C = _check(queries, entities, target, filter_indptr, filter_indices, score, num_candidates, "realistic")
    return _counts(queries, entities, target, filter_indptr, filter_indices, score, C)


def _counts(queries, entities, target, filter_indptr, filter_indices, score, C):
    backend = _backend.choose_backend("filtered_rank", queries.device, queries.dtype,
                                      gpu_preference=_GPU_PREFERENCE, compiled_op="filtered_rank_counts")
    if backend == "reference":
        return reference_filtered_rank_counts(queries, entities, target, filter_indptr, filter_indices, score, C)
    indptr = filter_indptr.long().contiguous()
    indices = _sorted_rows(indptr, filter_indices.long(), entities.shape[0]).contiguous()
    return _counts_op(backend)(queries.contiguous(), entities.contiguous(), target.long().contiguous(),
                               indptr, indices, SCORES.index(score), C)


def filtered_rank(queries: torch.Tensor, entities: torch.Tensor, target: torch.Tensor,
                  filter_indptr: torch.Tensor, filter_indices: torch.Tensor, score: str = "transe_l1",
                  num_candidates: Optional[int] = None, ties: str = "realistic") -> torch.Tensor:
    """Filtered rank of each target among the first num_candidates entities -> [B] float
    (float64 for float64 queries): optimistic 1 + greater, pessimistic 1 + greater + equal,
    realistic their mean. queries [B, D] already composed with the relation; filter as CSR
    (filter_indptr [B + 1], filter_indices [nnz]) of the other true answers of each query (the
    target itself and ids >= num_candidates in it are ignored; duplicates count once)."""
    C = _check(queries, entities, target, filter_indptr, filter_indices, score, num_candidates, ties)
    greater, equal = _counts(queries, entities, target, filter_indptr, filter_indices, score, C)
    return ranks_from_counts(greater, equal, ties, acc_dtype(queries.dtype))


def rank_metrics(ranks: torch.Tensor, ks: Sequence[int] = (1, 3, 10)) -> Dict[str, float]:
    """{"mrr": mean(1/rank), "mr": mean(rank), "hits@k": mean(rank <= k) for k in ks}."""
    if not isinstance(ranks, torch.Tensor) or ranks.dim() != 1 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor, got {shape_str(ranks)}")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ks must hold positive ints, got {k!r}")
    r = ranks.double()
    if checking_values() and bool((r < 1).any()):
        raise ValueError("ranks must be >= 1")
    out = {"mrr": float((1.0 / r).mean()), "mr": float(r.mean())}
    for k in ks:
        out[f"hits@{k}"] = float((r <= k).double().mean())
    return out


def build_filter(known_triples: torch.Tensor, triples: torch.Tensor, side: str = "tail"
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The filter CSR of `triples` [B, 3] (h, r, t) against `known_triples` [T, 3] (every true
    triple known: train, valid and test of the snapshots seen): for side "tail", row b holds the
    sorted distinct t' with (h_b, r_b, t') known; for side "head", the h' with (h', r_b, t_b) known
    (head prediction; equivalently tail prediction on inverse relations (t, r + R, h)). Returns
    (indptr [B + 1], indices [nnz]) int64 on triples' device. The true answer itself is in its row
    (the rankers ignore it)."""
    if side not in ("tail", "head"):
        raise ValueError(f"side must be 'tail' or 'head', got {side!r}")
    for name, t in (("known_triples", known_triples), ("triples", triples)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != 3:
            raise ValueError(f"{name} must be a [*, 3] tensor of (head, relation, tail) ids, got {shape_str(t)}")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer ids, got {t.dtype}")
    dev = triples.device
    known = known_triples.to(dev).long()
    q = triples.long()
    if known.numel() and int(known.min()) < 0:
        raise ValueError("known_triples holds a negative id")
    if q.numel() and int(q.min()) < 0:
        raise ValueError("triples holds a negative id")
    a, b, ans = (0, 1, 2) if side == "tail" else (2, 1, 0)
    both = torch.cat([known, q]) if known.numel() else q
    n_ent = int(both[:, [0, 2]].max()) + 1 if both.numel() else 1
    n_rel = int(both[:, 1].max()) + 1 if both.numel() else 1
    key = known[:, a] * n_rel + known[:, b]
    # sorted, distinct (key, answer); by sort and neighbour comparison: torch.unique without an
    # inverse took 150 ms for 60k keys on 2 CPU threads (2 ms on one), the sort 5 ms
    pair = torch.sort(key * n_ent + known[:, ans])[0]
    if pair.numel() > 1:
        pair = pair[torch.cat([pair.new_ones(1, dtype=torch.bool), pair[1:] != pair[:-1]])]
    pkey, pans = pair // n_ent, pair % n_ent
    qkey = q[:, a] * n_rel + q[:, b]
    lo = torch.searchsorted(pkey, qkey, side="left")
    hi = torch.searchsorted(pkey, qkey, side="right")
    counts = hi - lo
    indptr = torch.zeros(q.shape[0] + 1, dtype=torch.int64, device=dev)
    indptr[1:] = counts.cumsum(0)
    nnz = int(indptr[-1])
    starts = torch.repeat_interleave(lo, counts, output_size=nnz)
    offsets = torch.arange(nnz, device=dev) - torch.repeat_interleave(indptr[:-1], counts, output_size=nnz)
    return indptr, pans[starts + offsets]


_register()
