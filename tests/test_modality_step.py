"""Op family A: scores, coefficients, split head, noise, and the fused step on every backend."""
import math

import pytest
import torch

import mmcl_fast
from mmcl_fast.ops import (
    modality_adamw_,
    modality_scores,
    modality_sgd_,
    modulation_coefficients,
    philox_normal,
    split_head_logits,
)
from mmcl_fast.ops.modality_step import philox4x32_10

from conftest import cpu_backends

BACKENDS = cpu_backends()

# ------------------------------------------------------------------------------------------------
# 4.1 scores, coefficients, split head
# ------------------------------------------------------------------------------------------------


def ogm_ge_coefficients(score_v, score_a, alpha):
    """Transcribed from OGM-GE's training loop (Peng et al., CVPR 2022), M = 2."""
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    relu = lambda x: max(x, 0.0)  # noqa: E731
    if ratio_v > 1:
        return 1 - math.tanh(alpha * relu(ratio_v)), 1.0
    return 1.0, 1 - math.tanh(alpha * relu(ratio_a))


@pytest.mark.parametrize("alpha", [0.1, 0.3, 1.5])
def test_coefficients_equal_ogm_ge_for_two_modalities(alpha):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = torch.rand(2, generator=g, dtype=torch.float64) * 10 + 1e-3
        if s[0] == s[1]:
            continue
        expect = ogm_ge_coefficients(float(s[0]), float(s[1]), alpha)
        got = modulation_coefficients(s, alpha)
        assert got.tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)


def test_coefficients_three_modalities_by_hand():
    alpha = 0.5
    k = modulation_coefficients(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64), alpha)
    # rho = 3 / ((1 + 2) / 2) = 2;  1 / 2.5 = 0.4;  2 / 2 = 1 (not > 1)
    assert k.tolist() == pytest.approx([1 - math.tanh(2 * alpha), 1.0, 1.0], abs=1e-12)


def test_coefficients_ties_and_zeros_are_one():
    assert modulation_coefficients(torch.tensor([2.0, 2.0, 2.0]), 0.7).tolist() == [1.0, 1.0, 1.0]
    assert modulation_coefficients(torch.zeros(2), 0.7).tolist() == [1.0, 1.0]
    # one modality scores, the others nothing: it is infinitely dominant and fully damped
    k = modulation_coefficients(torch.tensor([5.0, 0.0, 0.0]), 0.7)
    assert k.tolist() == pytest.approx([0.0, 1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("alpha", [float("nan"), -0.1, float("inf")])
def test_coefficients_reject_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        modulation_coefficients(torch.tensor([1.0, 2.0]), alpha)


def test_coefficients_reject_bad_scores():
    with pytest.raises(ValueError, match="scores"):
        modulation_coefficients(torch.tensor([1.0]), 0.1)
    with pytest.raises(ValueError, match="scores"):
        modulation_coefficients(torch.ones(2, 2), 0.1)


def test_scores_match_hand_computation_with_ignore_index():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 5, generator=g)
    target = torch.randint(0, 5, (9,), generator=g)
    target[[2, 7]] = -100
    got = modality_scores(logits, target)
    expect = []
    for m in range(3):
        s = 0.0
        for i in range(9):
            if target[i] == -100:
                continue
            s += float(torch.softmax(logits[m, i], 0)[target[i]])
        expect.append(s)
    assert got.tolist() == pytest.approx(expect, rel=1e-5)
    # the list form and token-level [B, T, C] logits give the same scores
    as_list = [logits[m].reshape(3, 3, 5) for m in range(3)]
    assert torch.allclose(modality_scores(as_list, target.reshape(3, 3)), got)
    # everything ignored: zero scores, no NaN
    assert modality_scores(logits, torch.full((9,), -100)).tolist() == [0.0, 0.0, 0.0]


def test_scores_bad_input():
    with pytest.raises(ValueError, match="target"):
        modality_scores(torch.randn(2, 4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        modality_scores([torch.randn(4, 3), torch.randn(4, 2)], torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="target"):
        modality_scores(torch.randn(2, 4, 3), torch.zeros(4))


def test_split_head_logits_sum_to_the_fused_head():
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(6, 4, generator=g), torch.randn(6, 7, generator=g), torch.randn(6, 2, generator=g)]
    head = torch.nn.Linear(13, 5)
    z = split_head_logits(feats, head.weight, head.bias)
    assert z.shape == (3, 6, 5)
    torch.testing.assert_close(z.sum(0), head(torch.cat(feats, 1)))
    torch.testing.assert_close(z[1], feats[1] @ head.weight[:, 4:11].t() + head.bias / 3)
    with pytest.raises(ValueError, match="widths"):
        split_head_logits(feats[:2], head.weight, head.bias)


# ------------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------------


def test_philox_known_answers():
    """Random123's published known-answer vectors for Philox4x32-10."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for c, k, expect in cases:
        out = philox4x32_10(torch.tensor([c[0]]), c[1], c[2], c[3], k[0], k[1])
        assert tuple(int(x) for x in out) == expect


def test_philox_normal_statistics_and_keys():
    n = 1 << 20
    z = philox_normal(7, 3, 11, n).double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3) < 0.05  # Gaussian kurtosis
    assert torch.equal(z[:1000].float(), philox_normal(7, 3, 11, 1000))  # a prefix of itself
    for other in (philox_normal(7, 4, 11, n), philox_normal(7, 3, 12, n), philox_normal(8, 3, 11, n)):
        corr = torch.corrcoef(torch.stack([z, other.double()]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n)


def _sgd_effective_grad(backend, g, k, modality, noise, seed=5, step=9, tensor_id=3):
    """g' of the fused step, read back through SGD with lr 1 (p_new = p - g')."""
    p = torch.zeros_like(g)
    with mmcl_fast.use_backend(backend):
        modality_sgd_([p], [g], coefficients=torch.tensor([0.3, k]), modality=modality, lr=1.0,
                      noise=noise, seed=seed, noise_step=step, tensor_ids=[tensor_id])
    return -p


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_noise_distribution(backend):
    n = 1 << 12 if backend == "triton" else 1 << 20  # the interpreter is slow
    g = torch.linspace(-3, 5, n)
    k = 0.6
    gp = _sgd_effective_grad(backend, g, k, 1, True)
    eps = (gp.double() - k * g.double()) / g.double().std()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.std().item() - 1) < 5 * math.sqrt(0.5 / n) + 1e-4
    same = _sgd_effective_grad(backend, g, k, 1, True)
    assert torch.equal(gp, same)  # same seed, step and tensor: same noise
    other_step = _sgd_effective_grad(backend, g, k, 1, True, step=10)
    other_tensor = _sgd_effective_grad(backend, g, k, 1, True, tensor_id=4)
    for other in (other_step, other_tensor):
        e2 = (other.double() - k * g.double())
        assert abs(torch.corrcoef(torch.stack([eps, e2]))[0, 1].item()) < 5 / math.sqrt(n)
    # no modality: no scaling, no noise
    torch.testing.assert_close(_sgd_effective_grad(backend, g, k, -1, True), g)


# ------------------------------------------------------------------------------------------------
# Every backend against the reference
# ------------------------------------------------------------------------------------------------

# (2 * 65536 + 7,) spans three chunks of the CPU and CUDA kernels (65536 elements each)
SHAPES = [(1,), (7,), (61, 3), (129,), (80, 33), (2 * 65536 + 7,)]
SMALL_SHAPES = [(1,), (7,), (13, 3), (129,)]


def _make(shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(3)]
    return params, grads


def _anchors(params, mode, seed):
    """Anchors over the first rows (or all) of each parameter, with weights of the given form."""
    g = torch.Generator().manual_seed(seed)
    anchors, weights = [], []
    for i, p in enumerate(params):
        if i % 3 == 2:
            anchors.append(None)
            weights.append(None)
            continue
        rows = max(1, p.shape[0] // 2)
        a = p[:rows].cpu().float() + torch.randn(p[:rows].shape, generator=g)
        w = {"none": None, "scalar": torch.tensor(0.7), "row": torch.rand(rows, generator=g),
             "element": torch.rand(a.shape, generator=g)}[mode]
        anchors.append(a.to(p.device, p.dtype))
        weights.append(None if w is None else w.to(p.device, p.dtype))
    return anchors, weights


def _run_adamw(backend, params, grads, *, amsgrad, modality, noise, anchor_mode, coef=(0.4, 0.8)):
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params] if amsgrad else []
    anchors, weights = _anchors(params, anchor_mode, 3) if anchor_mode else (None, None)
    with mmcl_fast.use_backend(backend):
        for t, g in enumerate(grads, start=1):
            modality_adamw_(params, g, m, v, vmax, [float(t)] * len(params),
                            coefficients=torch.tensor(coef, device=params[0].device), modality=modality, lr=3e-2, beta1=0.8,
                            beta2=0.95, eps=1e-6, weight_decay=0.05, noise=noise, seed=11,
                            noise_step=t, tensor_ids=list(range(10, 10 + len(params))),
                            anchors=anchors, anchor_weights=weights, anchor_lambda=0.25)
    return params + m + v + vmax


def _run_sgd(backend, params, grads, *, momentum, dampening, nesterov, modality, noise, anchor_mode):
    params = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params] if momentum else []
    anchors, weights = _anchors(params, anchor_mode, 4) if anchor_mode else (None, None)
    with mmcl_fast.use_backend(backend):
        for t, g in enumerate(grads, start=1):
            modality_sgd_(params, g, bufs, [t == 1] * len(params) if momentum else None,
                          coefficients=torch.tensor([0.4, 0.8]), modality=modality, lr=0.05,
                          momentum=momentum, dampening=dampening, weight_decay=0.01,
                          nesterov=nesterov, noise=noise, seed=12, noise_step=t,
                          anchors=anchors, anchor_weights=weights, anchor_lambda=0.25)
    return params + bufs


def _close(got, expect, atol=2e-5, rtol=2e-5):
    assert len(got) == len(expect)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("modality,noise", [(-1, False), (1, False), (0, True), (-1, True)])
@pytest.mark.parametrize("anchor_mode", [None, "none", "scalar", "row", "element"])
def test_adamw_backend_matches_reference(backend, amsgrad, modality, noise, anchor_mode):
    shapes = SMALL_SHAPES if backend == "triton" else SHAPES
    params, grads = _make(shapes, 0)
    kw = dict(amsgrad=amsgrad, modality=modality, noise=noise, anchor_mode=anchor_mode)
    _close(_run_adamw(backend, params, grads, **kw), _run_adamw("reference", params, grads, **kw))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True)])
@pytest.mark.parametrize("modality,noise", [(-1, False), (1, False), (0, True)])
@pytest.mark.parametrize("anchor_mode", [None, "row", "element"])
def test_sgd_backend_matches_reference(backend, momentum, dampening, nesterov, modality, noise, anchor_mode):
    shapes = SMALL_SHAPES if backend == "triton" else SHAPES
    params, grads = _make(shapes, 1)
    kw = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, modality=modality, noise=noise, anchor_mode=anchor_mode)
    _close(_run_sgd(backend, params, grads, **kw), _run_sgd("reference", params, grads, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", [False, True])
def test_float64_step_on_backend(backend, noise):
    if backend in ("triton", "reference"):
        pytest.skip("triton serves float32/float16 on the CPU interpreter; the reference is the oracle")
    params, grads = _make(SHAPES, 2, torch.float64)
    kw = dict(amsgrad=True, modality=1, noise=noise, anchor_mode="row")
    # the noise itself is drawn in float32 (its log/sin/cos differ in the last bits per backend)
    tol = 5e-5 if noise else 1e-12
    _close(_run_adamw(backend, params, grads, **kw), _run_adamw("reference", params, grads, **kw), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["scalar", "row", "element"])
def test_anchor_term_is_the_penalty_gradient(backend, mode):
    """g' = g + d/dp [lambda * sum w (p - anchor)^2], checked against autograd of the penalty."""
    g = torch.Generator().manual_seed(5)
    p = torch.randn(9, 4, generator=g)
    grad = torch.randn(9, 4, generator=g)
    rows = 5
    anchor = torch.randn(rows, 4, generator=g)
    w = {"scalar": torch.tensor(0.3), "row": torch.rand(rows, generator=g), "element": torch.rand(rows, 4, generator=g)}[mode]
    lam = 0.7
    leaf = p.clone().requires_grad_(True)
    wb = w.reshape(-1, 1) if mode == "row" else w
    penalty = lam * (wb * (leaf[:rows] - anchor) ** 2).sum()
    (pen_grad,) = torch.autograd.grad(penalty, leaf)
    expect = p - (grad + pen_grad)
    got = p.clone()
    with mmcl_fast.use_backend(backend):
        modality_sgd_([got], [grad], lr=1.0, anchors=[anchor], anchor_weights=[w], anchor_lambda=lam)
    torch.testing.assert_close(got, expect)
    assert not torch.allclose(got, p - grad)  # the anchor did act


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _adam_args(n=2, shape=(3,)):
    params = [torch.randn(shape) for _ in range(n)]
    return params, [torch.randn(shape) for _ in params], [torch.zeros(shape) for _ in params], [torch.zeros(shape) for _ in params]


def test_step_rejects_integer_params():
    p = [torch.ones(3, dtype=torch.int64)]
    with pytest.raises(TypeError, match=r"params\[0\]"):
        modality_adamw_(p, p, p, p)


def test_step_rejects_params_on_different_devices():
    params = [torch.randn(3), torch.randn(3, device="meta")]
    with pytest.raises(ValueError, match="params are on different devices"):
        modality_sgd_(params, [torch.randn(3), torch.randn(3, device="meta")])


def test_step_rejects_mismatched_lists_and_values():
    params, grads, m, v = _adam_args()
    with pytest.raises(ValueError, match="momentum_buffers"):
        modality_sgd_(params, grads, momentum=0.9)
    with pytest.raises(ValueError, match="same tensor twice"):
        modality_sgd_([params[0], params[0]], grads)
    with pytest.raises(ValueError, match="steps"):
        modality_adamw_(params, grads, m, v, [], [0.0, 1.0])
    with pytest.raises(ValueError, match="grads"):
        modality_adamw_(params, grads[:1], m, v)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\]"):
        modality_adamw_(params, grads, [m[0], torch.zeros(4)], v)
    with pytest.raises(ValueError, match="lr"):
        modality_adamw_(params, grads, m, v, lr=float("nan"))
    with pytest.raises(ValueError, match="modality index"):
        modality_adamw_(params, grads, m, v, coefficients=torch.ones(2), modality=2)
    with pytest.raises(ValueError, match=r"anchors\[0\]"):
        modality_adamw_(params, grads, m, v, anchors=[torch.zeros(4), None], anchor_lambda=1.0)
    with pytest.raises(ValueError, match=r"anchor_weights\[0\]"):
        modality_adamw_(params, grads, m, v, anchors=[torch.zeros(3), None], anchor_weights=[torch.ones(2), None], anchor_lambda=1.0)
    with pytest.raises(ValueError, match="betas"):
        modality_adamw_(params, grads, m, v, beta1=1.0)


def test_any_python_int_seed():
    """Seeds beyond int64 (the schema's type) are taken modulo 2^64, like the reference."""
    g = torch.randn(64, generator=torch.Generator().manual_seed(3))
    for seed in (2**63, 2**64 - 1, -7):
        out = {}
        for backend in ("reference", "cpu"):
            if mmcl_fast.backend.why_not(backend, torch.device("cpu"), torch.float32):
                continue
            p = [torch.zeros(64)]
            with mmcl_fast.use_backend(backend):
                modality_sgd_(p, [g], coefficients=torch.ones(1), modality=0, lr=1.0, noise=True, seed=seed)
            out[backend] = p[0]
        for other in out.values():
            torch.testing.assert_close(other, out["reference"])
        assert not torch.allclose(out["reference"], -g)  # the noise acted


def test_empty_lists_are_a_no_op():
    modality_adamw_([], [], [], [])
    modality_sgd_([], [])


def test_bad_input_leaves_tensors_untouched():
    params, grads, m, v = _adam_args()
    before = [t.clone() for t in params + m + v]
    with pytest.raises(ValueError):
        modality_adamw_(params, grads, m, v, coefficients=torch.ones(2), modality=5)
    for a, b in zip(params + m + v, before):
        assert torch.equal(a, b)


def test_forcing_an_unavailable_backend_raises():
    params, grads, m, v = _adam_args()
    with mmcl_fast.use_backend("cuda"):
        with pytest.raises(mmcl_fast.BackendUnavailableError, match="cuda"):
            modality_adamw_(params, grads, m, v)


# ------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------


def _opcheck_args_adamw(amsgrad):
    params, grads, m, v = _adam_args(3, (5, 4))
    vmax = [torch.zeros(5, 4) for _ in params] if amsgrad else []
    return (params, grads, m, v, vmax, [1.0, 2.0, 3.0], torch.tensor([0.5, 0.9]), 1, 1e-2, 0.9, 0.99,
            1e-8, 0.01, True, 3, 4, [0, 1, 2], [torch.zeros(2, 4), None, None], [torch.ones(2), None, None], 0.5)


def _opcheck_args_sgd():
    params = [torch.randn(5, 4) for _ in range(2)]
    return (params, [torch.randn(5, 4) for _ in params], [torch.zeros(5, 4) for _ in params], [1, 0],
            torch.tensor([0.5, 0.9]), 0, 1e-2, 0.9, 0.1, 0.01, False, True, 3, 4, [0, 1], [], [], 0.0)


def _require(backend):
    reason = mmcl_fast.backend.why_not(backend, torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck_cpu_ops(amsgrad):
    _require("cpu")
    torch.library.opcheck(torch.ops.mmcl_fast.modality_adamw_.default, _opcheck_args_adamw(amsgrad))
    torch.library.opcheck(torch.ops.mmcl_fast.modality_sgd_.default, _opcheck_args_sgd())


def test_opcheck_triton_ops():
    _require("triton")
    import mmcl_fast.kernels.modality_step  # noqa: F401 - registers the mmcl_fast::*_triton_ ops
    torch.library.opcheck(torch.ops.mmcl_fast.modality_adamw_triton_.default, _opcheck_args_adamw(True))
    torch.library.opcheck(torch.ops.mmcl_fast.modality_sgd_triton_.default, _opcheck_args_sgd())


def test_torch_compile_fullgraph_scores_coefficients_and_step():
    _require("cpu")
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 16, 4, generator=g)
    target = torch.randint(0, 4, (16,), generator=g)
    params, grads, m, v = _adam_args(3, (6, 5))

    def train_step(params, grads, m, v, logits, target):
        k = modulation_coefficients(modality_scores(logits, target), 0.3)
        torch.ops.mmcl_fast.modality_adamw_(params, grads, m, v, [], [1.0, 1.0, 1.0], k, 0, 1e-2, 0.9,
                                            0.999, 1e-8, 0.01, False, 0, 0, [0, 1, 2], [], [], 0.0)
        return k

    eager = [t.clone() for t in params], [t.clone() for t in m], [t.clone() for t in v]
    k_eager = train_step(eager[0], grads, eager[1], eager[2], logits, target)
    compiled = torch.compile(train_step, fullgraph=True)
    k_comp = compiled(params, grads, m, v, logits, target)
    torch.testing.assert_close(k_comp, k_eager)
    for a, b in zip(params + m + v, eager[0] + eager[1] + eager[2]):
        torch.testing.assert_close(a, b)
    assert not torch.equal(params[0], _adam_args(3, (6, 5))[0][0])


# ------------------------------------------------------------------------------------------------
# GPU backends (run where a GPU is present; skipped elsewhere)
# ------------------------------------------------------------------------------------------------

GPU_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")) for b in ("cuda", "triton")]


def _to(tensors, device, dtype=None):
    return [t.to(device, dtype) if t is not None else None for t in tensors]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("amsgrad,noise,anchor_mode", [(False, False, None), (True, True, "row"), (False, True, "element")])
def test_gpu_adamw_matches_reference(backend, dtype, tol, amsgrad, noise, anchor_mode):
    reason = mmcl_fast.backend.why_not(backend, torch.device("cuda"), dtype)
    if reason:
        pytest.skip(reason)
    params, grads = _make(SHAPES + [(1000, 257)], 7)
    params = _to(params, "cuda", dtype)
    grads = [_to(g, "cuda", dtype) for g in grads]
    kw = dict(amsgrad=amsgrad, modality=1, noise=noise, anchor_mode=anchor_mode)
    got = _run_adamw(backend, params, grads, **kw)
    expect = _run_adamw("reference", params, grads, **kw)
    _close([t.float() for t in got], [t.float() for t in expect], atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_step_makes_no_host_sync(backend):
    reason = mmcl_fast.backend.why_not(backend, torch.device("cuda"), torch.float32)
    if reason:
        pytest.skip(reason)
    from mmcl_fast.optim import ModalityAdamW

    model = torch.nn.ModuleDict({"a": torch.nn.Linear(64, 64), "b": torch.nn.Linear(64, 64)}).cuda()
    opt = ModalityAdamW([{"params": model["a"].parameters(), "modality": "a"},
                         {"params": model["b"].parameters(), "modality": "b"}], noise=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    scores = torch.tensor([3.0, 1.0], device="cuda")
    with mmcl_fast.use_backend(backend):
        opt.step(scores=scores)  # first step allocates the state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(scores=scores)
        finally:
            torch.cuda.set_sync_debug_mode(0)
