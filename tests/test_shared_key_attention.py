"""Op family B: shared-key attention with on-the-fly asymmetric ReLU distillation.

Oracles: torch's scaled_dot_product_attention (the reference's output), the materialised maps and
the loss formula written out here (the closed forms and the kernels' column sums), autograd of the
reference (every backend's gradients), gradcheck in float64. Every backend runs the same cases.
"""
import importlib
import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import mmcl_fast
from mmcl_fast.backend import triton_interpreting, why_not
from mmcl_fast.ops import pooled_attention_maps, shared_key_attention, shared_key_attention_distill

from conftest import cpu_backends

ska = importlib.import_module("mmcl_fast.ops.shared_key_attention")

INTERP = triton_interpreting()


def _skip_unless(backend, device=torch.device("cpu"), dtype=torch.float32):
    reason = why_not(backend, device, dtype)
    if reason:
        pytest.skip(reason)


# -- input builders ------------------------------------------------------------------------------
def make_inputs(B, H, Lq, Lk, D, *, bank=True, bias="bank", kmask=True, qmask=False, dtype=torch.float32,
                device="cpu", seed=0, empty_row=False):
    """Random inputs; kmask pads a different tail per batch element (and, with empty_row, every key
    of the last element); bias "bank" [H,Lq,Lk], "one" [1,H,Lq,Lk], "batch" [B,H,Lq,Lk] or None."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)

    q = r(B, H, Lq, D)
    k = r(H, Lk, D) if bank else r(B, H, Lk, D)
    v = r(B, H, Lk, D)
    b = {"bank": lambda: r(H, Lq, Lk, s=0.5), "one": lambda: r(1, H, Lq, Lk, s=0.5),
         "batch": lambda: r(B, H, Lq, Lk, s=0.5), None: lambda: None}[bias]()
    kpm = qpm = None
    if kmask:
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        for i in range(B):
            kpm[i, Lk - (i % max(1, Lk // 2)):] = True  # element 0 unpadded, then longer tails
        if empty_row:
            kpm[-1] = True
        kpm = kpm.to(device)
    if qmask:
        qpm = torch.zeros(B, Lq, dtype=torch.bool)
        for i in range(B):
            qpm[i, Lq - (i % max(1, Lq // 2)):] = True
        qpm = qpm.to(device)
    return q, k, v, b, kpm, qpm


def _grads(out_and_loss, inputs, dout):
    out, loss = out_and_loss
    total = (out.float() * dout).sum() + (0 if loss is None else loss.float())
    ts = [t for t in inputs if t is not None]
    return torch.autograd.grad(total, ts, allow_unused=True)


def _leaf(ts, dtype=None):
    return [None if t is None else t.detach().clone().to(dtype or t.dtype).requires_grad_(t.is_floating_point())
            for t in ts]


def _close(a, b, tol, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a.double() - b.double()).abs().max().item()
    scale = max(1.0, b.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


# -- the reference is right ----------------------------------------------------------------------
@pytest.mark.parametrize("bank", [True, False])
@pytest.mark.parametrize("bias", [None, "bank", "batch"])
def test_reference_matches_sdpa_with_float_mask(bank, bias):
    q, k, v, b, kpm, _ = make_inputs(3, 2, 7, 9, 16, bank=bank, bias=bias, dtype=torch.float64)
    out = ska.reference_attention(q, k, v, b, kpm)
    kk = k.expand(3, -1, -1, -1) if bank else k
    mask = torch.zeros(3, 2, 7, 9, dtype=torch.float64)
    if b is not None:
        mask = mask + b
    mask = mask.masked_fill(kpm[:, None, None, :], float("-inf"))
    expect = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask)
    _close(out, expect, 1e-12, "reference vs SDPA")


def test_reference_pooled_maps_by_hand():
    """The pooled maps of a 1x1x2x3 map written out element by element."""
    q = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]], dtype=torch.float64)
    k = torch.tensor([[[1.0, 1.0], [2.0, -1.0], [0.5, 0.5]]], dtype=torch.float64)
    bias = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]]], dtype=torch.float64)
    kpm = torch.tensor([[False, False, True]])
    S = [[1 + 0, 2 + 1], [2 + 3, -2 + 0]]  # scale 1, third key padded
    w, u = ska.reference_pooled_maps(q, k, bias, kpm, None, 1.0)
    assert w.flatten().tolist() == [S[0][0] + S[0][1], S[1][0] + S[1][1]]
    assert u.flatten().tolist() == [S[0][0] + S[1][0], S[0][1] + S[1][1], 0.0]
    w, u = ska.reference_pooled_maps(q, k, bias, kpm, None, 1.0, space="probs")
    p0 = [math.exp(1) / (math.exp(1) + math.exp(3)), math.exp(3) / (math.exp(1) + math.exp(3))]
    p1 = [math.exp(5) / (math.exp(5) + math.exp(-2)), math.exp(-2) / (math.exp(5) + math.exp(-2))]
    assert torch.allclose(u.flatten(), torch.tensor([p0[0] + p1[0], p0[1] + p1[1], 0.0], dtype=torch.float64))
    assert torch.allclose(w.flatten(), torch.ones(2, dtype=torch.float64))


def _formula_loss(tw, th, w, u, pool, normalize):
    """DESIGN.md 5.2 written out: mean over (b, h) of ||ReLU(n(teacher) - n(student))||."""
    def n(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) if normalize else x

    d = 0
    if pool in ("width", "both"):
        d = d + torch.relu(n(tw) - n(w)).norm(dim=-1)
    if pool in ("height", "both"):
        d = d + torch.relu(n(th) - n(u)).norm(dim=-1)
    return d.mean()


@pytest.mark.parametrize("bank", [True, False])
@pytest.mark.parametrize("bias", [None, "bank", "one", "batch"])
@pytest.mark.parametrize("masks", [(False, False), (True, False), (True, True)])
def test_closed_form_maps_equal_the_pooled_explicit_maps(bank, bias, masks):
    q, k, _, b, kpm, qpm = make_inputs(3, 2, 7, 9, 16, bank=bank, bias=bias, kmask=masks[0], qmask=masks[1],
                                       dtype=torch.float64, empty_row=masks[0])
    w, u = ska.reference_pooled_maps(q, k, b, kpm, qpm, 0.3)
    w2, u2 = ska._closed_form_maps(q, k, b, kpm, qpm, 0.3)
    _close(w2, w, 1e-12, "width")
    _close(u2, u, 1e-12, "height")


def test_published_mspt_loss_has_zero_gradient_and_ours_does_not():
    """The released code's loss, ||row_L2_normalise(ReLU(old - new))||_F / 100, is piecewise
    constant: its gradient is 0. Ours, on the same maps, is not (guard against regressing to it)."""
    q, k, v, b, kpm, qpm = make_inputs(2, 2, 6, 6, 8, dtype=torch.float64)
    S_old = ska._reference_scores(q * 0.7, k, b, kpm, 0.35)
    qq = q.clone().requires_grad_()
    S_new = ska._reference_scores(qq, k, b, kpm, 0.35)
    r = torch.relu(S_old - S_new)
    published = (r / r.norm(dim=-1, keepdim=True).clamp_min(1e-12)).norm() / 100
    (g_pub,) = torch.autograd.grad(published, qq)
    assert published.item() > 0 and g_pub.abs().max().item() < 1e-12
    tw, _ = ska.reference_pooled_maps(q * 0.7, k, b, kpm, qpm, 0.35)
    with mmcl_fast.use_backend("reference"):
        _, loss = shared_key_attention_distill(qq, k, v, teacher_width=tw, bias=b, key_padding_mask=kpm,
                                               query_padding_mask=qpm, scale=0.35)
    (g,) = torch.autograd.grad(loss, qq)
    assert loss.item() > 0 and g.abs().max().item() > 1e-6


# -- every backend against the reference ---------------------------------------------------------
# (B, H, Lq, Lk, D, bank, bias, kmask, qmask): odd lengths 1, 7, 61, 80, 129; head dims 32..80
CASES = [
    (2, 3, 7, 7, 32, True, "bank", True, False),
    (3, 2, 1, 1, 48, True, None, False, False),
    (2, 2, 61, 61, 64, True, "bank", True, True),
    (2, 2, 80, 33, 80, False, "batch", True, False),
    (1, 2, 129, 129, 64, False, None, False, False),
    (3, 2, 7, 129, 48, True, "one", True, True),
]
# the Triton interpreter is slow: its own small cases
INTERP_CASES = [
    (2, 2, 7, 7, 32, True, "bank", True, False),
    (2, 1, 1, 1, 16, True, None, False, False),
    (2, 2, 19, 13, 48, False, "batch", True, True),
    (3, 1, 5, 21, 16, True, "one", True, False),
]


def _cases(backend):
    return INTERP_CASES if backend == "triton" else CASES


def _case_ids(c):
    B, H, Lq, Lk, D, bank, bias, km, qm = c
    return f"B{B}H{H}q{Lq}k{Lk}D{D}-{'bank' if bank else 'keys'}-{bias}-{'km' if km else ''}{'qm' if qm else ''}"


def _run_backend(backend, fn):
    if backend == "reference":
        with mmcl_fast.use_backend("reference"):
            return fn()
    with mmcl_fast.use_backend(backend):
        return fn()


def _compare_attention(backend, case, dtype=torch.float32, device="cpu", tol=2e-5, ref_dtype=torch.float64):
    B, H, Lq, Lk, D, bank, bias, km, qm = case
    inputs = make_inputs(B, H, Lq, Lk, D, bank=bank, bias=bias, kmask=km, qmask=qm, dtype=dtype, device=device,
                         empty_row=km and B > 1)
    q, k, v, b, kpm, qpm = inputs
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(1)).to(device)
    mine = _leaf([q, k, v, b])
    out = _run_backend(backend, lambda: shared_key_attention(*mine, key_padding_mask=kpm))
    assert out.dtype == dtype and out.shape == (B, H, Lq, D)
    got = _grads((out, None), mine, dout)
    ref = _leaf([q, k, v, b], ref_dtype)
    with mmcl_fast.use_backend("reference"):
        out_ref = shared_key_attention(*ref, key_padding_mask=kpm)
    want = _grads((out_ref, None), ref, dout.to(ref_dtype))
    _close(out, out_ref, tol, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        _close(g, w, tol, name)
    if km and B > 1:  # the last batch element has no valid key: output 0, no gradient into it
        assert out[-1].abs().max().item() == 0
        assert got[0][-1].abs().max().item() == 0


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ci", range(6))
def test_attention_matches_reference(backend, ci):
    _skip_unless(backend)
    cases = _cases(backend)
    if ci >= len(cases):
        pytest.skip("the Triton interpreter runs fewer cases")
    _compare_attention(backend, cases[ci])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("space,pool", [("scores", "width"), ("scores", "height"), ("scores", "both"), ("probs", "height")])
@pytest.mark.parametrize("normalize", [True, False])
def test_distill_matches_reference_and_formula(backend, space, pool, normalize):
    _skip_unless(backend)
    B, H, Lq, Lk, D = (2, 2, 9, 13, 16) if backend == "triton" else (3, 2, 61, 80, 32)
    q, k, v, b, kpm, qpm = make_inputs(B, H, Lq, Lk, D, bank=True, bias="bank", kmask=True, qmask=True,
                                       empty_row=True)
    # a teacher: the same shapes, other weights; its maps from the materialised reference
    tq, tk, _, tb, _, _ = make_inputs(B, H, Lq, Lk, D, bank=True, bias="bank", seed=5)
    tw, th = (t.float() for t in ska.reference_pooled_maps(tq.double(), tk.double(), tb.double(), kpm, qpm, None, space))
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(3))
    kw = dict(teacher_width=tw, teacher_height=th, key_padding_mask=kpm, query_padding_mask=qpm,
              space=space, pool=pool, normalize=normalize)
    mine = _leaf([q, k, v, b])
    out, loss = _run_backend(backend, lambda: shared_key_attention_distill(*mine[:3], bias=mine[3], **kw))
    got = _grads((out, loss), mine, dout)
    ref = _leaf([q, k, v, b], torch.float64)
    with mmcl_fast.use_backend("reference"):
        out_ref, loss_ref = shared_key_attention_distill(*ref[:3], bias=ref[3], **kw)
    want = _grads((out_ref, loss_ref), ref, dout.double())
    # the loss formula, on the pooled explicit maps
    w, u = ska.reference_pooled_maps(*[t.detach() for t in ref[:2]], ref[3].detach(), kpm, qpm, None, space)
    expect = _formula_loss(tw.double(), th.double(), w, u, pool, normalize)
    assert abs(loss_ref.item() - expect.item()) <= 1e-12 * max(1, abs(expect.item()))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - expect.item()) <= 2e-5 * max(1.0, abs(expect.item())), (loss.item(), expect.item())
    _close(out, out_ref, 2e-5, "out")
    for name, g, wnt in zip(("dq", "dk", "dv", "dbias"), got, want):
        _close(g, wnt, 5e-5, name)
    assert expect.item() > 0, "the teacher should have attention the student lacks"
    assert got[0].abs().max().item() > 0


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("space", ["scores", "probs"])
def test_pooled_maps_match_reference(backend, space):
    _skip_unless(backend)
    q, k, _, b, kpm, qpm = make_inputs(3, 2, 11, 7, 16, bank=False, bias="batch", qmask=True, empty_row=True)
    w, u = _run_backend(backend, lambda: pooled_attention_maps(q, k, b, kpm, qpm, space=space))
    w_ref, u_ref = ska.reference_pooled_maps(q.double(), k.double(), b.double(), kpm, qpm, None, space)
    _close(w, w_ref, 2e-5, "width")
    _close(u, u_ref, 2e-5, "height")
    assert w.dtype == torch.float32


@pytest.mark.parametrize("backend", cpu_backends())
def test_loss_is_zero_when_the_student_dominates(backend):
    """Without normalisation, a student map >= the teacher's everywhere costs nothing and has no
    gradient; lowering one entry below the teacher's switches a ReLU term on: non-zero gradient."""
    _skip_unless(backend)
    q, k, v, b, kpm, qpm = make_inputs(2, 2, 9, 7, 16, bias="bank", qmask=True)
    w, _ = ska.reference_pooled_maps(q.double(), k.double(), b.double(), kpm, qpm, None)
    teacher = (w - 1.0).float()  # every valid entry below the student's
    mine = _leaf([q, k, v, b])
    _, loss = _run_backend(backend, lambda: shared_key_attention_distill(
        *mine[:3], teacher_width=teacher, bias=mine[3], key_padding_mask=kpm, query_padding_mask=qpm, normalize=False))
    gq, gk, gb = torch.autograd.grad(loss, [mine[0], mine[1], mine[3]])
    assert loss.item() == 0 and gq.abs().max().item() == 0 and gk.abs().max().item() == 0
    teacher2 = teacher.clone()
    teacher2[0, 1, 2] = w[0, 1, 2].float() + 0.5
    _, loss2 = _run_backend(backend, lambda: shared_key_attention_distill(
        *mine[:3], teacher_width=teacher2, bias=mine[3], key_padding_mask=kpm, query_padding_mask=qpm, normalize=False))
    gq2, gb2 = torch.autograd.grad(loss2, [mine[0], mine[3]])
    assert abs(loss2.item() - 0.5 / 4) < 1e-5  # one active term of 0.5, mean over B*H = 4
    assert gq2[0, 1, 2].abs().max().item() > 0 and gb2[1, 2].abs().max().item() > 0
    assert gq2[1].abs().max().item() == 0  # other batch elements untouched


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("space,pool", [("scores", "both"), ("probs", "height")])
def test_gradcheck_float64(backend, space, pool):
    _skip_unless(backend, dtype=torch.float64)
    q, k, v, b, kpm, qpm = make_inputs(2, 2, 5, 4, 3, bias="bank", qmask=True, dtype=torch.float64)
    tq, tk, _, tb, _, _ = make_inputs(2, 2, 5, 4, 3, bias="bank", dtype=torch.float64, seed=9)
    tw, th = ska.reference_pooled_maps(tq, tk, tb, kpm, qpm, None, space)

    def f(q, k, v, b):
        with mmcl_fast.use_backend(backend):
            out, loss = shared_key_attention_distill(q, k, v, tw, th, b, kpm, qpm, space=space, pool=pool)
        return out, loss

    assert torch.autograd.gradcheck(f, _leaf([q, k, v, b]), eps=1e-6, atol=1e-6)


# -- the kernel ops directly: lse, colsum, empty rows ----------------------------------------------
def _kernel_fns(backend, device="cpu"):
    _skip_unless(backend, torch.device(device))
    if backend == "reference":
        pytest.skip("the reference has no kernel ops")
    return ska._kernel_ops(backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_forward_kernel_lse_and_column_sums(backend):
    fwd = _kernel_fns(backend)[0]
    q, k, v, b, kpm, qpm = make_inputs(3, 2, 13, 10, 16, bias="one", qmask=True, empty_row=True)
    out, lse, colsum = fwd(q, k.unsqueeze(0), v, b, kpm, qpm, 0.25, True)
    S = ska._reference_scores(q.double(), k.double(), b.double(), kpm, 0.25).masked_fill(kpm[:, None, None, :], float("-inf"))
    lse_ref = torch.logsumexp(S, -1)
    lse_ref = torch.where(torch.isneginf(lse_ref), torch.full_like(lse_ref, float("inf")), lse_ref)
    assert torch.isposinf(lse[-1]).all(), "a row with no valid key has lse = +inf"
    _close(lse[:-1], lse_ref[:-1], 1e-5, "lse")
    _, u = ska.reference_pooled_maps(q.double(), k.double(), b.double(), kpm, qpm, 0.25, "probs")
    _close(colsum, u, 1e-5, "colsum")
    _, _, none = fwd(q, k.unsqueeze(0), v, b, kpm, qpm, 0.25, False)
    assert none.numel() == 0


@pytest.mark.parametrize("backend", cpu_backends())
def test_minus_inf_bias_rows_give_zero_not_nan(backend):
    _skip_unless(backend)
    q, k, v, b, _, _ = make_inputs(2, 2, 5, 6, 16, bias="bank", kmask=False)
    b = b.clone()
    b[1, 3] = float("-inf")  # head 1, query 3 sees no key
    mine = _leaf([q, k, v, b])
    out = _run_backend(backend, lambda: shared_key_attention(*mine))
    assert out[:, 1, 3].abs().max().item() == 0 and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), mine[:3])
    assert all(torch.isfinite(g).all() for g in grads)


# -- the fused "scores" loss: the maps kernel and the map gradient in the backward kernel ----------
# (B, H, Lq, Lk, D, bank, bias, qmask); keys padded per element, every key of the last one
MAP_CASES = [
    (3, 2, 13, 10, 16, True, "bank", True),
    (2, 3, 7, 21, 48, False, "batch", False),
    (2, 1, 1, 5, 8, True, None, True),
    (2, 2, 9, 6, 16, True, "one", True),
]


def _map_case_ids(c):
    B, H, Lq, Lk, D, bank, bias, qm = c
    return f"B{B}H{H}q{Lq}k{Lk}D{D}-{'bank' if bank else 'keys'}-{bias}{'-qm' if qm else ''}"


def _map_inputs(case):
    B, H, Lq, Lk, D, bank, bias, qm = case
    q, k, v, b, kpm, qpm = make_inputs(B, H, Lq, Lk, D, bank=bank, bias=bias, kmask=True, qmask=qm, empty_row=True)
    k4 = k if k.dim() == 4 else k.unsqueeze(0)
    b4 = b if b is None or b.dim() == 4 else b.unsqueeze(0)
    return q, k, v, b, kpm, qpm, k4, b4


def _valid_of(mask, n, B):
    return torch.ones(B, n, dtype=torch.float64) if mask is None else (~mask).double()


# the kernel backends on the CPU (C++, the Triton interpreter) and on a GPU when there is one
KERNEL_TARGETS = [pytest.param(b, "cpu", id=b) for b in ("cpu", "triton")] + [
    pytest.param(b, "cuda", id=f"gpu-{b}", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))
    for b in ("cuda", "triton")]


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
@pytest.mark.parametrize("case", MAP_CASES, ids=_map_case_ids)
@pytest.mark.parametrize("normalize", [True, False])
def test_score_maps_kernel(backend, device, case, normalize):
    """ska_score_maps: the maps equal the pooled explicit maps; the distance per (b, h) equals the
    loss formula and its gradients equal autograd's of that formula (masked), for every teacher
    combination."""
    maps = _kernel_fns(backend, device)[2]
    q, k, _, b, kpm, qpm, k4, b4 = _map_inputs(case)
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k4.shape[2]
    scale = 0.3
    w_ref, u_ref = ska.reference_pooled_maps(q.double(), k.double(), None if b is None else b.double(), kpm, qpm,
                                             scale)
    g = torch.Generator().manual_seed(4)
    tw = (w_ref + torch.randn(B, H, Lq, generator=g, dtype=torch.float64)).float()
    th = (u_ref + torch.randn(B, H, Lk, generator=g, dtype=torch.float64)).float()
    wl, ul = w_ref.clone().requires_grad_(), u_ref.clone().requires_grad_()
    d_w = ska.asymmetric_relu_distance(tw.double(), wl, normalize)
    d_u = ska.asymmetric_relu_distance(th.double(), ul, normalize)
    gw_ref, gu_ref = torch.autograd.grad((d_w + d_u).sum(), [wl, ul])
    gw_ref = gw_ref * _valid_of(qpm, Lq, B)[:, None, :]
    gu_ref = gu_ref * _valid_of(kpm, Lk, B)[:, None, :]
    for teachers in ((tw, th), (tw, None), (None, th), (None, None)):
        w, u, dist, gw, gu = (t.cpu() for t in maps(*_to(device, q, k4, b4, kpm, qpm, *teachers), scale, normalize))
        assert w.dtype == u.dtype == dist.dtype == torch.float32
        _close(w, w_ref, 2e-5, "width")
        _close(u, u_ref, 2e-5, "height")
        want = sum(d for d, t in ((d_w, teachers[0]), (d_u, teachers[1])) if t is not None)
        _close(dist, want.detach() if isinstance(want, torch.Tensor) else torch.zeros(B, H), 2e-5, "dist")
        for got, ref, t, name in ((gw, gw_ref, teachers[0], "grad_width"), (gu, gu_ref, teachers[1], "grad_height")):
            if t is None:
                assert got.numel() == 0, f"{name} must be empty without its teacher"
            else:
                _close(got, ref, 5e-5, name)
    assert (d_w + d_u).min().item() > 0, "every pair should have an active ReLU term"


@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
@pytest.mark.parametrize("case", MAP_CASES, ids=_map_case_ids)
def test_backward_kernel_adds_the_map_gradient(backend, device, case):
    """ska_backward with grad_width a and grad_height c (not masked: the kernel masks them) equals
    autograd of sum(out dO) + sum(a w) + sum(c u) on the reference, w and u the pooled score maps."""
    fwd, bwd, _ = _kernel_fns(backend, device)
    q, k, v, b, kpm, qpm, k4, b4 = _map_inputs(case)
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k4.shape[2]
    scale = 0.3
    g = torch.Generator().manual_seed(6)
    a = torch.randn(B, H, Lq, generator=g)
    c = torch.randn(B, H, Lk, generator=g)
    dout = torch.randn(B, H, Lq, q.shape[3], generator=g)
    dq_, dk4, dv_, db4, dkpm, dqpm, ddout = _to(device, q, k4, v, b4, kpm, qpm, dout)
    out, lse, _ = fwd(dq_, dk4, dv_, db4, dkpm, None, scale, False)
    for gw, gu in ((a, c), (a, None), (None, c)):
        got = [t.cpu() for t in bwd(ddout, dq_, dk4, dv_, db4, dkpm, dqpm, out, lse, None, *_to(device, gw, gu), scale,
                                    b4 is not None)]
        ref = _leaf([q, k, v, b], torch.float64)
        w, u = ska.reference_pooled_maps(ref[0], ref[1], ref[3], kpm, qpm, scale)
        total = (ska.reference_attention(*ref[:3], ref[3], kpm, scale) * dout.double()).sum()
        total = total + (0 if gw is None else (a.double() * w).sum()) + (0 if gu is None else (c.double() * u).sum())
        want = torch.autograd.grad(total, [t for t in ref if t is not None])
        for name, x, y in zip(("dq", "dk", "dv", "dbias"), got, want):
            _close(x.reshape(y.shape), y, 5e-5, name)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_distill_gradients_of_one_output_and_no_double_backward(backend):
    """The fused node with only the loss used (dv = 0), only the output used (no map term), and a
    second derivative refused instead of silently wrong."""
    _skip_unless(backend)
    if backend == "reference":
        pytest.skip("the reference has no fused node")
    q, k, v, b, kpm, qpm = make_inputs(2, 2, 7, 9, 16, bias="bank", qmask=True)
    tw, th = (t.float() for t in ska.reference_pooled_maps(q.double() * 0.5, k.double(), b.double(), kpm, qpm, None))
    kw = dict(teacher_width=tw, teacher_height=th, key_padding_mask=kpm, query_padding_mask=qpm, pool="both")
    for which in ("loss", "out"):
        mine, ref = _leaf([q, k, v, b]), _leaf([q, k, v, b], torch.float64)
        res = []
        for leaves, be in ((mine, backend), (ref, "reference")):
            out, loss = _run_backend(be, lambda: shared_key_attention_distill(*leaves[:3], bias=leaves[3], **kw))
            res.append(torch.autograd.grad(loss if which == "loss" else out.sum(), leaves, allow_unused=True))
        for name, x, y in zip(("dq", "dk", "dv", "dbias"), *res):
            _close(x, torch.zeros_like(x) if y is None else y.float(), 5e-5, f"{which}: {name}")
    mine = _leaf([q, k, v, b])
    _, loss = _run_backend(backend, lambda: shared_key_attention_distill(*mine[:3], bias=mine[3], **kw))
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, mine[0], create_graph=True)
    out = _run_backend(backend, lambda: shared_key_attention(*mine[:3], bias=mine[3], key_padding_mask=kpm))
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(out.sum(), mine[0], create_graph=True)


# -- bad input: a clear error naming the argument, before any kernel runs ------------------------
def _good():
    return make_inputs(2, 2, 5, 6, 8, bias="bank", qmask=True)


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must be a 4-D"),
    (lambda a: a.update(k=a["k"][:1]), ValueError, "k .* does not match q"),
    (lambda a: a.update(k=a["k"][..., :4]), ValueError, "head dim"),
    (lambda a: a.update(k=torch.randn(3, 2, 6, 8)), ValueError, "batch 2 or 1"),
    (lambda a: a.update(v=a["v"][:, :, :5]), ValueError, r"v must be \[B, H, Lk, D\]"),
    (lambda a: a.update(v=a["v"].double()), TypeError, "v must have q's dtype"),
    (lambda a: a.update(q=a["q"].long()), TypeError, "q must be a floating-point"),
    (lambda a: a.update(bias=a["bias"][:, :4]), ValueError, "bias must be"),
    (lambda a: a.update(bias=torch.randn(3, 2, 5, 6)), ValueError, "bias must be"),
    (lambda a: a.update(bias=a["bias"].double()), TypeError, "bias must have q's dtype"),
    (lambda a: a.update(key_padding_mask=a["key_padding_mask"].float()), TypeError, "key_padding_mask must be a bool"),
    (lambda a: a.update(key_padding_mask=a["key_padding_mask"][:, :5]), ValueError, "key_padding_mask must be"),
    (lambda a: a.update(query_padding_mask=a["query_padding_mask"][:1]), ValueError, "query_padding_mask must be"),
    (lambda a: a.update(scale=float("nan")), ValueError, "scale must be finite"),
    (lambda a: a.update(space="logits"), ValueError, "space must be one of"),
    (lambda a: a.update(pool="rows"), ValueError, "pool must be one of"),
    (lambda a: a.update(space="probs", pool="width"), ValueError, "width pooling"),
    (lambda a: a.update(space="probs", pool="both"), ValueError, "width pooling"),
    (lambda a: a.update(teacher_width=a["teacher_width"][..., :4]), ValueError, "teacher_width must be"),
    (lambda a: a.update(teacher_width=None), ValueError, "teacher_width is required"),
    (lambda a: a.update(pool="height", teacher_height=torch.zeros(2, 2, 5)), ValueError, "teacher_height must be"),
])
def test_bad_input_is_named(change, exc, match):
    q, k, v, b, kpm, qpm = _good()
    args = dict(q=q, k=k, v=v, bias=b, key_padding_mask=kpm, query_padding_mask=qpm,
                teacher_width=torch.zeros(2, 2, 5), teacher_height=torch.zeros(2, 2, 6))
    change(args)
    with pytest.raises(exc, match=match):
        shared_key_attention_distill(**args)


def test_bad_input_of_attention_and_maps():
    q, k, v, b, kpm, qpm = _good()
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        shared_key_attention(q, k, v, b, kpm.T)
    with pytest.raises(ValueError, match="space must be one of"):
        pooled_attention_maps(q, k, space="attn")
    with pytest.raises(ValueError, match="one device"):
        shared_key_attention(q, k, v, b, kpm.to("meta"))


# -- torch.library: opcheck and torch.compile ----------------------------------------------------
def _opcheck_inputs():
    q, k, v, b, kpm, qpm = make_inputs(2, 2, 5, 6, 16, bias="one", qmask=True)
    q, k, v, b = _leaf([q, k.unsqueeze(0), v, b])
    return q, k, v, b, kpm, qpm


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    fwd, bwd, maps = _kernel_fns(backend)
    if backend == "triton":
        ska._register_triton()
    q, k, v, b, kpm, qpm = _opcheck_inputs()
    torch.library.opcheck(fwd.default, (q, k, v, b, kpm, qpm, 0.3, True))
    torch.library.opcheck(fwd.default, (q, k, v, None, None, None, 0.3, False))
    with torch.no_grad():
        out, lse, colsum = fwd(q, k, v, b, kpm, qpm, 0.3, True)
    g = torch.randn_like(out)
    gw, gu = torch.randn_like(lse), torch.randn_like(colsum)
    for extra in ((torch.randn_like(colsum), None, None), (None, gw, gu), (None, gw, None)):
        torch.library.opcheck(bwd.default, (g, q.detach(), k.detach(), v.detach(), b.detach(), kpm, qpm, out, lse,
                                            *extra, 0.3, True),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    tw, th = torch.randn_like(lse), torch.randn_like(colsum)
    for teachers in ((tw, th), (None, th), (None, None)):
        torch.library.opcheck(maps.default, (q.detach(), k.detach(), b.detach(), kpm, qpm, *teachers, 0.3, True),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_torch_compile_fullgraph_module():
    """A small module using the op (cpu backend when built) compiles without graph breaks and
    matches eager, output and gradients."""
    _skip_unless("cpu")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qv = torch.nn.Linear(16, 32)
            self.bank = torch.nn.Parameter(torch.randn(2, 6, 8))
            self.bias = torch.nn.Parameter(torch.zeros(2, 6, 6))

        def forward(self, x, kpm, tw):
            B, L, _ = x.shape
            q, v = self.qv(x).view(B, L, 2, 2, 8).permute(2, 0, 3, 1, 4)
            out, loss = shared_key_attention_distill(q, self.bank, v, teacher_width=tw, bias=self.bias,
                                                     key_padding_mask=kpm)
            return out.sum(1), loss

    torch.manual_seed(0)
    m = Block()
    x = torch.randn(3, 6, 16)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    tw = torch.randn(3, 2, 6)
    with mmcl_fast.use_backend("cpu"):
        eager = m(x, kpm, tw)
        g_eager = torch.autograd.grad(eager[0].sum() + eager[1], list(m.parameters()))
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        comp = compiled(x, kpm, tw)
        g_comp = torch.autograd.grad(comp[0].sum() + comp[1], list(m.parameters()))
    _close(comp[0], eager[0], 1e-5, "out")
    _close(comp[1], eager[1], 1e-5, "loss")
    for a, b in zip(g_comp, g_eager):
        _close(a, b, 1e-5, "grad")


# -- GPU: cuda and triton against the reference (skipped without a GPU) ---------------------------
GPU = torch.cuda.is_available()
GPU_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not GPU, reason="no GPU")) for b in ("cuda", "triton")]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
@pytest.mark.parametrize("ci", range(6))
def test_gpu_attention_matches_reference(backend, dtype, tol, ci):
    _skip_unless(backend, torch.device("cuda"), dtype)
    _compare_attention(backend, CASES[ci], dtype=dtype, device="cuda", tol=tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("space,pool", [("scores", "both"), ("probs", "height")])
def test_gpu_distill_matches_reference(backend, space, pool):
    _skip_unless(backend, torch.device("cuda"))
    q, k, v, b, kpm, qpm = make_inputs(4, 3, 61, 80, 64, bias="bank", qmask=True, empty_row=True, device="cuda")
    tw, th = ska.reference_pooled_maps(q.double() * 0.5, k.double(), b.double(), kpm, qpm, None, space)
    kw = dict(teacher_width=tw.float(), teacher_height=th.float(), key_padding_mask=kpm, query_padding_mask=qpm,
              space=space, pool=pool)
    mine = _leaf([q, k, v, b])
    out, loss = _run_backend(backend, lambda: shared_key_attention_distill(*mine[:3], bias=mine[3], **kw))
    dout = torch.randn_like(out)
    got = _grads((out, loss), mine, dout)
    ref = _leaf([q, k, v, b], torch.float64)
    with mmcl_fast.use_backend("reference"):
        out_ref, loss_ref = shared_key_attention_distill(*ref[:3], bias=ref[3], **kw)
    want = _grads((out_ref, loss_ref), ref, dout.double())
    assert abs(loss.item() - loss_ref.item()) <= 2e-3 * max(1.0, abs(loss_ref.item()))
    for name, g, w in zip(("out", "dq", "dk", "dv", "dbias"), (out,) + tuple(got), (out_ref,) + tuple(want)):
        _close(g, w, 2e-3, name)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_gpu_dropout_half_precision(backend, dtype, tol):
    """Dropout with fp16 / bf16 inputs (fp32 accumulation) against the float64 reference drawing
    the same mask: output and gradients."""
    _skip_unless(backend, torch.device("cuda"), dtype)
    q, k, v, b, kpm, _ = make_inputs(2, 3, 61, 80, 64, bias="batch", empty_row=True, dtype=dtype, device="cuda")
    dout = torch.randn(2, 3, 61, 64, generator=torch.Generator().manual_seed(2)).to("cuda", dtype)
    mine = _leaf([q, k, v, b])
    out = _run_backend(backend, lambda: shared_key_attention(*mine, key_padding_mask=kpm, dropout_p=0.2,
                                                             dropout_seed=31))
    got = _grads((out, None), mine, dout.float())
    ref = _leaf([q, k, v, b], torch.float64)
    want = _grads((ska.reference_attention(*ref, kpm, None, 0.2, 31), None), ref, dout.double())
    _close(out, ska.reference_attention(*[t.detach() for t in ref], kpm, None, 0.2, 31), tol, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        _close(g, w, tol, name)


@pytest.mark.parametrize("backend", cpu_backends())
def test_keys_with_batch_one_equal_the_bank(backend):
    """k [1, H, Lk, D] and bias [1, H, Lq, Lk] broadcast like the bank forms: same loss, output and
    gradients (the batch-1 gradients have the batch-1 shape)."""
    _skip_unless(backend)
    q, k, v, b, kpm, qpm = make_inputs(3, 2, 7, 5, 16, bias="bank", qmask=True)
    tw, th = ska.reference_pooled_maps(q.double() * 0.5, k.double(), b.double(), kpm, qpm, None)
    kw = dict(teacher_width=tw.float(), teacher_height=th.float(), key_padding_mask=kpm, query_padding_mask=qpm,
              pool="both")
    res = []
    for kk, bb in ((k, b), (k.unsqueeze(0), b.unsqueeze(0))):
        leaves = _leaf([q, kk, v, bb])
        out, loss = _run_backend(backend, lambda: shared_key_attention_distill(*leaves[:3], bias=leaves[3], **kw))
        res.append((out, loss) + _grads((out, loss), leaves, torch.ones_like(out)))
    (o1, l1, gq1, gk1, gv1, gb1), (o2, l2, gq2, gk2, gv2, gb2) = res
    assert gk2.shape == (1, 2, 5, 16) and gb2.shape == (1, 2, 7, 5)
    _close(o2, o1, 1e-6, "out")
    _close(l2, l1, 1e-6, "loss")
    for a, c, name in ((gq2, gq1, "dq"), (gk2[0], gk1, "dk"), (gv2, gv1, "dv"), (gb2[0], gb1, "dbias")):
        _close(a, c, 1e-5, name)


# -- dropout on P --------------------------------------------------------------------------------
def test_dropout_keep_mask_layout_and_statistics():
    """dropout_keep is Philox at counter (j >> 2, i, b H + h, tag), word j & 3 (checked element by
    element against single Philox calls); its keep rate is 1 - p; seeds and (b, h) rows differ."""
    from mmcl_fast.ops.modality_step import philox4x32_10

    seed = 0x0123456789ABCDEF
    m = ska.dropout_keep(seed, 2, 3, 5, 7, 0.3)
    thr = math.ceil(0.3 * 2**24)
    for b, h, i, j in [(0, 0, 0, 0), (1, 2, 4, 6), (0, 1, 3, 5), (1, 0, 2, 3), (1, 1, 0, 4)]:
        x = philox4x32_10(torch.tensor([j >> 2]), i, b * 3 + h, ska.DROPOUT_TAG, seed & 0xFFFFFFFF, seed >> 32)
        assert bool(m[b, h, i, j]) == (int(x[j & 3]) >> 8 >= thr), (b, h, i, j)
    for p in (0.1, 0.5, 0.9):
        keep = ska.dropout_keep(7, 4, 4, 64, 61, p).double()
        n = keep.numel()
        assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), p
        # neighbouring keys (same Philox call) and neighbouring rows are uncorrelated
        for a, c in ((keep[..., :-1], keep[..., 1:]), (keep[:, :, :-1], keep[:, :, 1:])):
            corr = ((a - a.mean()) * (c - c.mean())).mean() / (a.std() * c.std())
            assert abs(corr.item()) < 0.02
    a, b = ska.dropout_keep(7, 2, 2, 16, 16, 0.5), ska.dropout_keep(8, 2, 2, 16, 16, 0.5)
    assert not torch.equal(a, b) and not torch.equal(a[0, 0], a[0, 1]) and not torch.equal(a[0, 0], a[1, 0])
    assert torch.equal(a, ska.dropout_keep(7, 2, 2, 16, 16, 0.5))
    assert torch.equal(ska.dropout_keep(-1, 1, 1, 3, 9, 0.5), ska.dropout_keep(2**64 - 1, 1, 1, 3, 9, 0.5))
    assert ska.dropout_keep(7, 1, 2, 3, 9, 0.0).all()


def test_reference_dropout_is_p_times_keep_over_one_minus_p():
    """The reference's dropped output written out: softmax(S) * keep / (1 - p), then times v."""
    q, k, v, b, kpm, _ = make_inputs(2, 3, 7, 9, 16, bias="bank", dtype=torch.float64)
    P = torch.softmax((q @ k.transpose(-1, -2)) * 0.25 + b + torch.where(kpm, -math.inf, 0.0)[:, None, None, :], -1)
    keep = ska.dropout_keep(42, 2, 3, 7, 9, 0.4)
    expect = (P * keep / 0.6) @ v
    _close(ska.reference_attention(q, k, v, b, kpm, 0.25, 0.4, 42), expect, 1e-12, "reference dropout")


DROPOUT_CASES = [
    (2, 3, 7, 9, 32, True, "bank", True, False),
    (2, 2, 61, 129, 48, False, "batch", True, True),
    (3, 2, 1, 5, 64, True, None, False, False),
]
# the interpreter's tiles are 16 x 16: 21 x 37 has several query and key tiles
DROPOUT_INTERP_CASES = [
    (2, 2, 7, 9, 32, True, "bank", True, False),
    (2, 1, 21, 37, 16, False, "batch", True, True),
]


def _dropout_case(backend, device, ci):
    cases = DROPOUT_INTERP_CASES if (backend == "triton" and device == "cpu") else DROPOUT_CASES
    if ci >= len(cases):
        pytest.skip("the Triton interpreter runs fewer cases")
    return cases[ci]


@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
@pytest.mark.parametrize("ci", range(3))
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference(backend, device, ci, p):
    """Output and every gradient with dropout on P against the reference drawing the same mask
    (float64), through the public op; the seed as an int and as a tensor give the same result."""
    _skip_unless(backend, torch.device(device))
    B, H, Lq, Lk, D, bank, bias, km, qm = _dropout_case(backend, device, ci)
    q, k, v, b, kpm, _ = make_inputs(B, H, Lq, Lk, D, bank=bank, bias=bias, kmask=km, empty_row=km)
    seed = 1234567890123
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(2))
    mine = _leaf(_to(device, q, k, v, b))
    dkpm = None if kpm is None else kpm.to(device)
    out = _run_backend(backend, lambda: shared_key_attention(*mine, key_padding_mask=dkpm, dropout_p=p,
                                                             dropout_seed=seed))
    got = _grads((out, None), mine, dout.to(device))
    ref = _leaf([q, k, v, b], torch.float64)
    out_ref = ska.reference_attention(*ref, kpm, None, p, seed)
    want = _grads((out_ref, None), ref, dout.double())
    _close(out.cpu(), out_ref, 2e-5, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        _close(g.cpu(), w, 5e-5, name)
    undropped = ska.reference_attention(*[None if t is None else t.detach() for t in ref], kpm, None)
    assert (out.cpu().double() - undropped).abs().max().item() > 0.05  # the mask was applied
    again = _run_backend(backend, lambda: shared_key_attention(
        *[None if t is None else t.detach() for t in mine], key_padding_mask=dkpm, dropout_p=p,
        dropout_seed=torch.tensor([seed], device=device)))
    assert torch.equal(again, out.detach())


@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
@pytest.mark.parametrize("space,pool", [("scores", "both"), ("probs", "height")])
def test_dropout_with_the_distillation_loss(backend, device, space, pool):
    """With dropout the output is dropped and the loss is that of the undropped maps (the fused
    scores path, and the probs path whose column sums enter the backward next to the mask)."""
    _skip_unless(backend, torch.device(device))
    B, H, Lq, Lk, D = (2, 1, 19, 21, 16) if (backend == "triton" and device == "cpu") else (3, 2, 29, 140, 32)
    q, k, v, b, kpm, qpm = make_inputs(B, H, Lq, Lk, D, bias="bank", qmask=True, empty_row=True)
    tw, th = (t.float() for t in ska.reference_pooled_maps(q.double() * 0.5, k.double(), b.double(), kpm, qpm,
                                                             None, space))
    dout = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(3))
    kw = dict(key_padding_mask=kpm, query_padding_mask=qpm, space=space, pool=pool, dropout_p=0.3, dropout_seed=99)
    mine = _leaf(_to(device, q, k, v, b))
    dkw = dict(kw, key_padding_mask=kpm.to(device), query_padding_mask=qpm.to(device))
    out, loss = _run_backend(backend, lambda: shared_key_attention_distill(
        *mine[:3], bias=mine[3], teacher_width=tw.to(device), teacher_height=th.to(device), **dkw))
    got = _grads((out, loss), mine, dout.to(device))
    ref = _leaf([q, k, v, b], torch.float64)
    with mmcl_fast.use_backend("reference"):
        out_ref, loss_ref = shared_key_attention_distill(*ref[:3], bias=ref[3], teacher_width=tw, teacher_height=th,
                                                         **kw)
        _, loss_nodrop = shared_key_attention_distill(*ref[:3], bias=ref[3], teacher_width=tw, teacher_height=th,
                                                      **dict(kw, dropout_p=0.0))
    want = _grads((out_ref, loss_ref), ref, dout.double())
    assert abs(loss_ref.item() - loss_nodrop.item()) <= 1e-12
    assert abs(loss.item() - loss_ref.item()) <= 2e-5 * max(1.0, abs(loss_ref.item()))
    _close(out.cpu(), out_ref, 2e-5, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        _close(g.cpu(), w, 5e-5, name)


@pytest.mark.parametrize("backend,device", [pytest.param("cpu", "cpu", id="cpu")] + [
    pytest.param("cuda", "cuda", id="gpu-cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))])
def test_dropout_is_unbiased_over_seeds(backend, device):
    """An oracle independent of the mask's layout: averaged over seeds, the dropped output is the
    undropped one (Z has mean 1), within a bound set by the spread of the draws."""
    _skip_unless(backend, torch.device(device))
    q, k, v, b, kpm, _ = make_inputs(1, 2, 6, 8, 16, bias="bank", device=device)
    with mmcl_fast.use_backend(backend):
        full = shared_key_attention(q, k, v, b, kpm)
        draws = torch.stack([shared_key_attention(q, k, v, b, kpm, dropout_p=0.4, dropout_seed=s)
                             for s in range(800)])
    mean, sem = draws.double().mean(0), draws.double().std(0) / math.sqrt(draws.shape[0])
    assert ((mean - full.double()).abs() <= 5 * sem + 1e-6).all()
    assert sem.max().item() > 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64_with_dropout(backend):
    _skip_unless(backend, dtype=torch.float64)
    q, k, v, b, kpm, _ = make_inputs(2, 2, 5, 6, 3, bias="bank", dtype=torch.float64)

    def f(q, k, v, b):
        with mmcl_fast.use_backend(backend):
            return shared_key_attention(q, k, v, b, kpm, dropout_p=0.3, dropout_seed=5)

    assert torch.autograd.gradcheck(f, tuple(_leaf([q, k, v, b])), eps=1e-6, atol=1e-6)


def test_dropout_seed_from_torch_generator():
    """dropout_seed None: the mask is drawn from torch's generator, so manual_seed repeats it."""
    q, k, v, b, kpm, _ = make_inputs(2, 2, 7, 9, 16, bias="bank")
    torch.manual_seed(3)
    a = shared_key_attention(q, k, v, b, kpm, dropout_p=0.5)
    c = shared_key_attention(q, k, v, b, kpm, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(a, shared_key_attention(q, k, v, b, kpm, dropout_p=0.5))
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    with mmcl_fast.use_backend("reference"):
        _close(shared_key_attention(q, k, v, b, kpm, dropout_p=0.5), a, 2e-5, "reference, same generator state")


@pytest.mark.parametrize("dropout_p,seed,exc,match", [
    (1.0, 1, ValueError, r"dropout_p must be in \[0, 1\)"),
    (-0.1, 1, ValueError, r"dropout_p must be in \[0, 1\)"),
    (float("nan"), 1, ValueError, r"dropout_p must be in \[0, 1\)"),
    ("0.1", 1, TypeError, "dropout_p must be a float"),
    (0.1, torch.tensor([1.0]), TypeError, "dropout_seed must be an int or an int64 tensor"),
    (0.1, torch.tensor([1, 2]), TypeError, "dropout_seed must be an int or an int64 tensor"),
    (0.1, 2**64, ValueError, "dropout_seed must fit in 64 bits"),
    (0.1, 1.5, TypeError, "dropout_seed must be an int"),
])
def test_bad_dropout_arguments_are_named(dropout_p, seed, exc, match):
    q, k, v, b, kpm, qpm = _good()
    with pytest.raises(exc, match=match):
        shared_key_attention(q, k, v, b, kpm, dropout_p=dropout_p, dropout_seed=seed)
    with pytest.raises(exc, match=match):
        shared_key_attention_distill(q, k, v, teacher_width=torch.zeros(2, 2, 5), bias=b, key_padding_mask=kpm,
                                     dropout_p=dropout_p, dropout_seed=seed)


@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
def test_raw_ops_check_their_dropout_arguments(backend, device):
    """The kernel ops' own checks (before any kernel runs), for callers that skip the Python layer."""
    fwd, bwd, _ = _kernel_fns(backend, device)
    q, k, v, b, kpm, qpm = _to(device, *_opcheck_inputs())
    q, k, v, b = (t.detach() for t in (q, k, v, b))
    seed = torch.tensor([1], device=device)
    with pytest.raises(RuntimeError, match="dropout_seed is required"):
        fwd(q, k, v, b, kpm, qpm, 0.3, False, 0.2, None)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        fwd(q, k, v, b, kpm, qpm, 0.3, False, 1.5, seed)
    with pytest.raises(RuntimeError, match="dropout_seed must be an int64"):
        fwd(q, k, v, b, kpm, qpm, 0.3, False, 0.2, seed.double())
    with pytest.raises(RuntimeError, match="dropout_seed must .*one element"):
        fwd(q, k, v, b, kpm, qpm, 0.3, False, 0.2, torch.tensor([1, 2], device=device))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="dropout_seed must be on"):
            fwd(q, k, v, b, kpm, qpm, 0.3, False, 0.2, torch.tensor([1]))
    out, lse, _ = fwd(q, k, v, b, kpm, qpm, 0.3, False, 0.2, seed)
    with pytest.raises(RuntimeError, match="dropout_seed is required"):
        bwd(torch.ones_like(out), q, k, v, b, kpm, qpm, out, lse, None, None, None, 0.3, True, 0.2, None)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck_with_dropout(backend):
    fwd, bwd, _ = _kernel_fns(backend)
    if backend == "triton":
        ska._register_triton()
    q, k, v, b, kpm, qpm = _opcheck_inputs()
    seed = torch.tensor([77])
    torch.library.opcheck(fwd.default, (q, k, v, b, kpm, qpm, 0.3, True, 0.25, seed))
    with torch.no_grad():
        out, lse, colsum = fwd(q, k, v, b, kpm, qpm, 0.3, True, 0.25, seed)
    torch.library.opcheck(bwd.default, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), b.detach(), kpm,
                                        qpm, out, lse, torch.randn_like(colsum), None, None, 0.3, True, 0.25, seed),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_cpu_dropout_mask_forms_agree():
    """The C++ kernel draws a row of the mask with AVX2 intrinsics where the CPU has them, else
    with a portable loop; MMCL_FAST_PORTABLE_DROPOUT=1 forces the portable one (in a fresh
    process: the choice is made once). Both give the same output, bit for bit, at key counts that
    end a vector of 8 groups early (Lk 13, 129). (Which form ran is not observable from Python:
    the test relies on the kernel reading the variable.)"""
    import subprocess
    import sys

    _skip_unless("cpu")
    try:
        with open("/proc/cpuinfo") as f:
            avx2 = " avx2" in f.read()
    except OSError:
        avx2 = False
    if not avx2:
        pytest.skip("no AVX2 here: both runs would take the portable form")
    code = (
        "import torch, mmcl_fast\n"
        "from mmcl_fast.ops import shared_key_attention\n"
        "g = torch.Generator().manual_seed(0)\n"
        "outs = []\n"
        "for Lq, Lk in ((7, 13), (5, 129)):\n"
        "    q, v = torch.randn(2, 3, Lq, 16, generator=g), torch.randn(2, 3, Lk, 16, generator=g)\n"
        "    k = torch.randn(3, Lk, 16, generator=g)\n"
        "    with mmcl_fast.use_backend('cpu'):\n"
        "        outs.append(shared_key_attention(q, k, v, dropout_p=0.3, dropout_seed=-12345).flatten())\n"
        "torch.save(torch.cat(outs), OUT)\n")
    results = []
    for portable in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "MMCL_FAST_PORTABLE_DROPOUT"}
        if portable:
            env["MMCL_FAST_PORTABLE_DROPOUT"] = "1"
        out = os.path.join(tempfile.mkdtemp(), "out.pt")
        subprocess.run([sys.executable, "-c", f"OUT = {out!r}\n" + code], env=env, check=True, timeout=300)
        results.append(torch.load(out))
    assert torch.equal(results[0], results[1])
    # and it is the reference's mask
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(2, 3, 7, 16, generator=g), torch.randn(2, 3, 13, 16, generator=g)
    k = torch.randn(3, 13, 16, generator=g)
    expect = ska.reference_attention(q.double(), k.double(), v.double(), None, None, None, 0.3, -12345)
    _close(results[0][:expect.numel()].view_as(expect), expect, 2e-5, "out")
