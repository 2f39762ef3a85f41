"""Filtered link-prediction evaluation of a KG embedding: the rank of every test fact's true head
and true tail among the candidate entities, other known true answers excluded, through
`mmcl_fast.ops.filtered_rank` (streamed: no [queries, entities] score matrix).

    m = link_prediction(entities, relations, test, known, score="transe_l1", num_candidates=C)
    m["mrr"], m["hits@10"], m["count"]

Ties count as PyKEEN's RankBasedEvaluator counts them ("realistic" by default: the expected rank
under random tie-breaking). Candidates are the first `num_candidates` entity rows (ids numbered by
arrival: the entities known at some snapshot). The filter holds, for each query, every answer of
`known` (train, valid and test facts of the snapshots seen).

Under `torch.distributed` the queries are sharded over the ranks (each rank ranks every
world_size-th test fact) and the sums are all-reduced, so every rank returns the same metrics.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..nn.kge import SCORES, compose_query
from ..ops import build_filter, filtered_rank

SIDES = ("head", "tail")


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def link_prediction_ranks(entities: torch.Tensor, relations: torch.Tensor, test: torch.Tensor, known: torch.Tensor,
                          score: str, num_candidates: int | None = None, ties: str = "realistic",
                          sides: Sequence[str] = SIDES, batch_size: int = 4096) -> torch.Tensor:
    """Filtered ranks [len(sides) * n] of the n test facts (head ranks first), float."""
    if score not in SCORES:  # filtered_rank knows these by the same names, for composed queries
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    for side in sides:
        if side not in SIDES:
            raise ValueError(f"sides must be taken from {SIDES}, got {side!r}")
    if test.dim() != 2 or test.shape[1] != 3:
        raise ValueError(f"test must be [n, 3] id triples, got {tuple(test.shape)}")
    dev = entities.device
    test = test.to(dev)
    known = known.to(dev)
    out = []
    for side in sides:
        indptr, indices = build_filter(known, test, side)
        given, target = (test[:, 0], test[:, 2]) if side == "tail" else (test[:, 2], test[:, 0])
        for s in range(0, test.shape[0], batch_size):
            e = min(s + batch_size, test.shape[0])
            q = compose_query(entities.index_select(0, given[s:e]), relations.index_select(0, test[s:e, 1]),
                              score, side)
            ptr = indptr[s:e + 1] - indptr[s]
            idx = indices[int(indptr[s]):int(indptr[e])]
            out.append(filtered_rank(q.contiguous(), entities, target[s:e], ptr, idx, score,
                                     num_candidates=num_candidates, ties=ties))
    return torch.cat(out) if out else entities.new_zeros(0)


@torch.no_grad()
def link_prediction(entities: torch.Tensor, relations: torch.Tensor, test: torch.Tensor, known: torch.Tensor,
                    score: str, num_candidates: int | None = None, ties: str = "realistic",
                    ks: Sequence[int] = (1, 3, 10), sides: Sequence[str] = SIDES, batch_size: int = 4096,
                    distributed: bool = True) -> dict[str, float]:
    """{"mrr", "mr", "hits@k" ..., "count"} over both sides of every test fact (the mean of the
    head and tail ranks, as LKGE and PyKEEN's "both" report them)."""
    rank, world = _distributed() if distributed else (0, 1)
    mine = test[rank::world] if world > 1 else test
    r = link_prediction_ranks(entities, relations, mine, known, score, num_candidates, ties, sides, batch_size)
    r = r.double()
    sums = torch.stack([(1.0 / r).sum(), r.sum(), *[(r <= k).double().sum() for k in ks],
                        torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)])
    if world > 1:
        torch.distributed.all_reduce(sums)
    n = float(sums[-1])
    if n == 0:
        raise ValueError("no test fact to rank")
    out = {"mrr": float(sums[0]) / n, "mr": float(sums[1]) / n}
    for j, k in enumerate(ks):
        out[f"hits@{k}"] = float(sums[2 + j]) / n
    out["count"] = n
    return out
