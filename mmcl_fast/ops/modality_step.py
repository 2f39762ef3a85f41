"""Op family A: per-modality gradient-modulated optimizer steps (DESIGN.md section 4).

Public functions (names fixed by DESIGN.md):
    modality_scores(logits, target, ignore_index=-100) -> Tensor[M]
    modulation_coefficients(scores, alpha) -> Tensor[M]
    split_head_logits(features, weight, bias) -> Tensor[M, N, C]
    modality_adamw_(...), modality_sgd_(...)      the fused multi-tensor steps (in place)
    modality_adamw_rows_(...)                     the row-sparse (lazy) AdamW step of one
                                                  parameter (in place; sparse embedding gradients)
    sparse_grad_rows(grad)                        a sparse COO gradient as that step's (rows,
                                                  grad_rows)

The maths of the step, per tensor p of a group of modality m (k = 1 when the group has none):
    sigma = unbiased std of the unscaled gradient g        (when noise is on; 0 for numel < 2)
    g'    = k_m * g + sigma * eps + 2*lambda*w*(p - anchor)  (eps: Philox noise, see philox_normal)
then torch.optim.AdamW / torch.optim.SGD's own update with g' in place of g. The functions
`_reference_adamw_`, `_reference_sgd_` and `_reference_adamw_rows_` below are that spec in plain
PyTorch; the C++, CUDA and Triton kernels are tested against them.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Union

import torch

from .. import backend as _backend
from ._util import acc_dtype, checking_values, has_op

# --------------------------------------------------------------------------------------------
# 4.1 Scores and coefficients
# --------------------------------------------------------------------------------------------


def modality_scores(
    logits: Union[torch.Tensor, Sequence[torch.Tensor]],
    target: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Contribution score of each modality: s_m = sum_{i: y_i != ignore} softmax(z_m,i)[y_i].

    `logits` is Tensor[M, N, C] or a sequence of M tensors [N, C] (token-level logits [B, T, C]
    may be passed and are flattened); `target` holds N class ids (any shape with N elements).
    Computed in float32 (or float64 for float64 logits); no host synchronisation.
    """
    if isinstance(logits, torch.Tensor):
        if logits.dim() < 3:
            raise ValueError(f"logits must be [M, N, C] or a list of [N, C], got shape {tuple(logits.shape)}")
        z = logits.reshape(logits.shape[0], -1, logits.shape[-1])
    else:
        parts = list(logits)
        if len(parts) == 0:
            raise ValueError("logits must hold at least one modality")
        if any(not isinstance(t, torch.Tensor) for t in parts):
            raise TypeError("logits must be a Tensor or a sequence of Tensors")
        shapes = {(t.numel() // t.shape[-1], t.shape[-1]) if t.dim() > 0 else None for t in parts}
        if None in shapes or len(shapes) != 1:
            raise ValueError(f"logits: every modality needs the same [N, C], got {[tuple(t.shape) for t in parts]}")
        z = torch.stack([t.reshape(-1, t.shape[-1]) for t in parts])
    if not z.is_floating_point():
        raise TypeError(f"logits must be floating point, got {z.dtype}")
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError("target must be an integer tensor of class ids")
    y = target.reshape(-1)
    if y.numel() != z.shape[1]:
        raise ValueError(f"target has {y.numel()} elements but logits have N={z.shape[1]}")
    if y.device != z.device:
        raise ValueError(f"target is on {y.device} but logits are on {z.device}")
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    valid = y != ignore_index
    safe = torch.where(valid, y, torch.zeros_like(y)).long()
    p = torch.softmax(z.to(acc), dim=-1)
    picked = p.gather(-1, safe.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(-1)
    return (picked * valid.to(acc)).sum(dim=1)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, torch.Tensor):
        raise TypeError("alpha must be a Python number (a tensor would need a host sync to check)")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    return alpha


def modulation_coefficients(scores: torch.Tensor, alpha: float, eps: float = 1e-12) -> torch.Tensor:
    """OGM-GE coefficients generalised to M >= 2 modalities.

        rho_m = s_m / ((sum_{n != m} s_n) / (M - 1))     (denominator clamped at eps)
        k_m   = 1 - tanh(alpha * rho_m)   if rho_m > 1,   else 1

    For M = 2 this is OGM-GE's rule (the dominant modality gets 1 - tanh(alpha * ratio)); at an
    exact tie both get 1 (the OGM-GE code, by its if/else, would damp the second modality there).
    Stays on the device: no host synchronisation.
    """
    alpha = _check_alpha(alpha)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError("scores must be a 1-D tensor with one score per modality")
    if scores.numel() < 2:
        raise ValueError(f"scores needs at least 2 modalities, got {scores.numel()}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    s = scores.detach().to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    m = s.numel()
    others = (s.sum() - s) / (m - 1)
    rho = s / others.clamp_min(eps)
    damped = 1.0 - torch.tanh(alpha * rho)
    return torch.where(rho > 1.0, damped, torch.ones_like(rho))


def split_head_logits(features: Sequence[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Unimodal logits of a fusion head on concatenated features: z_m = h_m W_m^T + b / M.

    `weight` is [C, sum_m D_m] (a Linear on [h_1 ... h_M]), `bias` [C] or None; returns [M, N, C].
    """
    feats = list(features)
    if len(feats) < 1:
        raise ValueError("features must hold at least one modality")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [C, sum D_m], got {tuple(weight.shape)}")
    n = feats[0].shape[0]
    for i, h in enumerate(feats):
        if h.dim() != 2 or h.shape[0] != n:
            raise ValueError(f"features[{i}] must be [N, D_m] with N={n}, got {tuple(h.shape)}")
    widths = [h.shape[1] for h in feats]
    if sum(widths) != weight.shape[1]:
        raise ValueError(f"features widths {widths} sum to {sum(widths)} but weight has {weight.shape[1]} columns")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    parts = torch.split(weight, widths, dim=1)
    out = []
    for h, w in zip(feats, parts):
        z = h @ w.t()
        if bias is not None:
            z = z + bias / len(feats)
        out.append(z)
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# Counter-based noise, the reference form (csrc/philox.h has the same maths)
# --------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a uint32 constant and an int64 tensor of uint32s,
    split in 16-bit halves so that no product overflows int64."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(c0: torch.Tensor, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values (Random123's constants)."""
    c1 = torch.as_tensor(c1, dtype=torch.int64, device=c0.device).expand_as(c0)
    c2 = torch.as_tensor(c2, dtype=torch.int64, device=c0.device).expand_as(c0)
    c3 = torch.as_tensor(c3, dtype=torch.int64, device=c0.device).expand_as(c0)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(0xD2511F53, c0)
        hi1, lo1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def philox_normal(seed: int, step: int, tensor_id: int, numel: int, device=None) -> torch.Tensor:
    """The standard normal noise of one tensor: element e of tensor `tensor_id` at `step`.

    Philox key (seed_lo, seed_hi), counter (e//4 lo, e//4 hi, tensor_id, step); lanes 0,1 and 2,3
    of each group are Box-Muller pairs of 24-bit uniforms ((x >> 8) + 0.5) / 2^24.
    """
    seed &= (1 << 64) - 1
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    x = philox4x32_10(g & _MASK32, g >> 32, tensor_id & _MASK32, step & _MASK32, seed & _MASK32, seed >> 32)
    u = [((xi >> 8).to(torch.float32) + 0.5) * 2.0**-24 for xi in x]
    r01 = torch.sqrt(-2.0 * torch.log(u[0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[2]))
    th01 = 2.0 * math.pi * u[1]
    th23 = 2.0 * math.pi * u[3]
    z = torch.stack([r01 * torch.cos(th01), r01 * torch.sin(th01), r23 * torch.cos(th23), r23 * torch.sin(th23)], dim=1)
    return z.reshape(-1)[:numel]


# --------------------------------------------------------------------------------------------
# The reference (the spec) of the fused steps
# --------------------------------------------------------------------------------------------


def _modulated_grad(p, g, coefficients, modality, noise, seed, noise_step, tensor_id, anchor, anchor_weight, anchor_lambda):
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    g32 = g.to(acc)
    if modality >= 0:
        g_mod = coefficients[modality].to(acc) * g32
    else:
        g_mod = g32.clone()
    if noise and modality >= 0:
        sigma = g32.std() if g32.numel() > 1 else torch.zeros((), dtype=acc, device=g.device)
        eps = philox_normal(seed, noise_step, tensor_id, g.numel(), device=g.device).to(acc)
        g_mod = g_mod + sigma * eps.view_as(g32)
    if anchor is not None and anchor_lambda != 0.0:
        flat = g_mod.reshape(-1)
        n_a = anchor.numel()
        diff = p.reshape(-1)[:n_a].to(acc) - anchor.reshape(-1).to(acc)
        if anchor_weight is not None:
            w = anchor_weight.reshape(-1).to(acc)
            w = w.repeat_interleave(n_a // w.numel()) if w.numel() not in (1, n_a) else w
            diff = w * diff
        flat = torch.cat([flat[:n_a] + 2.0 * anchor_lambda * diff, flat[n_a:]])
        g_mod = flat.view_as(g32)
    return g_mod


def _reference_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, coefficients, modality, lr, beta1, beta2, eps, weight_decay, noise, seed, noise_step, tensor_ids, anchors, anchor_weights, anchor_lambda):
    amsgrad = len(max_exp_avg_sqs) > 0
    for i, p in enumerate(params):
        anchor = anchors[i] if anchors else None
        weight = anchor_weights[i] if anchor_weights else None
        tid = tensor_ids[i] if tensor_ids else i
        g = _modulated_grad(p, grads[i], coefficients, modality, noise, seed, noise_step, tid, anchor, weight, anchor_lambda)
        acc = g.dtype
        vmax = max_exp_avg_sqs[i].to(acc) if amsgrad else None
        pa, m, v, vmax = _adamw_update(p.to(acc), g, exp_avgs[i].to(acc), exp_avg_sqs[i].to(acc), vmax,
                                       steps[i], lr, beta1, beta2, eps, weight_decay)
        if amsgrad:
            max_exp_avg_sqs[i].copy_(vmax)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        p.copy_(pa)


def _adamw_update(p, g, m, v, vmax, step, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.AdamW's arithmetic on values in the accumulation dtype -> (p, m, v, vmax)."""
    p = p * (1 - lr * weight_decay)
    m = m.lerp(g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    bc1 = 1 - beta1 ** step
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    if vmax is not None:
        vmax = torch.maximum(vmax, v)
    denom = (v if vmax is None else vmax).sqrt() / bc2_sqrt + eps
    return p - (lr / bc1) * m / denom, m, v, vmax


def _reference_adamw_rows_(param, rows, grad_rows, exp_avg, exp_avg_sq, step, coefficients, modality, lr, beta1, beta2, eps, weight_decay, anchor, anchor_weight, anchor_lambda):
    """The row-sparse step: for each listed row r (distinct ids), with row i of grad_rows its gradient,
        g  = k * grad_rows[i]                                   (k = coefficients[modality]; 1 if -1)
        g += 2 * lambda * w_r * (p_r - anchor_r)                 only if r < anchor rows
    then AdamW's update of p_r, m_r, v_r with g (bias corrections from `step`, the parameter's
    count). Rows not listed are neither read nor written (lazy Adam, torch.optim.SparseAdam's
    semantics, with decoupled weight decay on the listed rows only)."""
    acc = acc_dtype(param.dtype)
    g = grad_rows.to(acc)
    if modality >= 0:
        g = coefficients[modality].to(acc) * g
    p = param.index_select(0, rows).to(acc)
    if anchor is not None and anchor_lambda != 0.0 and anchor.shape[0] > 0:
        n_a = anchor.shape[0]
        old = (rows < n_a).view(-1, *[1] * (p.dim() - 1))
        safe = torch.where(rows < n_a, rows, 0)  # rows past the anchor read row 0, masked below
        diff = p - anchor.index_select(0, safe).to(acc)
        if anchor_weight is not None:
            w = anchor_weight.reshape(-1).to(acc)
            if w.numel() == anchor.numel():  # per element
                w = w.view(anchor.shape).index_select(0, safe)
            elif w.numel() == n_a:  # per row
                w = w.index_select(0, safe).view(-1, *[1] * (p.dim() - 1))
            diff = w * diff  # (a scalar broadcasts)
        g = torch.where(old, g + 2.0 * anchor_lambda * diff, g)
    m, v = exp_avg.index_select(0, rows).to(acc), exp_avg_sq.index_select(0, rows).to(acc)
    p, m, v, _ = _adamw_update(p, g, m, v, None, step, lr, beta1, beta2, eps, weight_decay)
    exp_avg.index_copy_(0, rows, m.to(exp_avg.dtype))
    exp_avg_sq.index_copy_(0, rows, v.to(exp_avg_sq.dtype))
    param.index_copy_(0, rows, p.to(param.dtype))


def _reference_sgd_(params, grads, momentum_buffers, first_step, coefficients, modality, lr, momentum, dampening, weight_decay, nesterov, noise, seed, noise_step, tensor_ids, anchors, anchor_weights, anchor_lambda):
    for i, p in enumerate(params):
        anchor = anchors[i] if anchors else None
        weight = anchor_weights[i] if anchor_weights else None
        tid = tensor_ids[i] if tensor_ids else i
        g = _modulated_grad(p, grads[i], coefficients, modality, noise, seed, noise_step, tid, anchor, weight, anchor_lambda)
        pa = p.to(g.dtype)
        d = g + weight_decay * pa
        if momentum_buffers:
            buf = d if first_step[i] else momentum * momentum_buffers[i].to(g.dtype) + (1 - dampening) * d
            momentum_buffers[i].copy_(buf)
            d = d + momentum * buf if nesterov else buf
        p.copy_(pa - lr * d)


# --------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------


def _finite(name: str, value) -> float:
    if isinstance(value, torch.Tensor) or not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_tensor_list(name: str, tensors, params) -> List[torch.Tensor]:
    tensors = list(tensors)
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} tensors but params has {len(params)}")
    for i, (t, p) in enumerate(zip(tensors, params)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor")
        if t.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, params[{i}] has {tuple(p.shape)}")
        if t.device != p.device:
            raise ValueError(f"{name}[{i}] is on {t.device}, params[{i}] on {p.device}")
    return tensors


def _check_params(params) -> List[torch.Tensor]:
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] must be floating point, got {p.dtype}")
        if p.device != params[0].device:
            raise ValueError(f"params are on different devices: params[0] on {params[0].device}, params[{i}] on {p.device}")
        if p.dtype != params[0].dtype:
            raise TypeError(f"params must share one dtype per call: params[0] is {params[0].dtype}, params[{i}] is {p.dtype}")
    return params


def _check_anchors(anchors, anchor_weights, params):
    if not anchors:
        if anchor_weights:
            raise ValueError("anchor_weights given without anchors")
        return [], []
    anchors = list(anchors)
    if len(anchors) != len(params):
        raise ValueError(f"anchors has {len(anchors)} entries but params has {len(params)}")
    weights = list(anchor_weights) if anchor_weights else [None] * len(params)
    if len(weights) != len(params):
        raise ValueError(f"anchor_weights has {len(weights)} entries but params has {len(params)}")
    out = [_check_anchor(a, w, p, f"anchors[{i}]", f"anchor_weights[{i}]", f"params[{i}]")
           for i, (a, w, p) in enumerate(zip(anchors, weights, params))]
    return [a for a, _ in out], [w for _, w in out]


def _check_anchor(a, w, p, a_name: str, w_name: str, p_name: str):
    """(anchor, weight) checked against parameter p and converted to its dtype, contiguous; the
    weight (a number, or a tensor: scalar, per anchor row or per element) flattened."""
    if a is None:
        if w is not None:
            raise ValueError(f"{w_name} given without {a_name}")
        return None, None
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{a_name} must be a Tensor, got {type(a).__name__}")
    if a.device != p.device:
        raise ValueError(f"{a_name} is on {a.device}, {p_name} on {p.device}")
    rows_ok = a.dim() == p.dim() and a.dim() >= 1 and a.shape[1:] == p.shape[1:] and a.shape[0] <= p.shape[0]
    if not (a.shape == p.shape or rows_ok):
        raise ValueError(f"{a_name} must have the parameter's shape {tuple(p.shape)} or its first rows, got {tuple(a.shape)}")
    a = a.detach().to(p.dtype).contiguous()
    if w is None:
        return a, None
    if not isinstance(w, torch.Tensor):
        w = torch.tensor(float(w), dtype=p.dtype, device=p.device)
    if w.device != p.device:
        raise ValueError(f"{w_name} is on {w.device}, {p_name} on {p.device}")
    rows = a.shape[0] if a.dim() >= 1 else 1
    if not (w.numel() == 1 or (w.dim() == 1 and w.numel() == rows) or w.shape == a.shape):
        raise ValueError(f"{w_name} must be a scalar, [{rows}] (per row) or {tuple(a.shape)} (per element), got {tuple(w.shape)}")
    return a, w.detach().to(p.dtype).reshape(-1).contiguous()


def _check_coefficients(coefficients, modality, params) -> torch.Tensor:
    device = params[0].device
    if coefficients is None:
        if modality >= 0:
            raise ValueError("coefficients is None but modality >= 0")
        return torch.ones(1, dtype=torch.float32, device=device)
    if not isinstance(coefficients, torch.Tensor) or coefficients.dim() != 1:
        raise ValueError("coefficients must be a 1-D tensor with one coefficient per modality")
    if not coefficients.is_floating_point():
        raise TypeError(f"coefficients must be floating point, got {coefficients.dtype}")
    if coefficients.device != device:
        raise ValueError(f"coefficients is on {coefficients.device}, params on {device}")
    if modality >= coefficients.numel():
        raise ValueError(f"modality index {modality} out of range for {coefficients.numel()} coefficients")
    return coefficients.detach().to(torch.float32).contiguous()


def _common(params, grads, coefficients, modality, tensor_ids, anchors, anchor_weights, seed, noise_step):
    params = _check_params(params)
    if not params:
        return [], [], None, [], [], []
    grads = [g.detach() for g in _check_tensor_list("grads", grads, params)]
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] is {g.dtype}, params[{i}] is {p.dtype}")
        if g.is_sparse:
            raise TypeError(f"grads[{i}] is sparse; the fused step takes dense gradients")
    if not isinstance(modality, int) or isinstance(modality, bool):
        raise TypeError("modality must be an int (-1: no modality)")
    coefficients = _check_coefficients(coefficients, modality, params)
    tensor_ids = list(range(len(params))) if tensor_ids is None else [int(t) for t in tensor_ids]
    if len(tensor_ids) != len(params):
        raise ValueError(f"tensor_ids has {len(tensor_ids)} entries but params has {len(params)}")
    anchors, anchor_weights = _check_anchors(anchors, anchor_weights, params)
    if not isinstance(seed, int) or isinstance(seed, bool) or not isinstance(noise_step, int) or isinstance(noise_step, bool):
        raise TypeError("seed and noise_step must be ints")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params holds the same tensor twice")
    # Philox uses 32 bits of the tensor id (and of noise_step): keep them in range of the schema
    tensor_ids = [t & _MASK32 for t in tensor_ids]
    return params, grads, coefficients, tensor_ids, anchors, anchor_weights


def _seed64(seed: int) -> int:
    """Any Python int as the signed int64 the schema takes, with the same 64 bits (the kernels and
    the reference read it as unsigned)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def validate_adamw_args(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=(), steps=None, *,
    coefficients: Optional[torch.Tensor] = None, modality: int = -1,
    lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 1e-2, noise: bool = False, seed: int = 0, noise_step: int = 0,
    tensor_ids: Optional[Sequence[int]] = None, anchors=None, anchor_weights=None,
    anchor_lambda: float = 0.0,
) -> Optional[tuple]:
    """The checked positional arguments of the AdamW op (None when there is nothing to do);
    a clear error naming the argument for anything wrong, before any tensor is touched."""
    params, grads, coefficients, tensor_ids, anchors, anchor_weights = _common(params, grads, coefficients, modality, tensor_ids, anchors, anchor_weights, seed, noise_step)
    if not params:
        return None
    exp_avgs = _check_tensor_list("exp_avgs", exp_avgs, params)
    exp_avg_sqs = _check_tensor_list("exp_avg_sqs", exp_avg_sqs, params)
    max_exp_avg_sqs = _check_tensor_list("max_exp_avg_sqs", max_exp_avg_sqs, params) if len(max_exp_avg_sqs) else []
    steps = [1.0] * len(params) if steps is None else [float(s) for s in steps]
    if len(steps) != len(params) or not all(math.isfinite(s) and s >= 1 for s in steps):
        raise ValueError("steps must hold one finite count >= 1 per parameter")
    lr, beta1, beta2, eps, weight_decay, anchor_lambda = (_finite(n, v) for n, v in (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay), ("anchor_lambda", anchor_lambda)))
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got ({beta1}, {beta2})")
    return (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, coefficients, modality, lr, beta1, beta2, eps, weight_decay, bool(noise), _seed64(seed), noise_step & _MASK32, tensor_ids, anchors, anchor_weights, anchor_lambda)


def validate_sgd_args(
    params, grads, momentum_buffers=(), first_step=None, *,
    coefficients: Optional[torch.Tensor] = None, modality: int = -1,
    lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
    nesterov: bool = False, noise: bool = False, seed: int = 0, noise_step: int = 0,
    tensor_ids: Optional[Sequence[int]] = None, anchors=None, anchor_weights=None,
    anchor_lambda: float = 0.0,
) -> Optional[tuple]:
    """The checked positional arguments of the SGD op (None when there is nothing to do)."""
    params, grads, coefficients, tensor_ids, anchors, anchor_weights = _common(params, grads, coefficients, modality, tensor_ids, anchors, anchor_weights, seed, noise_step)
    if not params:
        return None
    momentum_buffers = _check_tensor_list("momentum_buffers", momentum_buffers, params) if len(momentum_buffers) else []
    if momentum != 0 and not momentum_buffers:
        raise ValueError("momentum_buffers must hold one buffer per parameter when momentum != 0")
    first_step = [0] * len(params) if first_step is None else [int(bool(f)) for f in first_step]
    if len(first_step) != len(params):
        raise ValueError(f"first_step has {len(first_step)} entries but params has {len(params)}")
    lr, momentum, dampening, weight_decay, anchor_lambda = (_finite(n, v) for n, v in (("lr", lr), ("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay), ("anchor_lambda", anchor_lambda)))
    return (params, grads, momentum_buffers, first_step, coefficients, modality, lr, momentum, dampening, weight_decay, bool(nesterov), bool(noise), _seed64(seed), noise_step & _MASK32, tensor_ids, anchors, anchor_weights, anchor_lambda)


def _check_like(name: str, t, param: torch.Tensor, shape) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got {t.layout}")
    if t.dtype != param.dtype:
        raise TypeError(f"{name} is {t.dtype}, param is {param.dtype}")
    if t.device != param.device:
        raise ValueError(f"{name} is on {t.device}, param on {param.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def check_row_ids(rows: torch.Tensor, num_rows: int) -> None:
    """Row ids in [0, num_rows) and distinct, else a ValueError naming rows: data-dependent (one
    host sync), so only when value checks are on (eager mode)."""
    if not checking_values() or rows.numel() == 0:
        return
    ids = rows.sort().values
    lo, hi, dup = torch.stack([ids[0], ids[-1], (ids[1:] == ids[:-1]).any().long()]).tolist()
    if lo < 0 or hi >= num_rows:
        bad = lo if lo < 0 else hi
        raise ValueError(f"rows holds the id {bad}, out of range for a parameter of {num_rows} rows")
    if dup:
        raise ValueError("rows holds duplicated row ids (coalesce the sparse gradient first: its rows must be distinct)")


def sparse_grad_rows(grad: torch.Tensor):
    """(rows, grad_rows, sparse_dim) of a sparse COO gradient, as modality_adamw_rows_ takes them:
    the distinct entries of its sparse dimensions as flat row ids (sorted) and the summed values of
    each, [U, *shape[sparse_dim:]]. For sparse_dim > 1 the rows are those of the parameter viewed as
    [prod(shape[:sparse_dim]), *shape[sparse_dim:]]. An uncoalesced gradient (nn.Embedding's, or
    one after DDP's all-reduce) is coalesced: torch's sort-based coalesce() sums duplicates in a
    fixed order on every device (index_add_ was 2x faster on an idle CPU but 15x slower when
    another process shared the cores, and its GPU atomics sum in no fixed order)."""
    sparse_dim = grad.sparse_dim()
    if sparse_dim == 1 and not grad.is_coalesced():
        # a gradient built coalesced (rows sorted and distinct, e.g. mmcl_fast.nn.MultimodalKGE's) is
        # marked uncoalesced again by autograd's accumulation: one comparison (tens of microseconds)
        # spares the sort of coalesce() (2.4 ms for 10k rows of 200 here)
        idx = grad._indices()[0]
        if idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all()):
            return idx, grad._values(), 1
    grad = grad.coalesce()  # a no-op when already coalesced
    idx = grad.indices()
    rows = idx[0]
    for d in range(1, sparse_dim):
        rows = rows * grad.shape[d] + idx[d]
    return rows, grad.values(), sparse_dim


def validate_adamw_rows_args(
    param, rows, grad_rows, exp_avg, exp_avg_sq, step, *,
    coefficients: Optional[torch.Tensor] = None, modality: int = -1,
    lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 1e-2, anchor: Optional[torch.Tensor] = None, anchor_weight=None,
    anchor_lambda: float = 0.0, amsgrad: bool = False, noise: bool = False,
) -> Optional[tuple]:
    """The checked positional arguments of the row-sparse AdamW op (None when no row is listed); a
    clear error naming the argument for anything wrong, before any tensor is touched."""
    if amsgrad:
        raise ValueError("amsgrad is not supported by the row-sparse step (a lazy max of v is not "
                         "torch's amsgrad); use a dense gradient for this parameter")
    if noise:
        raise ValueError("noise is not supported by the row-sparse step (GE noise is dense: it acts "
                         "on every element); use a dense gradient for this parameter")
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param must be a Tensor, got {type(param).__name__}")
    if not param.is_floating_point():
        raise TypeError(f"param must be floating point, got {param.dtype}")
    if param.dim() < 1:
        raise ValueError("param must have a row dimension (at least 1-D), got a 0-d tensor")
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows must be a Tensor, got {type(rows).__name__}")
    if rows.dtype != torch.int64:
        raise TypeError(f"rows must be int64 row ids, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"rows must be 1-D, got shape {list(rows.shape)}")
    if rows.device != param.device:
        raise ValueError(f"rows is on {rows.device}, param on {param.device}")
    _check_like("grad_rows", grad_rows, param, (rows.shape[0],) + tuple(param.shape[1:]))
    _check_like("exp_avg", exp_avg, param, param.shape)
    _check_like("exp_avg_sq", exp_avg_sq, param, param.shape)
    if len({id(param), id(exp_avg), id(exp_avg_sq)}) != 3:
        raise ValueError("param, exp_avg and exp_avg_sq must be three different tensors")
    step = _finite("step", step)
    if step < 1:
        raise ValueError(f"step must be the parameter's count after this step (>= 1), got {step}")
    if not isinstance(modality, int) or isinstance(modality, bool):
        raise TypeError("modality must be an int (-1: no modality)")
    coefficients = _check_coefficients(coefficients, modality, [param])
    lr, beta1, beta2, eps, weight_decay, anchor_lambda = (_finite(n, v) for n, v in (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps), ("weight_decay", weight_decay), ("anchor_lambda", anchor_lambda)))
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got ({beta1}, {beta2})")
    anchor, anchor_weight = _check_anchor(anchor, anchor_weight, param, "anchor", "anchor_weight", "param")
    check_row_ids(rows, param.shape[0])
    if rows.numel() == 0:
        return None
    if anchor_lambda == 0.0:
        anchor = anchor_weight = None
    return (param, rows.contiguous(), grad_rows.detach().contiguous(), exp_avg, exp_avg_sq, step,
            coefficients, modality, lr, beta1, beta2, eps, weight_decay, anchor, anchor_weight,
            anchor_lambda)


_REFERENCE = {"modality_adamw_": _reference_adamw_, "modality_sgd_": _reference_sgd_,
              "modality_adamw_rows_": _reference_adamw_rows_}
# positions of the tensors or tensor lists in each op's arguments (for the contiguity check of the
# dispatch)
_TENSOR_LISTS = {"modality_adamw_": (0, 1, 2, 3, 4, 17, 18), "modality_sgd_": (0, 1, 2, 15, 16),
                 "modality_adamw_rows_": (0, 1, 2, 3, 4, 13, 14)}
# positions of the tensors or lists each op writes
_MUTATED = {"modality_adamw_": (0, 2, 3, 4), "modality_sgd_": (0, 2), "modality_adamw_rows_": (0, 3, 4)}
# ops that an extension built from older sources may lack
_NEWER_OPS = ("modality_adamw_rows_",)


def _tensors(args: tuple, positions) -> List[torch.Tensor]:
    out = []
    for i in positions:
        a = args[i]
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif a is not None:
            out.extend(t for t in a if t is not None)
    return out


def choose_step_backend(op: str, device: torch.device, dtype: torch.dtype, contiguous: bool = True) -> str:
    """The backend that runs family-A op `op` on tensors of this device and dtype."""
    return _backend.choose_backend(op, device, dtype, contiguous=contiguous,
                                   compiled_op=op if op in _NEWER_OPS else None)


def run_step(op: str, args: tuple, backend: Optional[str] = None) -> str:
    """Run op ("modality_adamw_", "modality_sgd_" or "modality_adamw_rows_") on checked arguments on
    `backend` (default: the dispatch's choice); returns the backend used. The optimizers call this
    directly with arguments they checked once."""
    if backend is None:
        first = _tensors(args, (0,))[0]
        contiguous = all(t.is_contiguous() for t in _tensors(args, _TENSOR_LISTS[op]))
        backend = choose_step_backend(op, first.device, first.dtype, contiguous)
    if backend == "reference":
        with torch.no_grad():
            _REFERENCE[op](*args)
    elif backend == "triton":
        from ..kernels import modality_step as _tk

        getattr(_tk, op)(*args)
    else:
        getattr(torch.ops.mmcl_fast, op)(*args)
    if backend != "reference":
        # the kernels write through raw pointers: bump the version counters as an in-place torch
        # op would, so that autograd still detects a parameter modified after it was saved
        mutated = _tensors(args, _MUTATED[op])
        try:
            torch.autograd.graph.increment_version(mutated)
        except TypeError:  # torch before 2.6 takes one tensor at a time
            for t in mutated:
                torch.autograd.graph.increment_version(t)
    return backend


def modality_adamw_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=(), steps=None, **kwargs
) -> None:
    """Fused, multi-tensor AdamW step with per-modality gradient modulation, in place.

    params, grads, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs for amsgrad, else empty) are lists of
    one device and dtype; steps[i] is tensor i's step count AFTER this step (torch's convention).
    Keyword arguments (see validate_adamw_args): coefficients, modality, lr, beta1, beta2, eps,
    weight_decay, noise, seed, noise_step, tensor_ids, anchors, anchor_weights, anchor_lambda.
    k = coefficients[modality] is read on the device (modality -1: k = 1 and no noise).
    """
    args = validate_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **kwargs)
    if args is not None:
        run_step("modality_adamw_", args)


def modality_sgd_(params, grads, momentum_buffers=(), first_step=None, **kwargs) -> None:
    """Fused, multi-tensor SGD step (torch.optim.SGD semantics) with per-modality modulation.

    momentum_buffers: one per param when momentum is used (else empty); first_step[i] true when
    buffer i is new (torch then copies the gradient into it instead of averaging). Keyword
    arguments (see validate_sgd_args): coefficients, modality, lr, momentum, dampening,
    weight_decay, nesterov, noise, seed, noise_step, tensor_ids, anchors, anchor_weights,
    anchor_lambda.
    """
    args = validate_sgd_args(params, grads, momentum_buffers, first_step, **kwargs)
    if args is not None:
        run_step("modality_sgd_", args)


def modality_adamw_rows_(
    param: torch.Tensor, rows: torch.Tensor, grad_rows: torch.Tensor, exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor, step: float, *, coefficients: Optional[torch.Tensor] = None,
    modality: int = -1, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 1e-2, anchor: Optional[torch.Tensor] = None,
    anchor_weight=None, anchor_lambda: float = 0.0, amsgrad: bool = False, noise: bool = False,
) -> None:
    """Row-sparse (lazy) AdamW step of one parameter, in place: only the listed rows of param,
    exp_avg and exp_avg_sq are read and written (torch.optim.SparseAdam's semantics, with
    torch.optim.AdamW's arithmetic, decoupled weight decay, the modality coefficient and the anchor
    term of the dense step).

    param [N, ...] (a row = param[r], R = numel / N elements), exp_avg / exp_avg_sq of its shape and
    dtype; rows: int64 [U] distinct row ids in any order (a coalesced sparse gradient's indices);
    grad_rows [U, ...]: row i is the gradient of row rows[i]; step: the parameter's step count
    after this step (bias corrections 1 - beta^step). For each listed row r:

        g   = k * grad_row           (k = coefficients[modality], read on the device; -1: k = 1)
        g  += 2 anchor_lambda w_r (p_r - anchor_r)          only if r < anchor.shape[0]
        p_r = p_r (1 - lr weight_decay);  m_r = lerp(m_r, g, 1 - beta1);  v_r = beta2 v_r + (1 - beta2) g^2
        p_r = p_r - lr / (1 - beta1^step) * m_r / (sqrt(v_r) / sqrt(1 - beta2^step) + eps)

    anchor: the parameter's first rows [n_a, ...] (or its whole shape); anchor_weight: a number or
    a scalar tensor, per row [n_a], or per element (anchor's shape); None: 1.
    amsgrad and noise are not supported (a ValueError if asked). Errors: TypeError for a wrong
    dtype, ValueError naming the argument for wrong shapes, devices, NaN hyper-parameters and, in
    eager mode, row ids out of range or repeated; all before anything is written.
    """
    args = validate_adamw_rows_args(
        param, rows, grad_rows, exp_avg, exp_avg_sq, step, coefficients=coefficients,
        modality=modality, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        anchor=anchor, anchor_weight=anchor_weight, anchor_lambda=anchor_lambda, amsgrad=amsgrad,
        noise=noise)
    if args is not None:
        run_step("modality_adamw_rows_", args)


def _register_fakes() -> None:
    """Fake kernels of the C++ ops (they mutate in place and return nothing)."""
    if not _backend.extension_loaded():
        return

    @torch.library.register_fake("mmcl_fast::modality_adamw_")
    def _(*args, **kwargs):
        return None

    @torch.library.register_fake("mmcl_fast::modality_sgd_")
    def _(*args, **kwargs):
        return None

    if has_op("modality_adamw_rows_"):  # absent from an extension built from older sources

        @torch.library.register_fake("mmcl_fast::modality_adamw_rows_")
        def _(*args, **kwargs):
            return None


_register_fakes()
