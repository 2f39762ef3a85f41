"""Op family C in Triton, the ranking side: filtered rank counts without the score matrix (the
contract of mmcl_fast::filtered_rank_counts).

The maths, for query b (q = queries[b], already composed), candidate c < C = num_candidates
(e = entities[c]), in float32 (inputs float32 / float16 / bfloat16):

    0 transe_l1  s = -sum_d |q_d - e_d|          1 transe_l2  s = -sum_d (q_d - e_d)^2
    2 distmult, 3 complex, 5 dot   s = sum_d q_d e_d
    4 rotate     s = -sum_{k < D/2} sqrt((q_k - e_k)^2 + (q_{k+D/2} - e_{k+D/2})^2)
    t_b       = s(b, target_b)
    greater_b = #{c < C : c != target_b, c not in filter row b, s(b, c) >  t_b}
    equal_b   = #{c < C : c != target_b, c not in filter row b, s(b, c) == t_b}
    (filter row b = filter_indices[indptr[b]:indptr[b+1]], sorted: duplicates count once, the
     target and ids >= C are ignored; a NaN score counts in neither, a NaN target counts nothing)

Exact ties by construction: every score, whether of a candidate tile, of a target or of a filter
entry, is the same strictly sequential float32 accumulation over d = 0, 1, ..., D-1 of one jitted
step (_step / _step_rot: acc + |q - e|, acc + (q - e)(q - e), acc + q e,
acc + sqrt_rn(a a + b b)), every kernel launched with enable_fp_fusion=False (no mul + add
contracted to an fma, so every operation is one IEEE-rounded float32 operation, fixed by the
code). No tree reduction: an element's bits do not depend on the tile shape, its position in the
tile, the layout or the kernel, so a duplicate of the target row scores exactly t_b. (The
candidate tiles read D in zero-padded chunks; the extra steps add +0, which changes no value.)

Launches (memory O(B S + tile D), never a [B, N] buffer; S = candidate splits, <= ~64):
  _target_kernel   grid B / 128: t_b (float32 [B]).
  _rank_tiles_kernel   grid (S, query blocks): each program streams its range of candidate tiles
                   ([BLOCK_Q, BLOCK_C] scores held in registers) and counts, over all c < C with
                   c != target_b, s > t_b and s == t_b; stores int32 partial counts [S, 2, B]
                   (no atomics, no zeroing).
  _rank_filter_kernel  grid B: sums the S partials, then walks the query's CSR row (skipping an
                   entry equal to its predecessor, the target and ids >= C), rescores those entries
                   with the same step and subtracts the ones that were counted; stores int64.
"""
import os
from typing import Tuple

import torch
import triton
import triton.language as tl

from .modality_step import _device_guard

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Scores (the schema's int)
_TRANSE_L1, _TRANSE_L2, _DISTMULT, _COMPLEX, _ROTATE, _DOT = range(6)

# (BLOCK_Q, BLOCK_C, BLOCK_K, num_warps, VARIANT): VARIANT 1 reads column d of the query and
# candidate tiles straight from memory at each step; 2 reads [BLOCK, BLOCK_K] chunks (coalesced)
# and splits them into columns in registers (BLOCK_K 4, 8 or 16). Measured on an H200 (B 1000,
# N 14541, D 200, float32): transe_l1 0.61 ms, transe_l2 0.67, distmult 0.62 (64, 32, 8, 4, 2);
# rotate 2.1 ms (64, 32, 4, 4, 2); variant 1 is 2-2.5x slower, 128-row tiles spill. (A float32
# tl.dot variant was as fast for the dot scores but not tie-exact: not used.) The interpreter gets
# small tiles, so that small tests span several query blocks, candidate tiles, splits and padded
# d chunks.
_CFG = (8, 16, 4, 4, 2) if _INTERPRET else (64, 32, 8, 4, 2)
_CFG_ROTATE = (8, 16, 4, 4, 2) if _INTERPRET else (64, 32, 4, 4, 2)
_TILES_PER_SPLIT_INTERP = 2
_TARGET_BLOCK = 16 if _INTERPRET else 128
_FILTER_BLOCK = 8 if _INTERPRET else 64
_PART_BLOCK = 4 if _INTERPRET else 64
_MAX_SPLITS = 64


# ---------------------------------------------------------------------------------------------
# The score step (one d), shared by every kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _step(acc, q, e, SCORE: tl.constexpr):
    if SCORE == 0:
        r = acc + tl.abs(q - e)
    elif SCORE == 1:
        d = q - e
        r = acc + d * d
    else:
        r = acc + q * e
    return r


@triton.jit
def _step_rot(acc, qa, qb, ea, eb):
    da = qa - ea
    db = qb - eb
    return acc + tl.sqrt_rn(da * da + db * db)


@triton.jit
def _finish(acc, SCORE: tl.constexpr):
    if SCORE == 0 or SCORE == 1 or SCORE == 4:
        r = -acc
    else:
        r = acc
    return r


@triton.jit
def _pair_scores(q_ptr, e_ptr, qrow, erow, valid, D, SCORE: tl.constexpr, R: tl.constexpr):
    """Scores of the R pairs (queries[qrow], entities[erow]) (int64 rows; invalid pairs read 0)."""
    qb = q_ptr + qrow * D
    eb = e_ptr + erow * D
    acc = tl.zeros([R], tl.float32)
    if SCORE == 4:
        H = D // 2
        for d in range(0, H):
            qa = tl.load(qb + d, mask=valid, other=0.0).to(tl.float32)
            qz = tl.load(qb + d + H, mask=valid, other=0.0).to(tl.float32)
            ea = tl.load(eb + d, mask=valid, other=0.0).to(tl.float32)
            ez = tl.load(eb + d + H, mask=valid, other=0.0).to(tl.float32)
            acc = _step_rot(acc, qa, qz, ea, ez)
    else:
        for d in range(0, D):
            qa = tl.load(qb + d, mask=valid, other=0.0).to(tl.float32)
            ea = tl.load(eb + d, mask=valid, other=0.0).to(tl.float32)
            acc = _step(acc, qa, ea, SCORE)
    return _finish(acc, SCORE)


# ---------------------------------------------------------------------------------------------
# Candidate tiles
# ---------------------------------------------------------------------------------------------


@triton.jit
def _cols4(x):
    """Columns 0..3 of a [R, 4] tile (exact: register moves)."""
    ev, od = tl.split(tl.reshape(x, [x.shape[0], 2, 2]))
    x0, x2 = tl.split(ev)
    x1, x3 = tl.split(od)
    return x0, x1, x2, x3


@triton.jit
def _acc4(acc, qa, ea, SCORE: tl.constexpr):
    q0, q1, q2, q3 = _cols4(qa)
    e0, e1, e2, e3 = _cols4(ea)
    acc = _step(acc, q0[:, None], e0[None, :], SCORE)
    acc = _step(acc, q1[:, None], e1[None, :], SCORE)
    acc = _step(acc, q2[:, None], e2[None, :], SCORE)
    acc = _step(acc, q3[:, None], e3[None, :], SCORE)
    return acc


@triton.jit
def _acc4_rot(acc, qa, qz, ea, ez):
    q0, q1, q2, q3 = _cols4(qa)
    z0, z1, z2, z3 = _cols4(qz)
    e0, e1, e2, e3 = _cols4(ea)
    y0, y1, y2, y3 = _cols4(ez)
    acc = _step_rot(acc, q0[:, None], z0[:, None], e0[None, :], y0[None, :])
    acc = _step_rot(acc, q1[:, None], z1[:, None], e1[None, :], y1[None, :])
    acc = _step_rot(acc, q2[:, None], z2[:, None], e2[None, :], y2[None, :])
    acc = _step_rot(acc, q3[:, None], z3[:, None], e3[None, :], y3[None, :])
    return acc


@triton.jit
def _halves(x, R: tl.constexpr, K: tl.constexpr):
    """Columns [0, K/2) and [K/2, K) of a [R, K] tile, as two [R, K/2] tiles (register moves)."""
    return tl.split(tl.permute(tl.reshape(x, [R, 2, K // 2]), [0, 2, 1]))


@triton.jit
def _acc_chunk(acc, qa, ea, SCORE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """acc + the steps of the BLOCK_K (4, 8 or 16) columns of the chunks qa, ea, in order."""
    if BLOCK_K == 4:
        acc = _acc4(acc, qa, ea, SCORE)
    elif BLOCK_K == 8:
        ql, qh = _halves(qa, BLOCK_Q, 8)
        el, eh = _halves(ea, BLOCK_C, 8)
        acc = _acc4(acc, ql, el, SCORE)
        acc = _acc4(acc, qh, eh, SCORE)
    else:
        ql, qh = _halves(qa, BLOCK_Q, 16)
        el, eh = _halves(ea, BLOCK_C, 16)
        acc = _acc_chunk(acc, ql, el, SCORE, BLOCK_Q, BLOCK_C, 8)
        acc = _acc_chunk(acc, qh, eh, SCORE, BLOCK_Q, BLOCK_C, 8)
    return acc


@triton.jit
def _acc_chunk_rot(acc, qa, qz, ea, ez, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    if BLOCK_K == 4:
        acc = _acc4_rot(acc, qa, qz, ea, ez)
    else:
        ql, qh = _halves(qa, BLOCK_Q, BLOCK_K)
        zl, zh = _halves(qz, BLOCK_Q, BLOCK_K)
        el, eh = _halves(ea, BLOCK_C, BLOCK_K)
        yl, yh = _halves(ez, BLOCK_C, BLOCK_K)
        acc = _acc_chunk_rot(acc, ql, zl, el, yl, BLOCK_Q, BLOCK_C, BLOCK_K // 2)
        acc = _acc_chunk_rot(acc, qh, zh, eh, yh, BLOCK_Q, BLOCK_C, BLOCK_K // 2)
    return acc


@triton.jit
def _load_chunk(base, rows, r_valid, dk, d_valid, D):
    return tl.load(base + rows[:, None] * D + dk[None, :],
                   mask=r_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)


@triton.jit
def _score_tile(q_ptr, e_ptr, qrow, q_valid, crow, c_valid, D, SCORE: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                VARIANT: tl.constexpr):
    """The [BLOCK_Q, BLOCK_C] scores of query rows qrow x entity rows crow (int64)."""
    acc = tl.zeros([BLOCK_Q, BLOCK_C], tl.float32)
    if SCORE == 4:
        H = D // 2
        if VARIANT == 1:
            for d in range(0, H):
                qa = tl.load(q_ptr + qrow * D + d, mask=q_valid, other=0.0).to(tl.float32)
                qz = tl.load(q_ptr + qrow * D + d + H, mask=q_valid, other=0.0).to(tl.float32)
                ea = tl.load(e_ptr + crow * D + d, mask=c_valid, other=0.0).to(tl.float32)
                ez = tl.load(e_ptr + crow * D + d + H, mask=c_valid, other=0.0).to(tl.float32)
                acc = _step_rot(acc, qa[:, None], qz[:, None], ea[None, :], ez[None, :])
        else:
            for d0 in range(0, H, BLOCK_K):
                dk = d0 + tl.arange(0, BLOCK_K)
                dv = dk < H
                qa = _load_chunk(q_ptr, qrow, q_valid, dk, dv, D)
                qz = _load_chunk(q_ptr + H, qrow, q_valid, dk, dv, D)
                ea = _load_chunk(e_ptr, crow, c_valid, dk, dv, D)
                ez = _load_chunk(e_ptr + H, crow, c_valid, dk, dv, D)
                acc = _acc_chunk_rot(acc, qa, qz, ea, ez, BLOCK_Q, BLOCK_C, BLOCK_K)
    else:
        if VARIANT == 1:
            for d in range(0, D):
                qa = tl.load(q_ptr + qrow * D + d, mask=q_valid, other=0.0).to(tl.float32)
                ea = tl.load(e_ptr + crow * D + d, mask=c_valid, other=0.0).to(tl.float32)
                acc = _step(acc, qa[:, None], ea[None, :], SCORE)
        else:
            for d0 in range(0, D, BLOCK_K):
                dk = d0 + tl.arange(0, BLOCK_K)
                dv = dk < D
                qa = _load_chunk(q_ptr, qrow, q_valid, dk, dv, D)
                ea = _load_chunk(e_ptr, crow, c_valid, dk, dv, D)
                acc = _acc_chunk(acc, qa, ea, SCORE, BLOCK_Q, BLOCK_C, BLOCK_K)
    return _finish(acc, SCORE)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _target_kernel(q_ptr, e_ptr, tgt_ptr, t_ptr, B, D, SCORE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < B
    tgt = tl.load(tgt_ptr + offs, mask=valid, other=0)
    t = _pair_scores(q_ptr, e_ptr, offs.to(tl.int64), tgt.to(tl.int64), valid, D, SCORE, BLOCK)
    tl.store(t_ptr + offs, t, mask=valid)


@triton.jit
def _rank_tiles_kernel(q_ptr, e_ptr, tgt_ptr, t_ptr, part_ptr, B, D, C, n_tiles, tiles_per_split,
                       SCORE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr, VARIANT: tl.constexpr):
    s_id = tl.program_id(0)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = offs_q < B
    qrow = offs_q.to(tl.int64)
    tgt = tl.load(tgt_ptr + offs_q, mask=q_valid, other=-1)
    t = tl.load(t_ptr + offs_q, mask=q_valid, other=0.0)
    greater = tl.zeros([BLOCK_Q], tl.int32)
    equal = tl.zeros([BLOCK_Q], tl.int32)
    tile0 = s_id * tiles_per_split
    tile1 = tl.minimum(tile0 + tiles_per_split, n_tiles)
    for tile in range(tile0, tile1):
        offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        c_valid = offs_c < C
        s = _score_tile(q_ptr, e_ptr, qrow, q_valid, offs_c.to(tl.int64), c_valid, D, SCORE,
                        BLOCK_Q, BLOCK_C, BLOCK_K, VARIANT)
        ok = q_valid[:, None] & c_valid[None, :] & (offs_c[None, :] != tgt[:, None])
        greater += tl.sum((ok & (s > t[:, None])).to(tl.int32), axis=1)
        equal += tl.sum((ok & (s == t[:, None])).to(tl.int32), axis=1)
    base = part_ptr + s_id.to(tl.int64) * 2 * B
    tl.store(base + offs_q, greater, mask=q_valid)
    tl.store(base + B + offs_q, equal, mask=q_valid)


@triton.jit
def _rank_filter_kernel(q_ptr, e_ptr, tgt_ptr, t_ptr, indptr_ptr, indices_ptr, part_ptr, gt_ptr,
                        eq_ptr, B, D, C, n_splits, SCORE: tl.constexpr, BLOCK_F: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    tgt = tl.load(tgt_ptr + b)
    t = tl.load(t_ptr + b)
    # the partial counts of the candidate splits
    sg = tl.zeros([BLOCK_S], tl.int64)
    se = tl.zeros([BLOCK_S], tl.int64)
    for s0 in range(0, n_splits, BLOCK_S):
        sid = s0 + tl.arange(0, BLOCK_S)
        sv = sid < n_splits
        off = sid.to(tl.int64) * 2 * B + b
        sg += tl.load(part_ptr + off, mask=sv, other=0).to(tl.int64)
        se += tl.load(part_ptr + off + B, mask=sv, other=0).to(tl.int64)
    # minus the filtered candidates that were counted
    start = tl.load(indptr_ptr + b)
    end = tl.load(indptr_ptr + b + 1)
    fg = tl.zeros([BLOCK_F], tl.int64)
    fe = tl.zeros([BLOCK_F], tl.int64)
    qrow = tl.zeros([BLOCK_F], tl.int64) + b
    for p0 in range(start, end, BLOCK_F):
        p = p0 + tl.arange(0, BLOCK_F)
        pv = p < end
        idx = tl.load(indices_ptr + p, mask=pv, other=-1)
        prv = tl.load(indices_ptr + p - 1, mask=pv & (p > start), other=-1)
        keep = pv & (idx != prv) & (idx >= 0) & (idx < C) & (idx != tgt)
        s = _pair_scores(q_ptr, e_ptr, qrow, tl.where(keep, idx, 0).to(tl.int64), keep, D,
                         SCORE, BLOCK_F)
        fg += (keep & (s > t)).to(tl.int64)
        fe += (keep & (s == t)).to(tl.int64)
    tl.store(gt_ptr + b, tl.sum(sg, axis=0) - tl.sum(fg, axis=0))
    tl.store(eq_ptr + b, tl.sum(se, axis=0) - tl.sum(fe, axis=0))


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _check(queries: torch.Tensor, entities: torch.Tensor, score: int):
    if queries.device.type != "cuda" and not (_INTERPRET and queries.device.type == "cpu"):
        raise RuntimeError(
            "mmcl_fast (triton): filtered ranking needs CUDA tensors (CPU tensors only under "
            "TRITON_INTERPRET=1)"
        )
    if queries.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"mmcl_fast (triton): queries must be float32/float16/bfloat16, got {queries.dtype}")
    if entities.dtype != queries.dtype or entities.device != queries.device:
        raise ValueError("mmcl_fast (triton): entities must have the queries' dtype and device")
    if queries.dim() != 2 or entities.dim() != 2 or queries.shape[1] != entities.shape[1]:
        raise ValueError("mmcl_fast (triton): queries [B, D] and entities [N, D]")
    if not 0 <= int(score) <= 5:
        raise ValueError(f"mmcl_fast (triton): unknown score {score}")
    if int(score) in (_COMPLEX, _ROTATE) and queries.shape[1] % 2:
        raise ValueError("mmcl_fast (triton): complex / rotate scores need an even D")


def _splits(B: int, n_tiles: int, block_q: int, device: torch.device) -> int:
    """Tiles per candidate split: enough programs for every SM to hold several."""
    if _INTERPRET or device.type != "cuda":
        return _TILES_PER_SPLIT_INTERP
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    want = max(1, -(-4 * sms // triton.cdiv(B, block_q)))
    want = min(want, _MAX_SPLITS, n_tiles)
    return triton.cdiv(n_tiles, want)


def _counts_impl(queries, entities, target, indptr, indices, score, num_candidates, cfg=None):
    _check(queries, entities, score)
    B, D = queries.shape
    N = entities.shape[0]
    C = int(num_candidates)
    if not 0 <= C <= N:
        raise ValueError(f"mmcl_fast (triton): num_candidates must be in [0, {N}], got {C}")
    dev = queries.device
    greater = torch.empty((B,), dtype=torch.int64, device=dev)
    equal = torch.empty((B,), dtype=torch.int64, device=dev)
    if B == 0:
        return greater, equal
    if C == 0:
        return greater.zero_(), equal.zero_()
    queries, entities = queries.contiguous(), entities.contiguous()
    target, indptr, indices = target.contiguous(), indptr.contiguous(), indices.contiguous()
    if indices.numel() == 0:
        indices = target  # never read (every row is empty), but a valid pointer
    score = int(score)
    bq, bc, bk, warps, variant = cfg or (_CFG_ROTATE if score == _ROTATE else _CFG)
    n_tiles = triton.cdiv(C, bc)
    tps = _splits(B, n_tiles, bq, dev)
    n_splits = triton.cdiv(n_tiles, tps)
    t = torch.empty((B,), dtype=torch.float32, device=dev)
    part = torch.empty((n_splits, 2, B), dtype=torch.int32, device=dev)
    with _device_guard(dev):
        _target_kernel[(triton.cdiv(B, _TARGET_BLOCK),)](
            queries, entities, target, t, B, D, SCORE=score, BLOCK=_TARGET_BLOCK, num_warps=4,
            enable_fp_fusion=False)
        _rank_tiles_kernel[(n_splits, triton.cdiv(B, bq))](
            queries, entities, target, t, part, B, D, C, n_tiles, tps, SCORE=score, BLOCK_Q=bq,
            BLOCK_C=bc, BLOCK_K=bk, VARIANT=variant, num_warps=warps,
            enable_fp_fusion=False)
        _rank_filter_kernel[(B,)](
            queries, entities, target, t, indptr, indices, part, greater, equal, B, D, C,
            n_splits, SCORE=score, BLOCK_F=_FILTER_BLOCK, BLOCK_S=_PART_BLOCK, num_warps=2,
            enable_fp_fusion=False)
    return greater, equal


# ---------------------------------------------------------------------------------------------
# The custom op (functional)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmcl_fast::filtered_rank_counts_triton", mutates_args=())
def filtered_rank_counts_triton(
    queries: torch.Tensor,
    entities: torch.Tensor,
    target: torch.Tensor,
    filter_indptr: torch.Tensor,
    filter_indices: torch.Tensor,
    score: int,
    num_candidates: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of mmcl_fast::filtered_rank_counts: (greater, equal) int64 [B]."""
    return _counts_impl(queries, entities, target, filter_indptr, filter_indices, score,
                        num_candidates)


@filtered_rank_counts_triton.register_fake
def _(queries, entities, target, filter_indptr, filter_indices, score, num_candidates):
    B = queries.shape[0]
    return (queries.new_empty((B,), dtype=torch.int64),
            queries.new_empty((B,), dtype=torch.int64))
