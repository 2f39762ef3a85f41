"""Op family C, the modulation side (DESIGN.md 6.1 - 6.3): modulated multimodal embeddings, weight
interpolation across snapshots, and the anchor penalty.

Modulated embedding. tables [M, N, D] (or a list of M [N, D] tables), index [B] entity ids,
gamma, beta [M, D], gate_logits [B, M] (per sample), [M] (shared) or None (uniform),
modality_mask [N, M] bool (True = the entity has that modality) or None:

    a_b   = softmax over the modalities entity index_b has of gate_logits_b   (0 for the others)
    h_b   = sum_m a_bm (gamma_m * tables[m, index_b] + beta_m)                -> [B, D]

Its backward touches only the gathered rows of the tables (duplicate ids accumulate; the C++
kernel's sum is deterministic), as a dense gradient or, with sparse=True, an uncoalesced sparse
COO gradient of the [M, N, D] table (indices (m, index_b), one row per (m, b)), for SparseAdam.

Weight interpolation, over a list of K (prev, new) pairs and sigma [K], snapshot number i >= 1:

    out_k = (1 - 1/i) prev_k + (1/i) sigma_k new_k / max(||new_k||_F, eps)

Anchor penalty (LKGE / EWC), over lists of parameters, anchors and weights:

    lam * sum_k sum w_k (p_k - a_k)^2,   w_k: None (1), a number, per row [p_k.size(0)], or per element

Anchors and weights are constants (no gradient); the same term is fused into the optimizer step
of op family A (the anchor options of mmcl_fast.optim.ModalityAdamW / ModalitySGD).

Each function checks its arguments (naming them) before any kernel runs. The reference backend
(plain PyTorch, below) is the spec; the C++, CUDA and Triton kernels are tested against it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch

from .. import backend as _backend
from ._util import acc_dtype, checking_values, has_op, refuse_double_backward, shape_str

_GPU_PREFERENCE = ("cuda", "triton")


# -- validation -----------------------------------------------------------------------------------
def _as_table(tables) -> torch.Tensor:
    if isinstance(tables, (list, tuple)):
        if len(tables) == 0:
            raise ValueError("tables must hold at least one modality table")
        for m, t in enumerate(tables):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"tables[{m}] must be a 2-D tensor [N, D], got {shape_str(t)}")
            if t.shape != tables[0].shape:
                raise ValueError(f"tables[{m}] is {shape_str(t)} but tables[0] is {shape_str(tables[0])}: "
                                 "every modality table needs the same number of rows and the same width")
            if t.device != tables[0].device:
                raise ValueError(f"tables[{m}] is on {t.device} but tables[0] on {tables[0].device}")
            if t.dtype != tables[0].dtype:
                raise TypeError(f"tables[{m}] is {t.dtype} but tables[0] is {tables[0].dtype}")
        return torch.stack(list(tables))  # a copy: pass one [M, N, D] tensor to avoid it
    if not isinstance(tables, torch.Tensor) or tables.dim() != 3:
        raise ValueError(f"tables must be a tensor [M, N, D] or a list of M [N, D] tensors, got {shape_str(tables)}")
    return tables


def _check_embedding(tables, index, gamma, beta, gate_logits, modality_mask):
    if not tables.is_floating_point():
        raise TypeError(f"tables must be floating point, got {tables.dtype}")
    M, N, D = tables.shape
    if M == 0 or D == 0:
        raise ValueError(f"tables {shape_str(tables)} has no modality or no width")
    if not isinstance(index, torch.Tensor) or index.dim() != 1:
        raise ValueError(f"index must be a 1-D tensor of entity ids [B], got {shape_str(index)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index must be int64 or int32, got {index.dtype}")
    dev = tables.device
    for name, t in (("index", index), ("gamma", gamma), ("beta", beta), ("gate_logits", gate_logits),
                    ("modality_mask", modality_mask)):
        if isinstance(t, torch.Tensor) and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but tables on {dev}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (M, D):
            raise ValueError(f"{name} must be [M, D] = [{M}, {D}], got {shape_str(t)}")
        if t.dtype != tables.dtype:
            raise TypeError(f"{name} must have the tables' dtype {tables.dtype}, got {t.dtype}")
    B = index.shape[0]
    if gate_logits is not None:
        if not isinstance(gate_logits, torch.Tensor) or tuple(gate_logits.shape) not in ((B, M), (M,)):
            raise ValueError(f"gate_logits must be [B, M] = [{B}, {M}] or [M] = [{M}], got {shape_str(gate_logits)}")
        if not gate_logits.is_floating_point():
            raise TypeError(f"gate_logits must be floating point, got {gate_logits.dtype}")
    if modality_mask is not None:
        if not isinstance(modality_mask, torch.Tensor) or tuple(modality_mask.shape) != (N, M):
            raise ValueError(f"modality_mask must be [N, M] = [{N}, {M}], got {shape_str(modality_mask)}")
        if modality_mask.dtype != torch.bool:
            raise TypeError(f"modality_mask must be bool (True = the entity has the modality), got {modality_mask.dtype}")
    if checking_values() and B > 0:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= N:
            bad = lo if lo < 0 else hi
            raise ValueError(f"index holds id {bad}, outside the tables' {N} rows [0, {N})")
        if modality_mask is not None:
            has_any = modality_mask[index.long()].any(dim=1)
            if not bool(has_any.all()):
                b = int((~has_any).nonzero()[0, 0])
                raise ValueError(f"entity {int(index[b])} (index[{b}]) has no modality at all in modality_mask: "
                                 "its embedding is undefined")


# -- the reference (the spec) ---------------------------------------------------------------------
class _SparseRows(torch.autograd.Function):
    """tables[:, index] -> [M, B, D], whose backward is an uncoalesced sparse COO gradient."""

    @staticmethod
    def forward(ctx, tables, index):
        ctx.save_for_backward(index)
        ctx.size = tables.shape
        return tables[:, index]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _sparse_grad(grad, index, ctx.size), None


def _sparse_grad(values: torch.Tensor, index: torch.Tensor, size) -> torch.Tensor:
    """The sparse [M, N, D] tensor with row (m, index_b) = values[m, b] (duplicates not summed)."""
    M, B = values.shape[0], values.shape[1]
    mods = torch.arange(M, device=index.device).repeat_interleave(B)
    ids = index.long().repeat(M)
    return torch.sparse_coo_tensor(torch.stack([mods, ids]), values.reshape(M * B, -1), size,
                                   check_invariants=False)


def _gates(logits: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the kept modalities of each row (0 elsewhere), in the accumulation dtype."""
    z = logits.to(acc_dtype(logits.dtype))
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    return torch.softmax(z, dim=-1)


def reference_modulated_embedding(tables, index, gamma, beta, gate_logits=None, modality_mask=None,
                                  sparse=False) -> torch.Tensor:
    """The spec: gather, FiLM per modality, mix with the (masked) softmax gates; autograd backward."""
    tables = _as_table(tables)
    M, _, D = tables.shape
    idx = index.long()
    B = idx.shape[0]
    x = _SparseRows.apply(tables, idx) if sparse else tables[:, idx]          # [M, B, D]
    y = gamma[:, None, :] * x + beta[:, None, :]
    if gate_logits is None:
        logits = tables.new_zeros((B, M))
    else:
        logits = gate_logits.expand(B, M)
    keep = None if modality_mask is None else modality_mask[idx]
    a = _gates(logits, keep).to(tables.dtype)                                  # [B, M]
    return torch.einsum("bm,mbd->bd", a, y)


# -- the kernels ----------------------------------------------------------------------------------
def _emb_ops(backend: str):
    if backend == "triton":
        from ..kernels import modulated_embedding as _tk  # noqa: F401  (registers the ops)

        return (torch.ops.mmcl_fast.modulated_embedding_forward_triton,
                torch.ops.mmcl_fast.modulated_embedding_backward_triton)
    return torch.ops.mmcl_fast.modulated_embedding_forward, torch.ops.mmcl_fast.modulated_embedding_backward


def _emb_setup_context(ctx, inputs, output):
    tables, index, gamma, beta, gate_logits, _ = inputs
    _, gates = output
    ctx.save_for_backward(tables, index, gamma, beta, gates)
    ctx.logits_shape = None if gate_logits is None else tuple(gate_logits.shape)
    ctx.logits_dtype = None if gate_logits is None else gate_logits.dtype


def _emb_grads(ctx, backward_op, grad_out, sparse, want_tables):
    refuse_double_backward(ctx, "modulated_embedding")
    tables, index, gamma, beta, gates = ctx.saved_tensors
    if grad_out is None:
        grad_out = tables.new_zeros((index.shape[0], tables.shape[2]))
    # frozen tables (MoFot's pretrained features): the [M, B, D] values are all the kernel writes,
    # no dense [M, N, D] gradient is made and zeroed for nothing
    gt, ggamma, gbeta, glogits = backward_op(grad_out.contiguous(), tables, index, gamma, beta, gates,
                                             sparse or not want_tables)
    if not want_tables:
        gt = None
    elif sparse:
        gt = _sparse_grad(gt, index, tables.shape)
    if ctx.logits_shape is None:
        glogits = None
    else:
        if len(ctx.logits_shape) == 1:
            glogits = glogits.sum(dim=0)
        glogits = glogits.to(ctx.logits_dtype)
    return gt, ggamma, gbeta, glogits


def _make_emb_backward(backward_op):
    def _backward(ctx, grad_out, grad_gates):
        gt, ggamma, gbeta, glogits = _emb_grads(ctx, backward_op, grad_out, False, ctx.needs_input_grad[0])
        return gt, None, ggamma, gbeta, glogits, None
    return _backward


class _SparseKernelEmbedding(torch.autograd.Function):
    """The kernels' forward with the sparse table gradient (the op's registered autograd formula
    is the dense one; sparse is not an input of the forward op)."""

    @staticmethod
    def forward(ctx, ops, tables, index, gamma, beta, gate_logits, modality_mask):
        out, gates = ops[0](tables, index, gamma, beta, gate_logits, modality_mask)
        _emb_setup_context(ctx, (tables, index, gamma, beta, gate_logits, modality_mask), (out, gates))
        ctx.backward_op = ops[1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gt, ggamma, gbeta, glogits = _emb_grads(ctx, ctx.backward_op, grad_out, True, ctx.needs_input_grad[1])
        return None, gt, None, ggamma, gbeta, glogits, None


def _fake_emb_forward(tables, index, gamma, beta, gate_logits, modality_mask):
    M, _, D = tables.shape
    B = index.shape[0]
    return tables.new_empty((B, D)), tables.new_empty((B, M), dtype=acc_dtype(tables.dtype))


def _fake_emb_backward(grad_out, tables, index, gamma, beta, gates, sparse):
    M, _, D = tables.shape
    gt = tables.new_empty((M, index.shape[0], D)) if sparse else torch.empty_like(tables)
    return gt, torch.empty_like(gamma), torch.empty_like(beta), gates.new_empty(gates.shape)


def _modulated_embedding_kernels(backend, tables, index, gamma, beta, gate_logits, modality_mask, sparse):
    if backend == "triton":
        _register_triton()
    ops = _emb_ops(backend)
    args = (tables.contiguous(), index.long().contiguous(), gamma.contiguous(), beta.contiguous(),
            None if gate_logits is None else gate_logits.contiguous(),
            None if modality_mask is None else modality_mask.contiguous())
    if sparse:
        return _SparseKernelEmbedding.apply(ops, *args)
    out, _ = ops[0](*args)
    return out


def modulated_embedding(tables: Union[torch.Tensor, Sequence[torch.Tensor]], index: torch.Tensor,
                        gamma: torch.Tensor, beta: torch.Tensor, gate_logits: Optional[torch.Tensor] = None,
                        modality_mask: Optional[torch.Tensor] = None, sparse: bool = False) -> torch.Tensor:
    """h_b = sum_m softmax(gate_logits_b)_m (gamma_m * tables[m, index_b] + beta_m) -> [B, D].

    tables [M, N, D] (a list of M [N, D] tables is stacked first: a copy), index [B] (int64/int32),
    gamma/beta [M, D], gate_logits [B, M], [M] or None (uniform), modality_mask [N, M] bool or None
    (a modality an entity lacks leaves its softmax; an entity with none is an error). Gradients for
    tables (only the gathered rows; sparse=True: a sparse COO gradient), gamma, beta, gate_logits.
    """
    if sparse and torch.compiler.is_compiling():
        raise ValueError("sparse=True is not supported under torch.compile (torch.compile cannot trace "
                         "sparse COO tensors): use sparse=False inside compiled code")
    if sparse and isinstance(tables, (list, tuple)):
        raise ValueError("sparse=True needs tables as one [M, N, D] tensor (a sparse gradient cannot "
                         "flow through the stacking of a list)")
    tables = _as_table(tables)
    _check_embedding(tables, index, gamma, beta, gate_logits, modality_mask)
    if gate_logits is not None and gate_logits.dtype != tables.dtype:
        gate_logits = gate_logits.to(tables.dtype)  # e.g. float32 logits over bfloat16 tables
    backend = _backend.choose_backend("modulated_embedding", tables.device, tables.dtype,
                                      gpu_preference=_GPU_PREFERENCE, compiled_op="modulated_embedding_forward")
    if backend == "reference":
        return reference_modulated_embedding(tables, index, gamma, beta, gate_logits, modality_mask, sparse)
    return _modulated_embedding_kernels(backend, tables, index, gamma, beta, gate_logits, modality_mask, sparse)


# -- weight interpolation -----------------------------------------------------------------------------
def _check_list(name: str, xs) -> List[torch.Tensor]:
    if isinstance(xs, torch.Tensor):
        xs = [xs]
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(xs).__name__}")
    for k, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}[{k}] must be a tensor, got {type(x).__name__}")
    return list(xs)


def _check_same_kind(name: str, xs: List[torch.Tensor], like: torch.Tensor) -> None:
    for k, x in enumerate(xs):
        if x.dtype != like.dtype:
            raise TypeError(f"{name}[{k}] is {x.dtype}, expected {like.dtype} like the first tensor")
        if x.device != like.device:
            raise ValueError(f"{name}[{k}] is on {x.device}, expected {like.device} like the first tensor")


def _check_interpolation(prev, new, sigma, i, eps):
    prev, new = _check_list("prev", prev), _check_list("new", new)
    if len(prev) != len(new):
        raise ValueError(f"prev has {len(prev)} tensors but new has {len(new)}")
    K = len(new)
    if not isinstance(sigma, torch.Tensor) or sigma.dim() != 1 or sigma.shape[0] != K:
        raise ValueError(f"sigma must be a 1-D tensor [K] = [{K}], got {shape_str(sigma)}")
    if not sigma.is_floating_point():
        raise TypeError(f"sigma must be floating point, got {sigma.dtype}")
    if isinstance(i, bool) or not isinstance(i, (int, float)) or not math.isfinite(i) or not (i >= 1):
        raise ValueError(f"i (the snapshot number) must be a number >= 1, got {i!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not (eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if K:
        if not new[0].is_floating_point():
            raise TypeError(f"new[0] must be floating point, got {new[0].dtype}")
        _check_same_kind("new", new, new[0])
        _check_same_kind("prev", prev, new[0])
        if sigma.device != new[0].device:
            raise ValueError(f"sigma is on {sigma.device} but new[0] on {new[0].device}")
        for k, (p, w) in enumerate(zip(prev, new)):
            if p.shape != w.shape:
                raise ValueError(f"prev[{k}] is {shape_str(p)} but new[{k}] is {shape_str(w)}")
    return prev, new


def reference_interpolate_weights(prev, new, sigma, i, eps=1e-12) -> List[torch.Tensor]:
    """The spec: (1 - 1/i) prev_k + (1/i) sigma_k new_k / max(||new_k||_F, eps), by autograd."""
    c = 1.0 / float(i)
    out = []
    for k, (p, w) in enumerate(zip(prev, new)):
        n = torch.linalg.vector_norm(w.to(acc_dtype(w.dtype))).clamp_min(eps)
        out.append(((1 - c) * p + (c * sigma[k].to(n.dtype) / n) * w).to(w.dtype))
    return out


def _interp_ops(backend: str):
    if backend == "triton":
        from ..kernels import modulated_embedding as _tk  # noqa: F401

        return (torch.ops.mmcl_fast.interpolate_weights_forward_triton,
                torch.ops.mmcl_fast.interpolate_weights_backward_triton)
    return torch.ops.mmcl_fast.interpolate_weights_forward, torch.ops.mmcl_fast.interpolate_weights_backward


def _interp_setup_context(ctx, inputs, output):
    prev, new, sigma, i, eps = inputs
    _, norms = output
    ctx.save_for_backward(sigma, norms, *new)
    ctx.i, ctx.eps = i, eps
    ctx.prev_grad = any(p.requires_grad for p in prev)


def _make_interp_backward(backward_op):
    def _backward(ctx, grad_outs, grad_norms):
        refuse_double_backward(ctx, "interpolate_weights")
        sigma, norms, *new = ctx.saved_tensors
        grads = [torch.zeros_like(w) if g is None else g.contiguous() for g, w in zip(grad_outs, new)]
        grad_new, grad_sigma = backward_op(grads, new, sigma, norms, ctx.i, ctx.eps)
        # a list input takes a list of gradients (None entries), not one None
        grad_prev = list(torch._foreach_mul(grads, 1.0 - 1.0 / ctx.i)) if ctx.prev_grad else [None] * len(new)
        return grad_prev, list(grad_new), grad_sigma, None, None
    return _backward


def _fake_interp_forward(prev, new, sigma, i, eps):
    return [torch.empty_like(w) for w in new], sigma.new_empty((len(new),))


def _fake_interp_backward(grad_out, new, sigma, norms, i, eps):
    return [torch.empty_like(w) for w in new], sigma.new_empty((len(new),))


def interpolate_weights(prev: Sequence[torch.Tensor], new: Sequence[torch.Tensor], sigma: torch.Tensor,
                        i: Union[int, float], eps: float = 1e-12) -> List[torch.Tensor]:
    """W_eff_k = (1 - 1/i) prev_k + (1/i) sigma_k new_k / max(||new_k||_F, eps) for every k, in one
    multi-tensor op with its backward (gradients for new, sigma, and prev when it requires them).

    prev, new: lists of K tensors (same shape pairwise, one dtype and device); sigma [K]; i >= 1 the
    snapshot number (i = 1 gives sigma_k new_k / ||new_k||).
    """
    prev, new = _check_interpolation(prev, new, sigma, i, eps)
    if not new:
        return []
    backend = _backend.choose_backend("interpolate_weights", new[0].device, new[0].dtype,
                                      gpu_preference=_GPU_PREFERENCE, compiled_op="interpolate_weights_forward")
    if backend == "reference":
        return reference_interpolate_weights(prev, new, sigma, i, eps)
    if backend == "triton":
        _register_triton()
    fwd, _ = _interp_ops(backend)
    s = sigma.to(acc_dtype(new[0].dtype)).contiguous()
    outs, _ = fwd([p.contiguous() for p in prev], [w.contiguous() for w in new], s, float(i), float(eps))
    return list(outs)


# -- anchor penalty ---------------------------------------------------------------------------------
def _check_anchor(params, anchors, weights):
    params, anchors = _check_list("params", params), _check_list("anchors", anchors)
    if len(params) != len(anchors):
        raise ValueError(f"params has {len(params)} tensors but anchors has {len(anchors)}")
    if weights is None or (isinstance(weights, (int, float)) and not isinstance(weights, bool)):
        weights = [weights] * len(params)
    elif isinstance(weights, torch.Tensor):
        if len(params) != 1:
            raise ValueError("one weight tensor for several params is ambiguous: pass a list, one entry per param")
        weights = [weights]
    if not isinstance(weights, (list, tuple)) or len(weights) != len(params):
        raise ValueError(f"weights must be None, a number, or a list of {len(params)} entries "
                         f"(None, a number or a tensor), got {type(weights).__name__}"
                         + (f" of length {len(weights)}" if isinstance(weights, (list, tuple)) else ""))
    if params:
        if not params[0].is_floating_point():
            raise TypeError(f"params[0] must be floating point, got {params[0].dtype}")
        _check_same_kind("params", params, params[0])
        _check_same_kind("anchors", anchors, params[0])
    out_w = []
    for k, (p, a, w) in enumerate(zip(params, anchors, weights)):
        if a.shape != p.shape:
            raise ValueError(f"anchors[{k}] is {shape_str(a)} but params[{k}] is {shape_str(p)}")
        if w is None:
            out_w.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, (int, float, torch.Tensor)):
            raise TypeError(f"weights[{k}] must be None, a number or a tensor, got {type(w).__name__}")
        if not isinstance(w, torch.Tensor):
            if not math.isfinite(w):
                raise ValueError(f"weights[{k}] must be finite, got {w!r}")
            w = torch.tensor(float(w), dtype=p.dtype, device=p.device)
        elif w.dtype != p.dtype or w.device != p.device:
            if w.device != p.device:
                raise ValueError(f"weights[{k}] is on {w.device} but params[{k}] on {p.device}")
            w = w.to(p.dtype)
        per_row = p.dim() >= 1 and w.dim() == 1 and w.shape[0] == p.shape[0]
        if not (w.numel() == 1 or per_row or w.shape == p.shape):
            raise ValueError(f"weights[{k}] must have one element, one per row ([{p.shape[0] if p.dim() else 1}]) "
                             f"or params[{k}]'s shape {shape_str(p)}, got {shape_str(w)}")
        out_w.append(w.detach())
    return params, [a.detach() for a in anchors], out_w


def _expand_weight(w: Optional[torch.Tensor], p: torch.Tensor) -> Optional[torch.Tensor]:
    """w broadcastable against p: a 0-d scalar, p's shape, or a per-row column [rows, 1, ...]."""
    if w is None or w.shape == p.shape:
        return w
    if w.numel() == 1:
        return w.reshape(())
    return w.reshape((-1,) + (1,) * (p.dim() - 1))


def reference_anchor_penalty(params, anchors, weights=None, lam=1.0) -> torch.Tensor:
    """The spec: lam * sum_k sum w_k (p_k - a_k)^2 in the accumulation dtype, by autograd."""
    params, anchors, weights = _check_anchor(params, anchors, weights)
    dt = acc_dtype(params[0].dtype) if params else torch.float32
    total = torch.zeros((), dtype=dt, device=params[0].device if params else None)
    for p, a, w in zip(params, anchors, weights):
        d2 = (p.to(dt) - a.to(dt)) ** 2
        w = _expand_weight(w, p)
        total = total + (d2 if w is None else w.to(dt) * d2).sum()
    return lam * total


def _anchor_ops(backend: str):
    if backend == "triton":
        from ..kernels import modulated_embedding as _tk  # noqa: F401

        return (torch.ops.mmcl_fast.anchor_penalty_forward_triton,
                torch.ops.mmcl_fast.anchor_penalty_backward_triton)
    return torch.ops.mmcl_fast.anchor_penalty_forward, torch.ops.mmcl_fast.anchor_penalty_backward


def _anchor_setup_context(ctx, inputs, output):
    params, anchors, weights = inputs
    ctx.K = len(params)
    ctx.has_w = [w is not None for w in weights]
    ctx.save_for_backward(*params, *anchors, *[w for w in weights if w is not None])


def _make_anchor_backward(backward_op):
    def _backward(ctx, grad):
        refuse_double_backward(ctx, "anchor_penalty")
        saved = ctx.saved_tensors
        K = ctx.K
        params, anchors, ws = list(saved[:K]), list(saved[K:2 * K]), iter(saved[2 * K:])
        weights = [next(ws) if h else None for h in ctx.has_w]
        grads = backward_op(grad.contiguous(), params, anchors, weights)
        # torch.library's structure check takes a list holding a None as one leaf (one None), a
        # list of tensors as a list (a list of Nones)
        no_grad_weights = None if not all(ctx.has_w) else [None] * K
        return list(grads), [None] * K, no_grad_weights
    return _backward


def _fake_anchor_forward(params, anchors, weights):
    dt = acc_dtype(params[0].dtype) if params else torch.float32
    return params[0].new_empty((len(params),), dtype=dt)


def _fake_anchor_backward(grad, params, anchors, weights):
    return [torch.empty_like(p) for p in params]


def anchor_penalty(params, anchors, weights=None, lam: float = 1.0) -> torch.Tensor:
    """lam * sum_k sum w_k (p_k - a_k)^2 (LKGE's per-row weights, EWC's per-element Fisher), a
    differentiable scalar (float32; float64 for float64 params) with gradient 2 lam w (p - a).

    params, anchors: a tensor or lists of K tensors; weights: None (1), a number, a tensor (K = 1)
    or a list of K entries, each None, a number, a per-row [rows] or a per-element tensor.
    """
    params, anchors, weights = _check_anchor(params, anchors, weights)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam must be a real number, got {lam!r}")
    if not params:
        return torch.zeros(())
    backend = _backend.choose_backend("anchor_penalty", params[0].device, params[0].dtype,
                                      gpu_preference=_GPU_PREFERENCE, compiled_op="anchor_penalty_forward")
    if backend == "reference":
        return reference_anchor_penalty(params, anchors, weights, lam)
    if backend == "triton":
        _register_triton()
    fwd, _ = _anchor_ops(backend)
    sums = fwd([p.contiguous() for p in params], [a.contiguous() for a in anchors],
               [None if w is None else w.contiguous() for w in weights])
    return lam * sums.sum()


# -- registration -----------------------------------------------------------------------------------
_FAKES = {
    "modulated_embedding_forward": _fake_emb_forward,
    "modulated_embedding_backward": _fake_emb_backward,
    "interpolate_weights_forward": _fake_interp_forward,
    "interpolate_weights_backward": _fake_interp_backward,
    "anchor_penalty_forward": _fake_anchor_forward,
    "anchor_penalty_backward": _fake_anchor_backward,
}
_AUTOGRAD = {
    "modulated_embedding": (_make_emb_backward, _emb_setup_context),
    "interpolate_weights": (_make_interp_backward, _interp_setup_context),
    "anchor_penalty": (_make_anchor_backward, _anchor_setup_context),
}


def _register() -> None:
    """Fake kernels and autograd formulas of the C++ ops; the Triton ops' too where Triton can run
    (registered at import: torch.compile cannot trace a registration made on first use)."""
    if not _backend.why_not("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                            torch.float32):
        _register_triton()
    if not _backend.extension_loaded() or not has_op("modulated_embedding_forward"):
        return
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"mmcl_fast::{name}")(fake)
    for name, (make_backward, setup) in _AUTOGRAD.items():
        torch.library.register_autograd(f"mmcl_fast::{name}_forward",
                                        make_backward(getattr(torch.ops.mmcl_fast, f"{name}_backward")),
                                        setup_context=setup)


_TRITON_REGISTERED = False


def _register_triton() -> None:
    global _TRITON_REGISTERED
    if _TRITON_REGISTERED:
        return
    from ..kernels import modulated_embedding as _tk  # noqa: F401  (defines the ops and their fakes)

    for name, (make_backward, setup) in _AUTOGRAD.items():
        torch.library.register_autograd(f"mmcl_fast::{name}_forward_triton",
                                        make_backward(getattr(torch.ops.mmcl_fast, f"{name}_backward_triton")),
                                        setup_context=setup)
    _TRITON_REGISTERED = True


_register()
