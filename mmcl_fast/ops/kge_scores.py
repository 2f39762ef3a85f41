"""Op family C, the training side of knowledge-graph embedding: the scores of positive triples and
of their negatives in one fused op, without the [b, K, D] tensor of gathered negative rows.

entities [U, D] (the rows the ids point into: a batch's distinct entities, or a whole table),
relations [b, Dr] (row i: the relation of positive i; Dr = D, or D/2 for rotate, whose relation
rows are phases), heads, tails [b] and negatives [b, K] ids in [0, U), 0 <= num_head <= K:

    pos[i]    = s(E[heads_i], R_i, E[tails_i])
    neg[i, k] = s(E[negatives_ik], R_i, E[tails_i])   for k <  num_head  (the head replaced)
              = s(E[heads_i], R_i, E[negatives_ik])   for k >= num_head  (the tail replaced)

with the score s(h, r, t) (higher is more plausible; complex rows hold [re | im] halves):

    transe_l1  -sum |h + r - t|            transe_l2  -||h + r - t||_2
    distmult   sum h r t                   complex    sum Re(h r conj(t))      (r complex, D/2)
    rotate     -sum_k sqrt((Re d_k)^2 + (Im d_k)^2 + 1e-12),  d = h exp(i theta) - t,  theta = r

Results in float32 (float64 for float64 inputs). Differentiable with respect to entities (a dense
[U, D] gradient, every occurrence of a row accumulated) and relations; transe_l2's gradient at a
zero distance is 0 and transe_l1 takes sign(0) = 0, as torch's norm and abs backwards do.

Backends: the reference below (gather, `score_triples`, autograd: the spec), the C++ CPU kernels
(float32 / float64), CUDA and Triton (float32 / float16 / bfloat16, float32 accumulation). The
kernels save only the inputs and recompute the differences in the backward; none makes the
[b, K, D] tensor of gathered negatives. grad_entities is bit-reproducible on the CPU (each
occurrence of a row gets its own gradient row, and a row's occurrences are added in a fixed order:
csrc/cpu/kge_scores.cpp), not on a GPU (float32 atomic adds).

`score_triples` is the pure formula (any broadcastable rows), for models that score other
shapes (evaluation, a single triple).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import backend as _backend
from ._util import acc_dtype, checking_values, has_op, refuse_double_backward, shape_str

SCORES = ("transe_l1", "transe_l2", "distmult", "complex", "rotate")
_GPU_PREFERENCE = ("cuda", "triton")


# -- the score formulas (pure; broadcasting over leading dimensions) -------------------------------
def _cmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Complex product of [re | im] rows."""
    h = a.shape[-1] // 2
    ar, ai, br, bi = a[..., :h], a[..., h:], b[..., :h], b[..., h:]
    return torch.cat([ar * br - ai * bi, ar * bi + ai * br], -1)


def score_triples(h: torch.Tensor, r: torch.Tensor, t: torch.Tensor, score: str) -> torch.Tensor:
    """The score of (h, r, t), broadcasting over leading dimensions (higher is more plausible);
    rotate's r holds the D/2 phases."""
    if score == "transe_l1":
        return -(h + r - t).abs().sum(-1)
    if score == "transe_l2":
        return -torch.linalg.vector_norm(h + r - t, dim=-1)
    if score == "distmult":
        return (h * r * t).sum(-1)
    if score == "complex":
        return (_cmul(h, r) * t).sum(-1)
    if score == "rotate":
        d = _cmul(h, torch.cat([torch.cos(r), torch.sin(r)], -1)) - t
        k = d.shape[-1] // 2
        return -torch.sqrt(d[..., :k] ** 2 + d[..., k:] ** 2 + 1e-12).sum(-1)
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


# -- validation -----------------------------------------------------------------------------------
def _check(entities, relations, heads, tails, negatives, num_head, score):
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not isinstance(entities, torch.Tensor) or entities.dim() != 2:
        raise ValueError(f"entities must be a 2-D tensor [U, D], got {shape_str(entities)}")
    if not entities.is_floating_point():
        raise TypeError(f"entities must be floating point, got {entities.dtype}")
    U, D = entities.shape
    if D == 0:
        raise ValueError("entities has width D = 0")
    if score in ("complex", "rotate") and D % 2:
        raise ValueError(f"score {score!r} needs an even entity width D ([re | im] halves), got D = {D}")
    if not isinstance(heads, torch.Tensor) or heads.dim() != 1:
        raise ValueError(f"heads must be a 1-D tensor of entity ids [b], got {shape_str(heads)}")
    b = heads.shape[0]
    Dr = D // 2 if score == "rotate" else D
    if not isinstance(relations, torch.Tensor) or tuple(relations.shape) != (b, Dr):
        what = "D/2 phases" if score == "rotate" else "width D"
        raise ValueError(f"relations must be [b, Dr] = [{b}, {Dr}] (one row per positive, {what} for "
                         f"score {score!r}), got {shape_str(relations)}")
    if relations.dtype != entities.dtype:
        raise TypeError(f"relations must have the entities' dtype {entities.dtype}, got {relations.dtype}")
    if not isinstance(tails, torch.Tensor) or tuple(tails.shape) != (b,):
        raise ValueError(f"tails must be a 1-D tensor of {b} entity ids (like heads), got {shape_str(tails)}")
    if not isinstance(negatives, torch.Tensor) or negatives.dim() != 2 or negatives.shape[0] != b:
        raise ValueError(f"negatives must be a 2-D tensor [b, K] = [{b}, K], got {shape_str(negatives)}")
    for name, t in (("heads", heads), ("tails", tails), ("negatives", negatives)):
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be int64 or int32 ids, got {t.dtype}")
    K = negatives.shape[1]
    if isinstance(num_head, bool) or not isinstance(num_head, int) or not 0 <= num_head <= K:
        raise ValueError(f"num_head must be an int in [0, K = {K}], got {num_head!r}")
    for name, t in (("relations", relations), ("heads", heads), ("tails", tails), ("negatives", negatives)):
        if t.device != entities.device:
            raise ValueError(f"{name} is on {t.device} but entities on {entities.device}")
    if checking_values():
        for name, t in (("heads", heads), ("tails", tails), ("negatives", negatives)):
            if t.numel() == 0:
                continue
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= U:
                raise ValueError(f"{name} holds id {lo if lo < 0 else hi}, outside the entities' rows [0, {U})")


# -- the reference (the spec) ---------------------------------------------------------------------
def reference_kge_scores(entities, relations, heads, tails, negatives, num_head, score
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The spec: gather the rows, score with `score_triples` in the accumulation dtype; autograd."""
    dt = acc_dtype(entities.dtype)
    E, R = entities.to(dt), relations.to(dt)
    h, t = E[heads.long()], E[tails.long()]
    n = E[negatives.long()]                                              # [b, K, D]
    pos = score_triples(h, R, t, score)
    r = R[:, None, :]
    neg = torch.cat([score_triples(n[:, :num_head], r, t[:, None, :], score),
                     score_triples(h[:, None, :], r, n[:, num_head:], score)], 1)
    return pos, neg


# -- the kernels ----------------------------------------------------------------------------------
def _ops(backend: str):
    if backend == "triton":
        from ..kernels import kge_scores as _tk  # noqa: F401  (defines the ops and their fakes)

        return torch.ops.mmcl_fast.kge_scores_forward_triton, torch.ops.mmcl_fast.kge_scores_backward_triton
    return torch.ops.mmcl_fast.kge_scores_forward, torch.ops.mmcl_fast.kge_scores_backward


def _setup_context(ctx, inputs, output):
    entities, relations, heads, tails, negatives, num_head, score = inputs
    ctx.save_for_backward(entities, relations, heads, tails, negatives)
    ctx.num_head, ctx.score = num_head, score


def _make_backward(backward_op):
    def _backward(ctx, grad_pos, grad_neg):
        refuse_double_backward(ctx, "kge_scores")
        entities, relations, heads, tails, negatives = ctx.saved_tensors
        dt = acc_dtype(entities.dtype)
        b, K = negatives.shape
        grad_pos = entities.new_zeros((b,), dtype=dt) if grad_pos is None else grad_pos.to(dt).contiguous()
        grad_neg = entities.new_zeros((b, K), dtype=dt) if grad_neg is None else grad_neg.to(dt).contiguous()
        ge, gr = backward_op(grad_pos, grad_neg, entities, relations, heads, tails, negatives, ctx.num_head,
                             ctx.score)
        return ge, gr, None, None, None, None, None
    return _backward


def _fake_forward(entities, relations, heads, tails, negatives, num_head, score):
    dt = acc_dtype(entities.dtype)
    b, K = negatives.shape
    return entities.new_empty((b,), dtype=dt), entities.new_empty((b, K), dtype=dt)


def _fake_backward(grad_pos, grad_neg, entities, relations, heads, tails, negatives, num_head, score):
    return torch.empty_like(entities), torch.empty_like(relations)


def kge_scores(entities: torch.Tensor, relations: torch.Tensor, heads: torch.Tensor, tails: torch.Tensor,
               negatives: torch.Tensor, num_head: int, score: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pos [b], neg [b, K]): the scores of the positives (E[heads_i], R_i, E[tails_i]) and of their
    negatives, negatives[:, :num_head] replacing the head and negatives[:, num_head:] the tail.

    entities [U, D], relations [b, Dr] (Dr = D; D/2 phases for "rotate"), heads / tails [b],
    negatives [b, K] (int64 or int32 ids in [0, U)); score one of "transe_l1", "transe_l2",
    "distmult", "complex", "rotate" (see the module docstring). float32 results (float64 for float64
    inputs); gradients for entities (dense [U, D]) and relations.
    """
    _check(entities, relations, heads, tails, negatives, num_head, score)
    backend = _backend.choose_backend("kge_scores", entities.device, entities.dtype,
                                      gpu_preference=_GPU_PREFERENCE, compiled_op="kge_scores_forward")
    if backend == "reference":
        return reference_kge_scores(entities, relations, heads, tails, negatives, num_head, score)
    if backend == "triton":
        _register_triton()
    forward, _ = _ops(backend)
    return forward(entities.contiguous(), relations.contiguous(), heads.long().contiguous(),
                   tails.long().contiguous(), negatives.long().contiguous(), num_head, SCORES.index(score))


# -- registration -----------------------------------------------------------------------------------
def _register() -> None:
    """Fake kernels and the autograd formula of the C++ ops; the Triton ops' where Triton can run
    (registered at import: torch.compile cannot trace a registration made on first use)."""
    if not _backend.why_not("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                            torch.float32):
        _register_triton()
    if not _backend.extension_loaded() or not has_op("kge_scores_forward"):
        return
    torch.library.register_fake("mmcl_fast::kge_scores_forward")(_fake_forward)
    torch.library.register_fake("mmcl_fast::kge_scores_backward")(_fake_backward)
    torch.library.register_autograd("mmcl_fast::kge_scores_forward",
                                    _make_backward(torch.ops.mmcl_fast.kge_scores_backward),
                                    setup_context=_setup_context)


_TRITON_REGISTERED = False


def _register_triton() -> None:
    global _TRITON_REGISTERED
    if _TRITON_REGISTERED:
        return
    from ..kernels import kge_scores as _tk  # noqa: F401  (defines the ops and their fakes)

    torch.library.register_autograd("mmcl_fast::kge_scores_forward_triton",
                                    _make_backward(torch.ops.mmcl_fast.kge_scores_backward_triton),
                                    setup_context=_setup_context)
    _TRITON_REGISTERED = True


_register()
