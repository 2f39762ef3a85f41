"""ModalityAdamW / ModalitySGD against torch.optim, and their own features."""
import copy

import pytest
import torch
from torch import nn

import mmcl_fast
from mmcl_fast.ops import modulation_coefficients
from mmcl_fast.optim import ModalityAdamW, ModalitySGD, param_groups_by_modality

from conftest import cpu_backends

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
