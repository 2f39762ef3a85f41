"""ModalityAdamW / ModalitySGD against torch.optim, and their own features."""
import copy

import pytest
import torch
from torch import nn

import mmcl_fast
from mmcl_fast.ops import modulation_coefficients
from mmcl_fast.optim import ModalityAdamW, ModalitySGD, param_groups_by_modality

from conftest import cpu_backends, gpu_backends, skip_unless

BACKENDS = cpu_backends()


class TwoStream(nn.Module):
    def __init__(self, width=7):
        super().__init__()
        self.vision = nn.Linear(5, width)
        self.text = nn.Linear(3, width)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, xv, xt):
        return self.head(torch.cat([torch.tanh(self.vision(xv)), torch.tanh(self.text(xt))], 1))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(9, 5, generator=g), torch.randn(9, 3, generator=g), torch.randint(0, 4, (9,), generator=g)) for _ in range(n)]


def _groups(model, **opts_per_group):
    return [
        {"params": list(model.vision.parameters()), **opts_per_group.get("vision", {})},
        {"params": list(model.text.parameters()), **opts_per_group.get("text", {})},
        {"params": list(model.head.parameters())},
    ]


ADAMW_OPTIONS = [
    dict(lr=1e-2),
    dict(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, amsgrad=True, weight_decay=0.0),
]
SGD_OPTIONS = [
    dict(lr=0.05),
    dict(lr=0.05, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
]


def _train(model, opt, batches, **step_kwargs):
    for xv, xt, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xv, xt), y).backward()
        opt.step(**step_kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,torch_cls,options", [(ModalityAdamW, torch.optim.AdamW, o) for o in ADAMW_OPTIONS] + [(ModalitySGD, torch.optim.SGD, o) for o in SGD_OPTIONS])
def test_plain_step_equals_torch_optim_over_50_steps(backend, cls, torch_cls, options):
    n_steps = 12 if backend == "triton" else 50
    torch.manual_seed(0)
    ours, theirs = TwoStream(), TwoStream()
    theirs.load_state_dict(ours.state_dict())
    per_group = {"vision": {"lr": options["lr"] * 3}, "text": {"lr": options["lr"] / 2}}
    opt = cls([dict(g, modality=m) if m else g for g, m in zip(_groups(ours, **per_group), ["vision", "text", None])], **options)
    ref = torch_cls(_groups(theirs, **per_group), **options)
    batches = _batches(n_steps)
    with mmcl_fast.use_backend(backend):
        _train(ours, opt, batches)
    _train(theirs, ref, batches)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the state has torch's layout
    sd_ours, sd_ref = opt.state_dict(), ref.state_dict()
    for i, st in sd_ref["state"].items():
        assert set(sd_ours["state"][i]) == set(st)
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                torch.testing.assert_close(sd_ours["state"][i][key], val, atol=1e-5, rtol=1e-5)


def test_modulated_step_scales_each_modality_by_its_coefficient():
    """With SGD (no momentum), lr 1: p_new = p - k_m * g for a modality group, - g for the rest."""
    torch.manual_seed(1)
    model = TwoStream()
    opt = ModalitySGD(param_groups_by_modality(model, {"vision": "vision.*", "text": "text.*"}), lr=1.0)
    assert opt.modalities == ["vision", "text"]
    xv, xt, y = _batches(1)[0]
    nn.functional.cross_entropy(model(xv, xt), y).backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    scores = torch.tensor([3.0, 1.0])
    opt.step(scores=scores)
    k = modulation_coefficients(scores, 0.1)
    assert k[0] < 1 and k[1] == 1
    torch.testing.assert_close(opt.last_coefficients, k)
    for n, p in model.named_parameters():
        p0, g = before[n]
        scale = k[0] if n.startswith("vision") else 1.0
        torch.testing.assert_close(p.detach(), p0 - scale * g)


def test_scores_as_mapping_and_explicit_coefficients():
    model = TwoStream()
    opt = ModalitySGD(param_groups_by_modality(model, {"vision": "vision.*", "text": "text.*"}), lr=0.1)
    _train(model, opt, _batches(1), scores={"text": 1.0, "vision": 4.0})
    torch.testing.assert_close(opt.last_coefficients, modulation_coefficients(torch.tensor([4.0, 1.0]), 0.1))
    _train(model, opt, _batches(1), coefficients=torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(opt.last_coefficients, torch.tensor([0.5, 0.25]))


def test_modulation_window():
    model = TwoStream()
    opt = ModalitySGD(param_groups_by_modality(model, {"vision": "vision.*", "text": "text.*"}), lr=0.1, modulation_steps=(2, 4))
    seen = []
    for xv, xt, y in _batches(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xv, xt), y).backward()
        opt.step(coefficients=torch.tensor([0.5, 0.8]))
        seen.append(opt.last_coefficients)
    expect = [[1.0, 1.0]] * 2 + [[0.5, 0.8]] * 2 + [[1.0, 1.0]] * 2
    torch.testing.assert_close(torch.stack(seen), torch.tensor(expect))
    opt.end_task()  # the window restarts with each task
    _train(model, opt, _batches(3), coefficients=torch.tensor([0.5, 0.8]))
    torch.testing.assert_close(opt.last_coefficients, torch.tensor([0.5, 0.8]))


def test_cross_task_carry():
    model = TwoStream()
    carry = 0.25
    opt = ModalitySGD(param_groups_by_modality(model, {"vision": "vision.*", "text": "text.*"}), lr=0.1, carry=carry)
    ks = [torch.tensor([0.2, 1.0]), torch.tensor([0.6, 0.5]), torch.tensor([1.0, 0.9])]
    for k in ks:  # task 1: no previous mean yet, coefficients used as given
        _train(model, opt, _batches(1), coefficients=k)
        torch.testing.assert_close(opt.last_coefficients, k)
    opt.end_task()
    prev = torch.stack(ks).mean(0)
    new_k = torch.tensor([0.4, 0.4])
    _train(model, opt, _batches(1), coefficients=new_k)
    torch.testing.assert_close(opt.last_coefficients, carry * prev + (1 - carry) * new_k)
    # carry = 0 (default) never looks back
    opt0 = ModalitySGD(param_groups_by_modality(model, {"vision": "vision.*", "text": "text.*"}), lr=0.1)
    _train(model, opt0, _batches(1), coefficients=ks[0])
    opt0.end_task()
    _train(model, opt0, _batches(1), coefficients=new_k)
    torch.testing.assert_close(opt0.last_coefficients, new_k)


@pytest.mark.parametrize("cls,kw", [(ModalityAdamW, dict(lr=1e-2, amsgrad=True)), (ModalitySGD, dict(lr=0.05, momentum=0.9))])
def test_state_dict_round_trip_resumes_exactly(cls, kw):
    """Saving mid-stream (carry state and noise counter included) and resuming in a fresh optimizer
    gives bit-identical parameters to an uninterrupted run."""
    torch.manual_seed(2)
    base = TwoStream()
    batches = _batches(8)

    def make(model):
        return cls(param_groups_by_modality(model, {"vision": "vision.*", "text": "text.*"}), noise=True, carry=0.5, seed=9, **kw)

    def run(model, opt, start, stop):
        for i in range(start, stop):
            xv, xt, y = batches[i]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xv, xt), y).backward()
            opt.step(scores=torch.tensor([2.0 + i, 1.0]))

    straight = copy.deepcopy(base)
    opt = make(straight)
    run(straight, opt, 0, 3)
    opt.end_task()
    run(straight, opt, 3, 8)

    resumed = copy.deepcopy(base)
    opt1 = make(resumed)
    run(resumed, opt1, 0, 3)
    opt1.end_task()
    run(resumed, opt1, 3, 5)
    saved_model, saved_opt = copy.deepcopy(resumed.state_dict()), copy.deepcopy(opt1.state_dict())
    fresh = TwoStream()
    fresh.load_state_dict(saved_model)
    opt2 = make(fresh)
    opt2.load_state_dict(saved_opt)
    run(fresh, opt2, 5, 8)
    for a, b in zip(fresh.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_anchor_group_pulls_toward_the_anchor():
    emb = nn.Embedding(10, 4)
    old = emb.weight.detach().clone()[:6] + 1.0
    w = torch.rand(6) + 0.1
    lam, lr = 0.5, 0.1
    opt = ModalitySGD([{"params": [emb.weight], "anchor": old, "anchor_weight": w, "anchor_lambda": lam}], lr=lr)
    grad = torch.randn(10, 4)
    emb.weight.grad = grad.clone()
    before = emb.weight.detach().clone()
    opt.step()
    expect = before - lr * grad
    expect[:6] -= lr * 2 * lam * w[:, None] * (before[:6] - old)
    torch.testing.assert_close(emb.weight.detach(), expect)
    # changing the group's anchor strength takes effect at the next step
    opt.param_groups[0]["anchor_lambda"] = 0.0
    before = emb.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(emb.weight.detach(), before - lr * grad)


def test_state_cleared_or_params_swapped_take_effect():
    lin = nn.Linear(3, 2)
    opt = ModalityAdamW(lin.parameters(), lr=0.1)
    for p in lin.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.state.clear()
    opt.step()
    assert len(opt.state_dict()["state"]) == 2 and float(opt.state[lin.weight]["step"]) == 1.0
    bigger = nn.Parameter(torch.zeros(5, 3))
    bigger.grad = torch.ones_like(bigger)
    opt.param_groups[0]["params"][0] = bigger
    opt.step()
    assert torch.all(bigger.detach() < 0)


def test_step_bumps_version_counters_so_autograd_sees_the_change():
    lin = nn.Linear(3, 2)
    opt = ModalitySGD(lin.parameters(), lr=0.1)
    y = (lin(torch.ones(1, 3, requires_grad=True)) ** 2).sum()
    for p in lin.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    with pytest.raises(RuntimeError, match="inplace"):
        y.backward()


def test_load_a_torch_optim_state_dict():
    lin = nn.Linear(3, 2)
    ref = torch.optim.AdamW(lin.parameters(), lr=0.1)
    for p in lin.parameters():
        p.grad = torch.ones_like(p)
    ref.step()
    opt = ModalityAdamW(lin.parameters(), lr=0.1)
    opt.load_state_dict(ref.state_dict())
    opt.step()
    assert float(opt.state[lin.weight]["step"]) == 2.0


def test_modality_added_after_a_task_with_carry():
    model = TwoStream()
    opt = ModalitySGD([{"params": model.vision.parameters(), "modality": "vision"}, {"params": model.head.parameters()}], lr=0.1, carry=0.5)
    _train(model, opt, _batches(2), coefficients=torch.tensor([0.4]))
    opt.end_task()
    opt.add_param_group({"params": model.text.parameters(), "modality": "text"})
    _train(model, opt, _batches(1), coefficients=torch.tensor([0.8, 0.6]))
    torch.testing.assert_close(opt.last_coefficients, torch.tensor([0.5 * 0.4 + 0.5 * 0.8, 0.6]))


def test_param_groups_by_modality():
    model = TwoStream()
    groups = param_groups_by_modality(model, {"vision": ["vision.*"], "text": "text.weight"}, lr=0.5)
    assert [g.get("modality") for g in groups] == ["vision", "text", None]
    assert all(g["lr"] == 0.5 for g in groups)
    assert len(groups[0]["params"]) == 2 and len(groups[1]["params"]) == 1 and len(groups[2]["params"]) == 3
    with pytest.raises(ValueError, match="several modalities"):
        param_groups_by_modality(model, {"a": "vision.*", "b": "*.weight"})


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _opt(**kw):
    model = TwoStream()
    return model, ModalityAdamW(param_groups_by_modality(model, {"vision": "vision.*", "text": "text.*"}), **kw)


def test_scores_of_the_wrong_length():
    model, opt = _opt()
    _train(model, opt, _batches(1))
    with pytest.raises(ValueError, match="scores"):
        opt.step(scores=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="unknown modalities"):
        opt.step(scores={"vision": 1.0, "audio": 2.0})


@pytest.mark.parametrize("alpha", [float("nan"), -1.0])
def test_nan_or_negative_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        _opt(alpha=alpha)


def test_integer_parameters():
    with pytest.raises(TypeError, match="floating point"):
        ModalityAdamW([torch.zeros(3, dtype=torch.int64)])


def test_unknown_modality_in_a_group():
    model = TwoStream()
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        ModalityAdamW([{"params": model.vision.parameters(), "modality": "audio"}], modalities=["vision", "text"])
    with pytest.raises(TypeError, match="modality"):
        ModalityAdamW([{"params": model.vision.parameters(), "modality": 3}])


def test_bad_hyperparameters():
    model = TwoStream()
    with pytest.raises(ValueError, match="lr"):
        ModalityAdamW(model.parameters(), lr=float("nan"))
    with pytest.raises(ValueError, match="betas"):
        ModalityAdamW(model.parameters(), betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="carry"):
        ModalityAdamW(model.parameters(), carry=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        ModalityAdamW(model.parameters(), weight_decay=float("inf"))
    with pytest.raises(ValueError, match="modulation_steps"):
        ModalityAdamW(model.parameters(), modulation_steps=(5, 2))
    with pytest.raises(ValueError, match="nesterov"):
        ModalitySGD(model.parameters(), nesterov=True)
    with pytest.raises(ValueError, match="anchor"):
        ModalitySGD([{"params": list(model.vision.parameters()), "anchor": torch.zeros(3)}])


def test_scores_without_modality_groups():
    model = TwoStream()
    opt = ModalityAdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="modality"):
        opt.step(scores=torch.tensor([1.0, 2.0]))


# ------------------------------------------------------------------------------------------------
# Sparse gradients: the row-sparse (lazy) step
# ------------------------------------------------------------------------------------------------

# Id batches of a KGE-like loop: repeated ids (so the embedding's gradient is uncoalesced), rows
# never touched, and one step without any id (a gradient with no entries).
ID_BATCHES = [[3, 40, 3, 7, 59], [0, 1, 2, 3, 60, 60], [], [17, 40, 17, 17], [5, 6, 60, 0, 44, 3]]


def _embedding_steps(emb, opt, batches):
    for ids in batches:
        opt.zero_grad()
        out = emb(torch.tensor(ids, dtype=torch.long, device=emb.weight.device))
        (out.pow(2).sum() + out.sum()).backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_embedding_gradient_equals_sparse_adam(backend):
    """nn.Embedding(sparse=True) under ModalityAdamW is torch.optim.SparseAdam (lazy Adam). SparseAdam
    adds eps before bias-correcting v (ours, like AdamW, after); with eps = 1e-30 both terms vanish
    next to sqrt(v), so the two agree to float32 round-off. Weight decay 0 and k = 1: SparseAdam
    has neither."""
    _check_against_sparse_adam(backend, "cpu")


@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_sparse_embedding_gradient_equals_sparse_adam(backend):
    skip_unless(backend, "cuda")
    _check_against_sparse_adam(backend, "cuda")


def _check_against_sparse_adam(backend, device):
    torch.manual_seed(3)
    ours, theirs = nn.Embedding(61, 7, sparse=True).to(device), nn.Embedding(61, 7, sparse=True).to(device)
    theirs.load_state_dict(ours.state_dict())
    opt = ModalityAdamW(ours.parameters(), lr=2e-2, betas=(0.8, 0.95), eps=1e-30, weight_decay=0.0)
    ref = torch.optim.SparseAdam(theirs.parameters(), lr=2e-2, betas=(0.8, 0.95), eps=1e-30)
    with mmcl_fast.use_backend(backend):
        _embedding_steps(ours, opt, ID_BATCHES)
    _embedding_steps(theirs, ref, ID_BATCHES)
    torch.testing.assert_close(ours.weight, theirs.weight)
    st, rst = opt.state[ours.weight], ref.state[theirs.weight]
    torch.testing.assert_close(st["exp_avg"], rst["exp_avg"])
    torch.testing.assert_close(st["exp_avg_sq"], rst["exp_avg_sq"])
    assert float(st["step"]) == float(rst["step"]) == len(ID_BATCHES)
    touched = torch.zeros(61, dtype=torch.bool, device=device)
    touched[[i for b in ID_BATCHES for i in b]] = True
    assert torch.equal(ours.weight[~touched], theirs.weight[~touched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_sparse_in_two_dimensions_equals_sparse_adam(backend):
    """A table [M, N, D] whose gradient is sparse in (m, n) (modulated_embedding(sparse=True)): the
    entries of the sparse dimensions are the rows of the lazy step, as SparseAdam's."""
    from mmcl_fast.ops import modulated_embedding

    torch.manual_seed(4)
    tables = [nn.Parameter(torch.randn(3, 29, 6)) for _ in range(2)]
    tables[1].data.copy_(tables[0].data)
    gamma, beta = torch.rand(3, 6) + 0.5, torch.randn(3, 6)
    opt = ModalityAdamW([tables[0]], lr=2e-2, eps=1e-30, weight_decay=0.0)
    ref = torch.optim.SparseAdam([tables[1]], lr=2e-2, eps=1e-30)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        index = torch.randint(0, 29, (11,), generator=g)
        for t, o in ((tables[0], opt), (tables[1], ref)):
            o.zero_grad()
            with mmcl_fast.use_backend("reference"):
                modulated_embedding(t, index, gamma, beta, sparse=True).pow(2).sum().backward()
            assert t.grad.layout == torch.sparse_coo and t.grad.sparse_dim() == 2
            with mmcl_fast.use_backend(backend if o is opt else None):
                o.step()
    torch.testing.assert_close(tables[0].detach(), tables[1].detach())
    torch.testing.assert_close(opt.state[tables[0]]["exp_avg_sq"], ref.state[tables[1]]["exp_avg_sq"])


def _sparse(dense_rows: torch.Tensor, rows, shape):
    return torch.sparse_coo_tensor(torch.as_tensor(rows).view(1, -1), dense_rows, shape, check_invariants=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("oracle", ["sparse_adam", "plain_lazy_step"])
@pytest.mark.parametrize("mode", ["scalar", "row", "element"])
def test_sparse_anchor_equals_penalty_gradient_on_touched_rows(backend, oracle, mode):
    """The group's anchor term equals adding the autograd gradient of mmcl_fast.ops.anchor_penalty,
    restricted to the rows the gradient touches, then taking the same lazy step without an anchor:
    torch.optim.SparseAdam (eps 1e-30, no decay, k = 1), or our plain lazy step with weight decay
    and the modality coefficient applied by hand (the anchor term is not scaled by k)."""
    from mmcl_fast.ops import anchor_penalty

    shape, n_a, lam = (23, 5), 9, 0.3
    g = torch.Generator().manual_seed(6)
    init = torch.randn(shape, generator=g)
    anchor = init[:n_a] + torch.randn(n_a, 5, generator=g)
    weight = {"scalar": torch.tensor(0.8), "row": torch.rand(n_a, generator=g) + 0.2,
              "element": torch.rand(n_a, 5, generator=g) + 0.2}[mode]
    wd, k = (0.0, 1.0) if oracle == "sparse_adam" else (0.05, 0.6)
    ours, theirs = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    hyper = dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-30)
    opt = ModalityAdamW([{"params": [ours], "modality": "kg", "anchor": anchor, "anchor_weight": weight,
                          "anchor_lambda": lam}], weight_decay=wd, **hyper)
    if oracle == "sparse_adam":
        ref = torch.optim.SparseAdam([theirs], **hyper)
    else:
        ref = ModalityAdamW([theirs], weight_decay=wd, **hyper)
    for rows in ([20, 3, 8, 9], [0, 1], [22, 15], [8, 4, 12, 2, 9]):
        grad_rows = torch.randn(len(rows), 5, generator=g)
        ours.grad = _sparse(grad_rows, rows, shape)
        leaf = theirs.detach().clone().requires_grad_(True)
        with mmcl_fast.use_backend("reference"):
            (pen,) = torch.autograd.grad(anchor_penalty(leaf[:n_a], anchor, weight, lam), leaf)
        theirs.grad = _sparse(k * grad_rows + pen[rows], rows, shape)
        with mmcl_fast.use_backend(backend):
            opt.step(coefficients=torch.tensor([k]))
            ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach())
    torch.testing.assert_close(opt.state[ours]["exp_avg"], ref.state[theirs]["exp_avg"])
    # rows 5..7 are old (inside the anchor) but never touched: the lazy step left them alone
    assert torch.equal(ours.detach()[5:8], init[5:8])


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncoalesced_sparse_gradient_is_coalesced(backend):
    """A gradient with repeated entries (DDP's all-reduce of sparse gradients concatenates them)
    steps as its coalesced sum."""
    shape = (17, 3)
    g = torch.Generator().manual_seed(7)
    init = torch.randn(shape, generator=g)
    a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt_a = ModalityAdamW([a], lr=0.1, weight_decay=0.1)
    opt_b = ModalityAdamW([b], lr=0.1, weight_decay=0.1)
    vals = torch.randn(5, 3, generator=g)
    a.grad = _sparse(vals, [4, 9, 4, 16, 9], shape)
    assert not a.grad.is_coalesced()
    b.grad = a.grad.coalesce()
    with mmcl_fast.use_backend(backend):
        opt_a.step()
        opt_b.step()
    assert torch.equal(a.detach(), b.detach())
    expect_rows = torch.zeros(17, dtype=torch.bool)
    expect_rows[[4, 9, 16]] = True
    assert torch.equal((a.detach() != init).any(1), expect_rows)


def test_sparse_and_dense_parameters_in_one_optimizer():
    """The dense parameters keep the fused dense step (torch.optim.AdamW), the sparse one gets the
    lazy step (torch.optim.SparseAdam); groups with a modality scale both by their k."""
    torch.manual_seed(8)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 6, sparse=True)
            self.lin = nn.Linear(6, 3)

        def forward(self, ids):
            return self.lin(self.emb(ids)).pow(2).sum()

    ours, theirs = Model(), Model()
    theirs.load_state_dict(ours.state_dict())
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-30)
    opt = ModalityAdamW([{"params": ours.emb.parameters(), "modality": "structure"},
                         {"params": ours.lin.parameters(), "modality": "text"}], weight_decay=0.0, **hyper)
    dense_ref = torch.optim.AdamW(theirs.lin.parameters(), weight_decay=0.0, **hyper)
    sparse_ref = torch.optim.SparseAdam(theirs.emb.parameters(), **hyper)
    k = torch.tensor([0.5, 0.25])
    g = torch.Generator().manual_seed(9)
    for _ in range(5):
        ids = torch.randint(0, 40, (12,), generator=g)
        opt.zero_grad()
        ours(ids).backward()
        opt.step(coefficients=k)
        dense_ref.zero_grad()
        sparse_ref.zero_grad()
        theirs(ids).backward()
        theirs.emb.weight.grad = theirs.emb.weight.grad * k[0]
        for p in theirs.lin.parameters():
            p.grad.mul_(k[1])
        dense_ref.step()
        sparse_ref.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)


def test_sparse_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(10)
    base = nn.Embedding(61, 7, sparse=True)

    def make(emb):
        return ModalityAdamW([{"params": [emb.weight], "anchor": base.weight.detach()[:30].clone(),
                               "anchor_weight": torch.rand(30, generator=torch.Generator().manual_seed(0)),
                               "anchor_lambda": 0.5}], lr=1e-2)

    straight = copy.deepcopy(base)
    _embedding_steps(straight, make(straight), ID_BATCHES)
    resumed = copy.deepcopy(base)
    opt = make(resumed)
    _embedding_steps(resumed, opt, ID_BATCHES[:2])
    saved_w, saved_opt = copy.deepcopy(resumed.state_dict()), copy.deepcopy(opt.state_dict())
    fresh = nn.Embedding(61, 7, sparse=True)
    fresh.load_state_dict(saved_w)
    opt2 = make(fresh)
    opt2.load_state_dict(saved_opt)
    _embedding_steps(fresh, opt2, ID_BATCHES[2:])
    assert torch.equal(fresh.weight, straight.weight)
    assert float(opt2.state[fresh.weight]["step"]) == len(ID_BATCHES)


def test_parameter_switching_between_dense_and_sparse_gradients():
    """One state for both: a dense step, then lazy steps, then a dense step again count one step
    each and keep one pair of moments."""
    p = nn.Parameter(torch.randn(9, 4))
    q = nn.Parameter(p.detach().clone())
    opt = ModalityAdamW([p], lr=0.1, weight_decay=0.0)
    ref = torch.optim.AdamW([q], lr=0.1, weight_decay=0.0)
    g = torch.Generator().manual_seed(11)
    for step in range(4):
        dense = torch.randn(9, 4, generator=g)
        # every row listed: the lazy step is then the dense one
        p.grad = dense.to_sparse(1) if step in (1, 2) else dense
        q.grad = dense
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach())
    assert float(opt.state[p]["step"]) == 4.0


@pytest.mark.parametrize("case", ["amsgrad", "noise", "sgd", "dtype"])
def test_sparse_gradient_refusals_name_the_option_and_change_nothing(case):
    dense, emb = nn.Linear(3, 2), nn.Embedding(10, 4, sparse=True)
    groups = [{"params": dense.parameters(), "modality": "a"}, {"params": emb.parameters(), "modality": "b"}]
    if case == "sgd":
        opt = ModalitySGD(groups, lr=0.1)
    else:
        opt = ModalityAdamW(groups, lr=0.1, amsgrad=case == "amsgrad", noise=case == "noise")
    for p in dense.parameters():
        p.grad = torch.ones_like(p)
    emb(torch.tensor([1, 5])).sum().backward()
    if case == "dtype":
        if not hasattr(emb.weight, "grad_dtype"):
            pytest.skip("this torch refuses a gradient of another dtype itself")
        emb.weight.grad_dtype = None  # let torch take it, so that ours is the check seen
        emb.weight.grad = _sparse(torch.ones(1, 4, dtype=torch.float64), [2], (10, 4))
    before = [t.detach().clone() for t in list(dense.parameters()) + [emb.weight]]
    exc, match = {"amsgrad": (ValueError, "amsgrad is not supported with sparse gradients"),
                  "noise": (ValueError, "noise is not supported with sparse gradients"),
                  "sgd": (TypeError, "ModalitySGD takes dense gradients; parameter 2"),
                  "dtype": (TypeError, "sparse gradient of parameter 2 is torch.float64")}[case]
    with pytest.raises(exc, match=match):
        opt.step(coefficients=torch.tensor([0.5, 0.5]))
    after = list(dense.parameters()) + [emb.weight]
    assert all(torch.equal(a.detach(), b) for a, b in zip(after, before))
    assert len(opt.state) == 0 and opt.last_coefficients is None
