"""Op family A in Triton: the fused, multi-tensor, per-modality gradient-modulated AdamW / SGD steps.

The maths (the same as mmcl_fast/ops/modality_step.py's reference and csrc/modality_step.h), for a
tensor p with gradient g of a group whose modality is m (k = 1 and no noise when m = -1):

    k     = coefficients[m]                                  (read by the kernel: no host sync)
    sigma = unbiased std of the UNSCALED g (0 when numel < 2), only when noise is on and m >= 0
    eps_e = Philox4x32-10 normal of element e:  key (seed_lo, seed_hi),
            counter (e//4 lo, e//4 hi, tensor_id, noise_step);  u = ((x >> 8) + 0.5) * 2^-24,
            lanes 0, 1 = Box-Muller of (u0, u1): r = sqrt(-2 ln u0), (r cos 2 pi u1, r sin 2 pi u1);
            lanes 2, 3 likewise from (u2, u3)
    g'_e  = k g_e + sigma eps_e + 2 lambda w_{e // (A / numel(w))} (p_e - anchor_e)   for e < A
    g'_e  = k g_e + sigma eps_e                                                        for e >= A
            (A = anchor.numel(); w = 1 when the tensor has no anchor weight)

then torch.optim's own update with g' in place of g (t = steps[i], the count after this step):

    AdamW: p *= 1 - lr wd;  m = lerp(m, g', 1 - b1);  v = b2 v + (1 - b2) g'^2;  vmax = max(vmax, v)
           p -= (lr / (1 - b1^t)) m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps)
    SGD:   d = g' + wd p;  buf = d if first_step else mom buf + (1 - damp) d
           d = d + mom buf if nesterov else buf;  p -= lr d

Everything is computed in float32 and stored in the parameter dtype (float32 / float16 / bfloat16).

Launches per call, whatever the number of tensors: one (the update) without noise; three with noise
(per-chunk gradient (count, mean, M2) partials; a per-tensor Chan merge of them into sigma, in
float64; the update). All tensors of a call share one launch through a device int64 table: one row
of 16 fields per tensor (each tensor's element offset from the first parameter, which is passed as
the one pointer argument; sizes, ids, ...), then one (tensor, start) pair per chunk of `chunk`
elements; each program takes one chunk. Offsets from an argument pointer, unlike addresses cast
from integers, keep the 16-byte alignment the compiler needs for vector loads. The table is cached
by its content (so a step over the same tensors copies nothing to the device); a new one goes
through pinned memory with a non-blocking copy. The element loop works on [BLOCK/4, 4] tiles so
that one Philox call gives the four lanes of a group of 4 elements.

The row-sparse step (modality_adamw_rows_: lazy AdamW of one parameter [N, R], only the listed
rows read and written) is one launch of _adamw_rows_kernel: each program takes BLOCK_R listed rows
and walks their R columns in [BLOCK_R, BLOCK_C] tiles, with the same AdamW arithmetic and

    g = k * grad_rows[i] + 2 lambda w_r (p_r - anchor_r)    (anchor term for r < anchor rows)

(w: 1, the scalar, per-row or per-element weight). Its pointers are plain arguments: no table.
"""
import collections
import functools
import math
import os
import struct
import threading
from typing import List, Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Elements per tile, and tiles per chunk. The interpreter gets small chunks so that small test
# tensors still span several chunks, with full and partial tiles.
_BLOCK = 128 if _INTERPRET else 1024
_NUM_WARPS = 4
_MAX_ITERS = 2 if _INTERPRET else 16
_PART_BLOCK = 32 if _INTERPRET else 512
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1

# Fields of one tensor's row of the table.
_NF = 16
(_F_P, _F_G, _F_S0, _F_S1, _F_S2, _F_A, _F_W, _F_N, _F_NA, _F_WS, _F_TID, _F_FIRST,
 _F_CB, _F_CE, _F_SS, _F_BC2) = range(_NF)


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _ptr(row, field: tl.constexpr, ref_ptr, ALIGN: tl.constexpr):
    """The pointer in field `field` of a table row. Rows hold element offsets from ref_ptr (the
    first parameter) rather than addresses: an address cast from an integer loses the alignment
    that the compiler needs to vectorise, an offset from an argument pointer keeps it (ALIGN:
    elements of 16 bytes when every tensor is 16-byte aligned, else 1)."""
    d = tl.load(row + field)
    if ALIGN > 1:
        d = tl.multiple_of(d, ALIGN)
    return ref_ptr + d


@triton.jit
def _f32_field(row, field: tl.constexpr):
    """A float32 stored by its bits in an int64 field."""
    return tl.load(row + field).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _ld(ptr, e, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + e, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + e)
    return x.to(tl.float32)


@triton.jit
def _st(ptr, e, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + e, x.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + e, x.to(ptr.dtype.element_ty))


@triton.jit
def _log_unit(u):
    """ln(u) for u in (0, 1]: exponent from the bits, mantissa in [sqrt(1/2), sqrt(2)), then
    2 atanh((m-1)/(m+1)) by its series (as csrc/cpu/modality_step.cpp); relative error ~1e-7 near
    u = 1, so -2 ln u stays > 0 and accurate for the largest 24-bit uniforms."""
    bits = u.to(tl.int32, bitcast=True)
    ex = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.41421356
    m = tl.where(big, 0.5 * m, m)
    ex = tl.where(big, ex + 1, ex)
    t = (m - 1.0) / (m + 1.0)
    t2 = t * t
    series = t * (2.0 + t2 * (0.666666667 + t2 * (0.4 + t2 * (0.285714286 + t2 * 0.222222222))))
    return ex.to(tl.float32) * 0.693147181 + series


@triton.jit
def _sincos_2pi(u):
    """(sin, cos) of 2 pi u for u in (0, 1): quadrant q = round(4u), |r| <~ pi/4, Taylor to r^9."""
    qf = tl.floor(4.0 * u + 0.5)
    r = (u - 0.25 * qf) * 6.28318531
    r2 = r * r
    sr = r * (1.0 + r2 * (-1.6666667e-1 + r2 * (8.3333333e-3 + r2 * (-1.9841270e-4 + r2 * 2.7557319e-6))))
    cr = 1.0 + r2 * (-0.5 + r2 * (4.1666667e-2 + r2 * (-1.3888889e-3 + r2 * 2.4801587e-5)))
    q = qf.to(tl.int32) & 3
    odd = (q & 1) != 0
    ss = tl.where(odd, cr, sr)
    cc = tl.where(odd, sr, cr)
    s = tl.where((q & 2) != 0, -ss, ss)
    c = tl.where(((q + 1) & 2) != 0, -cc, cc)
    return s, c


@triton.jit
def _uniform24(x):
    return ((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def _philox_normal_tile(seed, tid, step, grp0, BLOCK: tl.constexpr):
    """Standard normals of the [BLOCK/4, 4] tile of elements 4*grp0 ... 4*grp0 + BLOCK - 1."""
    grp = grp0 + tl.arange(0, BLOCK // 4).to(tl.int64)
    c0 = grp.to(tl.uint32)
    c1 = (grp >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + tid
    c3 = tl.zeros_like(c0) + step
    x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3)
    r01 = tl.sqrt_rn(tl.maximum(-2.0 * _log_unit(_uniform24(x0)), 0.0))
    r23 = tl.sqrt_rn(tl.maximum(-2.0 * _log_unit(_uniform24(x2)), 0.0))
    s1, c1f = _sincos_2pi(_uniform24(x1))
    s3, c3f = _sincos_2pi(_uniform24(x3))
    lane = tl.arange(0, 4)[None, :]
    z = tl.where(lane == 0, (r01 * c1f)[:, None],
                 tl.where(lane == 1, (r01 * s1)[:, None],
                          tl.where(lane == 2, (r23 * c3f)[:, None], (r23 * s3)[:, None])))
    return z


@triton.jit
def _modulated_grad(g, p, e, mask, off, k, sigma, seed, tid, step, a_ptr, w_ptr, a_n, w_stride,
                    has_w, lambda2, USE_K: tl.constexpr, NOISE: tl.constexpr,
                    ANCHOR: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """g' = k g + sigma eps + 2 lambda w (p - anchor) on one tile (see the module docstring)."""
    if USE_K:
        gm = k * g
    else:
        gm = g
    if NOISE:
        gm = gm + sigma * _philox_normal_tile(seed, tid, step, off // 4, BLOCK)
    if ANCHOR:
        am = mask & (e < a_n)
        diff = p - tl.load(a_ptr + e, mask=am, other=0.0).to(tl.float32)
        if HAS_W:
            # elements past w_n read no weight (1); w_n = 0 for a tensor without weights. (A
            # mask built as `am & has_w` is not boolean in triton 3.9's interpreter.)
            w_n = tl.where(has_w, a_n, 0)
            w = tl.load(w_ptr + e // w_stride, mask=mask & (e < w_n), other=1.0).to(tl.float32)
            diff = w * diff
        gm = tl.where(am, gm + lambda2 * diff, gm)
    return gm


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["chunk_base", "chunk", "n_chunks"])
def _grad_stats_kernel(tab_ptr, ref_ptr, part_ptr, chunk_base, chunk, n_chunks, ALIGN: tl.constexpr,
                       BLOCK: tl.constexpr):
    """(count, mean, M2) of the gradient elements of one chunk: float32, shifted by the chunk's
    first element (so that a large mean does not cost precision), Chan merge of the tiles."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tab_ptr + chunk_base + 2 * pid)
    start = tl.multiple_of(tl.load(tab_ptr + chunk_base + 2 * pid + 1), BLOCK)
    row = tab_ptr + t * 16
    end = tl.minimum(start + chunk, tl.load(row + 7))
    g_ptr = _ptr(row, 1, ref_ptr, ALIGN)
    shift = tl.load(g_ptr + start).to(tl.float32)
    n = tl.sum(tl.zeros([1], dtype=tl.float32), axis=0)
    mean = n
    m2 = n
    for off in range(start, end, BLOCK):
        e = off + tl.arange(0, BLOCK).to(tl.int64)
        mask = e < end
        if off + BLOCK <= end:
            x = _ld(g_ptr, e, mask, False)
        else:
            x = _ld(g_ptr, e, mask, True)
        x = tl.where(mask, x - shift, 0.0)
        nb = tl.minimum(end - off, BLOCK).to(tl.float32)
        mb = tl.sum(x, axis=0) / nb
        d = tl.where(mask, x - mb, 0.0)
        m2b = tl.sum(d * d, axis=0)
        delta = mb - mean
        ntot = n + nb
        mean = mean + delta * (nb / ntot)
        m2 = m2 + m2b + delta * delta * (n * nb / ntot)
        n = ntot
    tl.store(part_ptr + pid, n)
    tl.store(part_ptr + n_chunks + pid, mean + shift)
    tl.store(part_ptr + 2 * n_chunks + pid, m2)


@triton.jit
def _sigma_kernel(tab_ptr, part_ptr, sigma_ptr, n_chunks, PB: tl.constexpr):
    """sigma of one tensor: Chan merge (float64) of its chunks' partials, unbiased, 0 if n < 2."""
    t = tl.program_id(0).to(tl.int64)
    row = tab_ptr + t * 16
    cb = tl.load(row + 12)
    ce = tl.load(row + 13)
    acc_n = tl.zeros([PB], dtype=tl.float64)
    acc_s = tl.zeros([PB], dtype=tl.float64)
    for off in range(cb, ce, PB):
        i = off + tl.arange(0, PB).to(tl.int64)
        mk = i < ce
        nb = tl.load(part_ptr + i, mask=mk, other=0.0).to(tl.float64)
        mb = tl.load(part_ptr + n_chunks + i, mask=mk, other=0.0).to(tl.float64)
        acc_n += nb
        acc_s += nb * mb
    ntot = tl.sum(acc_n, axis=0)
    mean = tl.sum(acc_s, axis=0) / tl.maximum(ntot, 1.0)
    acc_m2 = tl.zeros([PB], dtype=tl.float64)
    for off in range(cb, ce, PB):
        i = off + tl.arange(0, PB).to(tl.int64)
        mk = i < ce
        nb = tl.load(part_ptr + i, mask=mk, other=0.0).to(tl.float64)
        mb = tl.load(part_ptr + n_chunks + i, mask=mk, other=0.0).to(tl.float64)
        m2b = tl.load(part_ptr + 2 * n_chunks + i, mask=mk, other=0.0).to(tl.float64)
        dm = mb - mean
        acc_m2 += m2b + nb * dm * dm
    m2 = tl.sum(acc_m2, axis=0)
    var = tl.where(ntot > 1.5, m2 / tl.maximum(ntot - 1.0, 1.0), 0.0)
    tl.store(sigma_ptr + t, tl.sqrt(tl.maximum(var, 0.0)).to(tl.float32))


@triton.jit
def _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, w_ptr, e, mask, off, k, sigma, seed,
                tid, step, a_n, w_stride, has_w, lambda2, decay, lerp_w, beta2, one_minus_beta2,
                eps, step_size, bc2_sqrt, USE_K: tl.constexpr, NOISE: tl.constexpr,
                ANCHOR: tl.constexpr, HAS_W: tl.constexpr, AMSGRAD: tl.constexpr,
                LERP_LOW: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    p = _ld(p_ptr, e, mask, MASKED)
    g = _ld(g_ptr, e, mask, MASKED)
    g = _modulated_grad(g, p, e, mask, off, k, sigma, seed, tid, step, a_ptr, w_ptr, a_n, w_stride,
                        has_w, lambda2, USE_K, NOISE, ANCHOR, HAS_W, BLOCK)
    m = _ld(m_ptr, e, mask, MASKED)
    v = _ld(v_ptr, e, mask, MASKED)
    p = p * decay
    if LERP_LOW:  # torch.lerp: weight < 0.5 ? m + w (g - m) : g - (g - m)(1 - w)
        m = m + lerp_w * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_w)
    v = v * beta2 + (one_minus_beta2 * g) * g
    if AMSGRAD:
        vmax = tl.maximum(_ld(vmax_ptr, e, mask, MASKED), v)
        _st(vmax_ptr, e, vmax, mask, MASKED)
        denom = tl.sqrt_rn(vmax) / bc2_sqrt + eps
    else:
        denom = tl.sqrt_rn(v) / bc2_sqrt + eps
    p = p - (step_size * m) / denom
    _st(m_ptr, e, m, mask, MASKED)
    _st(v_ptr, e, v, mask, MASKED)
    _st(p_ptr, e, p, mask, MASKED)


@triton.jit(do_not_specialize=["chunk_base", "chunk", "modality", "seed_lo", "seed_hi", "noise_step"])
def _adamw_kernel(tab_ptr, ref_ptr, coef_ptr, sigma_ptr, chunk_base, chunk, modality, decay, lerp_w,
                  beta2, one_minus_beta2, eps, lambda2, step_size, bc2_sqrt, seed_lo, seed_hi,
                  noise_step, USE_K: tl.constexpr, NOISE: tl.constexpr, ANCHOR: tl.constexpr,
                  HAS_W: tl.constexpr, AMSGRAD: tl.constexpr, PER_TENSOR_STEP: tl.constexpr,
                  LERP_LOW: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tab_ptr + chunk_base + 2 * pid)
    start = tl.multiple_of(tl.load(tab_ptr + chunk_base + 2 * pid + 1), BLOCK)
    row = tab_ptr + t * 16
    end = tl.minimum(start + chunk, tl.load(row + 7))
    p_ptr = _ptr(row, 0, ref_ptr, ALIGN)
    g_ptr = _ptr(row, 1, ref_ptr, ALIGN)
    m_ptr = _ptr(row, 2, ref_ptr, ALIGN)
    v_ptr = _ptr(row, 3, ref_ptr, ALIGN)
    vmax_ptr = m_ptr
    if AMSGRAD:
        vmax_ptr = _ptr(row, 4, ref_ptr, ALIGN)
    if PER_TENSOR_STEP:
        step_size = _f32_field(row, 14)
        bc2_sqrt = _f32_field(row, 15)
    k = 1.0
    if USE_K:
        k = tl.load(coef_ptr + modality)
    sigma = 0.0
    seed = 0
    tid = 0
    step = 0
    if NOISE:
        sigma = tl.load(sigma_ptr + t)
        seed = (seed_hi.to(tl.uint64) << 32) | seed_lo.to(tl.uint64)
        tid = tl.load(row + 10).to(tl.uint32)
        step = noise_step.to(tl.uint32)
    a_ptr = p_ptr
    w_ptr = p_ptr
    a_n = 0
    w_stride = 1
    has_w = False
    if ANCHOR:
        a_ptr = _ptr(row, 5, ref_ptr, 1)
        a_n = tl.load(row + 8)
        if HAS_W:
            w_ptr = _ptr(row, 6, ref_ptr, 1)
            ws = tl.load(row + 9)
            has_w = ws != 0
            w_stride = tl.maximum(ws, 1)
    e_loc = (tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]).to(tl.int64)
    for off in range(start, end, BLOCK):
        e = off + e_loc
        mask = e < end
        if off + BLOCK <= end:
            _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, w_ptr, e, mask, off, k, sigma,
                        seed, tid, step, a_n, w_stride, has_w, lambda2, decay, lerp_w, beta2,
                        one_minus_beta2, eps, step_size, bc2_sqrt, USE_K, NOISE, ANCHOR, HAS_W,
                        AMSGRAD, LERP_LOW, BLOCK, False)
        else:
            _adamw_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, w_ptr, e, mask, off, k, sigma,
                        seed, tid, step, a_n, w_stride, has_w, lambda2, decay, lerp_w, beta2,
                        one_minus_beta2, eps, step_size, bc2_sqrt, USE_K, NOISE, ANCHOR, HAS_W,
                        AMSGRAD, LERP_LOW, BLOCK, True)


@triton.jit
def _sgd_tile(p_ptr, g_ptr, b_ptr, a_ptr, w_ptr, e, mask, off, k, sigma, seed, tid, step, a_n,
              w_stride, has_w, lambda2, first, lr, momentum, one_minus_dampening, weight_decay,
              USE_K: tl.constexpr, NOISE: tl.constexpr, ANCHOR: tl.constexpr, HAS_W: tl.constexpr,
              MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr,
              MASKED: tl.constexpr):
    p = _ld(p_ptr, e, mask, MASKED)
    g = _ld(g_ptr, e, mask, MASKED)
    g = _modulated_grad(g, p, e, mask, off, k, sigma, seed, tid, step, a_ptr, w_ptr, a_n, w_stride,
                        has_w, lambda2, USE_K, NOISE, ANCHOR, HAS_W, BLOCK)
    d = g + weight_decay * p
    if MOMENTUM:
        buf = _ld(b_ptr, e, mask, MASKED)
        buf = tl.where(first, d, momentum * buf + one_minus_dampening * d)
        _st(b_ptr, e, buf, mask, MASKED)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    p = p - lr * d
    _st(p_ptr, e, p, mask, MASKED)


@triton.jit(do_not_specialize=["chunk_base", "chunk", "modality", "seed_lo", "seed_hi", "noise_step"])
def _sgd_kernel(tab_ptr, ref_ptr, coef_ptr, sigma_ptr, chunk_base, chunk, modality, lr, momentum,
                one_minus_dampening, weight_decay, lambda2, seed_lo, seed_hi, noise_step,
                USE_K: tl.constexpr, NOISE: tl.constexpr, ANCHOR: tl.constexpr, HAS_W: tl.constexpr,
                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, ALIGN: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(tab_ptr + chunk_base + 2 * pid)
    start = tl.multiple_of(tl.load(tab_ptr + chunk_base + 2 * pid + 1), BLOCK)
    row = tab_ptr + t * 16
    end = tl.minimum(start + chunk, tl.load(row + 7))
    p_ptr = _ptr(row, 0, ref_ptr, ALIGN)
    g_ptr = _ptr(row, 1, ref_ptr, ALIGN)
    b_ptr = p_ptr
    first = False
    if MOMENTUM:
        b_ptr = _ptr(row, 2, ref_ptr, ALIGN)
        first = tl.load(row + 11) != 0
    k = 1.0
    if USE_K:
        k = tl.load(coef_ptr + modality)
    sigma = 0.0
    seed = 0
    tid = 0
    step = 0
    if NOISE:
        sigma = tl.load(sigma_ptr + t)
        seed = (seed_hi.to(tl.uint64) << 32) | seed_lo.to(tl.uint64)
        tid = tl.load(row + 10).to(tl.uint32)
        step = noise_step.to(tl.uint32)
    a_ptr = p_ptr
    w_ptr = p_ptr
    a_n = 0
    w_stride = 1
    has_w = False
    if ANCHOR:
        a_ptr = _ptr(row, 5, ref_ptr, 1)
        a_n = tl.load(row + 8)
        if HAS_W:
            w_ptr = _ptr(row, 6, ref_ptr, 1)
            ws = tl.load(row + 9)
            has_w = ws != 0
            w_stride = tl.maximum(ws, 1)
    e_loc = (tl.arange(0, BLOCK // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]).to(tl.int64)
    for off in range(start, end, BLOCK):
        e = off + e_loc
        mask = e < end
        if off + BLOCK <= end:
            _sgd_tile(p_ptr, g_ptr, b_ptr, a_ptr, w_ptr, e, mask, off, k, sigma, seed, tid, step,
                      a_n, w_stride, has_w, lambda2, first, lr, momentum, one_minus_dampening,
                      weight_decay, USE_K, NOISE, ANCHOR, HAS_W, MOMENTUM, NESTEROV, BLOCK, False)
        else:
            _sgd_tile(p_ptr, g_ptr, b_ptr, a_ptr, w_ptr, e, mask, off, k, sigma, seed, tid, step,
                      a_n, w_stride, has_w, lambda2, first, lr, momentum, one_minus_dampening,
                      weight_decay, USE_K, NOISE, ANCHOR, HAS_W, MOMENTUM, NESTEROV, BLOCK, True)


# Anchor weight layouts of the row-sparse kernel (csrc/modality_step.h's RowsWeight).
_W_NONE, _W_SCALAR, _W_ROW, _W_ELEMENT = 0, 1, 2, 3


@triton.jit(do_not_specialize=["n_rows", "n_table", "anchor_rows", "modality"])
def _adamw_rows_kernel(p_ptr, rows_ptr, g_ptr, m_ptr, v_ptr, a_ptr, w_ptr, coef_ptr, n_rows, n_table,
                       row_size, anchor_rows, modality, decay, lerp_w, beta2, one_minus_beta2, eps,
                       lambda2, step_size, bc2_sqrt, USE_K: tl.constexpr, ANCHOR: tl.constexpr,
                       W_KIND: tl.constexpr, LERP_LOW: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """Rows [pid BLOCK_R, (pid + 1) BLOCK_R) of the listed rows (see the module docstring)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r = tl.load(rows_ptr + i, mask=i < n_rows, other=-1)
    # an id out of range (refused by the Python checks in eager mode) is skipped, never written
    rmask = (i < n_rows) & (r >= 0) & (r < n_table)
    k = 1.0
    if USE_K:
        k = tl.load(coef_ptr + modality)
    p_row = r * row_size
    g_row = i * row_size
    amask = rmask
    lw = tl.zeros([BLOCK_R], dtype=tl.float32)
    if ANCHOR:
        amask = rmask & (r < anchor_rows)
        lw = lw + lambda2
        if W_KIND == 1:
            lw = lw * tl.load(w_ptr).to(tl.float32)
        if W_KIND == 2:
            lw = lw * tl.load(w_ptr + r, mask=amask, other=0.0).to(tl.float32)
    for c0 in range(0, row_size, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (c < row_size)[None, :]
        e = p_row[:, None] + c[None, :]
        p = tl.load(p_ptr + e, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + g_row[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if USE_K:
            g = k * g
        if ANCHOR:
            am = mask & amask[:, None]
            d = p - tl.load(a_ptr + e, mask=am, other=0.0).to(tl.float32)
            if W_KIND == 3:
                d = d * tl.load(w_ptr + e, mask=am, other=0.0).to(tl.float32)
            g = tl.where(am, g + lw[:, None] * d, g)
        m = tl.load(m_ptr + e, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + e, mask=mask, other=0.0).to(tl.float32)
        p = p * decay
        if LERP_LOW:  # torch.lerp, as _adamw_tile
            m = m + lerp_w * (g - m)
        else:
            m = g - (g - m) * (1.0 - lerp_w)
        v = v * beta2 + (one_minus_beta2 * g) * g
        p = p - (step_size * m) / (tl.sqrt_rn(v) / bc2_sqrt + eps)
        tl.store(m_ptr + e, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + e, v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(p_ptr + e, p.to(p_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side: the tensor table, its cache, the launches
# ---------------------------------------------------------------------------------------------

_CACHE_SIZE = 64
_table_cache: "collections.OrderedDict" = collections.OrderedDict()
_capture_keepalive: list = []  # tables (and their host sources) used inside CUDA graph captures
_lock = threading.Lock()


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


class _Rel:
    """Element offsets of tensors from the first parameter (what the table holds), and whether
    every address seen is 16-byte aligned."""

    def __init__(self, ref: torch.Tensor):
        self.base = ref.data_ptr()
        self.size = ref.element_size()
        self.aligned = self.base % 16 == 0

    def __call__(self, t: Optional[torch.Tensor], vector: bool = True) -> int:
        if t is None or t.numel() == 0:  # nothing is read through it
            return 0
        addr = t.data_ptr()
        diff = addr - self.base
        if diff % self.size:
            raise ValueError("mmcl_fast (triton): a tensor's address is not aligned to its element size")
        if vector and addr % 16:
            self.aligned = False
        return diff // self.size

    def align(self) -> int:
        return 16 // self.size if self.aligned else 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _chunk_elems(total: int, device: torch.device) -> int:
    """Elements per program: a multiple of _BLOCK, large enough to keep the table small, small
    enough to give every SM several programs."""
    if _INTERPRET or device.type != "cuda":
        return _BLOCK * _MAX_ITERS
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = 8 * _sm_count(index)
    iters = max(1, min(_MAX_ITERS, total // (_BLOCK * target)))
    iters = 1 << (iters.bit_length() - 1)
    return _BLOCK * iters


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _table(rows: List[int], numels: List[int], chunk: int, base: int, device: torch.device,
           fields=(_NF, _F_CB, _F_CE)):
    """(device int64 table, number of chunks): rows (`fields` = (fields per tensor, index of the
    first chunk, index of the chunk end), filled here for the last two), then (tensor, start) per
    chunk. Cached by content. Shared by the multi-tensor kernels of families A and C."""
    nf, f_cb, f_ce = fields
    n_t = len(numels)
    counts = [(n + chunk - 1) // chunk for n in numels]
    c = 0
    for i, cnt in enumerate(counts):
        rows[i * nf + f_cb] = c
        c += cnt
        rows[i * nf + f_ce] = c
    key = (str(device), base, chunk, fields, tuple(rows))
    capturing = _capturing(device)
    with _lock:
        hit = _table_cache.get(key)
        if hit is not None:
            _table_cache.move_to_end(key)
            if capturing:  # a captured graph keeps using it, even once evicted from the cache
                _capture_keepalive.append(hit)
            return hit
    cnt_t = torch.tensor(counts, dtype=torch.int64)
    tidx = torch.repeat_interleave(torch.arange(n_t, dtype=torch.int64), cnt_t)
    first = torch.cumsum(cnt_t, 0) - cnt_t
    starts = (torch.arange(c, dtype=torch.int64) - first[tidx]) * chunk
    host = torch.cat([torch.tensor(rows, dtype=torch.int64), torch.stack([tidx, starts], 1).reshape(-1)])
    if device.type == "cuda":
        host = host.pin_memory()
        dev = host.to(device, non_blocking=True)
    else:
        dev = host.to(device)
    entry = (dev, c)
    if capturing:
        # The copy runs at each replay: keep its source alive, and keep the table out of the cache
        # (it holds nothing until the graph is replayed).
        _capture_keepalive.append((host, dev))
        return entry
    with _lock:
        _table_cache[key] = entry
        while len(_table_cache) > _CACHE_SIZE:
            _table_cache.popitem(last=False)
    return entry


def _common_rows(params, grads, tensor_ids, anchors, anchor_weights, use_anchor, rel):
    """Rows with p, g, anchor fields, numel and tensor id filled; the state fields left 0.
    Anchor weight field _F_WS: elements per weight entry, 0 when the tensor has no weight."""
    rows = [0] * (_NF * len(params))
    numels = []
    for i, (p, g) in enumerate(zip(params, grads)):
        b = i * _NF
        n = p.numel()
        numels.append(n)
        rows[b + _F_P] = rel(p)
        rows[b + _F_G] = rel(g)
        rows[b + _F_N] = n
        rows[b + _F_TID] = (tensor_ids[i] if tensor_ids else i) & _MASK32
        if use_anchor and anchors[i] is not None:
            a = anchors[i]
            a_n = a.numel()
            if a_n > n:
                raise ValueError(f"mmcl_fast: anchors[{i}] has more elements than params[{i}]")
            rows[b + _F_A] = rel(a, vector=False)
            rows[b + _F_NA] = a_n
            w = anchor_weights[i] if anchor_weights else None
            if w is not None:
                if w.numel() == 0 or a_n % w.numel() != 0:
                    raise ValueError(
                        f"mmcl_fast: anchor_weights[{i}] must hold 1, one per anchor row or one "
                        "per anchor element values"
                    )
                rows[b + _F_W] = rel(w, vector=False)
                rows[b + _F_WS] = max(1, a_n // w.numel())
    return rows, numels


def _check_inputs(params, lists, anchors, anchor_weights, use_anchor):
    dev, dtype = params[0].device, params[0].dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"mmcl_fast (triton): params must be float32/float16/bfloat16, got {dtype}")
    for name, ts in lists:
        if len(ts) != len(params):
            raise ValueError(f"mmcl_fast (triton): {name} has {len(ts)} tensors, params {len(params)}")
        for i, (t, p) in enumerate(zip(ts, params)):
            if t.device != dev or t.dtype != dtype or t.numel() != p.numel() or not t.is_contiguous():
                raise ValueError(
                    f"mmcl_fast (triton): {name}[{i}] must be a contiguous {dtype} tensor on {dev} "
                    f"with params[{i}]'s {p.numel()} elements"
                )
    if use_anchor:
        for name, ts in (("anchors", anchors), ("anchor_weights", anchor_weights)):
            if ts and len(ts) != len(params):
                raise ValueError(f"mmcl_fast (triton): {name} must be empty or one entry per param")
            for i, t in enumerate(ts or []):
                if t is not None and (t.device != dev or t.dtype != dtype or not t.is_contiguous()):
                    raise ValueError(f"mmcl_fast (triton): {name}[{i}] must be a contiguous {dtype} tensor on {dev}")


def _noise_sigma(tab, ref, n_t, n_chunks, chunk, align, device):
    """Per-tensor sigma (float32 [T]) from the gradient stats: two launches."""
    buf = torch.empty(3 * max(n_chunks, 1) + n_t, dtype=torch.float32, device=device)
    part = buf[: 3 * max(n_chunks, 1)]
    sigma = buf[3 * max(n_chunks, 1):]
    if n_chunks > 0:
        _grad_stats_kernel[(n_chunks,)](tab, ref, part, n_t * _NF, chunk, max(n_chunks, 1),
                                        ALIGN=align, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    _sigma_kernel[(n_t,)](tab, part, sigma, max(n_chunks, 1), PB=_PART_BLOCK, num_warps=_NUM_WARPS)
    return sigma


def _split_seed(seed: int):
    seed &= _MASK64
    return seed & _MASK32, seed >> 32


def _on_cpu_copies(fn, args, mutated):
    """The interpreter brings only the argument tensors to the host, not the tensors reached by
    offsets from the table: run on CPU copies of everything, then copy the results back."""
    def cpu(x):
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().clone()
        if isinstance(x, list):
            return [cpu(y) for y in x]
        return x

    cargs = [cpu(a) for a in args]
    fn(*cargs)
    for idx in mutated:
        for dst, src in zip(args[idx], cargs[idx]):
            dst.copy_(src)


def _adamw_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, coefficients,
                modality, lr, beta1, beta2, eps, weight_decay, noise, seed, noise_step, tensor_ids,
                anchors, anchor_weights, anchor_lambda):
    if len(params) == 0:
        return
    device = params[0].device
    if _INTERPRET and device.type != "cpu":
        args = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, coefficients, modality,
                lr, beta1, beta2, eps, weight_decay, noise, seed, noise_step, tensor_ids, anchors,
                anchor_weights, anchor_lambda]
        return _on_cpu_copies(_adamw_impl, args, (0, 2, 3, 4))
    n_t = len(params)
    amsgrad = len(max_exp_avg_sqs) > 0
    noise_on = bool(noise) and modality >= 0
    use_anchor = bool(anchors) and anchor_lambda != 0.0 and any(a is not None for a in anchors)
    lists = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)]
    if amsgrad:
        lists.append(("max_exp_avg_sqs", max_exp_avg_sqs))
    _check_inputs(params, lists, anchors, anchor_weights, use_anchor)
    if len(steps) != n_t:
        raise ValueError("mmcl_fast (triton): steps must have one entry per parameter")
    if tensor_ids and len(tensor_ids) != n_t:
        raise ValueError("mmcl_fast (triton): tensor_ids must have one entry per parameter")
    has_w = use_anchor and bool(anchor_weights) and any(w is not None for w in anchor_weights)

    rel = _Rel(params[0])
    rows, numels = _common_rows(params, grads, tensor_ids, anchors, anchor_weights, use_anchor, rel)
    for i in range(n_t):
        b = i * _NF
        rows[b + _F_S0] = rel(exp_avgs[i])
        rows[b + _F_S1] = rel(exp_avg_sqs[i])
        if amsgrad:
            rows[b + _F_S2] = rel(max_exp_avg_sqs[i])

    def corrections(s):
        return lr / (1.0 - beta1 ** s), math.sqrt(1.0 - beta2 ** s)

    per_tensor_step = any(s != steps[0] for s in steps)
    step_size, bc2_sqrt = corrections(steps[0])
    if per_tensor_step:
        for i, s in enumerate(steps):
            ss, bc2 = corrections(s)
            rows[i * _NF + _F_SS] = _f32_bits(ss)
            rows[i * _NF + _F_BC2] = _f32_bits(bc2)
    chunk = _chunk_elems(sum(numels), device)
    with _device_guard(device):
        tab, n_chunks = _table(rows, numels, chunk, rel.base, device)
        if n_chunks == 0:
            return
        ref = params[0]
        sigma = _noise_sigma(tab, ref, n_t, n_chunks, chunk, rel.align(), device) if noise_on else coefficients
        seed_lo, seed_hi = _split_seed(seed)
        lerp_w = _f32(1.0 - beta1)
        _adamw_kernel[(n_chunks,)](
            tab, ref, coefficients, sigma, n_t * _NF, chunk, max(modality, 0),
            1.0 - lr * weight_decay, lerp_w, beta2, 1.0 - beta2, eps, 2.0 * anchor_lambda,
            step_size, bc2_sqrt, seed_lo, seed_hi, noise_step & _MASK32,
            USE_K=modality >= 0, NOISE=noise_on, ANCHOR=use_anchor, HAS_W=has_w, AMSGRAD=amsgrad,
            PER_TENSOR_STEP=per_tensor_step, LERP_LOW=abs(lerp_w) < 0.5, ALIGN=rel.align(),
            BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )


def _sgd_impl(params, grads, momentum_buffers, first_step, coefficients, modality, lr, momentum,
              dampening, weight_decay, nesterov, noise, seed, noise_step, tensor_ids, anchors,
              anchor_weights, anchor_lambda):
    if len(params) == 0:
        return
    device = params[0].device
    if _INTERPRET and device.type != "cpu":
        args = [params, grads, momentum_buffers, first_step, coefficients, modality, lr, momentum,
                dampening, weight_decay, nesterov, noise, seed, noise_step, tensor_ids, anchors,
                anchor_weights, anchor_lambda]
        return _on_cpu_copies(_sgd_impl, args, (0, 2))
    n_t = len(params)
    use_momentum = len(momentum_buffers) > 0
    noise_on = bool(noise) and modality >= 0
    use_anchor = bool(anchors) and anchor_lambda != 0.0 and any(a is not None for a in anchors)
    lists = [("grads", grads)]
    if use_momentum:
        lists.append(("momentum_buffers", momentum_buffers))
        if len(first_step) != n_t:
            raise ValueError("mmcl_fast (triton): first_step must have one entry per parameter")
    _check_inputs(params, lists, anchors, anchor_weights, use_anchor)
    if tensor_ids and len(tensor_ids) != n_t:
        raise ValueError("mmcl_fast (triton): tensor_ids must have one entry per parameter")
    has_w = use_anchor and bool(anchor_weights) and any(w is not None for w in anchor_weights)

    rel = _Rel(params[0])
    rows, numels = _common_rows(params, grads, tensor_ids, anchors, anchor_weights, use_anchor, rel)
    if use_momentum:
        for i in range(n_t):
            rows[i * _NF + _F_S0] = rel(momentum_buffers[i])
            rows[i * _NF + _F_FIRST] = 1 if first_step[i] else 0
    chunk = _chunk_elems(sum(numels), device)
    with _device_guard(device):
        tab, n_chunks = _table(rows, numels, chunk, rel.base, device)
        if n_chunks == 0:
            return
        ref = params[0]
        sigma = _noise_sigma(tab, ref, n_t, n_chunks, chunk, rel.align(), device) if noise_on else coefficients
        seed_lo, seed_hi = _split_seed(seed)
        _sgd_kernel[(n_chunks,)](
            tab, ref, coefficients, sigma, n_t * _NF, chunk, max(modality, 0),
            lr, momentum, 1.0 - dampening, weight_decay, 2.0 * anchor_lambda,
            seed_lo, seed_hi, noise_step & _MASK32,
            USE_K=modality >= 0, NOISE=noise_on, ANCHOR=use_anchor, HAS_W=has_w,
            MOMENTUM=use_momentum, NESTEROV=bool(nesterov) and use_momentum, ALIGN=rel.align(),
            BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )


# Elements per [BLOCK_R, BLOCK_C] tile of the row-sparse kernel, and the widest column tile.
_ROWS_TILE = 256 if _INTERPRET else 4096
_ROWS_MAX_C = 64 if _INTERPRET else 1024


def _adamw_rows_impl(param, rows, grad_rows, exp_avg, exp_avg_sq, step, coefficients, modality, lr,
                     beta1, beta2, eps, weight_decay, anchor, anchor_weight, anchor_lambda):
    n_rows = rows.numel()
    if param.dim() < 1 or n_rows == 0 or param.numel() == 0:
        return
    if param.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"mmcl_fast (triton): param must be float32/float16/bfloat16, got {param.dtype}")
    n_table = param.shape[0]
    row_size = param.numel() // n_table
    for name, t, numel in (("grad_rows", grad_rows, n_rows * row_size), ("exp_avg", exp_avg, param.numel()),
                           ("exp_avg_sq", exp_avg_sq, param.numel())):
        if t.device != param.device or t.dtype != param.dtype or t.numel() != numel or not t.is_contiguous():
            raise ValueError(f"mmcl_fast (triton): {name} must be a contiguous {param.dtype} tensor on "
                             f"{param.device} with {numel} elements")
    if not param.is_contiguous() or rows.dtype != torch.int64 or not rows.is_contiguous():
        raise ValueError("mmcl_fast (triton): param must be contiguous and rows contiguous int64")
    use_anchor = anchor is not None and anchor_lambda != 0.0 and anchor.numel() > 0
    w_kind = _W_NONE
    if use_anchor:
        if anchor.numel() != anchor.shape[0] * row_size or anchor.shape[0] > n_table:
            raise ValueError("mmcl_fast (triton): anchor must hold the parameter's first rows")
        if anchor_weight is not None:
            nw = anchor_weight.numel()
            w_kind = (_W_ELEMENT if nw == anchor.numel() else _W_ROW if nw == anchor.shape[0]
                      else _W_SCALAR if nw == 1 else None)
            if w_kind is None:
                raise ValueError("mmcl_fast (triton): anchor_weight must hold 1, one per anchor row "
                                 "or one per anchor element values")
    block_c = min(triton.next_power_of_2(row_size), _ROWS_MAX_C)
    block_r = max(1, _ROWS_TILE // block_c)
    lerp_w = _f32(1.0 - beta1)
    with _device_guard(param.device):
        _adamw_rows_kernel[(triton.cdiv(n_rows, block_r),)](
            param, rows, grad_rows, exp_avg, exp_avg_sq, anchor if use_anchor else param,
            anchor_weight if w_kind != _W_NONE else param, coefficients, n_rows, n_table, row_size,
            anchor.shape[0] if use_anchor else 0, max(modality, 0), 1.0 - lr * weight_decay, lerp_w,
            beta2, 1.0 - beta2, eps, 2.0 * anchor_lambda, lr / (1.0 - beta1 ** step),
            math.sqrt(1.0 - beta2 ** step), USE_K=modality >= 0, ANCHOR=use_anchor, W_KIND=w_kind,
            LERP_LOW=abs(lerp_w) < 0.5, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_NUM_WARPS,
        )


class _NullGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the params' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _NullGuard()


# ---------------------------------------------------------------------------------------------
# The custom ops (torch.library: opcheck and torch.compile see them as opaque mutating ops)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "mmcl_fast::modality_adamw_triton_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
)
def modality_adamw_triton_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    max_exp_avg_sqs: List[torch.Tensor],
    steps: List[float],
    coefficients: torch.Tensor,
    modality: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    noise: bool,
    seed: int,
    noise_step: int,
    tensor_ids: List[int],
    anchors: List[Optional[torch.Tensor]],
    anchor_weights: List[Optional[torch.Tensor]],
    anchor_lambda: float,
) -> None:
    """Triton implementation of mmcl_fast::modality_adamw_ (see the module docstring)."""
    _adamw_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, coefficients,
                modality, lr, beta1, beta2, eps, weight_decay, noise, seed, noise_step, tensor_ids,
                anchors, anchor_weights, anchor_lambda)


@modality_adamw_triton_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, coefficients, modality, lr,
      beta1, beta2, eps, weight_decay, noise, seed, noise_step, tensor_ids, anchors,
      anchor_weights, anchor_lambda):
    return None


@torch.library.custom_op(
    "mmcl_fast::modality_sgd_triton_",
    mutates_args=("params", "momentum_buffers"),
)
def modality_sgd_triton_(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    momentum_buffers: List[torch.Tensor],
    first_step: List[int],
    coefficients: torch.Tensor,
    modality: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    noise: bool,
    seed: int,
    noise_step: int,
    tensor_ids: List[int],
    anchors: List[Optional[torch.Tensor]],
    anchor_weights: List[Optional[torch.Tensor]],
    anchor_lambda: float,
) -> None:
    """Triton implementation of mmcl_fast::modality_sgd_ (see the module docstring)."""
    _sgd_impl(params, grads, momentum_buffers, first_step, coefficients, modality, lr, momentum,
              dampening, weight_decay, nesterov, noise, seed, noise_step, tensor_ids, anchors,
              anchor_weights, anchor_lambda)


@modality_sgd_triton_.register_fake
def _(params, grads, momentum_buffers, first_step, coefficients, modality, lr, momentum, dampening,
      weight_decay, nesterov, noise, seed, noise_step, tensor_ids, anchors, anchor_weights,
      anchor_lambda):
    return None


@torch.library.custom_op(
    "mmcl_fast::modality_adamw_rows_triton_",
    mutates_args=("param", "exp_avg", "exp_avg_sq"),
)
def modality_adamw_rows_triton_(
    param: torch.Tensor,
    rows: torch.Tensor,
    grad_rows: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: float,
    coefficients: torch.Tensor,
    modality: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    anchor: Optional[torch.Tensor],
    anchor_weight: Optional[torch.Tensor],
    anchor_lambda: float,
) -> None:
    """Triton implementation of mmcl_fast::modality_adamw_rows_ (see the module docstring)."""
    _adamw_rows_impl(param, rows, grad_rows, exp_avg, exp_avg_sq, step, coefficients, modality, lr,
                     beta1, beta2, eps, weight_decay, anchor, anchor_weight, anchor_lambda)


@modality_adamw_rows_triton_.register_fake
def _(param, rows, grad_rows, exp_avg, exp_avg_sq, step, coefficients, modality, lr, beta1, beta2,
      eps, weight_decay, anchor, anchor_weight, anchor_lambda):
    return None


def _int64(x: int) -> int:
    """An int as the signed 64-bit value with the same low 64 bits (what an `int` schema holds)."""
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


def _op_ints(seed, noise_step, tensor_ids, n):
    ids = [int(t) & _MASK32 for t in tensor_ids] if tensor_ids else list(range(n))
    return _int64(int(seed)), int(noise_step) & _MASK32, ids


def modality_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, coefficients,
                    modality, lr, beta1, beta2, eps, weight_decay, noise, seed, noise_step,
                    tensor_ids, anchors, anchor_weights, anchor_lambda) -> None:
    """The fused AdamW step on the Triton kernels (arguments as mmcl_fast.ops.modality_adamw_
    passes them, already validated)."""
    seed, noise_step, tensor_ids = _op_ints(seed, noise_step, tensor_ids, len(params))
    modality_adamw_triton_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
        [float(s) for s in steps], coefficients, int(modality), float(lr), float(beta1),
        float(beta2), float(eps), float(weight_decay), bool(noise), seed, noise_step, tensor_ids,
        list(anchors or []), list(anchor_weights or []), float(anchor_lambda),
    )


def modality_sgd_(params, grads, momentum_buffers, first_step, coefficients, modality, lr, momentum,
                  dampening, weight_decay, nesterov, noise, seed, noise_step, tensor_ids, anchors,
                  anchor_weights, anchor_lambda) -> None:
    """The fused SGD step on the Triton kernels (arguments as mmcl_fast.ops.modality_sgd_ passes
    them, already validated)."""
    seed, noise_step, tensor_ids = _op_ints(seed, noise_step, tensor_ids, len(params))
    first = [int(bool(f)) for f in first_step] if first_step is not None else []
    modality_sgd_triton_(
        list(params), list(grads), list(momentum_buffers), first, coefficients, int(modality),
        float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov),
        bool(noise), seed, noise_step, tensor_ids, list(anchors or []), list(anchor_weights or []),
        float(anchor_lambda),
    )


def modality_adamw_rows_(param, rows, grad_rows, exp_avg, exp_avg_sq, step, coefficients, modality,
                         lr, beta1, beta2, eps, weight_decay, anchor, anchor_weight,
                         anchor_lambda) -> None:
    """The row-sparse AdamW step on the Triton kernel (arguments as
    mmcl_fast.ops.modality_adamw_rows_ passes them, already validated)."""
    modality_adamw_rows_triton_(
        param, rows, grad_rows, exp_avg, exp_avg_sq, float(step), coefficients, int(modality),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), anchor,
        anchor_weight, float(anchor_lambda),
    )
