"""Op family B in Triton: shared-key attention, flash-style, with the column sums of P, and the
fused "scores"-space distillation (pooled score maps, their loss and its gradient).

The maths (DESIGN.md section 5.2; the contract of mmcl_fast::ska_forward / ska_backward /
ska_score_maps, notes/ska_fused_contract.md), per (b, h), with k read from k[0] when k is a shared
bank (Bk == 1) and bias from bias[0] when Bb == 1; kv_j = 1 when key j is valid (not
key_padding_mask[b, j]), qv_i = 1 when query i is valid (not query_padding_mask[b, i]), else 0:

    S_ij  = scale q_i . k_j + bias_ij             (-inf where key j is padded)
    lse_i = log sum_j exp(S_ij);  P_ij = exp(S_ij - lse_i);  out_i = sum_j P_ij Z_ij v_j
            (an "empty" row, all S_ij = -inf: out_i = 0, lse_i = +inf, so P_i. = 0 everywhere)
    colsum_j = sum_i qv_i P_ij                    (lse and colsum: of the undropped P)

    Z_ij    = dropout on P: 1 when dropout_p == 0; else keep_ij / (1 - p), with
              (x0..x3) = Philox4x32-10(counter (j >> 2, i, b H + h, DROPOUT_TAG = 0x64726F70),
                                       key (seed lo, seed hi)),  seed = dropout_seed[0] (int64)
              keep_ij = (x_(j & 3) >> 8) >= thr,  thr = min(ceil(p 2^24), 2^24)
              (mmcl_fast/ops/shared_key_attention.py: dropout_keep; the seed is read by the
              kernels, no host sync; the backward regenerates the forward's Z from p and seed)
    G_j     = grad_colsum[b, h, j] (0 when None)
    GW_i    = grad_width[b, h, i], GH_j = grad_height[b, h, j] (0 when None)
    dP_ij   = Z_ij dO_i . v_j + G_j qv_i                       (G not times Z)
    Delta_i = dO_i . out_i + qv_i sum_j P_ij G_j             (= sum_j P_ij dP_ij; out dropped)
    dS_ij   = P_ij (dP_ij - Delta_i) + qv_i kv_j (GW_i + GH_j)
    dq_i = scale sum_j dS_ij k_j;  dk_j = scale sum_i dS_ij q_i (summed over b for a bank);
    dv_j = sum_i P_ij Z_ij dO_i;  dbias_ij = dS_ij (summed over b when Bb == 1)

The qv_i kv_j (GW_i + GH_j) term (not multiplied by P: non-zero where P = 0, except at masked keys
and padded queries) is the gradient through the pooled score maps w_i = qv_i sum_j kv_j S_ij and
u_j = kv_j sum_i qv_i S_ij, with GW = dL/dw and GH = dL/du (pre-masked or not: the kernels apply
both masks, so values at padded positions never matter). dv and Delta do not see it.

The pooled score maps and the asymmetric ReLU distance to a teacher's maps (ska_score_maps), in
float32, with n(x) = x / max(||x||, 1e-12) when normalize (else n(x) = x), ||.|| over L:

    ksum = sum_j kv_j k_j;  qsum = sum_i qv_i q_i
    w_i  = qv_i (scale q_i . ksum + sum_j kv_j bias_ij)     (width)
    u_j  = kv_j (scale qsum . k_j + sum_i qv_i bias_ij)     (height)
    for (x, t) = (w, teacher_width) and (u, teacher_height), each only when its teacher is given:
        r = max(n(t) - n(x), 0);  d_x = ||r||;  gnx = -r / d_x (0 when d_x = 0)
        gx = (gnx - n(x) (n(x) . gnx)) / ||x|| when normalize and ||x|| > 1e-12,
             gnx / 1e-12 when normalize and ||x|| <= 1e-12,  gnx when not normalize
    dist = d_w + d_u;  grad_width = gx qv (x = w);  grad_height = gx kv (x = u)
(grad_* are d dist[b, h] / d x, not divided by B*H.)

Nothing of size B*H*Lq*Lk is ever allocated, except dbias when it is asked for. The kernels work
on [BLOCK_M, BLOCK_N] tiles of S in the log2 domain (S * log2(e), exp2), accumulate in float32
(inputs float32 / float16 / bfloat16; lse, colsum float32), and BLOCK_D = next power of two >= D
(at least 16), loads masked on d < D. float32 tiles are multiplied with tl.dot's "ieee"
precision (not TF32), so float32 results stay float32-accurate. Dropout is a constexpr DROPOUT
(the p == 0 kernels are compiled without it): _dropout_scale draws Z of a tile (one Philox call per
element, the word x_(j & 3) selected), used by _fwd_kernel (P Z in the PV product),
_bwd_dkdv_kernel (dv, dP) and _bwd_dq_kernel (dP); _colsum_kernel and _bwd_pre_kernel do not see it.

Launches (each a 1-D grid of tiles x B*H, the tiles of one (b, h) adjacent):
  forward   _fwd_kernel, grid Lq tiles x B*H: online softmax over the key tiles -> out, lse.
            _colsum_kernel (only when need_colsum), grid Lk tiles x B*H: loops over the query
            tiles, P recomputed from the final lse (padded queries get lse = +inf, i.e. P = 0),
            column sums kept in registers: deterministic, no atomics, no zeroing.
  backward  _bwd_pre_kernel, grid Lq tiles x B*H: Delta (plus, only when grad_colsum is given,
            a sweep over the key tiles for sum_j P_ij G_j).
            _bwd_dkdv_kernel, grid Lk tiles x B*H: loops over the query tiles in the transposed
            orientation ([BLOCK_N, BLOCK_M] tiles of S^T) -> dk, dv. For a shared bank
            (Bk == 1 < B) dk goes per batch element into a float32 [B, H, Lk, D] buffer that torch
            sums over b afterwards (deterministic; the buffer is the size of dv).
            _bwd_dq_kernel, grid Lq tiles x B*H: loops over the key tiles -> dq, and dbias
            (stored tile by tile when Bb == B; atomically added into a zeroed float32 [1, H, Lq, Lk]
            when Bb == 1 < B, the only non-deterministic sum).
            Both take grad_width / grad_height (constexpr HAS_GW / HAS_GH: without them the
            kernels are the plain attention backward) and add qv_i kv_j (GW_i + GH_j) to dS.
  maps      _score_maps_kernel, grid B*H, one program per (b, h) (deterministic, no atomics):
            ksum, qsum (D in BLOCK_D chunks, through a float32 [B*H, 2, D] scratch), then w and
            u (BLOCK_L positions at a time; bias row / column sums over [BLOCK_L, BLOCK_L]
            tiles), then per map with a teacher two sweeps over its L positions (||r||,
            n(x) . r; then gx). A barrier (tl.debug_barrier) separates writing the scratch / the
            maps from reading them back.
"""
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .modality_step import _device_guard

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# tl.dot on float32 tiles: "ieee" keeps float32 accuracy (the default "tf32" would not).
_F32_PRECISION = "ieee"


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_bh(L, BLOCK: tl.constexpr):
    """(tile index, b*h) of this program on the 1-D grid (L tiles) * (B*H), tiles fastest (the
    programs of one (b, h) run together and share its keys and values in L2; a 1-D grid has no
    65535 limit on B*H)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(L, BLOCK)
    return pid % n_tiles, (pid // n_tiles).to(tl.int64)


@triton.jit
def _load_rows(base, offs_r, r_valid, offs_d, d_valid, D):
    """The [len(offs_r), BLOCK_D] tile of rows offs_r of a row-major [*, D] matrix (zeros outside)."""
    return tl.load(base + offs_r[:, None] * D + offs_d[None, :],
                   mask=r_valid[:, None] & d_valid[None, :], other=0.0)


@triton.jit
def _key_keep(kpm_base, offs_n, n_valid, HAS_KPM: tl.constexpr):
    """Boolean [BLOCK_N]: key j exists and is not padded."""
    keep = n_valid
    if HAS_KPM:
        pad = tl.load(kpm_base + offs_n, mask=n_valid, other=1)
        keep = n_valid & (pad == 0)
    return keep


@triton.jit
def _query_valid(qpm_base, offs_m, m_valid, HAS_QPM: tl.constexpr):
    """Boolean [BLOCK_M]: query i exists and is not padded."""
    valid = m_valid
    if HAS_QPM:
        pad = tl.load(qpm_base + offs_m, mask=m_valid, other=1)
        valid = m_valid & (pad == 0)
    return valid


@triton.jit
def _scores(q, k, bias_base, offs_m, m_valid, offs_n, n_valid, keep, Lk, qk_scale,
            HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """S * log2(e) of the [BLOCK_M, BLOCK_N] tile (q [BLOCK_M, BLOCK_D], k [BLOCK_N, BLOCK_D]);
    -inf where the key is padded or out of range."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[:, None] * Lk + offs_n[None, :],
                       mask=m_valid[:, None] & n_valid[None, :], other=0.0).to(tl.float32)
        s = s + bias * 1.4426950408889634
    return tl.where(keep[None, :], s, float("-inf"))


@triton.jit
def _scores_t(k, q, bias_base, offs_m, m_valid, offs_n, n_valid, keep, Lk, qk_scale,
              HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """S^T * log2(e) of the [BLOCK_N, BLOCK_M] tile (the bias tile is read row-major, then
    transposed, so that the loads stay coalesced)."""
    st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[:, None] * Lk + offs_n[None, :],
                       mask=m_valid[:, None] & n_valid[None, :], other=0.0).to(tl.float32)
        st = st + tl.trans(bias) * 1.4426950408889634
    return tl.where(keep[:, None], st, float("-inf"))


@triton.jit
def _dropout_scale(seed, bh, offs_m, offs_n, thr, rscale, TRANS: tl.constexpr):
    """Z of the [len(offs_m), len(offs_n)] tile of (query i, key j) pairs (its transpose, the
    [len(offs_n), len(offs_m)] tile, with TRANS): rscale where kept, 0 where dropped, float32.
    (x0..x3) = Philox4x32-10(counter (j >> 2, i, b H + h, DROPOUT_TAG), key (seed lo, seed hi)),
    keep = (x_(j & 3) >> 8) >= thr: the words of dropout_keep in
    mmcl_fast/ops/shared_key_attention.py (seed: the int64 dropout_seed[0]; bh = b H + h)."""
    if TRANS:
        c0, c1 = tl.broadcast((offs_n >> 2).to(tl.uint32)[:, None], offs_m.to(tl.uint32)[None, :])
        lane = (offs_n & 3)[:, None]
    else:
        c1, c0 = tl.broadcast(offs_m.to(tl.uint32)[:, None], (offs_n >> 2).to(tl.uint32)[None, :])
        lane = (offs_n & 3)[None, :]
    zero = c1 * 0
    c2 = zero + bh.to(tl.uint32)
    c3 = zero + 0x64726F70  # DROPOUT_TAG, "drop"
    x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3)
    x = tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))
    # x >> 8 < 2^24: exact as int32, compared with thr (<= 2^24) as signed ints
    return tl.where((x >> 8).to(tl.int32) >= thr, rscale, 0.0)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["dropout_thr"])
def _fwd_kernel(Q, K, V, Bias, KPM, Out, LSE, Seed, H, Lq, Lk, D, stride_kb, stride_bb, qk_scale,
                dropout_thr, dropout_rscale, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
                DROPOUT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out, lse of one query tile (online softmax over the key tiles); with DROPOUT the PV
    product takes P Z (Z from _dropout_scale), l and lse stay those of the undropped P."""
    pid_m, bh = _tile_bh(Lq, BLOCK_M)
    b = bh // H
    h = bh % H
    q_base = Q + bh * Lq * D
    k_base = K + b * stride_kb + h * Lk * D
    v_base = V + bh * Lk * D
    bias_base = Bias + b * stride_bb + h * Lq * Lk
    kpm_base = KPM + b * Lk
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Lq
    d_valid = offs_d < D
    q = _load_rows(q_base, offs_m, m_valid, offs_d, d_valid, D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(Seed)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < Lk
        keep = _key_keep(kpm_base, offs_n, n_valid, HAS_KPM)
        k = _load_rows(k_base, offs_n, n_valid, offs_d, d_valid, D)
        s = _scores(q, k, bias_base, offs_m, m_valid, offs_n, n_valid, keep, Lk, qk_scale,
                    HAS_BIAS, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with no finite score yet: subtract 0 instead of -inf (no -inf - -inf = NaN)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, n_valid, offs_d, d_valid, D)
        if DROPOUT:
            p = p * _dropout_scale(seed, bh, offs_m, offs_n, dropout_thr, dropout_rscale, False)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    l_div = tl.where(empty, 1.0, l_i)
    out = acc / l_div[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_div)) * 0.6931471805599453)
    tl.store(Out + bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + bh * Lq + offs_m, lse, mask=m_valid)


@triton.jit
def _colsum_kernel(Q, K, Bias, KPM, QPM, LSE, Colsum, H, Lq, Lk, D, stride_kb, stride_bb, qk_scale,
                   HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    pid_n, bh = _tile_bh(Lk, BLOCK_N)
    b = bh // H
    h = bh % H
    q_base = Q + bh * Lq * D
    k_base = K + b * stride_kb + h * Lk * D
    bias_base = Bias + b * stride_bb + h * Lq * Lk
    lse_base = LSE + bh * Lq
    qpm_base = QPM + b * Lq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < Lk
    d_valid = offs_d < D
    keep = _key_keep(KPM + b * Lk, offs_n, n_valid, HAS_KPM)
    k = _load_rows(k_base, offs_n, n_valid, offs_d, d_valid, D)
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < Lq
        valid = _query_valid(qpm_base, offs_m, m_valid, HAS_QPM)
        q = _load_rows(q_base, offs_m, m_valid, offs_d, d_valid, D)
        lse2 = tl.load(lse_base + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
        lse2 = tl.where(valid, lse2, float("inf"))  # padded queries: P = 0
        s = _scores(q, k, bias_base, offs_m, m_valid, offs_n, n_valid, keep, Lk, qk_scale,
                    HAS_BIAS, PREC)
        colsum += tl.sum(tl.exp2(s - lse2[:, None]), 0)
    tl.store(Colsum + bh * Lk + offs_n, colsum, mask=n_valid)


@triton.jit
def _bwd_pre_kernel(DO, O, Q, K, Bias, KPM, QPM, LSE, G, Delta, H, Lq, Lk, D, stride_kb, stride_bb,
                    qk_scale, HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
                    HAS_QPM: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = _tile_bh(Lq, BLOCK_M)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Lq
    d_valid = offs_d < D
    do = _load_rows(DO + bh * Lq * D, offs_m, m_valid, offs_d, d_valid, D).to(tl.float32)
    o = _load_rows(O + bh * Lq * D, offs_m, m_valid, offs_d, d_valid, D).to(tl.float32)
    delta = tl.sum(do * o, 1)
    if HAS_G:
        valid = _query_valid(QPM + b * Lq, offs_m, m_valid, HAS_QPM)
        q = _load_rows(Q + bh * Lq * D, offs_m, m_valid, offs_d, d_valid, D)
        lse2 = tl.load(LSE + bh * Lq + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
        k_base = K + b * stride_kb + h * Lk * D
        bias_base = Bias + b * stride_bb + h * Lq * Lk
        pg = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_valid = offs_n < Lk
            keep = _key_keep(KPM + b * Lk, offs_n, n_valid, HAS_KPM)
            k = _load_rows(k_base, offs_n, n_valid, offs_d, d_valid, D)
            s = _scores(q, k, bias_base, offs_m, m_valid, offs_n, n_valid, keep, Lk, qk_scale,
                        HAS_BIAS, PREC)
            g = tl.load(G + bh * Lk + offs_n, mask=n_valid, other=0.0).to(tl.float32)
            pg += tl.sum(tl.exp2(s - lse2[:, None]) * g[None, :], 1)
        delta += tl.where(valid, pg, 0.0)
    tl.store(Delta + bh * Lq + offs_m, delta, mask=m_valid)


@triton.jit(do_not_specialize=["dropout_thr"])
def _bwd_dkdv_kernel(Q, K, V, Bias, KPM, QPM, DO, LSE, Delta, G, GW, GH, Seed, DK, DV, H, Lq, Lk,
                     D, stride_kb, stride_bb, qk_scale, scale, dropout_thr, dropout_rscale,
                     HAS_G: tl.constexpr, HAS_GW: tl.constexpr, HAS_GH: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr,
                     DROPOUT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of one key tile, over [BLOCK_N, BLOCK_M] tiles of S^T:
    dv_j = sum_i P_ij Z_ij dO_i;  dP_ij = Z_ij dO_i . v_j + qv_i G_j;
    dS^T_ji = P_ij (dP_ij - Delta_i) + qv_i kv_j (GW_i + GH_j) (the map term only with HAS_GW /
    HAS_GH, each part absent without its flag; not multiplied by P). Z = 1 without DROPOUT."""
    pid_n, bh = _tile_bh(Lk, BLOCK_N)
    b = bh // H
    h = bh % H
    q_base = Q + bh * Lq * D
    do_base = DO + bh * Lq * D
    bias_base = Bias + b * stride_bb + h * Lq * Lk
    qpm_base = QPM + b * Lq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < Lk
    d_valid = offs_d < D
    keep = _key_keep(KPM + b * Lk, offs_n, n_valid, HAS_KPM)
    k = _load_rows(K + b * stride_kb + h * Lk * D, offs_n, n_valid, offs_d, d_valid, D)
    v = _load_rows(V + bh * Lk * D, offs_n, n_valid, offs_d, d_valid, D)
    g = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_G:
        g = tl.load(G + bh * Lk + offs_n, mask=n_valid, other=0.0).to(tl.float32)
    gh = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_GH:
        gh = tl.load(GH + bh * Lk + offs_n, mask=n_valid, other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(Seed)
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < Lq
        q = _load_rows(q_base, offs_m, m_valid, offs_d, d_valid, D)
        do = _load_rows(do_base, offs_m, m_valid, offs_d, d_valid, D)
        lse2 = tl.load(LSE + bh * Lq + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta + bh * Lq + offs_m, mask=m_valid, other=0.0)
        st = _scores_t(k, q, bias_base, offs_m, m_valid, offs_n, n_valid, keep, Lk, qk_scale,
                       HAS_BIAS, PREC)
        pt = tl.exp2(st - lse2[None, :])
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        if DROPOUT:
            zt = _dropout_scale(seed, bh, offs_m, offs_n, dropout_thr, dropout_rscale, True)
            dv += tl.dot((pt * zt).to(do.dtype), do, input_precision=PREC)
            dpt = dpt * zt
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        if HAS_G or HAS_GW or HAS_GH:
            valid = _query_valid(qpm_base, offs_m, m_valid, HAS_QPM)
        if HAS_G:
            dpt += g[:, None] * valid.to(tl.float32)[None, :]
        dst = pt * (dpt - delta[None, :])
        if HAS_GW or HAS_GH:
            # + qv_i kv_j (GW_i + GH_j): padded / out-of-range queries and keys excluded
            if HAS_GW:
                gw = tl.load(GW + bh * Lq + offs_m, mask=m_valid, other=0.0).to(tl.float32)
                if HAS_GH:
                    mg = gh[:, None] + gw[None, :]
                else:
                    mg = gw[None, :]
            else:
                mg = gh[:, None]
            dst += tl.where(keep[:, None] & valid[None, :], mg, 0.0)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    dk = dk * scale
    out_offs = bh * Lk * D + offs_n[:, None] * D + offs_d[None, :]
    out_mask = n_valid[:, None] & d_valid[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["dropout_thr"])
def _bwd_dq_kernel(Q, K, V, Bias, KPM, QPM, DO, LSE, Delta, G, GW, GH, Seed, DQ, DBias, H, Lq, Lk,
                   D, stride_kb, stride_bb, qk_scale, scale, dropout_thr, dropout_rscale,
                   HAS_G: tl.constexpr, HAS_GW: tl.constexpr, HAS_GH: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr,
                   NEED_DBIAS: tl.constexpr, DBIAS_ATOMIC: tl.constexpr, DROPOUT: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """dq (and dbias) of one query tile, over [BLOCK_M, BLOCK_N] tiles of S:
    dP_ij = Z_ij dO_i . v_j + qv_i G_j;
    dS_ij = P_ij (dP_ij - Delta_i) + qv_i kv_j (GW_i + GH_j) (the map term only with HAS_GW /
    HAS_GH, each part absent without its flag; not multiplied by P). Z = 1 without DROPOUT."""
    pid_m, bh = _tile_bh(Lq, BLOCK_M)
    b = bh // H
    h = bh % H
    k_base = K + b * stride_kb + h * Lk * D
    v_base = V + bh * Lk * D
    bias_base = Bias + b * stride_bb + h * Lq * Lk
    dbias_base = DBias + b * stride_bb + h * Lq * Lk
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Lq
    d_valid = offs_d < D
    q = _load_rows(Q + bh * Lq * D, offs_m, m_valid, offs_d, d_valid, D)
    do = _load_rows(DO + bh * Lq * D, offs_m, m_valid, offs_d, d_valid, D)
    lse2 = tl.load(LSE + bh * Lq + offs_m, mask=m_valid, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + bh * Lq + offs_m, mask=m_valid, other=0.0)
    valid = m_valid
    if HAS_G or HAS_GW or HAS_GH:
        valid = _query_valid(QPM + b * Lq, offs_m, m_valid, HAS_QPM)
    validf = valid.to(tl.float32)
    gw = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GW:
        gw = tl.load(GW + bh * Lq + offs_m, mask=m_valid, other=0.0).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(Seed)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < Lk
        keep = _key_keep(KPM + b * Lk, offs_n, n_valid, HAS_KPM)
        k = _load_rows(k_base, offs_n, n_valid, offs_d, d_valid, D)
        v = _load_rows(v_base, offs_n, n_valid, offs_d, d_valid, D)
        s = _scores(q, k, bias_base, offs_m, m_valid, offs_n, n_valid, keep, Lk, qk_scale,
                    HAS_BIAS, PREC)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            dp = dp * _dropout_scale(seed, bh, offs_m, offs_n, dropout_thr, dropout_rscale, False)
        if HAS_G:
            g = tl.load(G + bh * Lk + offs_n, mask=n_valid, other=0.0).to(tl.float32)
            dp += validf[:, None] * g[None, :]
        ds = p * (dp - delta[:, None])
        if HAS_GW or HAS_GH:
            # + qv_i kv_j (GW_i + GH_j): padded / out-of-range queries and keys excluded
            if HAS_GH:
                gh = tl.load(GH + bh * Lk + offs_n, mask=n_valid, other=0.0).to(tl.float32)
                if HAS_GW:
                    mg = gw[:, None] + gh[None, :]
                else:
                    mg = gh[None, :]
            else:
                mg = gw[:, None]
            ds += tl.where(valid[:, None] & keep[None, :], mg, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if NEED_DBIAS:
            db_ptrs = dbias_base + offs_m[:, None] * Lk + offs_n[None, :]
            db_mask = m_valid[:, None] & n_valid[None, :]
            if DBIAS_ATOMIC:
                tl.atomic_add(db_ptrs, ds, mask=db_mask)
            else:
                tl.store(db_ptrs, ds.to(DBias.dtype.element_ty), mask=db_mask)
    dq = dq * scale
    tl.store(DQ + bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])


@triton.jit
def _map_loss(X, T, GX, VPM, L, ssx, sst, HAS_VPM: tl.constexpr, NORMALIZE: tl.constexpr,
              BLOCK_L: tl.constexpr):
    """The asymmetric ReLU distance of one map x (X, length L, already stored by this program)
    against its teacher t (T), given ssx = ||x||^2 and sst = ||t||^2; writes gx * valid to GX
    (valid from the padding mask VPM) and returns d = ||max(n(t) - n(x), 0)||."""
    offs_l = tl.arange(0, BLOCK_L)
    nrm_x = tl.sqrt(ssx)
    big = nrm_x > 1e-12
    if NORMALIZE:
        den_x = tl.maximum(nrm_x, 1e-12)
        den_t = tl.maximum(tl.sqrt(sst), 1e-12)
    else:
        den_x = 1.0
        den_t = 1.0
    # pass 1: d = ||r|| and nx . r
    ssr = tl.zeros([BLOCK_L], dtype=tl.float32)
    snr = tl.zeros([BLOCK_L], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        offs = start + offs_l
        in_range = offs < L
        nx = tl.load(X + offs, mask=in_range, other=0.0) / den_x
        nt = tl.load(T + offs, mask=in_range, other=0.0) / den_t
        r = tl.maximum(nt - nx, 0.0)
        ssr += r * r
        snr += nx * r
    d = tl.sqrt(tl.sum(ssr, 0))
    d_div = tl.where(d > 0.0, d, 1.0)  # r = 0 everywhere when d = 0: gnx = 0
    nx_gnx = -tl.sum(snr, 0) / d_div     # nx . gnx
    nrm_div = tl.where(big, nrm_x, 1.0)
    # pass 2: gnx = -r / d;  gx = (gnx - nx (nx . gnx)) / ||x||  (gnx / eps when ||x|| <= eps)
    for start in range(0, L, BLOCK_L):
        offs = start + offs_l
        in_range = offs < L
        nx = tl.load(X + offs, mask=in_range, other=0.0) / den_x
        nt = tl.load(T + offs, mask=in_range, other=0.0) / den_t
        gnx = -tl.maximum(nt - nx, 0.0) / d_div
        if NORMALIZE:
            gx = tl.where(big, (gnx - nx * nx_gnx) / nrm_div, gnx / 1e-12)
        else:
            gx = gnx
        valid = _query_valid(VPM, offs, in_range, HAS_VPM)
        tl.store(GX + offs, tl.where(valid, gx, 0.0), mask=in_range)
    return d


@triton.jit
def _pooled_map(X, Vec, Bias, bias_sr, bias_sc, RPM, CPM, Out, T, Lr, Lc, D, scale,
                HAS_BIAS: tl.constexpr, HAS_RPM: tl.constexpr, HAS_CPM: tl.constexpr,
                HAS_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pooled score map of one (b, h), stored to Out:
        out_r = rv_r (scale x_r . vec + sum_c cv_c bias[r * bias_sr + c * bias_sc])
    over the Lr rows r of X ([Lr, D]; rv from the padding mask RPM) and the Lc columns c (cv from
    CPM): the width with rows = queries, the height with rows = keys and the bias transposed.
    Returns (||out||^2, ||t||^2) with the teacher T when HAS_T (else zeros)."""
    offs_l = tl.arange(0, BLOCK_L)
    offs_dd = tl.arange(0, BLOCK_D)
    ss = tl.zeros([BLOCK_L], dtype=tl.float32)
    sst = tl.zeros([BLOCK_L], dtype=tl.float32)
    for start_r in range(0, Lr, BLOCK_L):
        offs_r = start_r + offs_l
        r_valid = offs_r < Lr
        rv = _query_valid(RPM, offs_r, r_valid, HAS_RPM)
        x = tl.zeros([BLOCK_L], dtype=tl.float32)
        for start_d in range(0, D, BLOCK_D):
            offs_d = start_d + offs_dd
            d_valid = offs_d < D
            rows = _load_rows(X, offs_r, rv, offs_d, d_valid, D).to(tl.float32)
            vec = tl.load(Vec + offs_d, mask=d_valid, other=0.0)
            x += tl.sum(rows * vec[None, :], 1)
        x = x * scale
        if HAS_BIAS:
            bsum = tl.zeros([BLOCK_L], dtype=tl.float32)
            for start_c in range(0, Lc, BLOCK_L):
                offs_c = start_c + offs_l
                cv = _query_valid(CPM, offs_c, offs_c < Lc, HAS_CPM)
                bias = tl.load(Bias + offs_r[:, None] * bias_sr + offs_c[None, :] * bias_sc,
                               mask=rv[:, None] & cv[None, :], other=0.0).to(tl.float32)
                bsum += tl.sum(bias, 1)
            x += bsum
        x = tl.where(rv, x, 0.0)
        tl.store(Out + offs_r, x, mask=r_valid)
        if HAS_T:
            t = tl.load(T + offs_r, mask=r_valid, other=0.0)
            ss += x * x
            sst += t * t
    return tl.sum(ss, 0), tl.sum(sst, 0)


@triton.jit
def _score_maps_kernel(Q, K, Bias, KPM, QPM, TW, TH, KQSum, Width, Height, Dist, GW, GH, H, Lq,
                       Lk, D, stride_kb, stride_bb, scale, HAS_BIAS: tl.constexpr,
                       HAS_KPM: tl.constexpr, HAS_QPM: tl.constexpr, HAS_TW: tl.constexpr,
                       HAS_TH: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_L: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """One program per (b, h): the closed-form "scores" maps w, u, the distance to the teachers
    and its gradient (see the module docstring). Fixed-size tiles: BLOCK_L positions by BLOCK_D
    features, looping over L and D. ksum and qsum go through a float32 scratch [B*H, 2, D]
    (KQSum), w and u through their outputs; a barrier before each read-back (the program's
    threads read what other threads of it wrote)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    q_base = Q + bh * Lq * D
    k_base = K + b * stride_kb + h * Lk * D
    bias_base = Bias + b * stride_bb + h * Lq * Lk
    kpm_base = KPM + b * Lk
    qpm_base = QPM + b * Lq
    ksum_base = KQSum + bh * 2 * D
    qsum_base = ksum_base + D
    offs_l = tl.arange(0, BLOCK_L)
    offs_dd = tl.arange(0, BLOCK_D)

    # 1. ksum = sum_j kv_j k_j, qsum = sum_i qv_i q_i, one D chunk at a time
    for start_d in range(0, D, BLOCK_D):
        offs_d = start_d + offs_dd
        d_valid = offs_d < D
        ks = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start_n in range(0, Lk, BLOCK_L):
            offs_n = start_n + offs_l
            keep = _key_keep(kpm_base, offs_n, offs_n < Lk, HAS_KPM)
            ks += tl.sum(_load_rows(k_base, offs_n, keep, offs_d, d_valid, D).to(tl.float32), 0)
        qs = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start_m in range(0, Lq, BLOCK_L):
            offs_m = start_m + offs_l
            qv = _query_valid(qpm_base, offs_m, offs_m < Lq, HAS_QPM)
            qs += tl.sum(_load_rows(q_base, offs_m, qv, offs_d, d_valid, D).to(tl.float32), 0)
        tl.store(ksum_base + offs_d, ks, mask=d_valid)
        tl.store(qsum_base + offs_d, qs, mask=d_valid)
    tl.debug_barrier()

    # 2. w_i = qv_i (scale q_i . ksum + sum_j kv_j bias_ij): rows = queries, bias as stored
    ssw, sstw = _pooled_map(q_base, ksum_base, bias_base, Lk, 1, qpm_base, kpm_base, Width + bh * Lq,
                            TW + bh * Lq, Lq, Lk, D, scale, HAS_BIAS, HAS_QPM, HAS_KPM, HAS_TW,
                            BLOCK_L, BLOCK_D)
    # 3. u_j = kv_j (scale qsum . k_j + sum_i qv_i bias_ij): rows = keys, bias transposed
    ssu, sstu = _pooled_map(k_base, qsum_base, bias_base, 1, Lk, kpm_base, qpm_base, Height + bh * Lk,
                            TH + bh * Lk, Lk, Lq, D, scale, HAS_BIAS, HAS_KPM, HAS_QPM, HAS_TH,
                            BLOCK_L, BLOCK_D)
    tl.debug_barrier()

    # 4. the distances and their gradients (reading w, u back)
    dist = tl.sum(tl.zeros([BLOCK_L], dtype=tl.float32), 0)
    if HAS_TW:
        dist += _map_loss(Width + bh * Lq, TW + bh * Lq, GW + bh * Lq, qpm_base, Lq, ssw, sstw,
                          HAS_QPM, NORMALIZE, BLOCK_L)
    if HAS_TH:
        dist += _map_loss(Height + bh * Lk, TH + bh * Lk, GH + bh * Lk, kpm_base, Lk, ssu, sstu,
                          HAS_KPM, NORMALIZE, BLOCK_L)
    tl.store(Dist + bh, dist)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _config(D: int, dtype: torch.dtype, backward: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) by head size and element size (one
    config, no autotuning: the backward's atomic dbias sum must not be run twice). The backward
    kernels hold two more [BLOCK, BLOCK_D] float32 accumulators: more warps for wide rows."""
    block_d = max(16, triton.next_power_of_2(D))
    if _INTERPRET:
        return 16, 16, block_d, 4, 1
    wide = block_d * (4 if dtype == torch.float32 else 2)  # bytes of one row of a tile
    if wide <= 128:
        return 64, 64, block_d, 4, 2 if backward else 3
    if wide <= 256:
        return 64, 64, block_d, 8 if backward else 4, 2
    if wide <= 512:
        return 64, 32, block_d, 8 if backward else 4, 2
    return 32, 32, block_d, 8, 1


def _precision(dtype: torch.dtype) -> str:
    return _F32_PRECISION if dtype == torch.float32 else "tf32"


def _check_device(q: torch.Tensor):
    if q.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            "mmcl_fast (triton): shared-key attention needs CUDA tensors (CPU tensors only under "
            "TRITON_INTERPRET=1)"
        )
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"mmcl_fast (triton): q must be float32/float16/bfloat16, got {q.dtype}")


def _check_dropout(dropout_p, dropout_seed, q: torch.Tensor) -> bool:
    """Checks the dropout arguments (naming them; RuntimeError, as the C++ ops' TORCH_CHECK); True
    when dropout is on (dropout_p > 0)."""
    p = float(dropout_p)
    if not (math.isfinite(p) and 0.0 <= p < 1.0):
        raise RuntimeError(f"mmcl_fast (triton): ska: dropout_p must be in [0, 1), got {dropout_p}")
    if p == 0.0:
        return False  # the seed is ignored
    if dropout_seed is None:
        raise RuntimeError("mmcl_fast (triton): ska: dropout_seed is required when dropout_p > 0 "
                           "(an int64 tensor [1] on q's device)")
    if not isinstance(dropout_seed, torch.Tensor):
        raise RuntimeError(f"mmcl_fast (triton): ska: dropout_seed must be an int64 tensor [1], "
                           f"got {type(dropout_seed).__name__}")
    if dropout_seed.dtype != torch.int64:
        raise RuntimeError(f"mmcl_fast (triton): ska: dropout_seed must be an int64 tensor, got "
                           f"{dropout_seed.dtype}")
    if dropout_seed.numel() != 1:
        raise RuntimeError(f"mmcl_fast (triton): ska: dropout_seed must have exactly one element, "
                           f"got shape {list(dropout_seed.shape)}")
    if dropout_seed.device != q.device:
        raise RuntimeError(f"mmcl_fast (triton): ska: dropout_seed must be on q's device "
                           f"{q.device}, got {dropout_seed.device}")
    return True


def _dropout_args(dropout_p, dropout_seed, dummy: torch.Tensor):
    """(seed pointer, thr, rscale) of the kernels: thr = min(ceil(p 2^24), 2^24) and
    rscale = 1 / (1 - p) computed in double (the kernels take rscale as float32), as
    mmcl_fast/ops/shared_key_attention.py's dropout_threshold and reference; a dummy pointer and
    (0, 1.0) without dropout."""
    if not dropout_p:
        return dummy, 0, 1.0
    from ..ops.shared_key_attention import dropout_threshold  # (the ops import this module lazily)

    return dropout_seed, dropout_threshold(dropout_p), 1.0 / (1.0 - float(dropout_p))


def _mask_bytes(mask: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (the kernels test != 0), or a dummy pointer when absent."""
    if mask is None:
        return dummy
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _common(q, k, bias, key_padding_mask, query_padding_mask):
    B, H, Lq, D = q.shape
    Bk, _, Lk, _ = k.shape
    stride_kb = 0 if Bk == 1 else H * Lk * D
    stride_bb = 0
    if bias is not None:
        stride_bb = 0 if bias.shape[0] == 1 else H * Lq * Lk
    kpm = _mask_bytes(key_padding_mask, q)
    qpm = _mask_bytes(query_padding_mask, q)
    return B, H, Lq, Lk, D, Bk, stride_kb, stride_bb, kpm, qpm


def _forward_impl(q, k, v, bias, key_padding_mask, query_padding_mask, scale, need_colsum,
                  dropout_p=0.0, dropout_seed=None):
    _check_device(q)
    dropout = _check_dropout(dropout_p, dropout_seed, q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bias = bias.contiguous() if bias is not None else None
    B, H, Lq, Lk, D, Bk, stride_kb, stride_bb, kpm, qpm = _common(
        q, k, bias, key_padding_mask, query_padding_mask)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    bm, bn, bd, warps, stages = _config(D, q.dtype)
    prec = _precision(q.dtype)
    qk_scale = float(scale) * _LOG2E
    bias_arg = bias if bias is not None else q
    seed_arg, thr, rscale = _dropout_args(dropout_p, dropout_seed, lse)
    with _device_guard(q.device):
        _fwd_kernel[(triton.cdiv(Lq, bm) * B * H,)](
            q, k, v, bias_arg, kpm, out, lse, seed_arg, H, Lq, Lk, D, stride_kb, stride_bb,
            qk_scale, thr, rscale, HAS_BIAS=bias is not None,
            HAS_KPM=key_padding_mask is not None, DROPOUT=dropout, PREC=prec,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        )
        if need_colsum:
            colsum = torch.empty((B, H, Lk), dtype=torch.float32, device=q.device)
            _colsum_kernel[(triton.cdiv(Lk, bn) * B * H,)](
                q, k, bias_arg, kpm, qpm, lse, colsum, H, Lq, Lk, D, stride_kb, stride_bb,
                qk_scale, HAS_BIAS=bias is not None, HAS_KPM=key_padding_mask is not None,
                HAS_QPM=query_padding_mask is not None, PREC=prec, BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_D=bd, num_warps=warps, num_stages=stages,
            )
        else:
            colsum = torch.empty((0,), dtype=torch.float32, device=q.device)
    return out, lse, colsum


def _acc_vector(name: str, t: Optional[torch.Tensor], shape, dev,
                empty_is_none: bool = False) -> Optional[torch.Tensor]:
    """An optional [B, H, L] float32 input, contiguous (None when absent; with empty_is_none, an
    empty tensor counts as absent too)."""
    if t is None or (empty_is_none and t.numel() == 0):
        return None
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"mmcl_fast (triton): ska: {name} must be {list(shape)} float32, got "
                         f"{list(t.shape)}")
    if t.device != dev:
        raise ValueError(f"mmcl_fast (triton): ska: {name} must be on {dev}, got {t.device}")
    return t.to(torch.float32).contiguous()


def _backward_impl(grad_out, q, k, v, bias, key_padding_mask, query_padding_mask, out, lse,
                   grad_colsum, grad_width, grad_height, scale, need_dbias, dropout_p=0.0,
                   dropout_seed=None):
    _check_device(q)
    dropout = _check_dropout(dropout_p, dropout_seed, q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    bias = bias.contiguous() if bias is not None else None
    grad_colsum = grad_colsum.contiguous() if grad_colsum is not None else None
    B, H, Lq, Lk, D, Bk, stride_kb, stride_bb, kpm, qpm = _common(
        q, k, bias, key_padding_mask, query_padding_mask)
    grad_width = _acc_vector("grad_width", grad_width, (B, H, Lq), q.device, empty_is_none=True)
    grad_height = _acc_vector("grad_height", grad_height, (B, H, Lk), q.device, empty_is_none=True)
    dev = q.device
    bm, bn, bd, warps, stages = _config(D, q.dtype, backward=True)
    prec = _precision(q.dtype)
    qk_scale = float(scale) * _LOG2E
    has_g = grad_colsum is not None
    has_bias = bias is not None
    need_dbias = bool(need_dbias) and has_bias
    has_kpm = key_padding_mask is not None
    has_qpm = query_padding_mask is not None
    bias_arg = bias if has_bias else q
    g_arg = grad_colsum if has_g else lse
    has_gw, has_gh = grad_width is not None, grad_height is not None
    gw_arg = grad_width if has_gw else lse
    gh_arg = grad_height if has_gh else lse
    seed_arg, thr, rscale = _dropout_args(dropout_p, dropout_seed, lse)

    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    dq = torch.empty_like(q)
    dv = torch.empty_like(v)
    bank = Bk == 1 and B > 1
    # a shared bank's dk: per batch element in float32, summed over b below (deterministic)
    dk_buf = torch.empty((B, H, Lk, D), dtype=torch.float32, device=dev) if bank else torch.empty_like(k)
    dbias_atomic = need_dbias and bias.shape[0] == 1 and B > 1
    if need_dbias:
        if dbias_atomic:
            dbias = torch.zeros(bias.shape, dtype=torch.float32, device=dev)
        else:
            dbias = torch.empty_like(bias)
    else:
        dbias = torch.empty((0,), dtype=bias.dtype if has_bias else q.dtype, device=dev)

    with _device_guard(dev):
        _bwd_pre_kernel[(triton.cdiv(Lq, bm) * B * H,)](
            grad_out, out, q, k, bias_arg, kpm, qpm, lse, g_arg, delta, H, Lq, Lk, D, stride_kb,
            stride_bb, qk_scale, HAS_G=has_g, HAS_BIAS=has_bias, HAS_KPM=has_kpm,
            HAS_QPM=has_qpm, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
            num_stages=stages,
        )
        _bwd_dkdv_kernel[(triton.cdiv(Lk, bn) * B * H,)](
            q, k, v, bias_arg, kpm, qpm, grad_out, lse, delta, g_arg, gw_arg, gh_arg, seed_arg,
            dk_buf, dv, H, Lq, Lk, D, stride_kb, stride_bb, qk_scale, float(scale), thr, rscale,
            HAS_G=has_g, HAS_GW=has_gw, HAS_GH=has_gh, HAS_BIAS=has_bias,
            HAS_KPM=has_kpm, HAS_QPM=has_qpm, DROPOUT=dropout, PREC=prec, BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        )
        _bwd_dq_kernel[(triton.cdiv(Lq, bm) * B * H,)](
            q, k, v, bias_arg, kpm, qpm, grad_out, lse, delta, g_arg, gw_arg, gh_arg, seed_arg,
            dq, dbias if need_dbias else q, H, Lq, Lk, D, stride_kb, stride_bb, qk_scale,
            float(scale), thr, rscale, HAS_G=has_g, HAS_GW=has_gw, HAS_GH=has_gh,
            HAS_BIAS=has_bias, HAS_KPM=has_kpm, HAS_QPM=has_qpm,
            NEED_DBIAS=need_dbias, DBIAS_ATOMIC=dbias_atomic, DROPOUT=dropout, PREC=prec,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        )
    dk = dk_buf.sum(0, keepdim=True).to(k.dtype) if bank else dk_buf
    if dbias_atomic and bias.dtype != torch.float32:
        dbias = dbias.to(bias.dtype)
    return dq, dk, dv, dbias


def _score_maps_config(D: int):
    """(BLOCK_L, BLOCK_D, num_warps) of _score_maps_kernel: fixed tiles, D in chunks of at most
    128 (16 under the interpreter, so that its tests run the chunk loops). One program per
    (b, h), so few programs: 8 warps each (which also keeps the [64, 64] bias tiles and
    [64, 128] float32 feature tiles in registers, no local memory, on sm_90)."""
    if _INTERPRET:
        return 16, 16, 4
    return 64, min(max(16, triton.next_power_of_2(D)), 128), 8


def _score_maps_impl(q, k, bias, key_padding_mask, query_padding_mask, teacher_width,
                     teacher_height, scale, normalize):
    _check_device(q)
    q, k = q.contiguous(), k.contiguous()
    bias = bias.contiguous() if bias is not None else None
    B, H, Lq, Lk, D, Bk, stride_kb, stride_bb, kpm, qpm = _common(
        q, k, bias, key_padding_mask, query_padding_mask)
    dev = q.device
    tw = _acc_vector("teacher_width", teacher_width, (B, H, Lq), dev)
    th = _acc_vector("teacher_height", teacher_height, (B, H, Lk), dev)
    f32 = dict(dtype=torch.float32, device=dev)
    width = torch.empty((B, H, Lq), **f32)
    height = torch.empty((B, H, Lk), **f32)
    dist = torch.empty((B, H), **f32)
    grad_width = torch.empty((B, H, Lq) if tw is not None else (0,), **f32)
    grad_height = torch.empty((B, H, Lk) if th is not None else (0,), **f32)
    kqsum = torch.empty((B * H, 2, D), **f32)  # scratch: ksum, qsum per (b, h)
    block_l, block_d, warps = _score_maps_config(D)
    with _device_guard(dev):
        _score_maps_kernel[(B * H,)](
            q, k, bias if bias is not None else q, kpm, qpm,
            tw if tw is not None else width, th if th is not None else height, kqsum, width,
            height, dist, grad_width if tw is not None else width,
            grad_height if th is not None else height, H, Lq, Lk, D, stride_kb, stride_bb,
            float(scale), HAS_BIAS=bias is not None, HAS_KPM=key_padding_mask is not None,
            HAS_QPM=query_padding_mask is not None, HAS_TW=tw is not None,
            HAS_TH=th is not None, NORMALIZE=bool(normalize), BLOCK_L=block_l, BLOCK_D=block_d,
            num_warps=warps, num_stages=1,
        )
    return width, height, dist, grad_width, grad_height


# ---------------------------------------------------------------------------------------------
# The custom ops (functional: they return new tensors)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmcl_fast::ska_forward_triton", mutates_args=())
def ska_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    query_padding_mask: Optional[torch.Tensor],
    scale: float,
    need_colsum: bool,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton implementation of mmcl_fast::ska_forward: (out, lse, colsum); out of the dropped P
    when dropout_p > 0 (dropout_seed: int64 [1] on q's device, read by the kernel), lse and colsum
    of the undropped P."""
    return _forward_impl(q, k, v, bias, key_padding_mask, query_padding_mask, scale, need_colsum,
                         dropout_p, dropout_seed)


def _stat_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@ska_forward_triton.register_fake
def _(q, k, v, bias, key_padding_mask, query_padding_mask, scale, need_colsum, dropout_p=0.0,
      dropout_seed=None):
    _check_dropout(dropout_p, dropout_seed, q)
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    sd = _stat_dtype(q)
    out = q.new_empty(q.shape)
    lse = q.new_empty((B, H, Lq), dtype=sd)
    colsum = q.new_empty((B, H, Lk) if need_colsum else (0,), dtype=sd)
    return out, lse, colsum


@torch.library.custom_op("mmcl_fast::ska_backward_triton", mutates_args=())
def ska_backward_triton(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    query_padding_mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_colsum: Optional[torch.Tensor],
    grad_width: Optional[torch.Tensor],
    grad_height: Optional[torch.Tensor],
    scale: float,
    need_dbias: bool,
    dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton implementation of mmcl_fast::ska_backward: (dq, dk, dv, dbias); dropout_p and
    dropout_seed must be the forward's (the kernels regenerate its mask; out is the dropped
    output it returned)."""
    return _backward_impl(grad_out, q, k, v, bias, key_padding_mask, query_padding_mask, out, lse,
                          grad_colsum, grad_width, grad_height, scale, need_dbias, dropout_p,
                          dropout_seed)


@ska_backward_triton.register_fake
def _(grad_out, q, k, v, bias, key_padding_mask, query_padding_mask, out, lse, grad_colsum,
      grad_width, grad_height, scale, need_dbias, dropout_p=0.0, dropout_seed=None):
    _check_dropout(dropout_p, dropout_seed, q)
    dq = q.new_empty(q.shape)
    dk = k.new_empty(k.shape)
    dv = v.new_empty(v.shape)
    if need_dbias and bias is not None:
        dbias = bias.new_empty(bias.shape)
    else:
        dbias = q.new_empty((0,), dtype=bias.dtype if bias is not None else q.dtype)
    return dq, dk, dv, dbias


@torch.library.custom_op("mmcl_fast::ska_score_maps_triton", mutates_args=())
def ska_score_maps_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    bias: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    query_padding_mask: Optional[torch.Tensor],
    teacher_width: Optional[torch.Tensor],
    teacher_height: Optional[torch.Tensor],
    scale: float,
    normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton implementation of mmcl_fast::ska_score_maps: (width, height, dist, grad_width,
    grad_height); grad_width / grad_height are empty (shape (0,)) when their teacher is None."""
    return _score_maps_impl(q, k, bias, key_padding_mask, query_padding_mask, teacher_width,
                            teacher_height, scale, normalize)


@ska_score_maps_triton.register_fake
def _(q, k, bias, key_padding_mask, query_padding_mask, teacher_width, teacher_height, scale,
      normalize):
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    sd = _stat_dtype(q)
    width = q.new_empty((B, H, Lq), dtype=sd)
    height = q.new_empty((B, H, Lk), dtype=sd)
    dist = q.new_empty((B, H), dtype=sd)
    grad_width = q.new_empty((B, H, Lq) if teacher_width is not None else (0,), dtype=sd)
    grad_height = q.new_empty((B, H, Lk) if teacher_height is not None else (0,), dtype=sd)
    return width, height, dist, grad_width, grad_height
