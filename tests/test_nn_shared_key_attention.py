"""mmcl_fast.nn: SharedKeyBank, SharedKeyAttention and the distillation contexts (no transformers /
timm needed; their patching is tested in test_patching.py)."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mmcl_fast
from mmcl_fast.nn import (
    AttentionMaps,
    SharedKeyAttention,
    SharedKeyBank,
    attention_distillation,
    record_attention_maps,
    shared_key_layers,
)
from mmcl_fast.ops import asymmetric_relu_distance, shared_key_attention

HID, H, D = 32, 4, 8


def _x(B=3, L=7, seed=0, hid=HID):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, hid, generator=g)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, L - 2:] = True
    kpm[2, 3:] = True
    return x, kpm


def _module(bank=True, max_len=9, dropout=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    b = SharedKeyBank(H, 10, D, init_std=0.5) if bank else None
    m = SharedKeyAttention(HID, H, b, max_len, dropout=dropout, **kw)
    with torch.no_grad():
        for p in m.attn_bias.values():
            p.normal_()
    return m


def _oracle(m, x, kpm, modality=None):
    """Plain PyTorch: q/v projections, bank keys, sliced bias and the padding as a float mask,
    through F.scaled_dot_product_attention."""
    B, L, _ = x.shape
    split = lambda t: t.view(B, L, H, D).transpose(1, 2)  # noqa: E731
    q, v = split(m.q_proj(x)), split(m.v_proj(x))
    k = m.bank.key[:, :L].expand(B, H, L, D) if m.bank is not None else split(m.k_proj(x))
    mask = torch.zeros(B, H, L, L)
    if len(m.attn_bias):
        mask = mask + m.attn_bias[modality or m.modality][:, :L, :L]
    if kpm is not None:
        mask = mask.masked_fill(kpm[:, None, None, :], float("-inf"))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return m.out_proj(o.transpose(1, 2).reshape(B, L, HID))


# -- SharedKeyBank -------------------------------------------------------------------------------
def test_bank_shape_init_and_slice():
    torch.manual_seed(0)
    bank = SharedKeyBank(3, 50, 16)
    assert bank.key.shape == (3, 50, 16) and bank.key.requires_grad
    assert 0.01 < bank.key.std().item() < 0.03 and bank.key.abs().max().item() <= 0.04 + 1e-6
    assert torch.equal(bank(7), bank.key[:, :7])
    assert torch.equal(bank(50), bank.key)


@pytest.mark.parametrize("args,match", [
    ((0, 4, 8), "num_heads"), ((2, -1, 8), "num_slots"), ((2, 4, 2.5), "head_dim"), ((2, 4, True), "head_dim"),
])
def test_bank_bad_construction(args, match):
    with pytest.raises(ValueError, match=match):
        SharedKeyBank(*args)


def test_bank_length_beyond_slots_is_a_clear_error():
    bank = SharedKeyBank(2, 5, 4)
    with pytest.raises(ValueError, match="exceeds the bank's num_slots=5"):
        bank(6)
    with pytest.raises(ValueError, match="length"):
        bank(0)


# -- SharedKeyAttention ----------------------------------------------------------------------------
@pytest.mark.parametrize("bank", [True, False], ids=["bank", "self_keys"])
def test_forward_and_gradients_match_sdpa_oracle(bank):
    m = _module(bank)
    x, kpm = _x()
    x.requires_grad_(True)
    out = m(x, kpm)
    ref = _oracle(m, x, kpm)
    assert out.shape == (3, 7, HID)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    params = [p for p in m.parameters()]
    ga = torch.autograd.grad(out, [x] + params, g)
    gb = torch.autograd.grad(ref, [x] + params, g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if bank:
        assert m.bank.key.grad is None and ga[1 + params.index(m.bank.key)][:, 7:].abs().sum() == 0  # unused slots
        assert ga[1 + params.index(m.bank.key)][:, :7].abs().sum() > 0


def test_self_keys_without_bias_equal_torch_multihead_attention():
    m = _module(bank=False, max_len=None)
    mha = nn.MultiheadAttention(HID, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        mha.out_proj.weight.copy_(m.out_proj.weight)
        mha.out_proj.bias.copy_(m.out_proj.bias)
    x, kpm = _x()
    ref, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(m(x, kpm), ref, atol=1e-5, rtol=1e-5)


def test_per_modality_biases_are_separate():
    torch.manual_seed(1)
    bank = SharedKeyBank(H, 10, D, init_std=0.5)
    m = SharedKeyAttention(HID, H, bank, {"text": 9, "vision": 6}, modality="text")
    with torch.no_grad():
        for p in m.attn_bias.values():
            p.normal_()
    x, kpm = _x(L=5)
    torch.testing.assert_close(m(x, kpm, modality="vision"), _oracle(m, x, kpm, "vision"), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(m(x, kpm), m(x, kpm, modality="vision"))
    m(x, kpm, modality="vision").sum().backward()
    assert m.attn_bias["text"].grad is None
    assert m.attn_bias["vision"].grad[:, :5, :5].abs().sum() > 0
    assert m.attn_bias["vision"].grad[:, 5:].abs().sum() == 0
    with pytest.raises(ValueError, match="modality 'audio'"):
        m(x, kpm, modality="audio")
    with pytest.raises(ValueError, match="max_len=6 of modality 'vision'"):
        m(_x(L=7)[0], modality="vision")


def test_out_proj_false_returns_merged_heads():
    m = _module(out_proj=False)
    x, kpm = _x()
    B, L = x.shape[:2]
    q = m.q_proj(x).view(B, L, H, D).transpose(1, 2)
    v = m.v_proj(x).view(B, L, H, D).transpose(1, 2)
    o = shared_key_attention(q, m.bank(L), v, bias=m.attn_bias["default"][:, :L, :L], key_padding_mask=kpm)
    torch.testing.assert_close(m(x, kpm), o.transpose(1, 2).reshape(B, L, HID))


@pytest.mark.parametrize("make_input,exc,match", [
    (lambda: (torch.randn(2, 5, HID + 1), None), ValueError, "hidden_states must be .*hidden_size=32"),
    (lambda: (torch.randn(5, HID), None), ValueError, "hidden_states must be"),
    (lambda: (torch.randn(2, 5, HID).long(), None), TypeError, "hidden_states must be a floating-point"),
    (lambda: (torch.randn(2, 5, HID), torch.zeros(2, 5)), TypeError, "key_padding_mask must be a bool"),
    (lambda: (torch.randn(2, 5, HID), torch.zeros(2, 6, dtype=torch.bool)), ValueError,
     r"key_padding_mask must be \[B, L\] = \[2, 5\]"),
    (lambda: (torch.randn(2, 10, HID), None), ValueError, "sequence length 10 exceeds max_len=9"),
])
def test_bad_input_is_a_clear_error(make_input, exc, match):
    m = _module()
    x, kpm = make_input()
    with pytest.raises(exc, match=match):
        m(x, kpm)


def test_length_beyond_bank_slots_is_a_clear_error():
    m = _module(max_len=None)  # no bias: the bank's 10 slots are the limit
    with pytest.raises(ValueError, match="num_slots=10"):
        m(torch.randn(1, 11, HID))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(hidden_size=30, num_heads=4), ValueError, "multiple of num_heads"),
    (dict(bank=SharedKeyBank(2, 8, 8)), ValueError, "bank has num_heads=2"),
    (dict(bank="keys"), TypeError, "bank must be a SharedKeyBank"),
    (dict(max_len=0), ValueError, "max_len"),
    (dict(max_len={"text": 2.0}), ValueError, "max_len"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(modality=""), ValueError, "modality"),
])
def test_bad_construction_is_a_clear_error(kwargs, exc, match):
    args = dict(hidden_size=HID, num_heads=H)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        SharedKeyAttention(**args)


# -- dropout ------------------------------------------------------------------------------------------
def test_dropout_module_in_eval_equals_the_fused_path():
    m0 = _module(dropout=0.0)
    m1 = copy.deepcopy(m0)
    m1.attn_dropout.p = 0.4
    x, kpm = _x()
    torch.testing.assert_close(m1.eval()(x, kpm), m0.eval()(x, kpm), atol=0, rtol=0)


def test_training_dropout_is_the_ops_dropout_on_p():
    """In training the module passes its dropout to the fused op: the kernel backend and the
    reference (which draws the same mask for the same generator state) agree, output and
    gradients; the output differs from eval's."""
    m = _module(dropout=0.4).train()
    x, kpm = _x()
    res = []
    for backend in ("reference", None):
        torch.manual_seed(11)
        with mmcl_fast.use_backend(backend):
            out = m(x, kpm)
            res.append((out,) + torch.autograd.grad(out.square().sum(), list(m.parameters())))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(res[1][0], m.eval()(x, kpm), atol=1e-3)


def test_training_with_dropout_drops_and_is_reproducible():
    m = _module(dropout=0.5).train()
    x, kpm = _x()
    torch.manual_seed(5)
    a = m(x, kpm)
    torch.manual_seed(5)
    b = m(x, kpm)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.isfinite(a).all() and not torch.allclose(a, m.eval()(x, kpm))


# -- distillation plumbing -------------------------------------------------------------------------------
class TwoStreams(nn.Module):
    """Two shared-key layers per stream, the banks shared by the streams (MSPT's layout)."""

    def __init__(self, seed=0, dropout=0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.banks = nn.ModuleList([SharedKeyBank(H, 10, D, init_std=0.5) for _ in range(2)])
        self.text = nn.ModuleList([SharedKeyAttention(HID, H, b, 9, modality="text", dropout=dropout)
                                   for b in self.banks])
        self.vision = nn.ModuleList([SharedKeyAttention(HID, H, b, 6, modality="vision", dropout=dropout)
                                     for b in self.banks])
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 3 and p.shape[-1] == p.shape[-2]:
                    p.normal_(std=0.3)

    def forward(self, xt, kpm, xv):
        for layer in self.text:
            xt = xt + layer(xt, kpm)
        for layer in self.vision:
            xv = xv + layer(xv)
        return xt, xv


def _batch():
    xt, kpm = _x(L=7, seed=1)
    xv = torch.randn(3, 5, HID, generator=torch.Generator().manual_seed(2))
    return xt, kpm, xv


def test_teacher_maps_are_recorded_per_layer_with_the_right_shapes():
    model = TwoStreams().eval()
    xt, kpm, xv = _batch()
    with record_attention_maps(model) as maps, torch.no_grad():
        model(xt, kpm, xv)
    assert isinstance(maps, AttentionMaps) and maps.space == "scores"
    assert set(maps) == {("text.0", "text"), ("text.1", "text"), ("vision.0", "vision"), ("vision.1", "vision")}
    for (_, modality), (w, u) in maps.items():
        L = 7 if modality == "text" else 5
        assert w.shape == (3, H, L) and u.shape == (3, H, L) and not w.requires_grad
        if modality == "text":
            assert (w[2, :, 3:] == 0).all() and (u[2, :, 3:] == 0).all() and (w[2, :, :3] != 0).any()
    assert all(m._mmcl_hook is None for m in shared_key_layers(model).values())


def _student_maps(model, batch, space="scores"):
    with record_attention_maps(model, space=space) as maps, torch.no_grad():
        model(*batch)
    return maps


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["fused", "dropout_path"])
def test_student_equal_to_teacher_has_zero_loss_and_a_changed_bank_gets_gradient(dropout):
    teacher = TwoStreams().eval()
    batch = _batch()
    with record_attention_maps(teacher) as maps, torch.no_grad():
        ref_out = teacher(*batch)
    student = copy.deepcopy(teacher)
    student.train()
    for m in shared_key_layers(student).values():
        m.attn_dropout.p = dropout
    # with dropout, the second layers see other inputs than the teacher's: compare the first ones
    checked = [k for k in maps if dropout == 0 or k[0].endswith(".0")]
    with attention_distillation(student, maps) as distill:
        out = student(*batch)
    assert len(distill) == 4
    for key in checked:
        assert distill.losses[key].item() == pytest.approx(0.0, abs=1e-6)
    if dropout == 0:
        assert distill.loss().item() == pytest.approx(0.0, abs=1e-6)
        torch.testing.assert_close(out[0], ref_out[0])
    # a different bank: some ReLU term is active, its gradient reaches the bank
    with torch.no_grad():
        student.banks[1].key.add_(torch.randn_like(student.banks[1].key))
    with attention_distillation(student, maps, pool="both") as distill:
        student(*batch)
    loss = distill.loss()
    assert loss.item() > 1e-3
    loss.backward()
    assert student.banks[1].key.grad.abs().sum() > 0
    # per layer: the asymmetric ReLU distance of the pooled maps, averaged over (b, h)
    smaps = _student_maps(student, batch)
    for key in checked:
        layer_loss = distill.losses[key]
        (tw, tu), (sw, su) = maps[key], smaps[key]
        want = (asymmetric_relu_distance(tw, sw) + asymmetric_relu_distance(tu, su)).mean()
        torch.testing.assert_close(layer_loss.detach(), want, atol=1e-5, rtol=1e-4)


def test_loss_reduction_is_sum_over_modalities_of_mean_over_layers():
    teacher = TwoStreams().eval()
    batch = _batch()
    with record_attention_maps(teacher) as maps, torch.no_grad():
        teacher(*batch)
    student = TwoStreams(seed=1)
    with attention_distillation(student, maps) as distill:
        student(*batch)
    L = {k: v.detach() for k, v in distill.losses.items()}
    assert all(v > 0 for v in L.values())
    text = (L[("text.0", "text")] + L[("text.1", "text")]) / 2
    vision = (L[("vision.0", "vision")] + L[("vision.1", "vision")]) / 2
    torch.testing.assert_close(distill.loss().detach(), text + vision)
    torch.testing.assert_close(distill.loss(layers="sum", modalities="mean").detach(),
                               (sum(L.values())) / 2)
    assert set(distill.by_modality()) == {"text", "vision"}


def test_probs_space_height_pool():
    teacher = TwoStreams().eval()
    batch = _batch()
    maps = _student_maps(teacher, batch, space="probs")
    for (_, modality), (_, u) in maps.items():
        valid = (~batch[1]).sum(1) if modality == "text" else torch.full((3,), 5)
        torch.testing.assert_close(u.sum(-1), valid[:, None].expand(3, H).float())  # columns of P add to #queries
    student = TwoStreams(seed=1)
    with attention_distillation(student, maps, pool="height") as distill:
        student(*batch)
    distill.loss().backward()
    assert student.banks[0].key.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pool='width' is not supported in space 'probs'"):
        with attention_distillation(student, maps, pool="width"):
            pass


def test_distillation_errors_are_clear_and_hooks_are_removed():
    teacher, student = TwoStreams().eval(), TwoStreams(seed=1)
    xt, kpm, xv = _batch()
    with record_attention_maps(teacher.text) as maps, torch.no_grad():  # text stream only
        for layer in teacher.text:
            layer(xt, kpm)
    assert set(maps) == {("0", "text"), ("1", "text")}
    with pytest.raises(KeyError, match="no teacher maps for layer 'text.0'"):
        with attention_distillation(student, maps):
            student(xt, kpm, xv)
    assert all(m._mmcl_hook is None for m in shared_key_layers(student).values())
    with pytest.raises(RuntimeError, match="no shared-key attention layer ran"):
        with attention_distillation(student.text, maps) as distill:
            pass
        distill.loss()
    with pytest.raises(ValueError, match="teacher_width must be"):  # another batch size
        with attention_distillation(student.text, maps):
            student.text[0](xt[:2], kpm[:2])
    with pytest.raises(ValueError, match="no SharedKeyAttention layer"):
        with record_attention_maps(nn.Linear(2, 2)):
            pass
    with pytest.raises(TypeError, match="teacher_maps must be the AttentionMaps"):
        with attention_distillation(student, dict(maps)):
            pass
    with pytest.raises(ValueError, match="space must be one of"):
        with record_attention_maps(student, space="logits"):
            pass
    with pytest.raises(ValueError, match="pool must be one of"):
        with attention_distillation(student, maps, pool="rows"):
            pass
    with pytest.raises(RuntimeError, match="ran twice"):
        with record_attention_maps(teacher), torch.no_grad():
            teacher(xt, kpm, xv)
            teacher(xt, kpm, xv)


def test_several_streams_by_mapping():
    model = TwoStreams()
    layers = shared_key_layers({"a": model.text, "b": model.vision})
    assert set(layers) == {"a.0", "a.1", "b.0", "b.1"}
    with pytest.raises(TypeError, match="model must be an nn.Module or a mapping"):
        shared_key_layers([model])


# -- torch.compile -------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_matches_eager():
    m = _module().eval()
    x, kpm = _x()
    eager = m(x, kpm)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x, kpm)
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    g_eager = torch.autograd.grad(eager.sum(), [m.bank.key, m.attn_bias["default"]])
    g_comp = torch.autograd.grad(out.sum(), [m.bank.key, m.attn_bias["default"]])
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_with_dropout_in_training():
    """The dropout seed is drawn inside the graph (a tensor, no .item()): no graph break, and the
    compiled module draws what eager draws from the same generator state."""
    m = _module(dropout=0.3).train()
    x, kpm = _x()
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    out = compiled(x, kpm)
    torch.manual_seed(4)
    eager = m(x, kpm)
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, m.eval()(x, kpm), atol=1e-3)
    g_eager = torch.autograd.grad(eager.sum(), [m.bank.key, m.attn_bias["default"]])
    g_comp = torch.autograd.grad(out.sum(), [m.bank.key, m.attn_bias["default"]])
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
