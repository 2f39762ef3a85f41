"""Op family C in Triton, the modulation side: modulated embedding, weight interpolation, anchor
penalty (the contract of mmcl_fast::modulated_embedding_*, interpolate_weights_*, anchor_penalty_*).

The maths (acc = float32; inputs float32 / float16 / bfloat16, results stored in the input dtype
unless marked acc):

  modulated_embedding_forward(tables [M, N, D], index [B], gamma, beta [M, D], gate_logits?, mask?)
    keep_bm  = modality_mask[index_b, m] (True without a mask)
    gates_bm = softmax over the kept m of logit_bm (gate_logits[b, m], gate_logits[m] or 0), 0 where
               not kept (acc)
    out_b    = sum_m gates_bm (gamma_m x_bm + beta_m),  x_bm = tables[m, index_b]
  modulated_embedding_backward(grad_out, tables, index, gamma, beta, gates, sparse)
    grad_tables: row (m, index_b) += gates_bm gamma_m g_b (dense [M, N, D], duplicates accumulate),
                 or the COO values [M, B, D] (values[m, b] = gates_bm gamma_m g_b) when sparse
    grad_gamma_m = sum_b gates_bm g_b x_bm;  grad_beta_m = sum_b gates_bm g_b
    d_bm = g_b . (gamma_m x_bm + beta_m);  grad_logits_bm = gates_bm (d_bm - sum_m' gates_bm' d_bm') (acc)
  interpolate_weights_forward(prev[K], new[K], sigma [K], i, eps)
    n_k = ||new_k||_F (acc);  out_k = (1 - 1/i) prev_k + (1/i) sigma_k new_k / max(n_k, eps)
  interpolate_weights_backward(grad_out[K], new[K], sigma, norms, i, eps)
    dot_k = sum g_k new_k;  nn_k = max(norms_k, eps);  grad_sigma_k = dot_k / (i nn_k)
    grad_new_k = sigma_k / (i nn_k) (g_k - [norms_k > eps] dot_k / nn_k^2 new_k)
  anchor_penalty_forward(params[K], anchors[K], weights[K]):  sums_k = sum w_k (p_k - a_k)^2 (acc)
  anchor_penalty_backward(grad [K], params, anchors, weights): grad_p_k = 2 grad_k w_k (p_k - a_k)
    (w_k: absent -> 1; one element -> that scalar; [p.size(0)] with p.dim() > 1 -> one per row;
     else one per element)

Launches:
  modulated embedding forward: one (a program per block of rows: masked softmax of the gates in
    registers, then the gathered rows, looped over D tiles).
  backward: the row-block kernel (grad_logits; grad_gamma / grad_beta partial sums per row block;
    the sparse values; or, for a float32 dense grad, atomic adds into the zeroed [M, N, D] result)
    and a deterministic reduction of the partial sums; for a float16 / bfloat16 dense grad
    (no float32 staging buffer of M*N*D) the gathered rows are reduced by a segment kernel over
    the ids sorted by torch.sort (stable): one program per sorted position, the first position of
    each run of equal ids sums the run in float32 and stores the row once (deterministic).
  interpolate / anchor: multi-tensor, whatever the number of tensors. One device int64 table (a
    row of fields per tensor: element offsets from one reference tensor, numel, chunk range,
    weight layout; then a (tensor, start) pair per chunk of `chunk` elements), cached by content.
    Reductions (norms, dots, penalty sums): a chunk pass writing float32 partials, then a
    per-tensor pass summing each tensor's partials in order (deterministic); element-wise
    outputs: one chunk pass. Interpolate forward / backward: 3 launches each; anchor forward 2,
    backward 1.
"""
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .modality_step import _device_guard, _Rel, _sm_count, _table

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Modulated embedding: rows per program, widest D tile. The interpreter gets small tiles so that
# small tests span several row blocks and D tiles.
_ME_BLOCK_B = 4 if _INTERPRET else 16
_ME_MAX_BLOCK_D = 16 if _INTERPRET else 256
_ME_WARPS = 4
# Dense grad_tables of float32 tables: atomic adds from the row-block kernel (True), or the sorted
# segment kernel (False; always used for float16 / bfloat16).
_DENSE_ATOMIC_F32 = True

# Multi-tensor passes: elements per tile, tiles per chunk, partials summed per step.
_MT_BLOCK = 64 if _INTERPRET else 1024
_MT_MAX_ITERS = 2 if _INTERPRET else 8
_MT_PART_BLOCK = 16 if _INTERPRET else 256
_MT_WARPS = 4

# Fields of one tensor's row of the multi-tensor table.
# (the kernels use the field numbers literally: 0 first tensor, 1 second, 2 weight, 3 numel,
# 4 first chunk, 5 end chunk, 6 weight mode, 7 elements per weight row, 8 output)
_NF = 9
_F_X0, _F_X1, _F_W, _F_N, _F_CB, _F_CE, _F_WMODE, _F_WDIV, _F_OUT = range(_NF)
# weight modes (anchor penalty)
_W_NONE, _W_SCALAR, _W_ROW, _W_ELEM = 0, 1, 2, 3
# reduction modes
_R_SUMSQ, _R_DOT, _R_ANCHOR = 0, 1, 2

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Modulated embedding kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gates_tile(idx, offs_b, b_valid, logit_ptr, mask_ptr, M: tl.constexpr, GATE: tl.constexpr,
                HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):
    """The [BLOCK_B, BLOCK_M] float32 masked softmax of the gates of rows offs_b (0 where not kept,
    and on padding rows / columns)."""
    cols = tl.arange(0, BLOCK_M)
    c_valid = cols < M
    valid = b_valid[:, None] & c_valid[None, :]
    if GATE == 2:
        logit = tl.load(logit_ptr + offs_b[:, None].to(tl.int64) * M + cols[None, :], mask=valid,
                        other=0.0).to(tl.float32)
    elif GATE == 1:
        lrow = tl.load(logit_ptr + cols, mask=c_valid, other=0.0).to(tl.float32)
        logit = tl.zeros([offs_b.shape[0], BLOCK_M], tl.float32) + lrow[None, :]
    else:
        logit = tl.zeros([offs_b.shape[0], BLOCK_M], tl.float32)
    keep = valid
    if HAS_MASK:
        mk = tl.load(mask_ptr + idx[:, None] * M + cols[None, :], mask=valid, other=0)
        keep = keep & (mk != 0)
    z = tl.where(keep, logit, float("-inf"))
    mx = tl.max(z, axis=1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # padding rows (nothing kept): no inf - inf
    ex = tl.where(keep, tl.exp(z - mx[:, None]), 0.0)
    s = tl.sum(ex, axis=1)
    s = tl.where(s == 0.0, 1.0, s)
    return ex / s[:, None]


@triton.jit
def _column(x, cols, m: tl.constexpr):
    """Column m of a [R, BLOCK_M] tile (exact: one value plus zeros)."""
    return tl.sum(tl.where(cols[None, :] == m, x, 0.0), axis=1)


@triton.jit
def _me_fwd_kernel(tab_ptr, idx_ptr, gamma_ptr, beta_ptr, logit_ptr, mask_ptr, out_ptr, gates_ptr,
                   B, D, stride_m, M: tl.constexpr, GATE: tl.constexpr, HAS_MASK: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_valid = offs_b < B
    idx = tl.load(idx_ptr + offs_b, mask=b_valid, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_M)
    gates = _gates_tile(idx, offs_b, b_valid, logit_ptr, mask_ptr, M, GATE, HAS_MASK, BLOCK_M)
    tl.store(gates_ptr + offs_b[:, None].to(tl.int64) * M + cols[None, :], gates,
             mask=b_valid[:, None] & (cols[None, :] < M))
    row_off = idx * D
    out_row = offs_b.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_valid = offs_d < D
        msk = b_valid[:, None] & d_valid[None, :]
        acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
        tm = tab_ptr
        for m in tl.static_range(M):
            a = _column(gates, cols, m)
            x = tl.load(tm + row_off[:, None] + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
            gm = tl.load(gamma_ptr + m * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)
            bt = tl.load(beta_ptr + m * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)
            acc += a[:, None] * (gm[None, :] * x + bt[None, :])
            tm += stride_m
        tl.store(out_ptr + out_row[:, None] + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=msk)


@triton.jit
def _me_bwd_kernel(go_ptr, tab_ptr, idx_ptr, gamma_ptr, beta_ptr, gates_ptr, glog_ptr, pg_ptr,
                   pb_ptr, gt_ptr, B, D, stride_m, M: tl.constexpr, TABLES: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """TABLES: 0 none (the segment kernel does the dense grad), 1 sparse values [M, B, D],
    2 atomic adds into the dense float32 [M, N, D]."""
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    b_valid = offs_b < B
    idx = tl.load(idx_ptr + offs_b, mask=b_valid, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_M)
    gvalid = b_valid[:, None] & (cols[None, :] < M)
    gate_offs = offs_b[:, None].to(tl.int64) * M + cols[None, :]
    gates = tl.load(gates_ptr + gate_offs, mask=gvalid, other=0.0).to(tl.float32)
    dots = tl.zeros([BLOCK_B, BLOCK_M], tl.float32)
    row_off = idx * D
    g_row = offs_b.to(tl.int64) * D
    part = pid.to(tl.int64) * M * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_valid = offs_d < D
        msk = b_valid[:, None] & d_valid[None, :]
        g = tl.load(go_ptr + g_row[:, None] + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
        tm = tab_ptr
        vm = gt_ptr
        for m in tl.static_range(M):
            a = _column(gates, cols, m)
            x = tl.load(tm + row_off[:, None] + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
            gm = tl.load(gamma_ptr + m * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)
            bt = tl.load(beta_ptr + m * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)
            y = gm[None, :] * x + bt[None, :]
            d_m = tl.sum(g * y, axis=1)
            dots += tl.where(cols[None, :] == m, d_m[:, None], 0.0)
            ag = a[:, None] * g
            tl.store(pg_ptr + part + m * D + offs_d, tl.sum(ag * x, axis=0), mask=d_valid)
            tl.store(pb_ptr + part + m * D + offs_d, tl.sum(ag, axis=0), mask=d_valid)
            if TABLES == 1:
                val = (a[:, None] * gm[None, :]) * g
                tl.store(vm + g_row[:, None] + offs_d[None, :], val.to(gt_ptr.dtype.element_ty),
                         mask=msk)
                vm += B * D
            elif TABLES == 2:
                val = (a[:, None] * gm[None, :]) * g
                tl.atomic_add(vm + row_off[:, None] + offs_d[None, :], val, mask=msk, sem="relaxed")
                vm += stride_m
            tm += stride_m
    tot = tl.sum(gates * dots, axis=1)
    gl = tl.where(gates != 0.0, gates * (dots - tot[:, None]), 0.0)
    tl.store(glog_ptr + gate_offs, gl, mask=gvalid)


@triton.jit
def _me_param_reduce_kernel(pg_ptr, pb_ptr, gg_ptr, gb_ptr, n_parts, MD, PB: tl.constexpr,
                            BLOCK: tl.constexpr):
    """grad_gamma, grad_beta = the sums over the row blocks of the [n_parts, M*D] partials
    ([PB, BLOCK] tiles, then a fixed tree over PB: deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < MD
    rows = tl.arange(0, PB)
    ag = tl.zeros([PB, BLOCK], tl.float32)
    ab = tl.zeros([PB, BLOCK], tl.float32)
    for j0 in range(0, n_parts, PB):
        r = j0 + rows
        o = r[:, None].to(tl.int64) * MD + offs[None, :]
        msk = (r < n_parts)[:, None] & valid[None, :]
        ag += tl.load(pg_ptr + o, mask=msk, other=0.0)
        ab += tl.load(pb_ptr + o, mask=msk, other=0.0)
    tl.store(gg_ptr + offs, tl.sum(ag, axis=0).to(gg_ptr.dtype.element_ty), mask=valid)
    tl.store(gb_ptr + offs, tl.sum(ab, axis=0).to(gb_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _me_dense_segment_kernel(go_ptr, gamma_ptr, gates_ptr, sidx_ptr, perm_ptr, gt_ptr, B, D,
                             stride_m, M: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """Program p: if sorted position p starts a run of equal ids, the rows (m, id) of the dense
    grad = the sum over the run (in sorted = original order) of gates_bm gamma_m g_b."""
    p = tl.program_id(0)
    ident = tl.load(sidx_ptr + p)
    prev = tl.load(sidx_ptr + p - 1, mask=p > 0, other=-1)
    head = ident != prev
    rows = tl.arange(0, BLOCK_M)
    r_valid = rows < M
    rows64 = rows.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_valid = offs_d < D
        msk = r_valid[:, None] & d_valid[None, :]
        gam = tl.load(gamma_ptr + rows[:, None] * D + offs_d[None, :], mask=msk,
                      other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        q = p
        run = head
        while run:
            b = tl.load(perm_ptr + q)
            g = tl.load(go_ptr + b * D + offs_d, mask=d_valid, other=0.0).to(tl.float32)
            a = tl.load(gates_ptr + b * M + rows, mask=r_valid, other=0.0)
            acc += (a[:, None] * gam) * g[None, :]
            q += 1
            nxt = tl.load(sidx_ptr + q, mask=q < B, other=-1)
            run = nxt == ident
        tl.store(gt_ptr + rows64[:, None] * stride_m + ident * D + offs_d[None, :],
                 acc.to(gt_ptr.dtype.element_ty), mask=msk & head)


# ---------------------------------------------------------------------------------------------
# Multi-tensor kernels (interpolate, anchor); table rows of 9 int64 fields (see _NF)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tptr(row, field: tl.constexpr, ref_ptr, ALIGN: tl.constexpr):
    """The pointer of field `field` of a table row: an element offset from ref_ptr (offsets from an
    argument pointer, unlike addresses cast from integers, keep the alignment that the compiler
    needs for vector loads; ALIGN: elements of 16 bytes when every tensor is 16-byte aligned)."""
    d = tl.load(row + field)
    if ALIGN > 1:
        d = tl.multiple_of(d, ALIGN)
    return ref_ptr + d


@triton.jit
def _chunk(tab_ptr, chunk_base):
    """(tensor, first element, table row, numel) of this program's chunk."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tab_ptr + chunk_base + 2 * pid)
    start = tl.load(tab_ptr + chunk_base + 2 * pid + 1)
    row = tab_ptr + t * 9
    return t, start, row, tl.load(row + 3)


@triton.jit
def _weight(row, ref_ptr, e, mask, BLOCK: tl.constexpr):
    """The anchor weights (float32) of elements e: mode 3 per element, 2 per row (field 7 elements
    per row), 1 one scalar, 0 none (1)."""
    mode = tl.load(row + 6)
    wp = ref_ptr + tl.load(row + 2)
    if mode == 3:
        w = tl.load(wp + e, mask=mask, other=0.0).to(tl.float32)
    elif mode == 2:
        w = tl.load(wp + e // tl.load(row + 7), mask=mask, other=0.0).to(tl.float32)
    elif mode == 1:
        w = tl.zeros([BLOCK], tl.float32) + tl.load(wp).to(tl.float32)
    else:
        w = tl.full([BLOCK], 1.0, tl.float32)
    return w


@triton.jit(do_not_specialize=["chunk_base"])
def _mt_reduce_kernel(tab_ptr, ref_ptr, part_ptr, chunk_base, MODE: tl.constexpr,
                      ALIGN: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """part[chunk] = the float32 sum over the chunk's elements of x0^2 (MODE 0), x0 x1 (MODE 1)
    or w (x0 - x1)^2 (MODE 2)."""
    t, start, row, n = _chunk(tab_ptr, chunk_base)
    x0 = _tptr(row, 0, ref_ptr, ALIGN)
    x1 = _tptr(row, 1, ref_ptr, ALIGN)
    acc = tl.zeros([BLOCK], tl.float32)
    for it in tl.static_range(ITERS):
        e = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = e < n
        a = tl.load(x0 + e, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            acc += a * a
        elif MODE == 1:
            acc += a * tl.load(x1 + e, mask=mask, other=0.0).to(tl.float32)
        else:
            diff = a - tl.load(x1 + e, mask=mask, other=0.0).to(tl.float32)
            acc += _weight(row, ref_ptr, e, mask, BLOCK) * (diff * diff)
    tl.store(part_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _mt_finalize_kernel(tab_ptr, part_ptr, out_ptr, out2_ptr, norms_ptr, inv_i, eps,
                        MODE: tl.constexpr, PB: tl.constexpr):
    """Per tensor k: s = the sum of its chunks' partials, in order. MODE 0: out = sqrt(s) (norms);
    1: out = s (dots), out2 = s inv_i / max(norms, eps) (grad_sigma); 2: out = s (sums)."""
    k = tl.program_id(0)
    row = tab_ptr + k.to(tl.int64) * 9
    cb = tl.load(row + 4)
    ce = tl.load(row + 5)
    acc = tl.zeros([PB], tl.float32)
    for c0 in range(cb, ce, PB):
        offs = c0 + tl.arange(0, PB)
        acc += tl.load(part_ptr + offs, mask=offs < ce, other=0.0)
    s = tl.sum(acc, axis=0)
    if MODE == 0:
        tl.store(out_ptr + k, tl.sqrt_rn(s))
    elif MODE == 1:
        tl.store(out_ptr + k, s)
        tl.store(out2_ptr + k, inv_i * s / tl.maximum(tl.load(norms_ptr + k), eps))
    else:
        tl.store(out_ptr + k, s)


@triton.jit(do_not_specialize=["chunk_base"])
def _interp_fwd_kernel(tab_ptr, ref_ptr, sigma_ptr, norms_ptr, chunk_base, c_prev, inv_i, eps,
                       ALIGN: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """out = c_prev prev + (inv_i sigma / max(norm, eps)) new   (fields 0 new, 1 prev, 8 out)."""
    t, start, row, n = _chunk(tab_ptr, chunk_base)
    new = _tptr(row, 0, ref_ptr, ALIGN)
    prev = _tptr(row, 1, ref_ptr, ALIGN)
    out = _tptr(row, 8, ref_ptr, ALIGN)
    scale = inv_i * tl.load(sigma_ptr + t) / tl.maximum(tl.load(norms_ptr + t), eps)
    for it in tl.static_range(ITERS):
        e = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = e < n
        a = tl.load(new + e, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(prev + e, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + e, (c_prev * b + scale * a).to(ref_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["chunk_base"])
def _interp_bwd_kernel(tab_ptr, ref_ptr, sigma_ptr, norms_ptr, dots_ptr, chunk_base, inv_i, eps,
                       ALIGN: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """grad_new = (sigma inv_i / nn) (g - [norm > eps] dot / nn^2 new)  (fields 0 new, 1 g, 8 out)."""
    t, start, row, n = _chunk(tab_ptr, chunk_base)
    new = _tptr(row, 0, ref_ptr, ALIGN)
    g_ptr = _tptr(row, 1, ref_ptr, ALIGN)
    out = _tptr(row, 8, ref_ptr, ALIGN)
    norm = tl.load(norms_ptr + t)
    nn = tl.maximum(norm, eps)
    scale = tl.load(sigma_ptr + t) * inv_i / nn
    proj = tl.where(norm > eps, tl.load(dots_ptr + t) / (nn * nn), 0.0)
    for it in tl.static_range(ITERS):
        e = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = e < n
        a = tl.load(new + e, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + e, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + e, (scale * (g - proj * a)).to(ref_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["chunk_base"])
def _anchor_bwd_kernel(tab_ptr, ref_ptr, grad_ptr, chunk_base, ALIGN: tl.constexpr,
                       ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """grad_p = 2 grad_k w (p - a)   (fields 0 p, 1 a, 2 w, 8 out)."""
    t, start, row, n = _chunk(tab_ptr, chunk_base)
    p_ptr = _tptr(row, 0, ref_ptr, ALIGN)
    a_ptr = _tptr(row, 1, ref_ptr, ALIGN)
    out = _tptr(row, 8, ref_ptr, ALIGN)
    g2 = 2.0 * tl.load(grad_ptr + t).to(tl.float32)
    for it in tl.static_range(ITERS):
        e = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = e < n
        p = tl.load(p_ptr + e, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + e, mask=mask, other=0.0).to(tl.float32)
        w = _weight(row, ref_ptr, e, mask, BLOCK)
        tl.store(out + e, (g2 * w * (p - a)).to(ref_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _check_device(t: torch.Tensor, name: str):
    if t.device.type != "cuda" and not (_INTERPRET and t.device.type == "cpu"):
        raise RuntimeError(
            f"mmcl_fast (triton): {name} must be a CUDA tensor (CPU tensors only under "
            "TRITON_INTERPRET=1)"
        )
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"mmcl_fast (triton): {name} must be float32/float16/bfloat16, got {t.dtype}")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _me_blocks(D: int):
    return _ME_BLOCK_B, max(2, triton.next_power_of_2(max(1, D))) if D <= _ME_MAX_BLOCK_D else _ME_MAX_BLOCK_D


def _forward_impl(tables, index, gamma, beta, gate_logits, modality_mask):
    _check_device(tables, "tables")
    if tables.dim() != 3 or index.dim() != 1 or gamma.shape != (tables.shape[0], tables.shape[2]):
        raise ValueError("mmcl_fast (triton): tables [M, N, D], index [B], gamma/beta [M, D]")
    M, N, D = tables.shape
    B = index.shape[0]
    tables, index = tables.contiguous(), index.contiguous()
    gamma, beta = gamma.contiguous(), beta.contiguous()
    dev = tables.device
    out = torch.empty((B, D), dtype=tables.dtype, device=dev)
    gates = torch.empty((B, M), dtype=torch.float32, device=dev)
    if B == 0:
        return out, gates
    if M == 0:
        return out.zero_(), gates
    if gate_logits is None:
        gate_mode, logit_arg = 0, gamma
    elif gate_logits.dim() == 1:
        gate_mode, logit_arg = 1, gate_logits.contiguous()
    else:
        gate_mode, logit_arg = 2, gate_logits.contiguous()
    mask_arg = modality_mask.contiguous().view(torch.uint8) if modality_mask is not None else index
    bb, bd = _me_blocks(D)
    with _device_guard(dev):
        _me_fwd_kernel[(triton.cdiv(B, bb),)](
            tables, index, gamma, beta, logit_arg, mask_arg, out, gates, B, D, N * D,
            M=M, GATE=gate_mode, HAS_MASK=modality_mask is not None, BLOCK_B=bb,
            BLOCK_M=max(2, triton.next_power_of_2(M)), BLOCK_D=bd, num_warps=_ME_WARPS,
        )
    return out, gates


def _backward_impl(grad_out, tables, index, gamma, beta, gates, sparse):
    _check_device(tables, "tables")
    M, N, D = tables.shape
    B = index.shape[0]
    dev = tables.device
    dtype = tables.dtype
    grad_out, tables, index = grad_out.contiguous(), tables.contiguous(), index.contiguous()
    gamma, beta = gamma.contiguous(), beta.contiguous()
    gates = gates.contiguous().to(torch.float32)
    if sparse:
        grad_tables = torch.empty((M, B, D), dtype=dtype, device=dev)
    else:
        grad_tables = torch.zeros((M, N, D), dtype=dtype, device=dev)
    grad_logits = torch.empty((B, M), dtype=torch.float32, device=dev)
    if B == 0 or M == 0 or D == 0:
        return grad_tables, torch.zeros_like(gamma), torch.zeros_like(beta), grad_logits.zero_()
    bb, bd = _me_blocks(D)
    bm = max(2, triton.next_power_of_2(M))
    n_parts = triton.cdiv(B, bb)
    parts = torch.empty((2, n_parts, M, D), dtype=torch.float32, device=dev)
    grad_gamma = torch.empty_like(gamma)
    grad_beta = torch.empty_like(beta)
    if sparse:
        mode = 1
    elif dtype == torch.float32 and _DENSE_ATOMIC_F32:
        mode = 2
    else:
        mode = 0
    with _device_guard(dev):
        _me_bwd_kernel[(n_parts,)](
            grad_out, tables, index, gamma, beta, gates, grad_logits, parts[0], parts[1],
            grad_tables, B, D, N * D, M=M, TABLES=mode, BLOCK_B=bb, BLOCK_M=bm, BLOCK_D=bd,
            num_warps=_ME_WARPS,
        )
        rb = 16 if _INTERPRET else 64
        _me_param_reduce_kernel[(triton.cdiv(M * D, rb),)](
            parts[0], parts[1], grad_gamma, grad_beta, n_parts, M * D, PB=4 if _INTERPRET else 32,
            BLOCK=rb, num_warps=4,
        )
        if mode == 0:
            sidx, perm = torch.sort(index, stable=True)
            _me_dense_segment_kernel[(B,)](
                grad_out, gamma, gates, sidx, perm, grad_tables, B, D, N * D, M=M, BLOCK_M=bm,
                BLOCK_D=bd, num_warps=_ME_WARPS,
            )
    return grad_tables, grad_gamma, grad_beta, grad_logits


# -- the multi-tensor table ---------------------------------------------------------------------

def _chunk_iters(total: int, device: torch.device) -> int:
    """Tiles per chunk: enough chunks to give every SM several, at most _MT_MAX_ITERS tiles."""
    if _INTERPRET or device.type != "cuda":
        return _MT_MAX_ITERS
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = 8 * _sm_count(index)
    iters = max(1, min(_MT_MAX_ITERS, total // (_MT_BLOCK * target)))
    return 1 << (iters.bit_length() - 1)


def _check_list(ref_list, name, others):
    """All tensors of a call: one device, one dtype (the first of ref_list's), contiguous."""
    t0 = ref_list[0]
    _check_device(t0, f"{name}[0]")
    for lname, ts in others:
        if len(ts) != len(ref_list):
            raise ValueError(f"mmcl_fast (triton): {lname} has {len(ts)} tensors, {name} {len(ref_list)}")
        for k, t in enumerate(ts):
            if t is None:
                continue
            if t.device != t0.device or t.dtype != t0.dtype:
                raise ValueError(f"mmcl_fast (triton): {lname}[{k}] must be a {t0.dtype} tensor on {t0.device}")
            if not t.is_contiguous():
                raise ValueError(f"mmcl_fast (triton): {lname}[{k}] must be contiguous")


def _ref_tensor(*lists):
    """The first non-empty tensor (the base of the table's offsets), or None when all are empty."""
    for ts in lists:
        for t in ts:
            if t is not None and t.numel() > 0:
                return t
    return None


def _multi(rows, numels, ref, device):
    iters = _chunk_iters(sum(numels), device)
    tab, n_chunks = _table(rows, numels, _MT_BLOCK * iters, ref.data_ptr(), device, (_NF, _F_CB, _F_CE))
    return tab, n_chunks, iters


def _interp_rows(a_list, b_list, outs, rel):
    rows = [0] * (_NF * len(a_list))
    numels = []
    for k, (a, b, o) in enumerate(zip(a_list, b_list, outs)):
        if a.numel() != b.numel() or a.numel() != o.numel():
            raise ValueError(f"mmcl_fast (triton): tensors {k} of the lists differ in size")
        r = k * _NF
        rows[r + _F_X0] = rel(a)
        rows[r + _F_X1] = rel(b)
        rows[r + _F_OUT] = rel(o)
        rows[r + _F_N] = a.numel()
        numels.append(a.numel())
    return rows, numels


def _interp_forward_impl(prev, new, sigma, i, eps):
    K = len(new)
    if K == 0:
        return [], torch.empty((0,), dtype=torch.float32, device=sigma.device)
    _check_list(new, "new", [("prev", prev)])
    dev = new[0].device
    sigma = sigma.contiguous().to(torch.float32)
    prev = [p.contiguous() for p in prev]
    new = [n.contiguous() for n in new]
    outs = [torch.empty_like(p) for p in prev]
    norms = torch.zeros((K,), dtype=torch.float32, device=dev)
    ref = _ref_tensor(new, prev, outs)
    inv_i = 1.0 / float(i)
    if ref is None:
        return outs, norms
    rel = _Rel(ref)
    rows, numels = _interp_rows(new, prev, outs, rel)
    with _device_guard(dev):
        tab, n_chunks, iters = _multi(rows, numels, ref, dev)
        part = torch.empty((max(n_chunks, 1),), dtype=torch.float32, device=dev)
        _mt_reduce_kernel[(n_chunks,)](tab, ref, part, K * _NF, MODE=_R_SUMSQ, ALIGN=rel.align(),
                                       ITERS=iters, BLOCK=_MT_BLOCK, num_warps=_MT_WARPS)
        _mt_finalize_kernel[(K,)](tab, part, norms, norms, norms, inv_i, float(eps), MODE=_R_SUMSQ,
                                  PB=_MT_PART_BLOCK, num_warps=_MT_WARPS)
        _interp_fwd_kernel[(n_chunks,)](tab, ref, sigma, norms, K * _NF, 1.0 - inv_i, inv_i,
                                        float(eps), ALIGN=rel.align(), ITERS=iters,
                                        BLOCK=_MT_BLOCK, num_warps=_MT_WARPS)
    return outs, norms


def _interp_backward_impl(grad_out, new, sigma, norms, i, eps):
    K = len(new)
    if K == 0:
        return [], torch.empty((0,), dtype=torch.float32, device=sigma.device)
    _check_list(new, "new", [("grad_out", grad_out)])
    dev = new[0].device
    sigma = sigma.contiguous().to(torch.float32)
    norms = norms.contiguous().to(torch.float32)
    new = [n.contiguous() for n in new]
    grad_out = [g.contiguous() for g in grad_out]
    grad_new = [torch.empty_like(n) for n in new]
    dots = torch.zeros((K,), dtype=torch.float32, device=dev)
    grad_sigma = torch.zeros((K,), dtype=torch.float32, device=dev)
    ref = _ref_tensor(new, grad_out, grad_new)
    inv_i = 1.0 / float(i)
    if ref is None:
        return grad_new, grad_sigma
    rel = _Rel(ref)
    rows, numels = _interp_rows(new, grad_out, grad_new, rel)
    with _device_guard(dev):
        tab, n_chunks, iters = _multi(rows, numels, ref, dev)
        part = torch.empty((max(n_chunks, 1),), dtype=torch.float32, device=dev)
        _mt_reduce_kernel[(n_chunks,)](tab, ref, part, K * _NF, MODE=_R_DOT, ALIGN=rel.align(),
                                       ITERS=iters, BLOCK=_MT_BLOCK, num_warps=_MT_WARPS)
        _mt_finalize_kernel[(K,)](tab, part, dots, grad_sigma, norms, inv_i, float(eps),
                                  MODE=_R_DOT, PB=_MT_PART_BLOCK, num_warps=_MT_WARPS)
        _interp_bwd_kernel[(n_chunks,)](tab, ref, sigma, norms, dots, K * _NF, inv_i, float(eps),
                                        ALIGN=rel.align(), ITERS=iters, BLOCK=_MT_BLOCK,
                                        num_warps=_MT_WARPS)
    return grad_new, grad_sigma


def _anchor_rows(params, anchors, weights, outs, rel):
    rows = [0] * (_NF * len(params))
    numels = []
    for k, (p, a) in enumerate(zip(params, anchors)):
        n = p.numel()
        if a.numel() != n:
            raise ValueError(f"mmcl_fast (triton): anchors[{k}] must have params[{k}]'s shape")
        r = k * _NF
        rows[r + _F_X0] = rel(p)
        rows[r + _F_X1] = rel(a)
        rows[r + _F_N] = n
        if outs is not None:
            rows[r + _F_OUT] = rel(outs[k])
        w = weights[k] if weights else None
        if w is not None and n > 0:
            rows[r + _F_W] = rel(w, vector=False)
            if w.numel() == 1:
                rows[r + _F_WMODE] = _W_SCALAR
            elif w.dim() == 1 and p.dim() > 1 and w.numel() == p.shape[0]:
                rows[r + _F_WMODE] = _W_ROW
                rows[r + _F_WDIV] = n // p.shape[0]
            elif w.numel() == n:
                rows[r + _F_WMODE] = _W_ELEM
            else:
                raise ValueError(
                    f"mmcl_fast (triton): weights[{k}] must hold 1, params[{k}].size(0) or "
                    "params[k].numel() values")
        numels.append(n)
    return rows, numels


def _anchor_forward_impl(params, anchors, weights):
    K = len(params)
    if K == 0:
        return torch.empty((0,), dtype=torch.float32)
    weights = list(weights) if weights else [None] * K
    _check_list(params, "params", [("anchors", anchors), ("weights", weights)])
    dev = params[0].device
    params = [p.contiguous() for p in params]
    anchors = [a.contiguous() for a in anchors]
    sums = torch.zeros((K,), dtype=torch.float32, device=dev)
    ref = _ref_tensor(params, anchors)
    if ref is None:
        return sums
    rel = _Rel(ref)
    rows, numels = _anchor_rows(params, anchors, weights, None, rel)
    with _device_guard(dev):
        tab, n_chunks, iters = _multi(rows, numels, ref, dev)
        part = torch.empty((max(n_chunks, 1),), dtype=torch.float32, device=dev)
        _mt_reduce_kernel[(n_chunks,)](tab, ref, part, K * _NF, MODE=_R_ANCHOR,
                                       ALIGN=rel.align(), ITERS=iters, BLOCK=_MT_BLOCK,
                                       num_warps=_MT_WARPS)
        _mt_finalize_kernel[(K,)](tab, part, sums, sums, sums, 1.0, 0.0, MODE=_R_ANCHOR,
                                  PB=_MT_PART_BLOCK, num_warps=_MT_WARPS)
    return sums


def _anchor_backward_impl(grad, params, anchors, weights):
    K = len(params)
    if K == 0:
        return []
    weights = list(weights) if weights else [None] * K
    _check_list(params, "params", [("anchors", anchors), ("weights", weights)])
    dev = params[0].device
    params = [p.contiguous() for p in params]
    anchors = [a.contiguous() for a in anchors]
    grad = grad.contiguous().to(torch.float32)
    outs = [torch.empty_like(p) for p in params]
    ref = _ref_tensor(params, anchors, outs)
    if ref is None:
        return outs
    rel = _Rel(ref)
    rows, numels = _anchor_rows(params, anchors, weights, outs, rel)
    with _device_guard(dev):
        tab, n_chunks, iters = _multi(rows, numels, ref, dev)
        _anchor_bwd_kernel[(n_chunks,)](tab, ref, grad, K * _NF, ALIGN=rel.align(), ITERS=iters,
                                        BLOCK=_MT_BLOCK, num_warps=_MT_WARPS)
    return outs


# ---------------------------------------------------------------------------------------------
# The custom ops (functional: they return new tensors)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmcl_fast::modulated_embedding_forward_triton", mutates_args=())
def modulated_embedding_forward_triton(
    tables: torch.Tensor,
    index: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    gate_logits: Optional[torch.Tensor],
    modality_mask: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of mmcl_fast::modulated_embedding_forward: (out, gates)."""
    return _forward_impl(tables, index, gamma, beta, gate_logits, modality_mask)


@modulated_embedding_forward_triton.register_fake
def _(tables, index, gamma, beta, gate_logits, modality_mask):
    M, _, D = tables.shape
    B = index.shape[0]
    return tables.new_empty((B, D)), tables.new_empty((B, M), dtype=_acc_dtype(tables))


@torch.library.custom_op("mmcl_fast::modulated_embedding_backward_triton", mutates_args=())
def modulated_embedding_backward_triton(
    grad_out: torch.Tensor,
    tables: torch.Tensor,
    index: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    gates: torch.Tensor,
    sparse: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton implementation of mmcl_fast::modulated_embedding_backward:
    (grad_tables, grad_gamma, grad_beta, grad_logits)."""
    return _backward_impl(grad_out, tables, index, gamma, beta, gates, sparse)


@modulated_embedding_backward_triton.register_fake
def _(grad_out, tables, index, gamma, beta, gates, sparse):
    M, N, D = tables.shape
    B = index.shape[0]
    gt = tables.new_empty((M, B, D) if sparse else (M, N, D))
    return (gt, gamma.new_empty(gamma.shape), beta.new_empty(beta.shape),
            tables.new_empty((B, M), dtype=_acc_dtype(tables)))


@torch.library.custom_op("mmcl_fast::interpolate_weights_forward_triton", mutates_args=())
def interpolate_weights_forward_triton(
    prev: List[torch.Tensor],
    new: List[torch.Tensor],
    sigma: torch.Tensor,
    i: float,
    eps: float,
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Triton implementation of mmcl_fast::interpolate_weights_forward: (outs, norms)."""
    return _interp_forward_impl(prev, new, sigma, i, eps)


@interpolate_weights_forward_triton.register_fake
def _(prev, new, sigma, i, eps):
    acc = _acc_dtype(new[0]) if new else torch.float32
    return [p.new_empty(p.shape) for p in prev], sigma.new_empty((len(new),), dtype=acc)


@torch.library.custom_op("mmcl_fast::interpolate_weights_backward_triton", mutates_args=())
def interpolate_weights_backward_triton(
    grad_out: List[torch.Tensor],
    new: List[torch.Tensor],
    sigma: torch.Tensor,
    norms: torch.Tensor,
    i: float,
    eps: float,
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Triton implementation of mmcl_fast::interpolate_weights_backward: (grad_new, grad_sigma)."""
    return _interp_backward_impl(grad_out, new, sigma, norms, i, eps)


@interpolate_weights_backward_triton.register_fake
def _(grad_out, new, sigma, norms, i, eps):
    acc = _acc_dtype(new[0]) if new else torch.float32
    return [n.new_empty(n.shape) for n in new], sigma.new_empty((len(new),), dtype=acc)


@torch.library.custom_op("mmcl_fast::anchor_penalty_forward_triton", mutates_args=())
def anchor_penalty_forward_triton(
    params: List[torch.Tensor],
    anchors: List[torch.Tensor],
    weights: List[Optional[torch.Tensor]],
) -> torch.Tensor:
    """Triton implementation of mmcl_fast::anchor_penalty_forward: sums [K] float32."""
    return _anchor_forward_impl(params, anchors, weights)


@anchor_penalty_forward_triton.register_fake
def _(params, anchors, weights):
    if not params:
        return torch.empty((0,), dtype=torch.float32)
    return params[0].new_empty((len(params),), dtype=_acc_dtype(params[0]))


@torch.library.custom_op("mmcl_fast::anchor_penalty_backward_triton", mutates_args=())
def anchor_penalty_backward_triton(
    grad: torch.Tensor,
    params: List[torch.Tensor],
    anchors: List[torch.Tensor],
    weights: List[Optional[torch.Tensor]],
) -> List[torch.Tensor]:
    """Triton implementation of mmcl_fast::anchor_penalty_backward: grad_params."""
    return _anchor_backward_impl(grad, params, anchors, weights)


@anchor_penalty_backward_triton.register_fake
def _(grad, params, anchors, weights):
    return [p.new_empty(p.shape) for p in params]
