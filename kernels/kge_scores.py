"""Op family C in Triton, knowledge-graph triple scores with negatives (the contract of
mmcl_fast::kge_scores_forward / _backward; the maths and the reference: mmcl_fast/ops/kge_scores.py).

  kge_scores_forward(entities [U, D], relations [b, Dr], heads [b], tails [b], negatives [b, K],
                     num_head, score) -> pos [b], neg [b, K] (float32)
    pos[i] = s(E[h_i], R_i, E[t_i]);  neg[i, k] = s(E[n_ik], R_i, E[t_i]) for k < num_head, else
    s(E[h_i], R_i, E[n_ik]); s: 0 transe_l1 -sum|x + r - y|, 1 transe_l2 -||x + r - y||,
    2 distmult sum x r y, 3 complex sum Re(x r conj y), 4 rotate -sum sqrt(|x e^{i r} - y|^2 + 1e-12)
    (complex rows [re | im]; rotate's relation rows are the D/2 phases)
  kge_scores_backward(grad_pos [b], grad_neg [b, K] float32, the forward's inputs)
    -> grad_entities [U, D] (every occurrence accumulated), grad_relations [b, Dr]

Inputs float32 / float16 / bfloat16, arithmetic in float32. One program per positive: its h, r, t
rows are loaded once into registers (a tile of the whole row, W = D, or D/2 complex coordinates)
and each of its K negative rows is loaded and scored against them. The backward recomputes the
differences (nothing of the forward is saved), accumulates the gradient of the positive's head,
tail and relation rows in registers over its K negatives, and adds every entity row's gradient
into a float32 [U, D] buffer with atomic adds (so grad_entities is not bit-reproducible on a GPU).
transe_l2 scores each triple once more in the backward for its norm.
"""
import os
from typing import Tuple

import torch
import triton
import triton.language as tl

from .modality_step import _device_guard

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_BLOCK = 16384  # widest row tile (coordinates): registers, not shared memory, hold the rows
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_L2, _COMPLEX, _ROTATE = 1, 3, 4


@triton.jit
def _row(base, offs, valid, W, CPLX: tl.constexpr):
    """(re, im) halves of a complex row, or (row, row) of a real one, in float32."""
    a = tl.load(base + offs, mask=valid, other=0.0).to(tl.float32)
    if CPLX:
        b = tl.load(base + W + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        b = a
    return a, b


@triton.jit
def _rel_row(base, offs, valid, W, SCORE: tl.constexpr):
    """The relation row as (a, b): real rows (r, r), complex (re, im), rotate (cos, sin)."""
    a = tl.load(base + offs, mask=valid, other=0.0).to(tl.float32)
    if SCORE == 3:
        b = tl.load(base + W + offs, mask=valid, other=0.0).to(tl.float32)
    elif SCORE == 4:
        b = tl.sin(a)
        a = tl.cos(a)
    else:
        b = a
    return a, b


@triton.jit
def _score(xa, xb, ra, rb, ya, yb, valid, SCORE: tl.constexpr):
    if SCORE == 0:
        s = -tl.sum(tl.abs(xa + ra - ya), axis=0)
    elif SCORE == 1:
        d = xa + ra - ya
        s = -tl.sqrt(tl.sum(d * d, axis=0))
    elif SCORE == 2:
        s = tl.sum(xa * ra * ya, axis=0)
    elif SCORE == 3:
        s = tl.sum((xa * ra - xb * rb) * ya + (xa * rb + xb * ra) * yb, axis=0)
    else:
        dr = xa * ra - xb * rb - ya
        di = xa * rb + xb * ra - yb
        s = -tl.sum(tl.where(valid, tl.sqrt(dr * dr + di * di + 1e-12), 0.0), axis=0)
    return s


@triton.jit
def _grad(xa, xb, ra, rb, ya, yb, g, SCORE: tl.constexpr):
    """The gradient of g * s(x, r, y): (dxa, dxb, dra, drb, dya, dyb) (rotate: dra = d theta)."""
    if SCORE == 2:
        dxa = g * ra * ya
        dra = g * xa * ya
        dya = g * xa * ra
        dxb = dxa
        drb = dra
        dyb = dya
    elif SCORE == 3:
        dxa = g * (ra * ya + rb * yb)
        dxb = g * (ra * yb - rb * ya)
        dra = g * (xa * ya + xb * yb)
        drb = g * (xa * yb - xb * ya)
        dya = g * (xa * ra - xb * rb)
        dyb = g * (xa * rb + xb * ra)
    elif SCORE == 4:
        a = xa * ra - xb * rb
        bb = xa * rb + xb * ra
        dr = a - ya
        di = bb - yb
        m = tl.sqrt(dr * dr + di * di + 1e-12)
        u = -(g * dr) / m
        v = -(g * di) / m
        dxa = u * ra + v * rb
        dxb = v * ra - u * rb
        dra = v * a - u * bb
        drb = dra
        dya = -u
        dyb = -v
    else:
        d = xa + ra - ya
        if SCORE == 0:
            e = tl.where(d > 0, -g, tl.where(d < 0, g, 0.0))  # sign(0) = 0, as abs' backward
        else:
            n = tl.sqrt(tl.sum(d * d, axis=0))
            e = -d * tl.where(n > 0, g / tl.where(n > 0, n, 1.0), 0.0)  # 0 at d = 0, as torch's norm
        dxa = e
        dra = e
        dya = -e
        dxb = dxa
        drb = dra
        dyb = dya
    return dxa, dxb, dra, drb, dya, dyb


@triton.jit
def _positive(e_ptr, r_ptr, h_ptr, t_ptr, D, Dr, SCORE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's positive: i, its head and tail ids, the row's coordinates (W, offs, valid)
    and its h, r, t rows as (a, b) pairs."""
    CPLX: tl.constexpr = SCORE >= 3
    i = tl.program_id(0).to(tl.int64)
    W = D // 2 if CPLX else D
    offs = tl.arange(0, BLOCK)
    valid = offs < W
    hid = tl.load(h_ptr + i)
    tid = tl.load(t_ptr + i)
    xa, xb = _row(e_ptr + hid * D, offs, valid, W, CPLX)
    ya, yb = _row(e_ptr + tid * D, offs, valid, W, CPLX)
    ra, rb = _rel_row(r_ptr + i * Dr, offs, valid, W, SCORE)
    return i, hid, tid, W, offs, valid, xa, xb, ra, rb, ya, yb


@triton.jit
def _kge_fwd_kernel(e_ptr, r_ptr, h_ptr, t_ptr, n_ptr, pos_ptr, neg_ptr, D, Dr, K, NH,
                    SCORE: tl.constexpr, BLOCK: tl.constexpr):
    CPLX: tl.constexpr = SCORE >= 3
    i, hid, tid, W, offs, valid, xa, xb, ra, rb, ya, yb = _positive(e_ptr, r_ptr, h_ptr, t_ptr, D, Dr, SCORE,
                                                                   BLOCK)
    tl.store(pos_ptr + i, _score(xa, xb, ra, rb, ya, yb, valid, SCORE))
    for k in range(0, NH):
        nid = tl.load(n_ptr + i * K + k)
        na, nb = _row(e_ptr + nid * D, offs, valid, W, CPLX)
        tl.store(neg_ptr + i * K + k, _score(na, nb, ra, rb, ya, yb, valid, SCORE))
    for k in range(NH, K):
        nid = tl.load(n_ptr + i * K + k)
        na, nb = _row(e_ptr + nid * D, offs, valid, W, CPLX)
        tl.store(neg_ptr + i * K + k, _score(xa, xb, ra, rb, na, nb, valid, SCORE))


@triton.jit
def _add_row(base, offs, valid, W, a, b, CPLX: tl.constexpr):
    tl.atomic_add(base + offs, a, mask=valid, sem="relaxed")
    if CPLX:
        tl.atomic_add(base + W + offs, b, mask=valid, sem="relaxed")


@triton.jit
def _kge_bwd_kernel(e_ptr, r_ptr, h_ptr, t_ptr, n_ptr, gp_ptr, gn_ptr, ge_ptr, gr_ptr, D, Dr, K,
                    NH, SCORE: tl.constexpr, BLOCK: tl.constexpr):
    """ge_ptr: the float32 [U, D] gradient (zeroed; atomic adds); gr_ptr: grad_relations."""
    CPLX: tl.constexpr = SCORE >= 3
    i, hid, tid, W, offs, valid, xa, xb, ra, rb, ya, yb = _positive(e_ptr, r_ptr, h_ptr, t_ptr, D, Dr, SCORE,
                                                                   BLOCK)
    gha, ghb, gra, grb, gta, gtb = _grad(xa, xb, ra, rb, ya, yb, tl.load(gp_ptr + i), SCORE)
    for k in range(0, NH):
        nid = tl.load(n_ptr + i * K + k)
        na, nb = _row(e_ptr + nid * D, offs, valid, W, CPLX)
        dxa, dxb, dra, drb, dya, dyb = _grad(na, nb, ra, rb, ya, yb, tl.load(gn_ptr + i * K + k), SCORE)
        _add_row(ge_ptr + nid * D, offs, valid, W, dxa, dxb, CPLX)
        gra += dra
        grb += drb
        gta += dya
        gtb += dyb
    for k in range(NH, K):
        nid = tl.load(n_ptr + i * K + k)
        na, nb = _row(e_ptr + nid * D, offs, valid, W, CPLX)
        dxa, dxb, dra, drb, dya, dyb = _grad(xa, xb, ra, rb, na, nb, tl.load(gn_ptr + i * K + k), SCORE)
        _add_row(ge_ptr + nid * D, offs, valid, W, dya, dyb, CPLX)
        gha += dxa
        ghb += dxb
        gra += dra
        grb += drb
    _add_row(ge_ptr + hid * D, offs, valid, W, gha, ghb, CPLX)
    _add_row(ge_ptr + tid * D, offs, valid, W, gta, gtb, CPLX)
    gr_row = gr_ptr + i * Dr
    tl.store(gr_row + offs, gra.to(gr_ptr.dtype.element_ty), mask=valid)
    if SCORE == 3:
        tl.store(gr_row + W + offs, grb.to(gr_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _check(entities, relations, heads, tails, negatives, num_head, score):
    if entities.device.type != "cuda" and not (_INTERPRET and entities.device.type == "cpu"):
        raise RuntimeError("mmcl_fast (triton): kge_scores needs CUDA tensors (CPU tensors only under "
                           "TRITON_INTERPRET=1)")
    if entities.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"mmcl_fast (triton): entities must be float32/float16/bfloat16, got {entities.dtype}")
    if relations.dtype != entities.dtype:
        raise TypeError("mmcl_fast (triton): relations must have the entities' dtype")
    for name, t in (("relations", relations), ("heads", heads), ("tails", tails), ("negatives", negatives)):
        if t.device != entities.device:
            raise ValueError(f"mmcl_fast (triton): {name} must be on the entities' device")
    for name, t in (("heads", heads), ("tails", tails), ("negatives", negatives)):
        if t.dtype != torch.int64:
            raise TypeError(f"mmcl_fast (triton): {name} must be int64")
    score = int(score)
    if not 0 <= score <= 4:
        raise ValueError(f"mmcl_fast (triton): unknown score {score}")
    if entities.dim() != 2:
        raise ValueError("mmcl_fast (triton): entities must be [U, D]")
    D = entities.shape[1]
    if score in (_COMPLEX, _ROTATE) and D % 2:
        raise ValueError("mmcl_fast (triton): complex / rotate scores need an even D")
    b = heads.shape[0]
    Dr = D // 2 if score == _ROTATE else D
    if tuple(relations.shape) != (b, Dr) or tuple(tails.shape) != (b,) or negatives.dim() != 2 \
            or negatives.shape[0] != b:
        raise ValueError("mmcl_fast (triton): relations [b, Dr], heads / tails [b], negatives [b, K]")
    if not 0 <= int(num_head) <= negatives.shape[1]:
        raise ValueError("mmcl_fast (triton): num_head must be in [0, K]")
    W = D // 2 if score in (_COMPLEX, _ROTATE) else D
    block = triton.next_power_of_2(max(W, 1))
    if block > _MAX_BLOCK:
        raise ValueError(f"mmcl_fast (triton): rows of {W} coordinates exceed the widest tile ({_MAX_BLOCK})")
    return score, D, Dr, block


def _warps(block: int) -> int:
    return 1 if _INTERPRET else min(8, max(1, block // 128))


def _forward_impl(entities, relations, heads, tails, negatives, num_head, score):
    score, D, Dr, block = _check(entities, relations, heads, tails, negatives, num_head, score)
    b, K = negatives.shape
    dev = entities.device
    pos = torch.empty((b,), dtype=torch.float32, device=dev)
    neg = torch.empty((b, K), dtype=torch.float32, device=dev)
    if b == 0:
        return pos, neg
    args = [t.contiguous() for t in (entities, relations, heads, tails, negatives)]
    with _device_guard(dev):
        _kge_fwd_kernel[(b,)](*args, pos, neg, D, Dr, K, int(num_head), SCORE=score, BLOCK=block,
                              num_warps=_warps(block))
    return pos, neg


def _backward_impl(grad_pos, grad_neg, entities, relations, heads, tails, negatives, num_head, score):
    score, D, Dr, block = _check(entities, relations, heads, tails, negatives, num_head, score)
    b, K = negatives.shape
    dev = entities.device
    ge = torch.zeros(entities.shape, dtype=torch.float32, device=dev)
    gr = torch.empty_like(relations)
    if b > 0:
        args = [t.contiguous() for t in (entities, relations, heads, tails, negatives)]
        gp = grad_pos.contiguous().to(torch.float32)
        gn = grad_neg.contiguous().to(torch.float32)
        with _device_guard(dev):
            _kge_bwd_kernel[(b,)](*args, gp, gn, ge, gr, D, Dr, K, int(num_head), SCORE=score, BLOCK=block,
                                  num_warps=_warps(block))
    return ge.to(entities.dtype), gr


# ---------------------------------------------------------------------------------------------
# The custom ops (functional)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmcl_fast::kge_scores_forward_triton", mutates_args=())
def kge_scores_forward_triton(entities: torch.Tensor, relations: torch.Tensor, heads: torch.Tensor,
                              tails: torch.Tensor, negatives: torch.Tensor, num_head: int,
                              score: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of mmcl_fast::kge_scores_forward: (pos, neg) float32."""
    return _forward_impl(entities, relations, heads, tails, negatives, num_head, score)


@kge_scores_forward_triton.register_fake
def _(entities, relations, heads, tails, negatives, num_head, score):
    b, K = negatives.shape
    return (entities.new_empty((b,), dtype=torch.float32), entities.new_empty((b, K), dtype=torch.float32))


@torch.library.custom_op("mmcl_fast::kge_scores_backward_triton", mutates_args=())
def kge_scores_backward_triton(grad_pos: torch.Tensor, grad_neg: torch.Tensor, entities: torch.Tensor,
                               relations: torch.Tensor, heads: torch.Tensor, tails: torch.Tensor,
                               negatives: torch.Tensor, num_head: int,
                               score: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of mmcl_fast::kge_scores_backward: (grad_entities, grad_relations)."""
    return _backward_impl(grad_pos, grad_neg, entities, relations, heads, tails, negatives, num_head, score)


@kge_scores_backward_triton.register_fake
def _(grad_pos, grad_neg, entities, relations, heads, tails, negatives, num_head, score):
    return torch.empty_like(entities), torch.empty_like(relations)
