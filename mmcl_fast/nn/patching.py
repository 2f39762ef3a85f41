"""Shared-key attention inside Hugging Face and timm models, and the fused op as an ordinary
attention implementation (DESIGN.md 5.2, 8.1). transformers and timm are optional: nothing here
imports them until a function that needs them is called.

Shared keys (MSPT): the chosen layers' self-attention is replaced by a SharedKeyAttention that
reuses the layer's own q / v / output weights (same submodules, same state-dict names; the key
projection stays, unused) with keys from a SharedKeyBank and a learned per-modality bias:

    banks = make_banks(3, num_heads=12, num_slots=80, head_dim=64)   # one per shared layer
    patch_bert(text_model, layers=3, banks=banks, max_len=80)         # the last 3 layers
    patch_clip_vision(image_model, layers=3, banks=banks)             # the same 3 banks
    ... train ...;  unpatch(text_model)  # back to the original modules (with the trained weights)

With ``banks=None`` the patched layers keep their own keys (and, with bias=False, compute exactly
what the original layer computes): distillation then runs on ordinary attention.

Fused attention only (same outputs as eager / sdpa):

    register_hf_attention()                     # "mmcl_fast" in transformers' AttentionInterface
    model.set_attn_implementation("mmcl_fast")  # or BertModel._from_config(config, attn_implementation=...)
    use_fused_attention_timm(vit)               # every timm Attention of the ViT
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops as _ops
from .shared_key_attention import SharedKeyAttention, SharedKeyBank

__all__ = [
    "make_banks",
    "patch_bert",
    "patch_clip_vision",
    "patch_timm_vit",
    "use_fused_attention_timm",
    "unpatch",
    "register_hf_attention",
    "hf_attention_forward",
    "hf_attention_mask",
    "HF_ATTENTION_NAME",
]

HF_ATTENTION_NAME = "mmcl_fast"
Layers = Union[int, Sequence[int], None]


def make_banks(num_layers: int, num_heads: int, num_slots: int, head_dim: int, *, init_std: float = 0.02,
               device=None, dtype=None) -> nn.ModuleList:
    """`num_layers` SharedKeyBanks (one per shared layer index), to give to the patch_* functions
    of every stream that shares them (``banks[j]`` goes to the j-th patched layer)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    return nn.ModuleList([SharedKeyBank(num_heads, num_slots, head_dim, init_std=init_std, device=device, dtype=dtype)
                          for _ in range(num_layers)])


# -- masks ---------------------------------------------------------------------------------------
def _is_key_padding_4d(mask: torch.Tensor) -> bool:
    """A [B, 1, Lq, Lk] mask whose rows are one row broadcast (size or stride 0 along Lq): a pure
    key padding mask. Decided from the layout, without reading the values (no host sync)."""
    return mask.dim() == 4 and mask.shape[1] == 1 and (mask.shape[2] == 1 or mask.stride(2) == 0)


def _padding_from_mask(mask, B: int, L: int, name: str) -> Optional[torch.Tensor]:
    """A key padding mask [B, L] (True = padded) from the mask a patched layer receives, taken as a
    padding mask: None; 2-D [B, L] (HF convention, nonzero / True = keep); 4-D [B|1, 1, Lq, L] bool
    (True = attend, sdpa convention) or float (additive: negative = masked), read from its first
    query row (HF builds an encoder's mask from the padding alone, so every row is the same)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: shared-key layers need a tensor mask (attn_implementation 'eager', 'sdpa' or "
                        f"'{HF_ATTENTION_NAME}'), got {type(mask).__name__}")
    if mask.dim() == 2:
        kpm = ~mask if mask.dtype == torch.bool else mask == 0
    elif mask.dim() == 4:
        row = mask[:, 0, 0, :]
        kpm = ~row if mask.dtype == torch.bool else row < 0
    else:
        raise ValueError(f"{name} must be a padding mask [B, L] or [B, 1, Lq, L], got "
                         f"[{', '.join(map(str, mask.shape))}]")
    if kpm.shape[-1] != L or kpm.shape[0] not in (1, B):
        raise ValueError(f"{name} covers [{', '.join(map(str, kpm.shape))}] keys, expected [{B}, {L}]")
    return kpm.expand(B, L)


def _mask_to_inputs(mask, B: int, H: int, Lq: int, Lk: int, dtype, device, name: str, hf_2d: bool):
    """(key_padding_mask, bias) for the fused op from an sdpa-convention mask (bool: True = attend;
    float: additive; broadcastable to [B, H, Lq, Lk]) or, when `hf_2d`, an HF 2-D padding mask
    [B, Lk] (nonzero / True = keep). A bool [B|1, 1, Lq|1, Lk] mask with one row broadcast over the
    queries becomes a key padding mask; anything else a float bias [B|1, H, Lq, Lk] (masked: the
    dtype's minimum, as in HF's eager masks)."""
    if mask is None:
        return None, None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(mask).__name__}")
    if hf_2d and mask.dim() == 2:
        if tuple(mask.shape) != (B, Lk):
            raise ValueError(f"{name} must be [B, Lk] = [{B}, {Lk}] when 2-D, got [{', '.join(map(str, mask.shape))}]")
        return (~mask if mask.dtype == torch.bool else mask == 0), None
    if mask.dim() > 4:
        raise ValueError(f"{name} must broadcast to [B, H, Lq, Lk], got {mask.dim()}-D")
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask[..., :Lk]
    try:
        torch.broadcast_shapes(tuple(mask.shape), (B, H, Lq, Lk))
    except RuntimeError:
        raise ValueError(f"{name} [{', '.join(map(str, mask.shape))}] does not broadcast to [B, H, Lq, Lk] = "
                         f"[{B}, {H}, {Lq}, {Lk}]") from None
    if mask.dtype == torch.bool:
        if _is_key_padding_4d(mask):
            return (~mask[:, 0, 0, :]).expand(B, Lk), None
        bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    else:
        bias = mask.to(dtype)
    return None, bias.expand(bias.shape[0], H, Lq, Lk)


def _causal_bias(Lq: int, Lk: int, dtype, device):
    """[Lq, Lk]: 0 on and below the diagonal, the dtype's minimum above (sdpa's is_causal)."""
    keep = torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril()
    return torch.zeros(Lq, Lk, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


# -- the transformers AttentionInterface ---------------------------------------------------------
def hf_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function (the signature of sdpa_attention_forward) running
    mmcl_fast.ops.shared_key_attention. query [B, H, Lq, D], key / value [B, Hkv, Lk, D];
    returns (out [B, Lq, H, D], None). A pure padding mask becomes the op's key_padding_mask, any
    other mask a float bias; dropout > 0 (training) is dropout on P inside the op (its mask is
    not the one eager attention draws for the same seed)."""
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"the '{HF_ATTENTION_NAME}' attention does not support {unsupported}")
    H, Hkv = query.shape[1], key.shape[1]
    if Hkv != H:  # grouped-query attention
        if H % Hkv:
            raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hkv})")
        key = key.repeat_interleave(H // Hkv, dim=1)
        value = value.repeat_interleave(H // Hkv, dim=1)
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    kpm, bias = _mask_to_inputs(attention_mask, B, H, Lq, Lk, query.dtype, query.device, "attention_mask", True)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    if attention_mask is None and is_causal and Lq > 1:
        bias = _causal_bias(Lq, Lk, query.dtype, query.device).expand(1, H, Lq, Lk)
    out = _ops.shared_key_attention(query, key, value, bias=bias, key_padding_mask=kpm, scale=scaling,
                                    dropout_p=float(dropout or 0.0))
    return out.transpose(1, 2).contiguous(), None


def hf_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                      mask_function=None, attention_mask=None, **kwargs):
    """transformers mask function for the '{name}' attention: a bidirectional mask with padding
    only is returned as its padding row broadcast over the queries (bool [B, 1, Lq, Lk], True =
    attend, stride 0 along Lq), which hf_attention_forward turns into a key padding mask; every
    other pattern is sdpa's bool mask, materialised (never skipped for causal masks)."""
    from transformers import masking_utils as mu

    if mask_function is mu.bidirectional_mask_function and isinstance(kv_offset, int):
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            return None
        return padding[:, kv_offset:kv_offset + kv_length][:, None, None, :].expand(batch_size, 1, q_length, kv_length)
    kwargs["allow_is_causal_skip"] = False
    if mask_function is None:
        mask_function = mu.causal_mask_function
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


hf_attention_mask.__doc__ = hf_attention_mask.__doc__.replace("{name}", HF_ATTENTION_NAME)


def register_hf_attention(name: str = HF_ATTENTION_NAME) -> str:
    """Registers the fused attention as `name` in transformers' AttentionInterface (and its mask
    function in AttentionMaskInterface), so that ``model.set_attn_implementation(name)``,
    ``Model._from_config(config, attn_implementation=name)``, ``Model.from_pretrained(path,
    attn_implementation=name)`` and ``config._attn_implementation = name`` work (transformers 5's
    ``Model(config)`` takes no attn_implementation argument). Idempotent; returns `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, hf_attention_forward)
    AttentionMaskInterface.register(name, hf_attention_mask)
    return name


# -- patched layers --------------------------------------------------------------------------------
class _PatchedAttention(SharedKeyAttention):
    """A SharedKeyAttention that reuses an existing attention module's submodules under their own
    names (so the state dict keeps its keys); the original module is kept (not as a submodule)
    for unpatch()."""

    def __init__(self, original: nn.Module, *, num_heads, head_dim, bank, max_len, modality, scale):
        nn.Module.__init__(self)
        self._setup(num_heads, head_dim, bank, max_len, modality, scale,
                    device=_param_device(original), dtype=_param_dtype(original))
        self.hidden_size = num_heads * head_dim
        object.__setattr__(self, "_original", original)

    def forward(self, *args, **kwargs):  # pragma: no cover - every subclass defines it
        raise NotImplementedError


def _param_device(m):
    p = next(m.parameters(), None)
    return None if p is None else p.device


def _param_dtype(m):
    p = next(m.parameters(), None)
    return None if p is None else p.dtype


def _split_heads(t, B, L, D):
    return t.view(B, L, -1, D).transpose(1, 2)


class BertSharedKeyAttention(_PatchedAttention):
    """Replaces a transformers BertSelfAttention (submodules query, key, value, dropout); the
    output projection stays in BertSelfOutput. forward has BertSelfAttention's signature and
    returns (context [B, L, hidden], None)."""

    def __init__(self, original, bank, max_len, modality):
        super().__init__(original, num_heads=original.num_attention_heads, head_dim=original.attention_head_size,
                         bank=bank, max_len=max_len, modality=modality, scale=original.scaling)
        self.query, self.key, self.value, self.dropout = original.query, original.key, original.value, original.dropout
        self.config = original.config
        self.is_causal = False

    def _project(self, x):
        B, L, _ = x.shape
        k = None if self.bank is not None else _split_heads(self.key(x), B, L, self.head_dim)
        return _split_heads(self.query(x), B, L, self.head_dim), k, _split_heads(self.value(x), B, L, self.head_dim)

    def _merge(self, o, x):
        return o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)

    def _dropout_p(self):
        return self.dropout.p

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        if cache is not None or kwargs.get("past_key_values") is not None:
            raise NotImplementedError("shared-key BERT layers do not support a key/value cache")
        B, L = hidden_states.shape[:2]
        kpm = _padding_from_mask(attention_mask, B, L, "attention_mask")
        return self._merge(self._attention(hidden_states, kpm, self.modality), hidden_states), None


class CLIPSharedKeyAttention(_PatchedAttention):
    """Replaces a transformers CLIPAttention (submodules q_proj, k_proj, v_proj, out_proj).
    forward has CLIPAttention's signature and returns (out [B, L, hidden], None)."""

    def __init__(self, original, bank, max_len, modality):
        super().__init__(original, num_heads=original.num_heads, head_dim=original.head_dim, bank=bank,
                         max_len=max_len, modality=modality, scale=original.scale)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (original.q_proj, original.k_proj,
                                                                original.v_proj, original.out_proj)
        self.config = original.config
        self.embed_dim = original.embed_dim
        self.dropout = original.dropout  # a float, as in CLIPAttention
        self.is_causal = False

    def _dropout_p(self):
        return float(self.dropout)

    def forward(self, hidden_states, attention_mask=None, causal_attention_mask=None, **kwargs):
        if causal_attention_mask is not None:
            raise NotImplementedError("shared-key CLIP layers are for the vision tower (no causal mask)")
        B, L = hidden_states.shape[:2]
        kpm = _padding_from_mask(attention_mask, B, L, "attention_mask")
        return self._merge(self._attention(hidden_states, kpm, self.modality), hidden_states), None


class TimmSharedKeyAttention(_PatchedAttention):
    """Replaces a timm ``Attention`` (submodules qkv, q_norm, k_norm, attn_drop, norm, gate, proj,
    proj_drop): q and v are the q / v rows of the fused qkv weight (the k rows are skipped when
    the keys come from the bank), q_norm / k_norm apply to q and to the keys (bank keys included).
    forward(x, attn_mask=None, is_causal=False) -> [B, N, dim] as timm's. attn_mask: sdpa
    convention (bool True = attend, or additive float); a padding row broadcast over the queries
    ([B, 1, 1, N]) becomes a key padding mask, any other mask joins the bias."""

    def __init__(self, original, bank, max_len, modality):
        super().__init__(original, num_heads=original.num_heads, head_dim=original.head_dim, bank=bank,
                         max_len=max_len, modality=modality, scale=original.scale)
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
            setattr(self, name, getattr(original, name, None))
        self.attn_dim = original.num_heads * original.head_dim
        self.hidden_size = original.qkv.in_features

    def _project(self, x):
        B, N, _ = x.shape
        A, D = self.attn_dim, self.head_dim
        w, b = self.qkv.weight, self.qkv.bias
        if self.bank is None:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            return self.q_norm(q), self.k_norm(k), v
        q = F.linear(x, w[:A], None if b is None else b[:A])
        v = F.linear(x, w[2 * A:], None if b is None else b[2 * A:])
        return self.q_norm(_split_heads(q, B, N, D)), None, _split_heads(v, B, N, D)

    def _transform_keys(self, k):
        return k if self.bank is None else self.k_norm(k)

    def _merge(self, o, x):
        B, N = x.shape[:2]
        o = self.norm(o.transpose(1, 2).reshape(B, N, self.attn_dim))
        if self.gate is not None:
            o = o * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(o))

    def _dropout_p(self):
        return self.attn_drop.p

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        B, N = x.shape[:2]
        kpm, extra = _mask_to_inputs(attn_mask, B, self.num_heads, N, N, x.dtype, x.device, "attn_mask", False)
        if is_causal:
            causal = _causal_bias(N, N, x.dtype, x.device).expand(1, self.num_heads, N, N)
            extra = causal if extra is None else extra + causal
        return self._merge(self._attention(x, kpm, self.modality, extra), x)


# -- the patch functions -----------------------------------------------------------------------------
def _resolve_layers(layers: Layers, n: int) -> List[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, bool):
        raise TypeError(f"layers must be an int (the last n layers), a sequence of layer indices or None, "
                        f"got {layers!r}")
    if isinstance(layers, int):
        if not 1 <= layers <= n:
            raise ValueError(f"layers={layers}: the model has {n} layers, so the last 1..{n} can be patched")
        return list(range(n - layers, n))
    try:
        idx = list(layers)
    except TypeError:
        raise TypeError("layers must be an int, a sequence of layer indices or None, got "
                        f"{type(layers).__name__}") from None
    out = []
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise ValueError(f"layer index {i!r} is out of range for a model with {n} layers")
        out.append(i % n)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"layers must be non-empty and without duplicates, got {idx}")
    return out


def _resolve_banks(banks, count: int):
    if banks is None:
        return [None] * count
    if isinstance(banks, SharedKeyBank):
        banks = [banks]
    banks = list(banks)
    if len(banks) != count:
        raise ValueError(f"banks has {len(banks)} SharedKeyBank(s) for {count} patched layer(s): give one per layer "
                         "(banks[j] goes to the j-th patched layer)")
    for j, b in enumerate(banks):
        if not isinstance(b, SharedKeyBank):
            raise TypeError(f"banks[{j}] must be a SharedKeyBank, got {type(b).__name__}")
    return banks


def _max_len(max_len, default: int, bank, bias: bool):
    if not bias:
        return None
    n = default if max_len is None else max_len
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
    if bank is not None and max_len is None:
        n = min(n, bank.num_slots)
    return n


def _patch_layers(blocks, attr: str, layers: Layers, banks, make, check, default_len: int, max_len, bias: bool):
    idx = _resolve_layers(layers, len(blocks))
    banks = _resolve_banks(banks, len(idx))
    originals = []
    for i in idx:  # check every layer before changing any
        orig = getattr(blocks[i], attr)
        if isinstance(orig, SharedKeyAttention):
            raise ValueError(f"layer {i} is already patched (call unpatch(model) first)")
        check(orig, i)
        originals.append(orig)
    out = []
    for i, orig, bank in zip(idx, originals, banks):
        mod = make(orig, bank, _max_len(max_len, default_len, bank, bias))
        setattr(blocks[i], attr, mod)
        out.append(mod)
    return out


def _check_modality(modality):
    if not isinstance(modality, str) or not modality:
        raise ValueError(f"modality must be a non-empty str, got {modality!r}")


def patch_bert(model: nn.Module, layers: Layers = 3, banks=None, *, max_len: Optional[int] = None,
               bias: bool = True, modality: str = "text") -> List[BertSharedKeyAttention]:
    """Shared-key attention in the self-attention of `layers` (an int n: the last n; indices; None:
    all) of a transformers BertModel (or a model whose base_model is one). ``banks[j]`` (a
    SharedKeyBank) gives the keys of the j-th patched layer; None keeps the layers' own keys.
    `bias`: a learned bias [H, max_len, max_len] per layer (max_len defaults to the model's
    max_position_embeddings, capped at the bank's num_slots). The padding mask comes from the HF
    attention_mask (attn_implementation eager, sdpa or 'mmcl_fast'). Returns the new layers."""
    _check_modality(modality)
    base = getattr(model, "base_model", model)
    enc = getattr(base, "encoder", None)
    blocks = getattr(enc, "layer", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks) or not hasattr(blocks[0], "attention"):
        raise TypeError(f"patch_bert needs a transformers BertModel (encoder.layer[i].attention.self), got "
                        f"{type(model).__name__}")
    if getattr(base.config, "is_decoder", False):
        raise NotImplementedError("patch_bert supports encoder BERT models (config.is_decoder=False)")
    parents = [b.attention for b in blocks]

    def check(orig, i):
        for name in ("query", "key", "value", "num_attention_heads", "attention_head_size", "scaling", "dropout"):
            if not hasattr(orig, name):
                raise TypeError(f"layer {i}: {type(orig).__name__} is not a BertSelfAttention (no {name!r})")

    return _patch_layers(parents, "self", layers, banks,
                         lambda o, b, n: BertSharedKeyAttention(o, b, n, modality), check,
                         base.config.max_position_embeddings, max_len, bias)


def patch_clip_vision(model: nn.Module, layers: Layers = 3, banks=None, *, max_len: Optional[int] = None,
                      bias: bool = True, modality: str = "vision") -> List[CLIPSharedKeyAttention]:
    """As patch_bert, for the vision tower of a transformers CLIPVisionModel / CLIPModel (its
    encoder.layers[i].self_attn, under vision_model where there is one). max_len defaults to the
    number of positions (patches + class token)."""
    _check_modality(modality)
    vm = getattr(model, "vision_model", model)
    enc = getattr(vm, "encoder", None)
    blocks = getattr(enc, "layers", None)
    emb = getattr(vm, "embeddings", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks) or not hasattr(emb, "num_positions"):
        raise TypeError(f"patch_clip_vision needs a transformers CLIPVisionModel ([vision_model.]encoder.layers), got "
                        f"{type(model).__name__}")

    def check(orig, i):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale"):
            if not hasattr(orig, name):
                raise TypeError(f"layer {i}: {type(orig).__name__} is not a CLIPAttention (no {name!r})")

    return _patch_layers(blocks, "self_attn", layers, banks,
                         lambda o, b, n: CLIPSharedKeyAttention(o, b, n, modality), check,
                         emb.num_positions, max_len, bias)


def _timm_check(orig, i):
    from timm.layers import Attention

    if not isinstance(orig, Attention) or type(orig).forward is not Attention.forward:
        raise TypeError(f"layer {i}: only timm.layers.Attention is supported, got {type(orig).__name__}")


def _timm_blocks(model, fn):
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks) or not hasattr(blocks[0], "attn"):
        raise TypeError(f"{fn} needs a timm VisionTransformer (blocks[i].attn), got {type(model).__name__}")
    return blocks


def patch_timm_vit(model: nn.Module, layers: Layers = 3, banks=None, *, max_len: Optional[int] = None,
                   bias: bool = True, modality: str = "vision") -> List[TimmSharedKeyAttention]:
    """As patch_bert, for a timm VisionTransformer (blocks[i].attn, a timm Attention). max_len
    defaults to patch_embed.num_patches + num_prefix_tokens."""
    _check_modality(modality)
    blocks = _timm_blocks(model, "patch_timm_vit")
    default = None
    if hasattr(model, "patch_embed") and hasattr(model.patch_embed, "num_patches"):
        default = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 0)
    if bias and max_len is None and default is None:
        raise ValueError("max_len is needed: this model has no patch_embed.num_patches")
    return _patch_layers(blocks, "attn", layers, banks,
                         lambda o, b, n: TimmSharedKeyAttention(o, b, n, modality), _timm_check,
                         default or 1, max_len, bias)


def use_fused_attention_timm(model: nn.Module, layers: Layers = None) -> List[TimmSharedKeyAttention]:
    """The fused op as the attention of `layers` (default all) of a timm VisionTransformer, with
    the layers' own keys and no learned bias: the same outputs as timm's attention."""
    return patch_timm_vit(model, layers, None, bias=False)


def unpatch(model: nn.Module) -> int:
    """Puts the original attention modules back in place of every patched layer of `model` (their
    q / k / v / output weights are the same tensors, trained weights included; the banks and
    biases are dropped). Returns the number of layers restored."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            orig = getattr(child, "_original", None) if isinstance(child, _PatchedAttention) else None
            if orig is not None:
                setattr(parent, name, orig)
                count += 1
    return count
