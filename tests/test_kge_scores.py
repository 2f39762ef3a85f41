"""Op family C, the training side of KG embedding: kge_scores (positives and their negatives scored
in one op, with its backward).

Oracles: the scores written out per triple with torch.complex arithmetic and plain loops (for the
reference), autograd of the reference in float64 (every backend, both gradients), gradcheck (the
reference, and the CPU kernel in float64), gradients worked out by hand at a zero distance.
"""
import importlib
import math

import pytest
import torch

import mmcl_fast
from mmcl_fast.backend import BackendUnavailableError, triton_interpreting
from mmcl_fast.ops import kge_scores

from conftest import assert_close, cpu_backends, gpu_backends, skip_unless

ks = importlib.import_module("mmcl_fast.ops.kge_scores")
SCORES = ks.SCORES
INTERP = triton_interpreting()


def make(U, b, K, D, score, *, dtype=torch.float32, device="cpu", seed=0):
    """Entities, relations, ids with repeats and overlaps: heads repeat across positives, some
    positives are self-loops (head = tail), negatives hold their own positive's head and tail and
    repeat within a row."""
    g = torch.Generator().manual_seed(seed)
    Dr = D // 2 if score == "rotate" else D
    E = torch.randn(U, D, generator=g, dtype=torch.float64)
    if score == "rotate":
        R = (torch.rand(b, Dr, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    else:
        R = torch.randn(b, Dr, generator=g, dtype=torch.float64)
    heads = torch.randint(0, U, (b,), generator=g)
    tails = torch.randint(0, U, (b,), generator=g)
    neg = torch.randint(0, U, (b, K), generator=g)
    if b > 2:
        heads[b // 2:] = heads[: b - b // 2].clone()
        tails[::3] = heads[::3]
    if K > 1:
        neg[:, 0] = tails
        neg[:, -1] = heads
    if K > 3:
        neg[:, 2] = neg[:, 1]
    dev = torch.device(device)
    return (E.to(dtype).to(dev), R.to(dtype).to(dev), heads.to(dev), tails.to(dev), neg.to(dev))


def _leaf(t, dtype=None):
    return t.detach().clone().to(dtype or t.dtype).requires_grad_(True)


def _upstream(b, K, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, generator=g, dtype=torch.float64).to(device),
            torch.randn(b, K, generator=g, dtype=torch.float64).to(device))


def compare(backend, case, score, num_head, *, dtype=torch.float32, device="cpu", tol=2e-5):
    U, b, K, D = case
    E, R, h, t, n = make(U, b, K, D, score, dtype=dtype, device=device)
    gp, gn = _upstream(b, K, device)
    e, r = _leaf(E), _leaf(R)
    with mmcl_fast.use_backend(backend):
        pos, neg = kge_scores(e, r, h, t, n, num_head, score)
    want_dt = torch.float64 if dtype == torch.float64 else torch.float32
    assert pos.dtype == want_dt and neg.dtype == want_dt
    assert pos.shape == (b,) and neg.shape == (b, K)
    got = torch.autograd.grad((pos.double() * gp).sum() + (neg.double() * gn).sum(), [e, r])
    e64, r64 = _leaf(E, torch.float64), _leaf(R, torch.float64)
    pos_ref, neg_ref = ks.reference_kge_scores(e64, r64, h, t, n, num_head, score)
    want = torch.autograd.grad((pos_ref * gp).sum() + (neg_ref * gn).sum(), [e64, r64])
    assert_close(pos, pos_ref, tol, "pos")
    assert_close(neg, neg_ref, tol, "neg")
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close(got[0], want[0], tol, "grad entities")
    assert_close(got[1], want[1], tol, "grad relations")


# (U, b, K, D): odd shapes (one entity; one positive; widths 2, 8, 80 (and an odd 37 for the
# real scores); K 1, 3, 16), repeated and overlapping ids. The interpreter runs all of them.
CASES = [(1, 1, 1, 2), (7, 5, 3, 8), (61, 33, 16, 80), (7, 33, 16, 2), (61, 5, 1, 8), (7, 5, 3, 37)]


def _num_heads(K):
    return sorted({0, K // 2, K})


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ci", range(len(CASES)))
@pytest.mark.parametrize("score", SCORES)
def test_matches_reference(backend, ci, score):
    skip_unless(backend)
    case = CASES[ci]
    if case[3] % 2 and score in ("complex", "rotate"):
        pytest.skip("complex and rotate need an even width")
    nhs = _num_heads(case[2])
    if backend == "triton" and case[1] > 8:
        nhs = [5]  # the interpreter's time; 0 and K run in the smaller cases
    for nh in nhs:
        compare(backend, case, score, nh)


@pytest.mark.parametrize("score", SCORES)
def test_triton_float16_matches_reference(score):
    """float16 rows, float32 arithmetic and scores (the interpreter runs float32 / float16)."""
    skip_unless("triton", dtype=torch.float16)
    compare("triton", (7, 5, 3, 8), score, 1, dtype=torch.float16, tol=1e-2)


@pytest.mark.parametrize("score", SCORES)
def test_cpu_float64_matches_reference(score):
    skip_unless("cpu", dtype=torch.float64)
    compare("cpu", (61, 33, 16, 80), score, 5, dtype=torch.float64, tol=1e-12)


@pytest.mark.parametrize("score", SCORES)
def test_cpu_at_training_shapes(score):
    """A MoFot batch's shape (b 256, K 16, D 200, U ~ the distinct ids) through the vector paths."""
    skip_unless("cpu")
    compare("cpu", (3000, 256, 16, 200), score, 8, tol=1e-4)


def _complex(x):
    h = x.shape[-1] // 2
    return torch.complex(x[..., :h], x[..., h:])


def by_hand(E, R, heads, tails, neg, num_head, score):
    """The scores triple by triple, complex scores with torch.complex (independent of
    score_triples' [re | im] arithmetic)."""
    def s(hr, r, tr):
        if score == "transe_l1":
            return -sum(abs(float(a)) for a in hr + r - tr)
        if score == "transe_l2":
            return -math.sqrt(sum(float(a) ** 2 for a in hr + r - tr))
        if score == "distmult":
            return float((hr * r * tr).sum())
        hc, tc = _complex(hr), _complex(tr)
        if score == "complex":
            return float((hc * _complex(r) * tc.conj()).real.sum())
        d = hc * torch.exp(1j * r.to(torch.complex128)) - tc
        return -float(d.abs().sum())
    b, K = neg.shape
    pos = torch.tensor([s(E[heads[i]], R[i], E[tails[i]]) for i in range(b)], dtype=torch.float64)
    negs = torch.tensor([[s(E[neg[i, k]], R[i], E[tails[i]]) if k < num_head else s(E[heads[i]], R[i], E[neg[i, k]])
                          for k in range(K)] for i in range(b)], dtype=torch.float64).reshape(b, K)
    return pos, negs


@pytest.mark.parametrize("score", SCORES)
def test_reference_equals_scores_by_hand(score):
    E, R, h, t, n = make(9, 6, 4, 6, score, dtype=torch.float64)
    pos, neg = ks.reference_kge_scores(E, R, h, t, n, 3, score)
    want_pos, want_neg = by_hand(E, R, h, t, n, 3, score)
    assert_close(pos, want_pos, 1e-9, "pos")
    assert_close(neg, want_neg, 1e-9, "neg")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("score", SCORES)
def test_gradcheck_float64(backend, score):
    skip_unless(backend, dtype=torch.float64)
    E, R, h, t, n = make(5, 3, 4, 4, score, dtype=torch.float64)
    if score in ("transe_l1",):  # keep |d| away from 0, where |.| has no derivative
        E = E + 0.05 * torch.sign(E)
    with mmcl_fast.use_backend(backend):
        assert torch.autograd.gradcheck(lambda e, r: kge_scores(e, r, h, t, n, 2, score), (_leaf(E), _leaf(R)))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("score", ["transe_l1", "transe_l2"])
def test_gradient_at_zero_distance_is_zero(backend, score):
    """t = h + r exactly: the positive's score is 0 and so are its gradients (sign(0) = 0, and the
    norm's gradient at 0 is 0); a negative elsewhere still gets its own."""
    skip_unless(backend)
    E = torch.tensor([[1.0, 2.0, -1.0], [1.5, 2.5, 0.0], [4.0, -2.0, 1.0]])
    R = torch.tensor([[0.5, 0.5, 1.0]])
    heads, tails, neg = torch.tensor([0]), torch.tensor([1]), torch.tensor([[2]])
    e, r = _leaf(E), _leaf(R)
    with mmcl_fast.use_backend(backend):
        pos, negs = kge_scores(e, r, heads, tails, neg, 0, score)
        ge, gr = torch.autograd.grad(pos.sum(), [e, r])
    assert pos.tolist() == [0.0]
    assert torch.equal(ge, torch.zeros_like(E)) and torch.equal(gr, torch.zeros_like(R))
    with mmcl_fast.use_backend(backend):
        pos, negs = kge_scores(e, r, heads, tails, neg, 0, score)
        ge, gr = torch.autograd.grad(negs.sum(), [e, r])
    d = E[0] + R[0] - E[2]  # (1.5, 2.5, -1): the tail-replaced negative's difference
    want = -torch.sign(d) if score == "transe_l1" else -d / d.norm()
    assert torch.allclose(ge[0], want) and torch.allclose(gr[0], want) and torch.allclose(ge[2], -want)
    assert torch.equal(ge[1], torch.zeros(3))


def test_cpu_entity_gradient_is_deterministic():
    skip_unless("cpu")
    E, R, h, t, n = make(40, 512, 16, 72, "rotate")
    n = n % 9  # heavy repetition: each of the first rows accumulates hundreds of occurrences
    grads = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, threads, threads):
            torch.set_num_threads(nt)
            e, r = _leaf(E), _leaf(R)
            with mmcl_fast.use_backend("cpu"):
                pos, neg = kge_scores(e, r, h, t, n, 8, "rotate")
            grads.append(torch.autograd.grad(pos.sin().sum() + neg.cos().sum(), [e, r]))
    finally:
        torch.set_num_threads(threads)
    for ge, gr in grads[1:]:
        assert torch.equal(ge, grads[0][0]), "grad_entities changed between runs"
        assert torch.equal(gr, grads[0][1]), "grad_relations changed between runs"


@pytest.mark.parametrize("backend", cpu_backends())
def test_one_output_used_and_int32_ids(backend):
    """Only neg feeds the loss (no gradient flows into pos); int32 ids equal int64 ones."""
    skip_unless(backend)
    E, R, h, t, n = make(7, 5, 3, 8, "complex")
    e, r = _leaf(E), _leaf(R)
    with mmcl_fast.use_backend(backend):
        _, neg = kge_scores(e, r, h.int(), t.int(), n.int(), 1, "complex")
        got = torch.autograd.grad(neg.square().sum(), [e, r])
    e64, r64 = _leaf(E, torch.float64), _leaf(R, torch.float64)
    _, neg_ref = ks.reference_kge_scores(e64, r64, h, t, n, 1, "complex")
    want = torch.autograd.grad(neg_ref.square().sum(), [e64, r64])
    assert_close(neg, neg_ref, 2e-5, "neg")
    for name, a, w in zip(("entities", "relations"), got, want):
        assert_close(a, w, 2e-5, f"grad {name}")


def test_margin_loss_step_matches_reference():
    """The training step the op serves: a margin loss on (pos, neg), cpu kernels vs reference."""
    skip_unless("cpu")
    E, R, h, t, n = make(300, 64, 8, 40, "transe_l1")
    out = {}
    for backend in ("reference", "cpu"):
        e, r = _leaf(E), _leaf(R)
        with mmcl_fast.use_backend(backend):
            pos, neg = kge_scores(e, r, h, t, n, 4, "transe_l1")
        loss = torch.relu(2.0 - pos[:, None] + neg).mean()
        out[backend] = (loss,) + torch.autograd.grad(loss, [e, r])
    for a, w in zip(out["cpu"], out["reference"]):
        assert_close(a, w, 1e-5, "loss / gradients")


def test_double_backward_is_refused_not_wrong():
    skip_unless("cpu")
    E, R, h, t, n = make(7, 5, 3, 8, "distmult")
    e, r = _leaf(E), _leaf(R)
    with mmcl_fast.use_backend("cpu"):
        pos, neg = kge_scores(e, r, h, t, n, 1, "distmult")
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(pos.sum() + neg.sum(), [e, r], create_graph=True)


def test_dispatch():
    E, R, h, t, n = make(7, 5, 3, 8, "transe_l2")
    with mmcl_fast.use_backend("cuda"), pytest.raises(BackendUnavailableError, match="kge_scores"):
        kge_scores(E, R, h, t, n, 1, "transe_l2")
    # float16 on the CPU: the reference serves it automatically, the cpu backend refuses it
    pos, neg = kge_scores(E.half(), R.half(), h, t, n, 1, "transe_l2")
    assert pos.dtype == torch.float32 and neg.shape == (5, 3)
    if not mmcl_fast.backend.why_not("cpu", torch.device("cpu"), torch.float32):
        with mmcl_fast.use_backend("cpu"), pytest.raises(BackendUnavailableError, match="float16"):
            kge_scores(E.half(), R.half(), h, t, n, 1, "transe_l2")


# -- bad input: a clear error naming the argument, before anything runs ----------------------------
def _bad(change):
    E, R, h, t, n = make(7, 5, 3, 8, "transe_l1")
    args = dict(entities=E, relations=R, heads=h, tails=t, negatives=n, num_head=1, score="transe_l1")
    args.update(change(args))
    return args


BAD = [
    (lambda a: {"entities": a["entities"][0]}, ValueError, r"entities must be a 2-D tensor \[U, D\], got \[8\]"),
    (lambda a: {"entities": a["entities"].long()}, TypeError, "entities must be floating point"),
    (lambda a: {"relations": a["relations"][:, :5]}, ValueError, r"relations must be \[b, Dr\] = \[5, 8\]"),
    (lambda a: {"relations": a["relations"].double()}, TypeError, "relations must have the entities' dtype"),
    (lambda a: {"heads": a["heads"][None]}, ValueError, "heads must be a 1-D tensor"),
    (lambda a: {"tails": a["tails"][:4]}, ValueError, "tails must be a 1-D tensor of 5 entity ids"),
    (lambda a: {"negatives": a["negatives"][0]}, ValueError, r"negatives must be a 2-D tensor \[b, K\]"),
    (lambda a: {"negatives": a["negatives"][:4]}, ValueError, r"negatives must be a 2-D tensor \[b, K\] = \[5, K\]"),
    (lambda a: {"heads": a["heads"].float()}, TypeError, "heads must be int64 or int32"),
    (lambda a: {"negatives": a["negatives"].to(torch.int16)}, TypeError, "negatives must be int64 or int32"),
    (lambda a: {"heads": a["heads"] + 7}, ValueError, r"heads holds id \d+, outside the entities' rows \[0, 7\)"),
    (lambda a: {"tails": a["tails"] - 7}, ValueError, r"tails holds id -\d, outside"),
    (lambda a: {"negatives": a["negatives"] * 0 + 7}, ValueError, r"negatives holds id 7, outside"),
    (lambda a: {"num_head": 4}, ValueError, r"num_head must be an int in \[0, K = 3\], got 4"),
    (lambda a: {"num_head": -1}, ValueError, "num_head must be an int"),
    (lambda a: {"num_head": True}, ValueError, "num_head must be an int"),
    (lambda a: {"score": "transe"}, ValueError, "score must be one of"),
    (lambda a: {"entities": a["entities"][:, :7], "relations": a["relations"][:, :7], "score": "complex"},
     ValueError, "needs an even entity width"),
    (lambda a: {"score": "rotate"}, ValueError, r"relations must be \[b, Dr\] = \[5, 4\] .*D/2 phases"),
    (lambda a: {"negatives": a["negatives"].to("meta")}, ValueError, "negatives is on meta but entities on cpu"),
    (lambda a: {"relations": a["relations"].to("meta")}, ValueError, "relations is on meta"),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("change,exc,match", BAD)
def test_bad_input_is_named(backend, change, exc, match):
    skip_unless(backend)
    args = _bad(change)
    with mmcl_fast.use_backend(backend), pytest.raises(exc, match=match):
        kge_scores(**args)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernel_ops_refuse_out_of_range_ids(backend):
    """Under torch.compile the Python range checks are skipped: the kernels refuse on their own
    (the C++ kernel raises; the Triton one is checked here through its host-side shape checks)."""
    skip_unless(backend)
    E, R, h, t, n = make(7, 5, 3, 8, "transe_l1")
    if backend == "cpu":
        with pytest.raises(RuntimeError, match="negatives holds id 9"):
            torch.ops.mmcl_fast.kge_scores_forward(E, R, h, t, n * 0 + 9, 1, 0)
        with pytest.raises(RuntimeError, match="num_head must be in"):
            torch.ops.mmcl_fast.kge_scores_forward(E, R, h, t, n, 5, 0)
    else:
        ks._register_triton()
        with pytest.raises(ValueError, match="num_head"):
            torch.ops.mmcl_fast.kge_scores_forward_triton(E, R, h, t, n, 5, 0)


# -- torch.library: opcheck and torch.compile ----------------------------------------------------
def _op(backend, name):
    skip_unless(backend)
    if backend == "triton":
        ks._register_triton()
        name += "_triton"
    return getattr(torch.ops.mmcl_fast, name).default


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("score", ["transe_l2", "rotate"])
def test_opcheck(backend, score):
    fwd = _op(backend, "kge_scores_forward")
    bwd = _op(backend, "kge_scores_backward")
    E, R, h, t, n = make(7, 5, 3, 8, score)
    code = SCORES.index(score)
    torch.library.opcheck(fwd, (_leaf(E), _leaf(R), h, t, n, 2, code))
    torch.library.opcheck(fwd, (E, R, h, t, n[:, :0], 0, code))
    gp, gn = _upstream(5, 3, "cpu")
    torch.library.opcheck(bwd, (gp.float(), gn.float(), E, R, h, t, n, 1, code))


def test_torch_compile_fullgraph_forward_and_backward():
    """A small KGE training loss through kge_scores compiles with fullgraph=True (no graph break)
    and matches eager, loss and gradients."""
    skip_unless("cpu")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ent = torch.nn.Parameter(torch.randn(30, 8))
            self.rel = torch.nn.Embedding(4, 4)

        def forward(self, h, r, t, neg):
            pos, negs = kge_scores(self.ent, self.rel(r), h, t, neg, 3, "rotate")
            return torch.relu(1.0 - pos[:, None] + negs).mean()

    torch.manual_seed(0)
    m = Model()
    h, r, t = torch.randint(0, 30, (6,)), torch.randint(0, 4, (6,)), torch.randint(0, 30, (6,))
    neg = torch.randint(0, 30, (6, 5))
    with mmcl_fast.use_backend("cpu"):
        eager = m(h, r, t, neg)
        g_eager = torch.autograd.grad(eager, list(m.parameters()))
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        comp = compiled(h, r, t, neg)
        g_comp = torch.autograd.grad(comp, list(m.parameters()))
    assert_close(comp, eager, 1e-6, "loss")
    for a, b in zip(g_comp, g_eager):
        assert_close(a, b, 1e-6, "grad")


# -- GPU: cuda and triton against the reference (skipped without a GPU) ---------------------------
GPU_CASES = CASES + [(10_500, 1024, 16, 200), (3000, 257, 256, 1000)]


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("ci", range(len(GPU_CASES)))
@pytest.mark.parametrize("score", SCORES)
def test_gpu_matches_reference(backend, dtype, tol, ci, score):
    skip_unless(backend, "cuda", dtype)
    case = GPU_CASES[ci]
    if case[3] % 2 and score in ("complex", "rotate"):
        pytest.skip("complex and rotate need an even width")
    for nh in _num_heads(case[2]):
        compare(backend, case, score, nh, dtype=dtype, device="cuda", tol=tol)


@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_gradient_at_zero_distance_and_bad_ids(backend):
    skip_unless(backend, "cuda")
    E = torch.tensor([[1.0, 2.0], [1.5, 2.5]], device="cuda")
    R = torch.tensor([[0.5, 0.5]], device="cuda")
    e, r = _leaf(E), _leaf(R)
    ids = torch.tensor([0], device="cuda"), torch.tensor([1], device="cuda"), torch.zeros(1, 0, dtype=torch.int64,
                                                                                         device="cuda")
    with mmcl_fast.use_backend(backend):
        pos, _ = kge_scores(e, r, *ids, 0, "transe_l2")
        ge, gr = torch.autograd.grad(pos.sum(), [e, r])
    assert pos.tolist() == [0.0] and not ge.any() and not gr.any()
    with mmcl_fast.use_backend(backend), pytest.raises(ValueError, match="heads holds id 2"):
        kge_scores(E, R, ids[0] + 2, ids[1], ids[2], 0, "transe_l2")
