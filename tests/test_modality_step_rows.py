"""Op family A, the row-sparse (lazy) AdamW step: every backend against the reference, independent
oracles (torch.optim.AdamW with every row listed, the anchor penalty's autograd gradient), rows not
listed left bit-for-bit alone, bad input, opcheck and torch.compile."""
import pytest
import torch

import mmcl_fast
from mmcl_fast.ops import anchor_penalty, modality_adamw_rows_

from conftest import assert_close, cpu_backends, gpu_backends, skip_unless

BACKENDS = cpu_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b.values[0] != "reference"]

# N rows of 1, 7, 61, 129; row shapes of 1, 7, 80 elements; 3-D parameters
SHAPES = [(1,), (7,), (1, 80), (7, 7), (61, 1), (61, 80), (129, 7), (7, 4, 20), (61, 7, 1)]
HYPER = dict(lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05)


def _state(shape, seed, dtype=torch.float32, device="cpu"):
    """A parameter and moments part-way through training (non-zero m and v, so that a row the step
    wrongly touched would show)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g)
    m = 0.1 * torch.randn(shape, generator=g)
    v = 0.01 * torch.rand(shape, generator=g)
    return [t.to(device, dtype) for t in (p, m, v)]


def _row_sets(n, seed, steps=3):
    """A subset in random order, every row (shuffled), a single row: one per step."""
    g = torch.Generator().manual_seed(seed)
    sizes = [max(1, n // 2), n, 1]
    return [torch.randperm(n, generator=g)[: sizes[t % 3]] for t in range(steps)]


def _anchor(p, mode, seed):
    """An anchor over the first (about half) rows of p, with a weight of the given kind."""
    if mode is None:
        return {}
    g = torch.Generator().manual_seed(seed)
    n_a = max(1, (p.shape[0] + 1) // 2)
    a = p[:n_a].cpu().float() + torch.randn(p[:n_a].shape, generator=g)
    w = {"none": None, "scalar": torch.tensor(0.7), "row": torch.rand(n_a, generator=g) + 0.1,
         "element": torch.rand(a.shape, generator=g) + 0.1}[mode]
    return dict(anchor=a.to(p.device, p.dtype), anchor_weight=None if w is None else w.to(p.device, p.dtype),
                anchor_lambda=0.4)


def _run(backend, state, grads, row_sets, *, k=True, anchor_mode=None, seed=0, hyper=HYPER):
    p, m, v = (t.clone() for t in state)
    extra = _anchor(p, anchor_mode, seed)
    coef = dict(coefficients=torch.tensor([0.3, 0.7], device=p.device), modality=1) if k else {}
    with mmcl_fast.use_backend(backend):
        for t, (rows, g) in enumerate(zip(row_sets, grads), start=1):
            modality_adamw_rows_(p, rows.to(p.device), g, m, v, t + 4, **coef, **extra, **hyper)
    return p, m, v


def _grads(shape, row_sets, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((len(r),) + tuple(shape[1:]), generator=g).to(device, dtype) for r in row_sets]


def _compare(got, expect, tol, what=""):
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, expect):
        assert_close(a.float(), b.float(), tol, f"{what}{name}")


# ------------------------------------------------------------------------------------------------
# Every backend against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("anchor_mode", [None, "none", "scalar", "row", "element"])
@pytest.mark.parametrize("k", [False, True], ids=["k1", "k"])
def test_backend_matches_reference(backend, shape, anchor_mode, k):
    state = _state(shape, 0)
    rows = _row_sets(shape[0], 1)
    grads = _grads(shape, rows, 2)
    kw = dict(k=k, anchor_mode=anchor_mode, seed=3)
    _compare(_run(backend, state, grads, rows, **kw), _run("reference", state, grads, rows, **kw), 2e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float16_matches_reference(backend):
    skip_unless(backend, dtype=torch.float16)
    state = _state((61, 7), 4, torch.float16)
    rows = _row_sets(61, 5)
    grads = _grads((61, 7), rows, 6, torch.float16)
    kw = dict(anchor_mode="row", seed=7)
    _compare(_run(backend, state, grads, rows, **kw), _run("reference", state, grads, rows, **kw), 2e-3)


def test_cpu_float64_matches_reference():
    skip_unless("cpu", dtype=torch.float64)
    state = _state((61, 80), 8, torch.float64)
    rows = _row_sets(61, 9)
    grads = _grads((61, 80), rows, 10, torch.float64)
    kw = dict(anchor_mode="element", seed=11)
    _compare(_run("cpu", state, grads, rows, **kw), _run("reference", state, grads, rows, **kw), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("anchor_mode", [None, "row"])
def test_rows_not_listed_are_untouched(backend, anchor_mode):
    """Lazy semantics: a row not listed is neither decayed nor pulled to its anchor, and its moments
    keep their values, bit for bit."""
    shape = (61, 7, 3)
    state = _state(shape, 12)
    rows = [torch.tensor([40, 3, 17]), torch.tensor([17, 59])]
    got = _run(backend, state, _grads(shape, rows, 13), rows, anchor_mode=anchor_mode, seed=14)
    listed = torch.zeros(61, dtype=torch.bool)
    listed[torch.cat(rows)] = True
    for name, after, before in zip(("param", "exp_avg", "exp_avg_sq"), got, state):
        assert torch.equal(after[~listed], before[~listed]), f"{name}: a row not listed changed"
        assert not torch.equal(after[listed], before[listed]), f"{name}: the listed rows did not change"


# ------------------------------------------------------------------------------------------------
# Independent oracles
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7,), (61, 7), (7, 4, 20)], ids=str)
def test_every_row_listed_equals_torch_adamw(backend, shape):
    """With every row listed (in a shuffled order, gradient rows in the same order), k = 1 and no
    anchor, the step is torch.optim.AdamW on the dense gradient."""
    g = torch.Generator().manual_seed(15)
    p0 = torch.randn(shape, generator=g)
    ours = p0.clone()
    m, v = torch.zeros_like(ours), torch.zeros_like(ours)
    theirs = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([theirs], lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    with mmcl_fast.use_backend(backend):
        for step in range(1, 6):
            dense = torch.randn(shape, generator=g)
            rows = torch.randperm(shape[0], generator=g)
            modality_adamw_rows_(ours, rows, dense[rows], m, v, step, **HYPER)
            theirs.grad = dense
            opt.step()
    torch.testing.assert_close(ours, theirs.detach())
    torch.testing.assert_close(m, opt.state[theirs]["exp_avg"])
    torch.testing.assert_close(v, opt.state[theirs]["exp_avg_sq"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["scalar", "row", "element"])
def test_anchor_term_is_the_penalty_gradient_on_listed_rows(backend, mode):
    """g = k grad + d/dp [lambda sum w (p - anchor)^2] on the listed rows: the same step as with no
    anchor and the penalty's autograd gradient (mmcl_fast.ops.anchor_penalty) added to k grad."""
    shape = (13, 4)
    p, m, v = _state(shape, 16)
    extra = _anchor(p, mode, 17)  # anchor over the first 7 rows
    rows = torch.tensor([12, 2, 6, 7, 0])  # rows inside and past the anchor
    grad = torch.randn((5, 4), generator=torch.Generator().manual_seed(18))
    k = torch.tensor([0.3, 0.7])
    leaf = p.clone().requires_grad_(True)
    with mmcl_fast.use_backend("reference"):
        penalty = anchor_penalty(leaf[:7], extra["anchor"], extra["anchor_weight"], extra["anchor_lambda"])
    (pen_grad,) = torch.autograd.grad(penalty, leaf)
    assert pen_grad[7:].abs().max() == 0 and pen_grad[:7].abs().max() > 0
    got, expect = [[t.clone() for t in (p, m, v)] for _ in range(2)]
    with mmcl_fast.use_backend(backend):
        modality_adamw_rows_(*got[:1], rows, grad, *got[1:], 3, coefficients=k, modality=1, **extra, **HYPER)
        modality_adamw_rows_(*expect[:1], rows, k[1] * grad + pen_grad[rows], *expect[1:], 3, **HYPER)
    _compare(got, expect, 2e-6)
    plain = p.clone()
    modality_adamw_rows_(plain, rows, k[1] * grad, m.clone(), v.clone(), 3, **HYPER)
    assert not torch.allclose(got[0], plain)  # the anchor did act


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_kinds_agree_with_a_broadcast_weight(backend):
    """Scalar, per-row and per-element weights mean the same thing when they hold the same values
    (the kernels fold a weight constant along a row into lambda: equal up to rounding)."""
    shape = (9, 3, 2)
    state = _state(shape, 19)
    rows = [torch.tensor([8, 1, 4]), torch.tensor([0, 5])]
    grads = _grads(shape, rows, 20)
    anchor = torch.randn((5, 3, 2), generator=torch.Generator().manual_seed(21))
    per_row = torch.rand(5, generator=torch.Generator().manual_seed(22))
    results = []
    for w in (per_row, per_row.view(5, 1, 1).expand(5, 3, 2).contiguous(), torch.tensor(0.6), torch.full((5, 3, 2), 0.6)):
        p, m, v = (t.clone() for t in state)
        with mmcl_fast.use_backend(backend):
            for t, (r, g) in enumerate(zip(rows, grads), start=1):
                modality_adamw_rows_(p, r, g, m, v, t, anchor=anchor, anchor_weight=w, anchor_lambda=0.5, **HYPER)
        results.append(p)
    assert_close(results[0], results[1], 1e-6, "per row vs per element")
    assert_close(results[2], results[3], 1e-6, "scalar vs per element")
    assert (results[0] - results[2]).abs().max() > 1e-4  # the weights did act


@pytest.mark.parametrize("shape,sparse_dim,nnz", [((61, 7), 1, 40), ((3, 29, 6), 2, 50), ((4, 5, 6), 3, 70),
                                                   ((9,), 1, 0)])
def test_sparse_grad_rows_is_the_coalesced_gradient(shape, sparse_dim, nnz):
    """The rows of an uncoalesced sparse gradient are torch's coalesce(), with the sparse dimensions
    as flat row ids."""
    from mmcl_fast.ops.modality_step import sparse_grad_rows

    g = torch.Generator().manual_seed(36)
    idx = torch.stack([torch.randint(0, shape[d], (nnz,), generator=g) for d in range(sparse_dim)])
    grad = torch.sparse_coo_tensor(idx, torch.randn((nnz,) + shape[sparse_dim:], generator=g), shape,
                                   check_invariants=True)
    rows, values, s = sparse_grad_rows(grad)
    ref = grad.coalesce()
    flat = torch.zeros((), dtype=torch.int64)
    for d in range(sparse_dim):
        flat = flat * shape[d] + ref.indices()[d]
    assert s == sparse_dim and torch.equal(rows, flat)
    torch.testing.assert_close(values, ref.values())
    assert sparse_grad_rows(ref)[0].data_ptr() == ref.indices().data_ptr() or sparse_dim > 1  # no copy


@pytest.mark.parametrize("order", ["ascending", "descending", "repeats"])
def test_sparse_grad_rows_of_sorted_rows_marked_uncoalesced(order):
    """Autograd marks a gradient built coalesced as uncoalesced again; rows already sorted and
    distinct are taken as they are, anything else is still coalesced (summed, sorted)."""
    from mmcl_fast.ops.modality_step import sparse_grad_rows

    idx = {"ascending": [0, 2, 5, 9], "descending": [9, 5, 2, 0], "repeats": [0, 2, 2, 9]}[order]
    vals = torch.arange(12.0).reshape(4, 3)
    grad = torch.sparse_coo_tensor(torch.tensor([idx]), vals, (10, 3))
    assert not grad.is_coalesced()
    rows, values, _ = sparse_grad_rows(grad)
    ref = grad.coalesce()
    assert torch.equal(rows, ref.indices()[0]) and torch.equal(values, ref.values())


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, nothing written
# ------------------------------------------------------------------------------------------------


def _bad_cases():
    p = torch.randn(6, 4)
    good = dict(rows=torch.tensor([1, 4]), grad_rows=torch.randn(2, 4), exp_avg=torch.zeros(6, 4),
                exp_avg_sq=torch.zeros(6, 4), step=1)
    return p, good, [
        (dict(rows=torch.tensor([1, 4, 1]), grad_rows=torch.randn(3, 4)), ValueError, "rows holds duplicated"),
        (dict(rows=torch.tensor([1, 6])), ValueError, "rows holds the id 6"),
        (dict(rows=torch.tensor([-1, 2])), ValueError, "rows holds the id -1"),
        (dict(rows=torch.tensor([1, 4], dtype=torch.int32)), TypeError, "rows must be int64"),
        (dict(rows=torch.tensor([[1, 4]])), ValueError, "rows must be 1-D"),
        (dict(grad_rows=torch.randn(3, 4)), ValueError, "grad_rows must have shape"),
        (dict(grad_rows=torch.randn(2, 5)), ValueError, "grad_rows must have shape"),
        (dict(grad_rows=torch.randn(2, 4, dtype=torch.float64)), TypeError, "grad_rows is torch.float64"),
        (dict(grad_rows=torch.randn(2, 4).to_sparse()), TypeError, "grad_rows must be a dense"),
        (dict(exp_avg=torch.zeros(5, 4)), ValueError, "exp_avg must have shape"),
        (dict(exp_avg_sq=torch.zeros(6, 4, dtype=torch.float16)), TypeError, "exp_avg_sq is torch.float16"),
        (dict(rows=torch.tensor([1, 4], device="meta")), ValueError, "rows is on meta"),
        (dict(step=0), ValueError, "step must be"),
        (dict(step=float("nan")), ValueError, "step must be finite"),
        (dict(lr=float("nan")), ValueError, "lr must be finite"),
        (dict(weight_decay=float("inf")), ValueError, "weight_decay must be finite"),
        (dict(beta2=1.0), ValueError, "betas"),
        (dict(amsgrad=True), ValueError, "amsgrad is not supported"),
        (dict(noise=True), ValueError, "noise is not supported"),
        (dict(coefficients=torch.ones(2), modality=2), ValueError, "modality index"),
        (dict(anchor=torch.zeros(7, 4), anchor_lambda=1.0), ValueError, "anchor must have"),
        (dict(anchor=torch.zeros(3, 5), anchor_lambda=1.0), ValueError, "anchor must have"),
        (dict(anchor=torch.zeros(3, 4), anchor_weight=torch.ones(2), anchor_lambda=1.0), ValueError, "anchor_weight must be"),
        (dict(anchor_weight=torch.ones(2), anchor_lambda=1.0), ValueError, "anchor_weight given without anchor"),
        (dict(anchor=torch.zeros(3, 4), anchor_lambda=float("nan")), ValueError, "anchor_lambda must be finite"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases()[2])))
def test_bad_input_names_the_argument_and_writes_nothing(case):
    p, good, cases = _bad_cases()
    change, exc, match = cases[case]
    kw = dict(good, **change)
    written = (p, kw["exp_avg"], kw["exp_avg_sq"])
    before = [t.clone() for t in written]
    with pytest.raises(exc, match=match):
        modality_adamw_rows_(p, kw.pop("rows"), kw.pop("grad_rows"), kw.pop("exp_avg"), kw.pop("exp_avg_sq"), kw.pop("step"), **kw)
    for after, b in zip(written, before):
        assert torch.equal(after, b)


def test_integer_param_is_a_type_error():
    p = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="param must be floating point"):
        modality_adamw_rows_(p, torch.tensor([0]), torch.zeros(1, 2, dtype=torch.int64), p.clone(), p.clone(), 1)


def test_cpu_kernel_refuses_an_out_of_range_row_before_writing():
    """The C++ kernel's own range pass (the Python check is skipped under torch.compile)."""
    skip_unless("cpu")
    p, m, v = _state((6, 4), 23)
    before = [t.clone() for t in (p, m, v)]
    with pytest.raises(RuntimeError, match=r"rows\[2\] = 6 is out of range"):
        torch.ops.mmcl_fast.modality_adamw_rows_(p, torch.tensor([0, 3, 6]), torch.ones(3, 4), m, v, 1.0, torch.ones(1), -1,
                                                 0.1, 0.9, 0.999, 1e-8, 0.0, None, None, 0.0)
    for after, b in zip((p, m, v), before):
        assert torch.equal(after, b)


def test_no_rows_is_a_no_op():
    p, m, v = _state((5, 3), 24)
    before = [t.clone() for t in (p, m, v)]
    modality_adamw_rows_(p, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3), m, v, 1)
    for after, b in zip((p, m, v), before):
        assert torch.equal(after, b)


def test_forcing_an_unavailable_backend_raises():
    p, m, v = _state((5, 3), 25)
    with mmcl_fast.use_backend("cuda"):
        with pytest.raises(mmcl_fast.BackendUnavailableError, match="cuda"):
            modality_adamw_rows_(p, torch.tensor([1]), torch.ones(1, 3), m, v, 1)


def test_non_contiguous_param_runs_on_the_reference():
    """Kernels write through raw pointers: a strided parameter goes to the reference, which the
    automatic choice picks and a forced kernel backend refuses."""
    base = _state((7, 8), 26)
    p, m, v = (t[:, ::2] for t in base)
    expect = [t.contiguous() for t in (p, m, v)]
    rows, g = torch.tensor([6, 1]), torch.randn(2, 4)
    modality_adamw_rows_(p, rows, g, m, v, 2, **HYPER)
    with mmcl_fast.use_backend("reference"):
        modality_adamw_rows_(*expect[:1], rows, g, *expect[1:], 2, **HYPER)
    for a, b in zip((p, m, v), expect):
        assert torch.equal(a, b)
    if not mmcl_fast.backend.why_not("cpu", torch.device("cpu"), torch.float32):
        with mmcl_fast.use_backend("cpu"), pytest.raises(mmcl_fast.BackendUnavailableError, match="contiguous"):
            modality_adamw_rows_(p, rows, g, m, v, 3)


def test_step_bumps_the_version_counter():
    p = torch.nn.Parameter(torch.randn(5, 3))
    y = (p * p).sum()  # saves p for the backward
    m, v = torch.zeros(5, 3), torch.zeros(5, 3)
    with torch.no_grad():
        modality_adamw_rows_(p, torch.tensor([2]), torch.ones(1, 3), m, v, 1)
    with pytest.raises(RuntimeError, match="inplace"):
        y.backward()


# ------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------


def _opcheck_args(anchor):
    p, m, v = _state((9, 5), 27)
    rows = torch.tensor([8, 0, 3])
    a = (torch.randn(4, 5), torch.rand(4)) if anchor else (None, None)
    return (p, rows, torch.randn(3, 5), m, v, 3.0, torch.tensor([0.5, 0.9]), 1, 1e-2, 0.9, 0.99, 1e-8,
            0.01, a[0], a[1], 0.5 if anchor else 0.0)


@pytest.mark.parametrize("anchor", [False, True])
def test_opcheck_cpu_op(anchor):
    skip_unless("cpu")
    torch.library.opcheck(torch.ops.mmcl_fast.modality_adamw_rows_.default, _opcheck_args(anchor))


@pytest.mark.parametrize("anchor", [False, True])
def test_opcheck_triton_op(anchor):
    skip_unless("triton")
    import mmcl_fast.kernels.modality_step  # noqa: F401 - registers mmcl_fast::*_triton_ ops

    torch.library.opcheck(torch.ops.mmcl_fast.modality_adamw_rows_triton_.default, _opcheck_args(anchor))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The public function traces without graph breaks (the data-dependent row checks are skipped
    under compile) and gives the eager result."""
    skip_unless(backend)
    p, m, v = _state((13, 6), 28)
    rows = torch.tensor([12, 0, 5, 6])
    grad = torch.randn(4, 6)
    anchor, w, k = torch.randn(6, 6), torch.rand(6), torch.tensor([0.4, 0.8])

    def step(p, m, v, rows, grad):
        modality_adamw_rows_(p, rows, grad, m, v, 2, coefficients=k, modality=0, anchor=anchor,
                             anchor_weight=w, anchor_lambda=0.3, **HYPER)

    eager = [t.clone() for t in (p, m, v)]
    with mmcl_fast.use_backend(backend):
        step(eager[0], eager[1], eager[2], rows, grad)
        torch.compile(step, fullgraph=True, backend="aot_eager")(p, m, v, rows, grad)
    for a, b in zip((p, m, v), eager):
        torch.testing.assert_close(a, b)
    assert not torch.equal(p, _state((13, 6), 28)[0])


# ------------------------------------------------------------------------------------------------
# GPU backends (run where a GPU is present; skipped elsewhere)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", gpu_backends())
# float16 / bfloat16: a parameter near 4 stored in either backend may round to neighbouring values
# (one ulp: 4e-3 / 3e-2), and the moments are stored in that dtype too
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 4e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(1,), (61, 7), (129, 80), (1000, 257), (15000, 200), (7, 4, 20)], ids=str)
@pytest.mark.parametrize("anchor_mode", [None, "row", "element"])
def test_gpu_matches_reference(backend, dtype, tol, shape, anchor_mode):
    skip_unless(backend, "cuda", dtype)
    state = _state(shape, 29, dtype, "cuda")
    rows = [r.cuda() for r in _row_sets(shape[0], 30)]
    grads = _grads(shape, rows, 31, dtype, "cuda")
    kw = dict(anchor_mode=anchor_mode, seed=32)
    _compare(_run(backend, state, grads, rows, **kw), _run("reference", state, grads, rows, **kw), tol)


@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_rows_not_listed_are_untouched(backend):
    skip_unless(backend, "cuda")
    shape = (4099, 37)
    state = _state(shape, 33, device="cuda")
    rows = [torch.randperm(4099, device="cuda")[:1500] for _ in range(2)]
    got = _run(backend, state, _grads(shape, rows, 34, device="cuda"), rows, anchor_mode="element", seed=35)
    listed = torch.zeros(4099, dtype=torch.bool, device="cuda")
    listed[torch.cat(rows)] = True
    for after, before in zip(got, state):
        assert torch.equal(after[~listed], before[~listed])
