"""Op family C, the modulation side: modulated_embedding, interpolate_weights, anchor_penalty.

Oracles: the formulas written out here (independent of the library's reference), autograd of the
reference in float64 (every backend, every gradient), gradcheck, torch.optim.AdamW (the anchor
term fused in op family A's step equals AdamW on the loss plus anchor_penalty).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import mmcl_fast
from mmcl_fast.backend import triton_interpreting
from mmcl_fast.ops import anchor_penalty, interpolate_weights, modulated_embedding
from mmcl_fast.optim import ModalityAdamW

from conftest import assert_close, cpu_backends, gpu_backends, skip_unless

me = importlib.import_module("mmcl_fast.ops.modulated_embedding")
INTERP = triton_interpreting()


def _leaf(ts, dtype=None):
    return [None if t is None else t.detach().clone().to(dtype or t.dtype).requires_grad_(t.is_floating_point())
            for t in ts]


def _run(backend, fn):
    with mmcl_fast.use_backend(backend):
        return fn()


# -- modulated embedding --------------------------------------------------------------------------
def make_embedding(M, N, D, B, *, gates="batch", mask=False, dup=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    tables, gamma, beta = r(M, N, D), 1 + 0.3 * r(M, D), 0.3 * r(M, D)
    index = torch.randint(0, N, (B,), generator=g)
    if dup and B > 2:
        index[B // 2:] = index[: B - B // 2].clone()  # every id of the second half repeats one of the first
    logits = {"batch": lambda: r(B, M), "shared": lambda: r(M), None: lambda: None}[gates]()
    mmask = None
    if mask:
        mmask = torch.rand(N, M, generator=g) > 0.4
        mmask[torch.arange(N), torch.arange(N) % M] = True  # every entity keeps at least one modality
    return tables, index.to(device), gamma, beta, logits, None if mmask is None else mmask.to(device)


def by_hand(tables, index, gamma, beta, logits, mask):
    """The maths of DESIGN.md 6.1 written out with loops (the oracle of the reference)."""
    M, _, D = tables.shape
    out = []
    for b, e in enumerate(index.tolist()):
        z = torch.zeros(M, dtype=tables.dtype) if logits is None else (logits if logits.dim() == 1 else logits[b])
        keep = [m for m in range(M) if mask is None or bool(mask[e, m])]
        w = torch.softmax(torch.stack([z[m] for m in keep]), 0)
        out.append(sum(w[i] * (gamma[m] * tables[m, e] + beta[m]) for i, m in enumerate(keep)))
    return torch.stack(out)


@pytest.mark.parametrize("gates", ["batch", "shared", None])
@pytest.mark.parametrize("mask", [False, True])
def test_reference_equals_the_formula(gates, mask):
    t, i, ga, be, lo, mk = make_embedding(3, 11, 5, 9, gates=gates, mask=mask, dtype=torch.float64)
    assert_close(me.reference_modulated_embedding(t, i, ga, be, lo, mk), by_hand(t, i, ga, be, lo, mk), 1e-12, "out")


# (M, N, D, B, gates, mask): odd shapes, duplicates, both gate forms, masks
EMB_CASES = [
    (1, 1, 8, 1, None, False),
    (3, 13, 200, 7, "batch", True),
    (2, 13, 8, 7, "shared", False),
    (3, 15000, 256, 1000, "batch", True),
    (2, 61, 37, 129, "shared", True),
]
EMB_INTERP = [0, 1, 2]  # the interpreter runs the small cases only


def _compare_embedding(backend, case, *, dtype=torch.float32, device="cpu", tol=2e-5, sparse=False):
    M, N, D, B, gates, mask = case
    t, i, ga, be, lo, mk = make_embedding(M, N, D, B, gates=gates, mask=mask, dtype=dtype, device=device)
    dout = torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(device)
    mine = _leaf([t, ga, be, lo])
    out = _run(backend, lambda: modulated_embedding(mine[0], i, mine[1], mine[2], mine[3], mk, sparse=sparse))
    assert out.dtype == dtype and out.shape == (B, D)
    got = torch.autograd.grad((out * dout).sum(), [x for x in mine if x is not None])
    ref = _leaf([t, ga, be, lo], torch.float64)
    out_ref = me.reference_modulated_embedding(ref[0], i, ref[1], ref[2], ref[3], mk)
    want = torch.autograd.grad((out_ref * dout.double()).sum(), [x for x in ref if x is not None])
    assert_close(out, out_ref, tol, "out")
    if sparse:
        assert got[0].is_sparse, "sparse=True must give a sparse table gradient"
        assert got[0].shape == t.shape
        got = (got[0].to_dense(),) + tuple(got[1:])
    else:
        assert not got[0].is_sparse
    for name, g, w in zip(("tables", "gamma", "beta", "gate_logits"), got, want):
        assert_close(g, w, tol, f"grad {name}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ci", range(len(EMB_CASES)))
def test_embedding_matches_reference(backend, ci):
    skip_unless(backend)
    if backend == "triton" and ci not in EMB_INTERP:
        pytest.skip("the Triton interpreter runs the small cases")
    _compare_embedding(backend, EMB_CASES[ci], tol=1e-4 if ci == 3 else 2e-5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ci", [1, 4])
def test_embedding_sparse_gradient(backend, ci):
    skip_unless(backend)
    if backend == "triton" and ci not in EMB_INTERP:
        pytest.skip("the Triton interpreter runs the small cases")
    _compare_embedding(backend, EMB_CASES[ci], sparse=True)


def test_sparse_gradient_feeds_sparse_adam():
    t, i, ga, be, lo, mk = make_embedding(2, 20, 4, 6, gates="shared")
    table = torch.nn.Parameter(t.clone())
    opt = torch.optim.SparseAdam([table], lr=0.1)
    modulated_embedding(table, i, ga, be, lo, sparse=True).pow(2).sum().backward()
    opt.step()
    moved = (table.detach() != t).any(dim=2).any(dim=0)
    assert set(moved.nonzero().flatten().tolist()) == set(i.tolist())  # only gathered rows move


def test_cpu_dense_gradient_is_deterministic():
    skip_unless("cpu")
    t, i, ga, be, lo, mk = make_embedding(3, 50, 64, 4000, gates="batch", mask=True)
    i = i % 7  # heavy duplication: every id accumulates hundreds of rows
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, threads):
            torch.set_num_threads(n)
            leaf = t.clone().requires_grad_(True)
            out = _run("cpu", lambda: modulated_embedding(leaf, i, ga, be, lo, mk))
            (g,) = torch.autograd.grad(out.sin().sum(), [leaf])
            grads.append(g)
    finally:
        torch.set_num_threads(threads)
    for g in grads[1:]:
        assert torch.equal(g, grads[0]), "the dense table gradient changed between runs"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_embedding_gradcheck_float64(backend):
    skip_unless(backend, dtype=torch.float64)
    t, i, ga, be, lo, mk = make_embedding(3, 6, 4, 5, gates="batch", mask=True, dtype=torch.float64)
    leaves = _leaf([t, ga, be, lo])
    with mmcl_fast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c, d: modulated_embedding(a, i, b, c, d, mk), leaves)
        leaves[3] = leaves[3][0].detach().clone().requires_grad_(True)  # shared gates [M]
        assert torch.autograd.gradcheck(lambda a, b, c, d: modulated_embedding(a, i, b, c, d), leaves)


@pytest.mark.parametrize("backend", cpu_backends())
def test_frozen_tables_get_no_gradient_and_the_rest_match(backend):
    """MoFot's case: frozen feature tables, trainable FiLM and gates."""
    skip_unless(backend)
    t, i, ga, be, lo, mk = make_embedding(3, 13, 8, 7, gates="shared", mask=True)
    mine = _leaf([ga, be, lo])
    out = _run(backend, lambda: modulated_embedding(t, i, mine[0], mine[1], mine[2], mk))
    got = torch.autograd.grad(out.square().sum(), mine)
    ref = _leaf([ga, be, lo], torch.float64)
    want = torch.autograd.grad(me.reference_modulated_embedding(t.double(), i, *ref, mk).square().sum(), ref)
    for name, g, w in zip(("gamma", "beta", "gate_logits"), got, want):
        assert_close(g, w, 2e-5, f"grad {name}")


def test_double_backward_is_refused_not_wrong():
    skip_unless("cpu")
    t, i, ga, be, lo, mk = make_embedding(2, 9, 4, 5)
    leaves = _leaf([t, ga, be, lo])
    with mmcl_fast.use_backend("cpu"):
        out = modulated_embedding(leaves[0], i, leaves[1], leaves[2], leaves[3])
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(out.square().sum(), leaves, create_graph=True)


def test_list_of_tables_equals_the_stacked_tensor():
    t, i, ga, be, lo, mk = make_embedding(3, 9, 6, 5)
    parts = [p.clone().requires_grad_(True) for p in t]
    out = modulated_embedding(parts, i, ga, be, lo)
    assert_close(out, modulated_embedding(t, i, ga, be, lo), 0, "out")
    out.sum().backward()
    assert all(p.grad is not None for p in parts)


def test_masked_modality_gets_no_weight_and_no_gradient():
    t, i, ga, be, lo, _ = make_embedding(2, 4, 3, 4, gates="batch", dup=False, dtype=torch.float64)
    i = torch.tensor([0, 1, 2, 3])
    mk = torch.ones(4, 2, dtype=torch.bool)
    mk[1, 0] = False  # entity 1 lacks modality 0: its embedding is modality 1's alone
    leaves = _leaf([t, ga, be, lo])
    out = modulated_embedding(leaves[0], i, leaves[1], leaves[2], leaves[3], mk)
    assert_close(out[1], ga[1] * t[1, 1] + be[1], 1e-12, "entity 1")
    out.sum().backward()
    assert leaves[0].grad[0, 1].abs().max() == 0  # no gradient into the missing modality's row
    assert leaves[3].grad[1, 0] == 0


def _bad(change):
    t, i, ga, be, lo, mk = make_embedding(2, 10, 4, 3, gates="batch", mask=True)
    kw = dict(tables=t, index=i, gamma=ga, beta=be, gate_logits=lo, modality_mask=mk)
    change(kw)
    return kw


def _lacking(kw):
    kw["modality_mask"] = kw["modality_mask"].clone()
    kw["modality_mask"][int(kw["index"][1])] = False


@pytest.mark.parametrize("change,exc,match", [
    (lambda kw: kw.update(index=torch.tensor([0, 10, 2])), ValueError, "index holds id 10"),
    (lambda kw: kw.update(index=torch.tensor([0, -1, 2])), ValueError, "index holds id -1"),
    (lambda kw: kw.update(index=torch.tensor([0.0, 1.0, 2.0])), TypeError, "index must be int64"),
    (lambda kw: kw.update(tables=[torch.zeros(10, 4), torch.zeros(10, 5)]), ValueError, r"tables\[1\]"),
    (lambda kw: kw.update(gamma=torch.zeros(2, 5)), ValueError, "gamma must be"),
    (lambda kw: kw.update(beta=torch.zeros(2, 4, dtype=torch.float64)), TypeError, "beta must have"),
    (lambda kw: kw.update(gate_logits=torch.zeros(3, 3)), ValueError, "gate_logits must be"),
    (lambda kw: kw.update(modality_mask=torch.ones(10, 2)), TypeError, "modality_mask must be bool"),
    (lambda kw: kw.update(modality_mask=torch.ones(9, 2, dtype=torch.bool)), ValueError, "modality_mask must be"),
    (_lacking, ValueError, "has no modality"),
    (lambda kw: kw.update(tables=torch.zeros(2, 10, 4, dtype=torch.int64)), TypeError, "tables must be floating"),
])
def test_embedding_bad_input_is_named(change, exc, match):
    kw = _bad(change)
    for backend in ("reference", "cpu"):
        if backend == "cpu" and mmcl_fast.backend.why_not("cpu", torch.device("cpu"), torch.float32):
            continue
        with mmcl_fast.use_backend(backend), pytest.raises(exc, match=match):
            modulated_embedding(**kw)


def test_sparse_with_a_list_of_tables_is_refused():
    t, i, ga, be, lo, _ = make_embedding(2, 10, 4, 3)
    with pytest.raises(ValueError, match="sparse=True needs tables"):
        modulated_embedding(list(t), i, ga, be, lo, sparse=True)


# -- interpolate_weights ----------------------------------------------------------------------------
def make_interp(shapes, dtype=torch.float64, zero=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    prev = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    new = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    if zero is not None:
        new[zero] = torch.zeros_like(new[zero])  # ||new|| < eps: divided by eps, no projection
    sigma = torch.rand(len(shapes), generator=g, dtype=torch.float64) + 0.5
    return prev, new, sigma


def test_interpolation_by_hand():
    prev, new, sigma = make_interp([(7,), (13, 5)])
    out = interpolate_weights(prev, new, sigma, 1)  # i = 1: sigma * the normalised update
    for k in range(2):
        assert_close(out[k].flatten(), sigma[k] * F.normalize(new[k].flatten(), dim=0), 1e-12, f"i=1 out[{k}]")
    out = interpolate_weights(prev, new, sigma, 4)
    for k in range(2):
        want = 0.75 * prev[k] + 0.25 * sigma[k] * new[k] / new[k].norm()
        assert_close(out[k], want, 1e-12, f"i=4 out[{k}]")


INTERP_SHAPES = [(7,), (13, 5), (3, 4, 5), (1,), (129, 3)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("i", [1, 2, 3.5])
def test_interpolation_matches_reference(backend, i):
    skip_unless(backend)
    prev, new, sigma = make_interp(INTERP_SHAPES, torch.float32, zero=3)
    mine = _leaf(prev + new + [sigma.float()])
    K = len(INTERP_SHAPES)
    out = _run(backend, lambda: interpolate_weights(mine[:K], mine[K:2 * K], mine[-1], i))
    douts = [torch.randn_like(o) for o in out]
    got = torch.autograd.grad(sum((o * d).sum() for o, d in zip(out, douts)), mine)
    ref = _leaf(prev + new + [sigma], torch.float64)
    out_ref = me.reference_interpolate_weights(ref[:K], ref[K:2 * K], ref[-1], i)
    want = torch.autograd.grad(sum((o * d.double()).sum() for o, d in zip(out_ref, douts)), ref)
    for k in range(K):
        assert out[k].dtype == torch.float32
        assert_close(out[k], out_ref[k], 1e-5, f"out[{k}]")
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, 1e-5, f"grad {k}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_interpolation_gradcheck_float64(backend):
    skip_unless(backend, dtype=torch.float64)
    prev, new, sigma = make_interp([(3,), (2, 3)])
    leaves = _leaf(prev + new + [sigma])
    with mmcl_fast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c, d, s: interpolate_weights([a, b], [c, d], s, 2.5), leaves)


@pytest.mark.parametrize("args,exc,match", [
    (lambda p, n, s: ([p[0]], n, s, 2), ValueError, "prev has 1 tensors but new has 2"),
    (lambda p, n, s: ([p[0], p[0]], n, s, 2), ValueError, r"prev\[1\] is \[7\] but new\[1\] is \[13, 5\]"),
    (lambda p, n, s: (p, n, s[:1], 2), ValueError, "sigma must be"),
    (lambda p, n, s: (p, n, s, 0.5), ValueError, "i .the snapshot number. must be"),
    (lambda p, n, s: (p, [n[0], n[1].float()], s, 2), TypeError, r"new\[1\] is torch.float32"),
    (lambda p, n, s: (p, n, s.long(), 2), TypeError, "sigma must be floating"),
])
def test_interpolation_bad_input_is_named(args, exc, match):
    prev, new, sigma = make_interp([(7,), (13, 5)])
    with pytest.raises(exc, match=match):
        interpolate_weights(*args(prev, new, sigma))
    with pytest.raises(ValueError, match="eps must be"):
        interpolate_weights(prev, new, sigma, 2, eps=0.0)


# -- anchor penalty ---------------------------------------------------------------------------------
def make_anchor(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(13, 5), (7,), (4, 3, 2), (6, 4)]
    ps = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    anchors = [p + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in ps]
    weights = [torch.rand(13, generator=g, dtype=torch.float64).to(dtype),     # per row (LKGE)
               None,
               torch.rand(4, 3, 2, generator=g, dtype=torch.float64).to(dtype),  # per element (EWC)
               0.7]                                                              # a number
    return ps, anchors, weights


def test_anchor_penalty_by_hand():
    ps, anchors, weights = make_anchor(torch.float64)
    want = (weights[0][:, None] * (ps[0] - anchors[0]) ** 2).sum() + ((ps[1] - anchors[1]) ** 2).sum() \
        + (weights[2] * (ps[2] - anchors[2]) ** 2).sum() + 0.7 * ((ps[3] - anchors[3]) ** 2).sum()
    assert_close(anchor_penalty(ps, anchors, weights, lam=0.3), 0.3 * want, 1e-12, "penalty")


@pytest.mark.parametrize("backend", cpu_backends())
def test_anchor_penalty_matches_reference(backend):
    skip_unless(backend)
    ps, anchors, weights = make_anchor(torch.float32)
    mine = _leaf(ps)
    val = _run(backend, lambda: anchor_penalty(mine, anchors, weights, lam=0.3))
    got = torch.autograd.grad(val, mine)
    ref = _leaf(ps, torch.float64)
    wref = [w if not isinstance(w, torch.Tensor) else w.double() for w in weights]
    val_ref = me.reference_anchor_penalty(ref, [a.double() for a in anchors], wref, lam=0.3)
    want = torch.autograd.grad(val_ref, ref)
    assert val.dtype == torch.float32
    assert_close(val, val_ref, 1e-5, "penalty")
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, 1e-5, f"grad params[{k}]")


def test_fused_anchor_term_equals_adamw_on_the_penalty():
    """Op family A's fused anchor term (g + 2 lam w (p - a)) is the gradient of anchor_penalty:
    ModalityAdamW with the anchor equals torch AdamW on loss + anchor_penalty."""
    torch.manual_seed(0)
    p0 = torch.randn(8, 5)
    anchor, w, lam = torch.randn(8, 5), torch.rand(8), 0.4
    a = torch.nn.Parameter(p0.clone())
    b = torch.nn.Parameter(p0.clone())
    opt_a = ModalityAdamW([{"params": [a], "anchor": [anchor], "anchor_weight": [w], "anchor_lambda": lam}], lr=0.05)
    opt_b = torch.optim.AdamW([b], lr=0.05)
    for step in range(3):
        x = torch.randn(5)
        (a @ x).sin().sum().backward()
        ((b @ x).sin().sum() + anchor_penalty([b], [anchor], [w], lam=lam)).backward()
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    assert_close(a.detach(), b.detach(), 1e-5, "params after 3 steps")


@pytest.mark.parametrize("weights,match", [
    ([torch.ones(5), None, None, None], r"weights\[0\] must have one element"),
    ([None, None], "weights must be None, a number, or a list of 4"),
    ([None, "x", None, None], r"weights\[1\] must be None, a number or a tensor"),
])
def test_anchor_penalty_bad_input_is_named(weights, match):
    ps, anchors, _ = make_anchor()
    with pytest.raises((ValueError, TypeError), match=match):
        anchor_penalty(ps, anchors, weights)
    with pytest.raises(ValueError, match=r"anchors\[1\] is \[3\] but params\[1\] is \[7\]"):
        anchor_penalty(ps, [anchors[0], torch.zeros(3)] + anchors[2:])
    with pytest.raises(ValueError, match="params has 4 tensors but anchors has 3"):
        anchor_penalty(ps, anchors[:3])


# -- torch.library: opcheck and torch.compile ----------------------------------------------------
def _ops(backend):
    if backend == "triton":
        skip_unless("triton")
        me._register_triton()
        sfx = "_triton"
    else:
        skip_unless("cpu")
        sfx = ""
    return lambda name: getattr(torch.ops.mmcl_fast, name + sfx).default


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    op = _ops(backend)
    t, i, ga, be, lo, mk = make_embedding(2, 9, 6, 5, gates="batch", mask=True)
    t, ga, be, lo = _leaf([t, ga, be, lo])
    torch.library.opcheck(op("modulated_embedding_forward"), (t, i, ga, be, lo, mk))
    torch.library.opcheck(op("modulated_embedding_forward"), (t, i, ga, be, None, None))
    with torch.no_grad():
        out, gates = op("modulated_embedding_forward")(t, i, ga, be, lo, mk)
    for sparse in (False, True):
        torch.library.opcheck(op("modulated_embedding_backward"),
                              (torch.randn_like(out), t.detach(), i, ga.detach(), be.detach(), gates, sparse))
    prev, new, sigma = make_interp([(7,), (3, 5)], torch.float32)
    new, sigma = _leaf(new + [sigma.float()])[:2], sigma.float().requires_grad_(True)
    torch.library.opcheck(op("interpolate_weights_forward"), (prev, new, sigma, 2.0, 1e-12))
    with torch.no_grad():
        outs, norms = op("interpolate_weights_forward")(prev, new, sigma, 2.0, 1e-12)
    torch.library.opcheck(op("interpolate_weights_backward"),
                          ([torch.randn_like(o) for o in outs], [w.detach() for w in new], sigma.detach(), norms,
                           2.0, 1e-12))
    ps, anchors, weights = make_anchor()
    weights = [weights[0], None, weights[2], torch.tensor(0.7)]
    torch.library.opcheck(op("anchor_penalty_forward"), (_leaf(ps), anchors, weights))
    torch.library.opcheck(op("anchor_penalty_backward"), (torch.rand(4), ps, anchors, weights))


def test_torch_compile_fullgraph_kge_model():
    """A small multimodal KGE model using modulated_embedding (cpu backend when built) compiles
    with fullgraph=True and matches eager, loss and gradients."""
    skip_unless("cpu")

    class KGE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = torch.nn.Parameter(torch.randn(3, 20, 8))
            self.gamma = torch.nn.Parameter(torch.ones(3, 8))
            self.beta = torch.nn.Parameter(torch.zeros(3, 8))
            self.gates = torch.nn.Linear(8, 3)
            self.rel = torch.nn.Embedding(4, 8)

        def forward(self, h, r, t, mask):
            logits = self.gates(self.rel(r))
            eh = modulated_embedding(self.tables, h, self.gamma, self.beta, logits, mask)
            et = modulated_embedding(self.tables, t, self.gamma, self.beta, None, mask)
            return (eh + self.rel(r) - et).abs().sum(-1).mean()

    torch.manual_seed(0)
    m = KGE()
    h, r, t = torch.randint(0, 20, (6,)), torch.randint(0, 4, (6,)), torch.randint(0, 20, (6,))
    mask = torch.rand(20, 3) > 0.3
    mask[:, 0] = True
    with mmcl_fast.use_backend("cpu"):
        eager = m(h, r, t, mask)
        g_eager = torch.autograd.grad(eager, list(m.parameters()))
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        comp = compiled(h, r, t, mask)
        g_comp = torch.autograd.grad(comp, list(m.parameters()))
    assert_close(comp, eager, 1e-5, "loss")
    for a, b in zip(g_comp, g_eager):
        assert_close(a, b, 1e-5, "grad")


# -- GPU: cuda and triton against the reference (skipped without a GPU) ---------------------------
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("ci", range(len(EMB_CASES)))
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_embedding_matches_reference(backend, dtype, tol, ci, sparse):
    skip_unless(backend, "cuda", dtype)
    _compare_embedding(backend, EMB_CASES[ci], dtype=dtype, device="cuda", tol=tol, sparse=sparse)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_gpu_interpolation_and_anchor_match_reference(backend, dtype, tol):
    skip_unless(backend, "cuda", dtype)
    prev, new, sigma = make_interp(INTERP_SHAPES + [(1000, 300)], dtype, zero=3)
    prev, new = [p.cuda() for p in prev], [w.cuda() for w in new]
    mine = _leaf(new + [sigma.float().cuda()])
    K = len(new)
    out = _run(backend, lambda: interpolate_weights(prev, mine[:K], mine[-1], 3))
    douts = [torch.randn_like(o) for o in out]
    got = torch.autograd.grad(sum((o.float() * d.float()).sum() for o, d in zip(out, douts)), mine)
    ref = _leaf(new + [sigma.cuda()], torch.float64)
    out_ref = me.reference_interpolate_weights([p.double() for p in prev], ref[:K], ref[-1], 3)
    want = torch.autograd.grad(sum((o * d.double()).sum() for o, d in zip(out_ref, douts)), ref)
    for k in range(K):
        assert_close(out[k], out_ref[k], tol, f"out[{k}]")
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, tol, f"grad {k}")
    ps, anchors, weights = make_anchor(dtype)
    ps, anchors = [p.cuda() for p in ps], [a.cuda() for a in anchors]
    weights = [w.cuda() if isinstance(w, torch.Tensor) else w for w in weights]
    mine = _leaf(ps)
    val = _run(backend, lambda: anchor_penalty(mine, anchors, weights, lam=0.3))
    got = torch.autograd.grad(val, mine)
    ref = _leaf(ps, torch.float64)
    val_ref = me.reference_anchor_penalty(ref, [a.double() for a in anchors],
                                          [w.double() if isinstance(w, torch.Tensor) else w for w in weights], 0.3)
    want = torch.autograd.grad(val_ref, ref)
    assert_close(val, val_ref, tol, "penalty")
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, tol, f"grad params[{k}]")
