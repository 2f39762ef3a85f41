"""mmcl_fast.nn.patching: shared-key attention in transformers' BertModel / CLIPVisionModel and
timm's VisionTransformer, the fused op as an attention implementation, and the distillation
plumbing on patched models. Tiny random models built from configs (nothing is downloaded)."""
import copy

import pytest
import torch

import mmcl_fast

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from mmcl_fast.nn import (  # noqa: E402
    SharedKeyAttention,
    SharedKeyBank,
    attention_distillation,
    hf_attention_forward,
    make_banks,
    patch_bert,
    patch_clip_vision,
    patch_timm_vit,
    record_attention_maps,
    register_hf_attention,
    shared_key_layers,
    unpatch,
    use_fused_attention_timm,
)

H, HID, D = 4, 64, 16
N_IMG = 17  # (32 / 8)^2 patches + the class token


def bert(impl="eager", seed=0, **kw):
    torch.manual_seed(seed)
    kw = dict(dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), **kw)
    cfg = BertConfig(hidden_size=HID, num_hidden_layers=3, num_attention_heads=H, intermediate_size=128,
                     vocab_size=100, **kw)
    cfg._attn_implementation = impl
    return BertModel(cfg)


def clip(impl="eager", seed=0):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=HID, image_size=32, patch_size=8, num_hidden_layers=3, num_attention_heads=H,
                           intermediate_size=128)
    cfg._attn_implementation = impl
    return CLIPVisionModel(cfg)


def clip_layers(model):
    """transformers 5 flattened CLIPVisionModel (no vision_model); 4 had it."""
    return getattr(model, "vision_model", model).encoder.layers


def clip_path(model, i):
    return ("vision_model." if hasattr(model, "vision_model") else "") + f"encoder.layers.{i}.self_attn"


def vit(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=HID, depth=3, num_heads=H, num_classes=5)


def text_batch(B=3, L=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def images(B=2):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def text_out(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return out * mask[..., None]  # padded positions carry no meaning


def _loss(out):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return (out * w).sum()


def assert_same_outputs_and_grads(a, b, run, atol=2e-5):
    """run(model) -> output; a and b have the same parameter names."""
    oa, ob = run(a), run(b)
    torch.testing.assert_close(oa, ob, atol=atol, rtol=1e-4)
    _loss(oa).backward()
    _loss(ob).backward()
    pb = dict(b.named_parameters())
    n = 0
    for name, p in a.named_parameters():
        if p.grad is None:
            assert pb[name].grad is None or pb[name].grad.abs().max() == 0, name
            continue
        torch.testing.assert_close(p.grad, pb[name].grad, atol=atol, rtol=1e-4, msg=name)
        n += 1
    assert n > 10


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_hf_attention()


# -- patched layers with their own keys compute what the model computed ---------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa", "mmcl_fast"])
def test_bert_patched_with_own_keys_equals_unpatched(impl):
    ref = bert(impl)
    patched = copy.deepcopy(ref)
    layers = patch_bert(patched, layers=2, banks=None, bias=False)
    assert len(layers) == 2 and patched.encoder.layer[1].attention.self is layers[0]
    assert dict(patched.state_dict()).keys() == dict(ref.state_dict()).keys()
    ids, mask = text_batch()
    assert_same_outputs_and_grads(patched, ref, lambda m: text_out(m, ids, mask))


def test_clip_vision_patched_with_own_keys_equals_unpatched():
    ref = clip()
    patched = copy.deepcopy(ref)
    patch_clip_vision(patched, layers=[0, -1], banks=None, bias=False)
    px = images()
    assert_same_outputs_and_grads(patched, ref, lambda m: m(pixel_values=px).last_hidden_state)


def test_timm_fused_attention_equals_timm():
    ref = vit()
    fused = copy.deepcopy(ref)
    assert len(use_fused_attention_timm(fused)) == 3
    px = images()
    assert_same_outputs_and_grads(fused, ref, lambda m: m(px))


def test_timm_fused_attention_masks_equal_timm():
    ref = vit().eval()
    fused = copy.deepcopy(ref)
    use_fused_attention_timm(fused, layers=[1])
    x = torch.randn(2, N_IMG, HID)
    pad = torch.ones(2, 1, 1, N_IMG, dtype=torch.bool)
    pad[1, ..., 12:] = False
    general = torch.randn(2, 1, N_IMG, N_IMG)
    for kw in (dict(attn_mask=pad), dict(attn_mask=general), dict(is_causal=True)):
        a, b = fused.blocks[1].attn(x, **kw), ref.blocks[1].attn(x, **kw)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=str(list(kw)))


# -- the fused op as a transformers attention implementation -------------------------------------
@pytest.mark.parametrize("other", ["eager", "sdpa"])
def test_bert_mmcl_fast_attention_equals(other):
    ref = bert(other)
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("mmcl_fast")
    assert ours.config._attn_implementation == "mmcl_fast"
    ids, mask = text_batch()
    assert_same_outputs_and_grads(ours, ref, lambda m: text_out(m, ids, mask))


def test_mmcl_fast_attention_from_config_and_general_masks():
    cfg = bert().config
    model = BertModel._from_config(cfg, attn_implementation="mmcl_fast")
    assert model.config._attn_implementation == "mmcl_fast"
    # a decoder: causal + padding, a general mask (becomes a float bias)
    ref = bert("eager", is_decoder=True).eval()
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("mmcl_fast")
    ids, mask = text_batch()
    torch.testing.assert_close(text_out(ours, ids, mask), text_out(ref, ids, mask), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ours", ["mmcl_fast attention", "patched layers"])
def test_attention_dropout_in_training_is_the_ops_dropout(ours):
    """With attention dropout in training, our attention applies it inside the fused op: the
    kernels and the reference backend (which draws the same mask for the same generator state)
    agree, and the output is not eval's. (Its mask is not the one eager attention draws.)"""
    model = bert("eager", attention_probs_dropout_prob=0.3).train()
    if ours == "patched layers":
        patch_bert(model, 2, None, bias=False)
    else:
        model.set_attn_implementation("mmcl_fast")
    ids, mask = text_batch()
    outs = []
    for backend in ("reference", None):
        torch.manual_seed(7)
        with mmcl_fast.use_backend(backend):
            outs.append(text_out(model, ids, mask))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(outs[1], text_out(model.eval(), ids, mask), atol=1e-3)


def test_hf_attention_function_grouped_query_and_2d_padding():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    keep = torch.ones(2, 6, dtype=torch.long)
    keep[1, 4:] = 0
    module = torch.nn.Module()
    out, weights = hf_attention_forward(module, q, k, v, keep, scaling=0.4)
    mask = keep.bool()[:, None, None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=mask, scale=0.4)
    assert weights is None and out.shape == (2, 5, 4, 8)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="softcap"):
        hf_attention_forward(module, q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, Lk\]"):
        hf_attention_forward(module, q, k, v, keep[:, :5])


def test_clip_vision_mmcl_fast_attention_equals_eager():
    ref = clip("eager")
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation("mmcl_fast")
    px = images()
    assert_same_outputs_and_grads(ours, ref, lambda m: m(pixel_values=px).last_hidden_state)


# -- shared keys --------------------------------------------------------------------------------------
def _shared_models(patch_vision=True):
    text, image = bert("sdpa"), clip("eager")
    before = {k: v.clone() for k, v in text.state_dict().items()}
    banks = make_banks(2, H, 20, D, init_std=0.5)
    patch_bert(text, 2, banks)
    if patch_vision:
        patch_clip_vision(image, 2, banks)
    return text, image, banks, before


def test_shared_key_patch_keeps_weights_and_gradients_reach_the_bank_from_both_streams():
    text, image, banks, before = _shared_models()
    after = text.state_dict()
    new = set(after) - set(before)
    assert set(before) <= set(after)
    assert new == {f"encoder.layer.{i}.attention.self.{n}" for i in (1, 2) for n in ("bank.key", "attn_bias.text")}
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    layer = text.encoder.layer[2].attention.self
    assert layer.attn_bias["text"].shape == (H, 20, 20)  # max_position_embeddings capped at the bank's slots
    assert clip_layers(image)[2].self_attn.attn_bias["vision"].shape == (H, N_IMG, N_IMG)
    ids, mask = text_batch()
    t = text_out(text, ids, mask)
    assert torch.isfinite(t).all()
    _loss(t).backward()
    g_text = [b.key.grad.clone() for b in banks]
    assert all(g[:, :9].abs().sum() > 0 for g in g_text) and all((g[:, 9:] == 0).all() for g in g_text)
    assert layer.key.weight.grad is None  # the key projection is unused
    banks.zero_grad()
    v = image(pixel_values=images()).last_hidden_state
    assert torch.isfinite(v).all()
    _loss(v).backward()
    assert all(b.key.grad[:, :N_IMG].abs().sum() > 0 for b in banks)
    assert clip_layers(image)[2].self_attn.k_proj.weight.grad is None


def test_bank_gets_no_gradient_from_a_stream_that_is_not_patched():
    text, image, banks, _ = _shared_models(patch_vision=False)
    _loss(image(pixel_values=images()).last_hidden_state).backward()
    assert all(b.key.grad is None for b in banks)
    ids, mask = text_batch()
    _loss(text_out(text, ids, mask)).backward()
    assert all(b.key.grad.abs().sum() > 0 for b in banks)


def test_timm_shared_key_patch():
    model = vit()
    banks = make_banks(2, H, N_IMG, D, init_std=0.5)
    ref = model(images()).detach()
    patch_timm_vit(model, 2, banks)
    with torch.no_grad():
        model.blocks[2].attn.attn_bias["vision"].normal_()
    out = model(images())
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    _loss(out).backward()
    assert all(b.key.grad.abs().sum() > 0 for b in banks)
    assert model.blocks[2].attn.attn_bias["vision"].grad.abs().sum() > 0
    assert model.blocks[2].attn.qkv.weight.grad[HID:2 * HID].abs().sum() == 0  # k rows unused
    assert model.blocks[2].attn.qkv.weight.grad[:HID].abs().sum() > 0


def test_unpatch_restores_the_original_modules_and_trained_weights():
    ref = bert("eager")
    model = copy.deepcopy(ref)
    patch_bert(model, 3, make_banks(3, H, 9, D))
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight.add_(1.0)  # "training"
    assert unpatch(model) == 3
    assert type(model.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert torch.equal(model.encoder.layer[0].attention.self.query.weight,
                       ref.encoder.layer[0].attention.self.query.weight + 1.0)
    assert not shared_key_layers(model)


# -- distillation on patched models -----------------------------------------------------------------------
def test_distillation_on_patched_models():
    text, image, banks, _ = _shared_models()
    student = torch.nn.ModuleDict({"text": text, "vision": image})
    teacher = copy.deepcopy(student).eval()
    ids, mask = text_batch()
    px = images()

    def forward(m):
        return text_out(m["text"], ids, mask), m["vision"](pixel_values=px).last_hidden_state

    with record_attention_maps(teacher) as maps, torch.no_grad():
        forward(teacher)
    names = {(f"text.encoder.layer.{i}.attention.self", "text") for i in (1, 2)}
    names |= {("vision." + clip_path(image, i), "vision") for i in (1, 2)}
    assert set(maps) == names
    for (_, modality), (w, u) in maps.items():
        shape = (3, H, 9) if modality == "text" else (2, H, N_IMG)
        assert w.shape == shape and u.shape == shape
        if modality == "text":  # padded tokens hold 0
            assert (w[2, :, 3:] == 0).all() and (w[2, :, :3] != 0).all()
    with attention_distillation(student, maps) as distill:
        forward(student)
    assert len(distill) == 4 and distill.loss().item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        banks[0].key.add_(torch.randn_like(banks[0].key))
    with attention_distillation(student, maps, pool="both") as distill:
        forward(student)
    loss = distill.loss()
    assert loss.item() > 1e-3 and set(distill.by_modality()) == {"text", "vision"}
    loss.backward()
    assert banks[0].key.grad.abs().sum() > 0


# -- bad input ------------------------------------------------------------------------------------------------
def test_patch_errors_are_clear():
    model = bert()
    with pytest.raises(ValueError, match="banks has 1 SharedKeyBank"):
        patch_bert(model, 2, make_banks(1, H, 9, D))
    with pytest.raises(ValueError, match="bank has num_heads=2"):
        patch_bert(model, 1, [SharedKeyBank(2, 9, 32)])
    with pytest.raises(TypeError, match=r"banks\[0\] must be a SharedKeyBank"):
        patch_bert(model, 1, [torch.zeros(4, 9, 16)])
    with pytest.raises(ValueError, match="layers=4: the model has 3 layers"):
        patch_bert(model, 4)
    with pytest.raises(ValueError, match="layer index 3 is out of range"):
        patch_bert(model, [0, 3])
    with pytest.raises(ValueError, match="without duplicates"):
        patch_bert(model, [1, -2])
    assert not shared_key_layers(model)  # nothing was changed by the failed calls
    patch_bert(model, [2])
    with pytest.raises(ValueError, match="layer 2 is already patched"):
        patch_bert(model, 1)
    with pytest.raises(TypeError, match="patch_bert needs a transformers BertModel"):
        patch_bert(clip(), 1)
    with pytest.raises(TypeError, match="patch_clip_vision needs"):
        patch_clip_vision(bert(), 1)
    with pytest.raises(TypeError, match="patch_timm_vit needs a timm VisionTransformer"):
        patch_timm_vit(bert(), 1)
    with pytest.raises(NotImplementedError, match="is_decoder"):
        patch_bert(bert(is_decoder=True), 1)


def test_runtime_errors_of_patched_layers_are_clear():
    model = bert("eager")
    patch_bert(model, 1, make_banks(1, H, 6, D))
    ids, mask = text_batch()
    with pytest.raises(ValueError, match="sequence length 9 exceeds the bank's num_slots=6"):
        model(input_ids=ids, attention_mask=mask)
    layer = patch_bert(bert("eager"), 1)[0]
    x = torch.randn(2, 5, HID)
    with pytest.raises(ValueError, match="attention_mask covers"):
        layer(x, attention_mask=torch.ones(2, 6))
    with pytest.raises(TypeError, match="attention_mask: shared-key layers need a tensor mask"):
        layer(x, attention_mask=[1, 1, 1, 1, 1])
    assert isinstance(layer, SharedKeyAttention)
