"""Op family B: shared-key attention with on-the-fly asymmetric ReLU distillation (DESIGN.md 5).

Shapes: q [B, H, Lq, D]; k [H, Lk, D] (a key bank shared by the batch, MSPT's case) or
[B, H, Lk, D]; v [B, H, Lk, D]; bias [H, Lq, Lk] or [B, H, Lq, Lk] (or [1, H, Lq, Lk]) or None;
key_padding_mask [B, Lk] bool (True = padded) or None; query_padding_mask [B, Lq] bool or None
(it only affects the pooling); scale defaults to 1/sqrt(D).

    S_ij = scale q_i.k_j + bias_ij     (padded keys: -inf)
    P    = softmax_j(S)                (a row with no valid key: P = 0, out = 0)
    out  = P v

Pooled maps per (b, h), over valid positions only (invalid positions hold 0), of A = S ("scores",
MSPT's choice) or A = P ("probs"):  width w_i = sum_j A_ij,  height u_j = sum_i A_ij.
Asymmetric ReLU distillation against a teacher's maps, n(x) = x / max(||x||, 1e-12) if normalize:

    d_w = || ReLU(n(w_teacher) - n(w)) ||,  d_u likewise;  loss = mean over (b, h) of
    d_w (pool "width") | d_u ("height") | d_w + d_u ("both")

Nothing of size [B, H, Lq, Lk] is materialised outside the reference backend: attention runs
flash-style in the kernels (online softmax, lse saved, P recomputed in the backward); in "scores"
space the maps have closed forms, w_i = scale q_i.(sum_j valid k_j) + sum_j valid bias_ij and
u_j = scale (sum_i valid q_i).k_j + sum_i valid bias_ij, O((Lq + Lk) D), computed with the loss
per (b, h) and its gradient by one kernel (ska_score_maps); the gradient enters the attention
backward as dS_ij += qv_i kv_j (dL/dw_i + dL/du_j), so the loss costs no extra pass; in "probs" space the height map is the column sum of P that the kernels accumulate, and
its gradient G_j enters the kernels' backward as dS = P (dP + G - rowsum(P (dP + G))).

The reference backend (plain PyTorch, the spec) materialises S and P, as the seed code does.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from .. import backend as _backend
from ._util import acc_dtype, refuse_double_backward
from ._util import has_op as _has_op
from ._util import shape_str as _shape

SPACES = ("scores", "probs")
POOLS = ("width", "height", "both")
_NORM_EPS = 1e-12
_OP = "shared_key_attention"
# On a GPU the CUDA kernels come first: on an H200 they ran attention forward+backward about twice
# as fast as the Triton kernels (0.45 vs 1.18 ms at B 32, H 12, L 128, D 64; measured with
# benchmarks/profile_shared_key_attention.py).
_GPU_PREFERENCE = ("cuda", "triton")


# -- validation ---------------------------------------------------------------------------------
def _check_inputs(q, k, v, bias, key_padding_mask, query_padding_mask, scale, *, need_v=True):
    """Checks every argument (naming it) before any kernel runs; returns (B, H, Lq, Lk, D, scale)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [B, H, Lq, D], got {_shape(q) if isinstance(q, torch.Tensor) else type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    B, H, Lq, D = q.shape
    if not isinstance(k, torch.Tensor) or k.dim() not in (3, 4):
        raise ValueError("k must be a key bank [H, Lk, D] or keys [B, H, Lk, D], got "
                         + (_shape(k) if isinstance(k, torch.Tensor) else type(k).__name__))
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    kb = k if k.dim() == 4 else k.unsqueeze(0)
    if kb.shape[0] not in (1, B) or kb.shape[1] != H or kb.shape[3] != D:
        raise ValueError(f"k {_shape(k)} does not match q {_shape(q)}: heads must be {H} and head dim {D}"
                         + (f", batch {B} or 1" if k.dim() == 4 else ""))
    Lk = kb.shape[2]
    if B == 0 or H == 0 or Lq == 0 or Lk == 0 or D == 0:
        raise ValueError(f"empty input: q {_shape(q)}, k {_shape(k)}")
    if need_v:
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            raise ValueError(f"v must be a 4-D tensor [B, H, Lk, D], got {_shape(v) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if v.dtype != q.dtype:
            raise TypeError(f"v must have q's dtype {q.dtype}, got {v.dtype}")
        if tuple(v.shape) != (B, H, Lk, D):
            raise ValueError(f"v must be [B, H, Lk, D] = [{B}, {H}, {Lk}, {D}], got {_shape(v)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
        if bias.dtype != q.dtype:
            raise TypeError(f"bias must have q's dtype {q.dtype}, got {bias.dtype}")
        ok = (bias.dim() == 3 and tuple(bias.shape) == (H, Lq, Lk)) or (
            bias.dim() == 4 and bias.shape[0] in (1, B) and tuple(bias.shape[1:]) == (H, Lq, Lk))
        if not ok:
            raise ValueError(f"bias must be [H, Lq, Lk] = [{H}, {Lq}, {Lk}] or [B or 1, H, Lq, Lk], got {_shape(bias)}")
    for name, mask, length in (("key_padding_mask", key_padding_mask, Lk),
                               ("query_padding_mask", query_padding_mask, Lq)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a bool tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor (True = padded), got {mask.dtype}")
        if tuple(mask.shape) != (B, length):
            raise ValueError(f"{name} must be [B, {'Lk' if length == Lk and name[0] == 'k' else 'Lq'}] = [{B}, {length}], got {_shape(mask)}")
    devices = {t.device for t in (q, k, v if need_v else q, bias, key_padding_mask, query_padding_mask)
               if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"q, k, v, bias and the masks must be on one device, got {sorted(map(str, devices))}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}") from None
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    return B, H, Lq, Lk, D, scale


def _check_space_pool(space, pool):
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if space == "probs" and pool != "height":
        raise ValueError(f"pool={pool!r} is not supported in space 'probs': every row of P sums to 1, so its "
                         "width pooling carries no information; use pool='height' (or space='scores')")


def _check_teacher(name, t, shape, q):
    if t is None:
        raise ValueError(f"{name} is required for this pool (the teacher's pooled map, shape {list(shape)})")
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be {list(shape)} (the teacher's pooled map for these inputs), got {_shape(t)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")


def _check_dropout(dropout_p, dropout_seed, q) -> Tuple[float, Optional[torch.Tensor]]:
    """(p, seed tensor int64 [1] on q's device, or None when p = 0). A seed of None is drawn from
    torch's generator of q's device, so torch.manual_seed makes runs repeatable."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if p == 0.0:
        return 0.0, None
    if dropout_seed is None:
        return p, torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=q.device)
    if isinstance(dropout_seed, torch.Tensor):
        if dropout_seed.dtype != torch.int64 or dropout_seed.numel() != 1:
            raise TypeError(f"dropout_seed must be an int or an int64 tensor with one element, got "
                            f"{dropout_seed.dtype} {_shape(dropout_seed)}")
        return p, dropout_seed.reshape(1).to(q.device)
    if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, numbers.Integral):
        raise TypeError(f"dropout_seed must be an int, an int64 tensor or None, got {type(dropout_seed).__name__}")
    dropout_seed = int(dropout_seed)
    if not -(2**63) <= dropout_seed < 2**64:
        raise ValueError(f"dropout_seed must fit in 64 bits, got {dropout_seed}")
    if dropout_seed >= 2**63:
        dropout_seed -= 2**64
    return p, torch.tensor([dropout_seed], dtype=torch.int64, device=q.device)


def _choose(q) -> str:
    return _backend.choose_backend(_OP, q.device, q.dtype, contiguous=True, gpu_preference=_GPU_PREFERENCE)


# -- the reference (the spec: materialised S and P, as the seed code does) ----------------------
def _as_batched(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.dim() == 4 else t.unsqueeze(0)


def _reference_scores(q, k, bias, key_padding_mask, scale):
    """S without the key mask: scale q k^T + bias, [B, H, Lq, Lk]."""
    S = torch.matmul(q, _as_batched(k).transpose(-1, -2)) * scale
    if bias is not None:
        S = S + _as_batched(bias)
    return S


def _reference_probs(S, key_padding_mask):
    if key_padding_mask is not None:
        S = S.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    empty = torch.isneginf(S).all(dim=-1, keepdim=True)
    P = torch.softmax(S.masked_fill(empty, 0.0), dim=-1)
    return P.masked_fill(empty, 0.0)


# -- dropout on P: counter-based, so that the backward regenerates the forward's mask -------------
DROPOUT_TAG = 0x64726F70  # "drop": Philox counter word c3, apart from family A's noise counters


def dropout_threshold(dropout_p: float) -> int:
    """Keys whose 24-bit draw is below this are dropped: ceil(p 2^24) (in double, as every kernel
    computes it), so P(keep) = 1 - thr / 2^24, p rounded up to a multiple of 2^-24."""
    return min(int(math.ceil(float(dropout_p) * 16777216.0)), 1 << 24)


def dropout_keep(seed: int, B: int, H: int, Lq: int, Lk: int, dropout_p: float, device=None) -> torch.Tensor:
    """The keep mask [B, H, Lq, Lk] (bool) of dropout on P, the spec every backend draws:

        (x0, x1, x2, x3) = Philox4x32-10(counter (j >> 2, i, b H + h, DROPOUT_TAG), key (seed lo, seed hi))
        keep_bhij = (x_(j & 3) >> 8) >= ceil(p 2^24)

    so one Philox call serves four neighbouring keys, and nothing depends on how a kernel tiles."""
    from .modality_step import _MASK32, philox4x32_10

    seed &= (1 << 64) - 1
    g = torch.arange((Lk + 3) // 4, dtype=torch.int64, device=device)
    i = torch.arange(Lq, dtype=torch.int64, device=device)
    bh = torch.arange(B * H, dtype=torch.int64, device=device)
    c0 = g.view(1, 1, -1).expand(B * H, Lq, -1)
    c1 = i.view(1, -1, 1).expand_as(c0)
    c2 = bh.view(-1, 1, 1).expand_as(c0)
    x = philox4x32_10(c0.contiguous(), c1, c2, DROPOUT_TAG, seed & _MASK32, seed >> 32)
    words = torch.stack(x, dim=-1).reshape(B * H, Lq, -1)[..., :Lk]  # word j & 3 of group j >> 2
    return ((words >> 8) >= dropout_threshold(dropout_p)).reshape(B, H, Lq, Lk)


def _dropped(P, dropout_p, dropout_seed):
    """P Z with Z = keep / (1 - p): the probabilities that multiply v."""
    if not dropout_p:
        return P
    B, H, Lq, Lk = P.shape
    keep = dropout_keep(_seed_int(dropout_seed), B, H, Lq, Lk, dropout_p, P.device)
    return P * keep.to(P.dtype) * (1.0 / (1.0 - dropout_p))


def _seed_int(seed) -> int:
    if seed is None:
        raise ValueError("dropout_seed is required when dropout_p > 0 (an int or an int64 tensor)")
    return int(seed.reshape(-1)[0].item()) if isinstance(seed, torch.Tensor) else int(seed)


def reference_attention(q, k, v, bias=None, key_padding_mask=None, scale=None, dropout_p=0.0, dropout_seed=None):
    """The spec of the attention output, materialising S and P (no checks); with dropout_p > 0,
    out = (P Z) v, Z = dropout_keep(dropout_seed, ...) / (1 - dropout_p)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    P = _reference_probs(_reference_scores(q, k, bias, key_padding_mask, scale), key_padding_mask)
    return torch.matmul(_dropped(P, dropout_p, dropout_seed), v)


def _valid(mask, like):
    """1 for valid positions, 0 for padded ones, as `like`'s dtype; None when there is no mask."""
    return None if mask is None else (~mask).to(like.dtype)


def reference_pooled_maps(q, k, bias=None, key_padding_mask=None, query_padding_mask=None, scale=None,
                          space="scores"):
    """The spec of the pooled maps: width [B, H, Lq] and height [B, H, Lk] of the materialised map."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    S = _reference_scores(q, k, bias, key_padding_mask, scale)
    A = S if space == "scores" else _reference_probs(S, key_padding_mask)
    B, H, Lq, Lk = A.shape
    kv = torch.ones(B, Lk, dtype=A.dtype, device=A.device) if key_padding_mask is None else _valid(key_padding_mask, A)
    qv = torch.ones(B, Lq, dtype=A.dtype, device=A.device) if query_padding_mask is None else _valid(query_padding_mask, A)
    valid = qv[:, None, :, None] * kv[:, None, None, :]
    A = torch.where(valid > 0, A, torch.zeros((), dtype=A.dtype, device=A.device))
    return A.sum(-1) * qv[:, None, :], A.sum(-2) * kv[:, None, :]


# -- the distillation loss (shared by every backend: it works on [B, H, L] vectors) ---------------
def _normalise(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    if not normalize:
        return x
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def _norm0(x: torch.Tensor) -> torch.Tensor:
    """||x|| over the last dim, with gradient 0 (not NaN) where x = 0."""
    ss = (x * x).sum(-1)
    pos = ss > 0
    return torch.where(pos, ss.clamp_min(torch.finfo(ss.dtype).tiny).sqrt(), torch.zeros_like(ss))


def asymmetric_relu_distance(teacher: torch.Tensor, student: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """|| ReLU(n(teacher) - n(student)) || over the last dim: attention the teacher had and the
    student lost is penalised, new attention is free."""
    return _norm0(torch.relu(_normalise(teacher, normalize) - _normalise(student, normalize)))


def distill_loss(width, height, teacher_width, teacher_height, pool="width", normalize=True) -> torch.Tensor:
    """loss = mean over (b, h) of d_w, d_u or d_w + d_u (in float32, or float64 if any map is)."""
    maps = [t for t in (width, height, teacher_width, teacher_height) if t is not None]
    acc = torch.float64 if any(t.dtype == torch.float64 for t in maps) else torch.float32

    def up(t):
        return t.to(acc)

    d = 0
    if pool in ("width", "both"):
        d = d + asymmetric_relu_distance(up(teacher_width), up(width), normalize)
    if pool in ("height", "both"):
        d = d + asymmetric_relu_distance(up(teacher_height), up(height), normalize)
    return d.mean()


# -- closed forms of the "scores" maps -----------------------------------------------------------
def _closed_form_maps(q, k, bias, key_padding_mask, query_padding_mask, scale, want_width=True, want_height=True):
    """width/height of S without materialising it: O((Lq + Lk) D) plus one pass over the bias."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = q.to(acc), k.to(acc)
    bf = None if bias is None else bias.to(acc)
    kv, qv = _valid(key_padding_mask, qf), _valid(query_padding_mask, qf)
    bank = k.dim() == 3
    width = height = None
    if want_width:
        if kv is None:
            ksum = kf.sum(-2)                                            # [H, D] or [B, H, D]
        else:
            ksum = torch.einsum("bk,hkd->bhd", kv, kf) if bank else torch.einsum("bk,bhkd->bhd", kv, kf)
        width = scale * torch.matmul(qf, ksum.unsqueeze(-1)).squeeze(-1)  # [B, H, Lq]
        if bf is not None:
            if kv is None:
                width = width + bf.sum(-1)
            else:
                width = width + (torch.einsum("hqk,bk->bhq", bf, kv) if bf.dim() == 3
                                 else torch.einsum("xhqk,bk->bhq", bf, kv) if bf.shape[0] == 1
                                 else torch.einsum("bhqk,bk->bhq", bf, kv))
        if qv is not None:
            width = width * qv[:, None, :]
        if kv is not None:  # a query with no valid key has an empty row
            width = width * (kv.sum(-1) > 0).to(acc)[:, None, None]
    if want_height:
        qsum = qf.sum(-2) if qv is None else torch.einsum("bq,bhqd->bhd", qv, qf)  # [B, H, D]
        height = scale * (torch.einsum("bhd,hkd->bhk", qsum, kf) if bank
                          else torch.matmul(kf, qsum.unsqueeze(-1)).squeeze(-1))
        if bf is not None:
            if qv is None:
                height = height + bf.sum(-2)
            else:
                height = height + (torch.einsum("hqk,bq->bhk", bf, qv) if bf.dim() == 3
                                   else torch.einsum("xhqk,bq->bhk", bf, qv) if bf.shape[0] == 1
                                   else torch.einsum("bhqk,bq->bhk", bf, qv))
        if kv is not None:
            height = height * kv[:, None, :]
    return width, height


# -- the "scores" loss fused into the kernels ----------------------------------------------------
class _FusedScoresDistill(torch.autograd.Function):
    """(out, loss) in "scores" space through three kernels: the attention forward, the pooled maps
    with the loss per (b, h) and its gradient (ska_score_maps: dist, gw = d dist/dw, gu likewise),
    and the attention backward, which adds the maps' gradient to dS:

        loss = mean_(b, h) dist,    dS_ij += qv_i kv_j (gw_i + gu_j) g / (B H)

    (g: the loss's upstream gradient). w and u are linear in S, so that term skips the softmax;
    dq, dk and dbias take it from dS with the attention's own. Nothing of the loss is left for
    autograd: one node, a handful of launches per step (the ~60 small ops of the closed forms and
    the loss were most of a GPU step's time)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, kpm, qpm, tw, th, scale, normalize, backend, dropout_p, seed):
        fwd, _, maps = _kernel_ops(backend)
        acc = acc_dtype(q.dtype)
        q, v = q.contiguous(), v.contiguous()
        k4 = _as_batched(k).contiguous()
        b4 = None if bias is None else _as_batched(bias).contiguous()
        kpm = None if kpm is None else kpm.contiguous()
        qpm = None if qpm is None else qpm.contiguous()
        tw = None if tw is None else tw.detach().to(acc).contiguous()
        th = None if th is None else th.detach().to(acc).contiguous()
        out, lse, _ = fwd(q, k4, v, b4, kpm, None, scale, False, dropout_p, seed)
        _, _, dist, gw, gu = maps(q, k4, b4, kpm, qpm, tw, th, scale, normalize)
        ctx.save_for_backward(q, k4, v, b4, kpm, qpm, out, lse, gw if tw is not None else None,
                              gu if th is not None else None, seed)
        ctx.scale, ctx.backend, ctx.dropout_p = scale, backend, dropout_p
        ctx.k_shape, ctx.bias_shape = tuple(k.shape), None if bias is None else tuple(bias.shape)
        return out, dist.mean()

    @staticmethod
    def backward(ctx, grad_out, grad_loss):
        refuse_double_backward(ctx, "shared_key_attention_distill")
        q, k4, v, b4, kpm, qpm, out, lse, gw, gu, seed = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_loss is None:
            gw = gu = None
        else:
            c = grad_loss / (q.shape[0] * q.shape[1])
            gw = None if gw is None else gw * c
            gu = None if gu is None else gu * c
        need_dbias = b4 is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _kernel_ops(ctx.backend)[1](grad_out.contiguous(), q, k4, v, b4, kpm, qpm, out, lse,
                                                        None, gw, gu, ctx.scale, need_dbias, ctx.dropout_p, seed)
        dbias = dbias.reshape(ctx.bias_shape) if need_dbias else None
        return dq, dk.reshape(ctx.k_shape), dv, dbias, None, None, None, None, None, None, None, None, None


# -- the kernels ---------------------------------------------------------------------------------
def _kernel_ops(backend: str):
    """(forward, backward, score maps) ops of a kernel backend."""
    if backend == "triton":
        from ..kernels import shared_key_attention as _tk  # noqa: F401  (registers the ops)

        return (torch.ops.mmcl_fast.ska_forward_triton, torch.ops.mmcl_fast.ska_backward_triton,
                torch.ops.mmcl_fast.ska_score_maps_triton)
    return torch.ops.mmcl_fast.ska_forward, torch.ops.mmcl_fast.ska_backward, torch.ops.mmcl_fast.ska_score_maps


def _kernel_forward(backend, q, k, v, bias, key_padding_mask, query_padding_mask, scale, need_colsum,
                    dropout_p=0.0, seed=None):
    fwd = _kernel_ops(backend)[0]
    k4 = _as_batched(k).contiguous()
    b4 = None if bias is None else _as_batched(bias).contiguous()
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
    qpm = None if query_padding_mask is None else query_padding_mask.contiguous()
    out, lse, colsum = fwd(q.contiguous(), k4, v.contiguous(), b4, kpm, qpm, scale, need_colsum, dropout_p, seed)
    return out, lse, colsum


def _setup_context(ctx, inputs, output):
    q, k, v, bias, kpm, qpm, scale, _, dropout_p, seed = inputs  # (the dispatcher fills in defaults)
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, bias, kpm, qpm, out, lse, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _make_backward(backward_op):
    def _backward(ctx, grad_out, grad_lse, grad_colsum):
        refuse_double_backward(ctx, "shared_key_attention")
        q, k, v, bias, kpm, qpm, out, lse, seed = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        gc = None if grad_colsum is None or grad_colsum.numel() == 0 else grad_colsum.to(lse.dtype).contiguous()
        dq, dk, dv, dbias = backward_op(grad_out.contiguous(), q, k, v, bias, kpm, qpm, out, lse, gc, None,
                                        None, ctx.scale, need_dbias, ctx.dropout_p, seed)
        return dq, dk, dv, (dbias if need_dbias else None), None, None, None, None, None, None
    return _backward


def _register() -> None:
    """Fake kernels and autograd formulas of the C++ ops (the Triton ops get theirs when their
    module is first imported, see _register_triton)."""
    if not _backend.extension_loaded() or not _has_op("ska_forward"):
        return
    lib_fwd, lib_bwd, lib_maps = "mmcl_fast::ska_forward", "mmcl_fast::ska_backward", "mmcl_fast::ska_score_maps"

    @torch.library.register_fake(lib_fwd)
    def _(q, k, v, bias, key_padding_mask, query_padding_mask, scale, need_colsum, dropout_p=0.0,
          dropout_seed=None):
        return _fake_forward(q, k, v, need_colsum)

    @torch.library.register_fake(lib_bwd)
    def _(grad_out, q, k, v, bias, kpm, qpm, out, lse, grad_colsum, grad_width, grad_height, scale, need_dbias,
          dropout_p=0.0, dropout_seed=None):
        return _fake_backward(q, k, v, bias, need_dbias)

    @torch.library.register_fake(lib_maps)
    def _(q, k, bias, kpm, qpm, teacher_width, teacher_height, scale, normalize):
        return _fake_score_maps(q, k, teacher_width, teacher_height)

    torch.library.register_autograd(lib_fwd, _make_backward(torch.ops.mmcl_fast.ska_backward),
                                    setup_context=_setup_context)


def _fake_forward(q, k, v, need_colsum):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    acc = acc_dtype(q.dtype)
    colsum = q.new_empty((B, H, Lk), dtype=acc) if need_colsum else q.new_empty((0,), dtype=acc)
    return torch.empty_like(q), q.new_empty((B, H, Lq), dtype=acc), colsum


def _fake_score_maps(q, k, teacher_width, teacher_height):
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    acc = acc_dtype(q.dtype)
    w, u = q.new_empty((B, H, Lq), dtype=acc), q.new_empty((B, H, Lk), dtype=acc)
    gw = torch.empty_like(w) if teacher_width is not None else q.new_empty((0,), dtype=acc)
    gu = torch.empty_like(u) if teacher_height is not None else q.new_empty((0,), dtype=acc)
    return w, u, q.new_empty((B, H), dtype=acc), gw, gu


def _fake_backward(q, k, v, bias, need_dbias):
    dbias = torch.empty_like(bias) if (need_dbias and bias is not None) else q.new_empty((0,))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


_TRITON_REGISTERED = False


def _register_triton() -> None:
    """The autograd formula of the Triton forward op (its module defines the op and its fakes)."""
    global _TRITON_REGISTERED
    if _TRITON_REGISTERED:
        return
    from ..kernels import shared_key_attention as _tk  # noqa: F401

    torch.library.register_autograd("mmcl_fast::ska_forward_triton",
                                    _make_backward(torch.ops.mmcl_fast.ska_backward_triton),
                                    setup_context=_setup_context)
    _TRITON_REGISTERED = True


def _attention(backend, q, k, v, bias, kpm, qpm, scale, need_colsum, dropout_p=0.0, seed=None):
    """(out, colsum) through the backend's kernels, differentiable in q, k, v, bias."""
    if backend == "triton":
        _register_triton()
    out, _, colsum = _kernel_forward(backend, q, k, v, bias, kpm, qpm, scale, need_colsum, dropout_p, seed)
    return out, colsum


# -- the public ops ------------------------------------------------------------------------------
def shared_key_attention(q, k, v, bias=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                         dropout_seed=None) -> torch.Tensor:
    """softmax(scale q k^T + bias, padded keys excluded) v, flash-style; gradients for q, k (summed
    over the batch for a bank), v and bias (summed over the batch when broadcast).

    dropout_p > 0: dropout on P inside the kernels, out = (P Z) v with Z = keep / (1 - p), the keep
    mask drawn from `dropout_seed` (an int or an int64 tensor; None: drawn from torch's generator)
    by dropout_keep, the same on every backend; call it with dropout_p = 0 in eval."""
    _, _, _, _, _, scale = _check_inputs(q, k, v, bias, key_padding_mask, None, scale)
    dropout_p, seed = _check_dropout(dropout_p, dropout_seed, q)
    backend = _choose(q)
    if backend == "reference":
        return reference_attention(q, k, v, bias, key_padding_mask, scale, dropout_p, seed)
    out, _ = _attention(backend, q, k, v, bias, key_padding_mask, None, scale, False, dropout_p, seed)
    return out


def pooled_attention_maps(q, k, bias=None, key_padding_mask=None, query_padding_mask=None, scale=None,
                          space="scores") -> Tuple[torch.Tensor, torch.Tensor]:
    """The teacher's side: (width [B, H, Lq], height [B, H, Lk]) of the map in `space`, zero at
    padded positions, without materialising the map (except on the reference backend). In space
    "probs" the width is 1 for every valid query that has a valid key (rows of P sum to 1).
    float32 (float64 for float64 inputs)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    B, H, Lq, Lk, D, scale = _check_inputs(q, k, None, bias, key_padding_mask, query_padding_mask, scale,
                                           need_v=False)
    backend = _choose(q)
    acc = acc_dtype(q.dtype)
    if backend == "reference":
        w, u = reference_pooled_maps(q, k, bias, key_padding_mask, query_padding_mask, scale, space)
        return w.to(acc), u.to(acc)
    if space == "scores":
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, bias)):
            # differentiable: the closed forms through autograd (the kernel's maps have no backward)
            return _closed_form_maps(q, k, bias, key_padding_mask, query_padding_mask, scale)
        maps = _kernel_ops(backend)[2]
        w, u, _, _, _ = maps(q.contiguous(), _as_batched(k).contiguous(),
                             None if bias is None else _as_batched(bias).contiguous(),
                             None if key_padding_mask is None else key_padding_mask.contiguous(),
                             None if query_padding_mask is None else query_padding_mask.contiguous(),
                             None, None, scale, True)
        return w, u
    # "probs": the column sums come out of the forward kernel (v is not needed: zeros)
    v = q.new_zeros((B, H, Lk, D))
    out, colsum = _attention(backend, q, k, v, bias, key_padding_mask, query_padding_mask, scale, True)
    width = torch.ones(B, H, Lq, dtype=acc, device=q.device)
    if query_padding_mask is not None:
        width = width * _valid(query_padding_mask, width)[:, None, :]
    if key_padding_mask is not None:
        width = width * (key_padding_mask.logical_not().any(-1)).to(acc)[:, None, None]
    return width, colsum


def shared_key_attention_distill(q, k, v, teacher_width=None, teacher_height=None, bias=None,
                                 key_padding_mask=None, query_padding_mask=None, scale=None,
                                 space="scores", pool="width", normalize=True, dropout_p=0.0,
                                 dropout_seed=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, loss): the attention output and the asymmetric ReLU distillation loss of its pooled
    maps against the teacher's (teacher_width [B, H, Lq], teacher_height [B, H, Lk], as returned by
    pooled_attention_maps on the teacher's q, k, bias), computed on the fly. The loss is a float32
    scalar (float64 for float64 inputs) with gradients for q, k, bias (and the teacher's maps if
    they require grad). dropout_p, dropout_seed: dropout on P for the output, as in
    shared_key_attention; the pooled maps and the loss are those of the undropped attention."""
    _check_space_pool(space, pool)
    B, H, Lq, Lk, D, scale = _check_inputs(q, k, v, bias, key_padding_mask, query_padding_mask, scale)
    dropout_p, seed = _check_dropout(dropout_p, dropout_seed, q)
    if pool in ("width", "both"):
        _check_teacher("teacher_width", teacher_width, (B, H, Lq), q)
    if pool in ("height", "both"):
        _check_teacher("teacher_height", teacher_height, (B, H, Lk), q)
    backend = _choose(q)
    want_w, want_u = pool in ("width", "both"), pool in ("height", "both")
    if backend == "reference":
        out = reference_attention(q, k, v, bias, key_padding_mask, scale, dropout_p, seed)
        w, u = reference_pooled_maps(q, k, bias, key_padding_mask, query_padding_mask, scale, space)
    elif space == "scores":
        tw, th = teacher_width if want_w else None, teacher_height if want_u else None
        if not any(t is not None and t.requires_grad for t in (tw, th)):
            return _FusedScoresDistill.apply(q, k, v, bias, key_padding_mask, query_padding_mask, tw, th, scale,
                                             normalize, backend, dropout_p, seed)
        # a teacher map that wants a gradient (unusual): the closed forms through autograd
        out, _ = _attention(backend, q, k, v, bias, key_padding_mask, None, scale, False, dropout_p, seed)
        w, u = _closed_form_maps(q, k, bias, key_padding_mask, query_padding_mask, scale, want_w, want_u)
    else:
        out, u = _attention(backend, q, k, v, bias, key_padding_mask, query_padding_mask, scale, True, dropout_p, seed)
        w = None
    loss = distill_loss(w, u, teacher_width, teacher_height, pool, normalize)
    return out, loss


_register()
