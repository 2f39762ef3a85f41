"""Modules of op family B (DESIGN.md 5, 8.1): a shared key bank, shared-key attention, and the
plumbing of MSPT's attention distillation.

    bank = SharedKeyBank(num_heads=4, num_slots=80, head_dim=16)      # one per shared layer
    text_attn = SharedKeyAttention(64, 4, bank, max_len=80, modality="text")
    image_attn = SharedKeyAttention(64, 4, bank, max_len=50, modality="vision")

A stream of length L attends with the keys ``bank.key[:, :L]`` (no key projection) and its own
learned bias ``[H, L, L]`` (the first L rows and columns of its ``[H, max_len, max_len]`` bias):

    S = scale q k_bank^T + bias  (padded keys excluded),  out = out_proj(softmax(S) v)

Distillation (the teacher is a frozen copy of the model after the previous task):

    with record_attention_maps(teacher) as maps, torch.no_grad():
        teacher(batch)
    with attention_distillation(student, maps, pool="width") as distill:
        out = student(batch)
    loss = task_loss(out) + gamma * distill.loss()     # sum over modalities of the mean over layers

The contexts find every SharedKeyAttention (including the patched Hugging Face / timm layers of
mmcl_fast.nn.patching) inside the model and name it by its path in the model, so teacher and
student (a deepcopy) match layer by layer.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .. import ops as _ops

_ska = importlib.import_module("mmcl_fast.ops.shared_key_attention")

__all__ = [
    "SharedKeyBank",
    "SharedKeyAttention",
    "AttentionMaps",
    "DistillLosses",
    "record_attention_maps",
    "attention_distillation",
    "shared_key_layers",
]

LayerKey = Tuple[str, str]  # (path of the layer in the model, modality)


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]" if isinstance(t, torch.Tensor) else type(t).__name__


# -- the bank ----------------------------------------------------------------------------------
class SharedKeyBank(nn.Module):
    """A learnable key bank ``key [num_heads, num_slots, head_dim]`` shared by several attention
    layers or streams (MSPT: one bank per shared layer, used by both the text and the vision
    stream). A stream of length L uses the first L slots, ``bank(L) = key[:, :L]``.

    Initialised N(0, init_std^2) truncated at 2 std (0.02: the BERT / ViT convention, so that a
    freshly patched layer starts close to uniform attention and learns its keys)."""

    def __init__(self, num_heads: int, num_slots: int, head_dim: int, *, init_std: float = 0.02,
                 device=None, dtype=None):
        super().__init__()
        for name, val in (("num_heads", num_heads), ("num_slots", num_slots), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not (isinstance(init_std, (int, float)) and math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"init_std must be a finite number >= 0, got {init_std!r}")
        self.num_heads, self.num_slots, self.head_dim = num_heads, num_slots, head_dim
        self.init_std = float(init_std)
        self.key = nn.Parameter(torch.empty(num_heads, num_slots, head_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init_std == 0:
                self.key.zero_()
            else:
                nn.init.trunc_normal_(self.key, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)

    def forward(self, length: int) -> torch.Tensor:
        """The keys of a stream of `length` tokens: ``key[:, :length]``, [H, length, D]."""
        if isinstance(length, torch.Tensor):
            length = int(length)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if length > self.num_slots:
            raise ValueError(f"sequence length {length} exceeds the bank's num_slots={self.num_slots}: "
                             "make the SharedKeyBank with at least as many slots as the longest stream")
        return self.key[:, :length]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_slots={self.num_slots}, head_dim={self.head_dim}"


# -- the distillation plumbing -----------------------------------------------------------------
class AttentionMaps(dict):
    """The teacher's pooled maps, ``{(layer path, modality): (width [B, H, L], height [B, H, L])}``
    (detached), recorded in `space` ("scores" or "probs")."""

    def __init__(self, space: str):
        super().__init__()
        self.space = space


class DistillLosses:
    """The per-layer distillation losses of a student forward, ``losses[(layer path, modality)]``
    (float32 scalars with gradients), and their reduction."""

    REDUCTIONS = ("mean", "sum")

    def __init__(self):
        self.losses: Dict[LayerKey, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.losses)

    def by_modality(self, layers: str = "mean") -> Dict[str, torch.Tensor]:
        """``{modality: mean (or sum) over that modality's layers}``."""
        if layers not in self.REDUCTIONS:
            raise ValueError(f"layers must be one of {self.REDUCTIONS}, got {layers!r}")
        groups: Dict[str, list] = {}
        for (_, modality), loss in self.losses.items():
            groups.setdefault(modality, []).append(loss)
        red = torch.mean if layers == "mean" else torch.sum
        return {m: red(torch.stack(v)) for m, v in groups.items()}

    def loss(self, layers: str = "mean", modalities: str = "sum") -> torch.Tensor:
        """The total: by default MSPT's ``sum over streams of the mean over layers``."""
        if modalities not in self.REDUCTIONS:
            raise ValueError(f"modalities must be one of {self.REDUCTIONS}, got {modalities!r}")
        if not self.losses:
            raise RuntimeError("no shared-key attention layer ran under attention_distillation(): "
                               "run the student's forward inside the `with` block, on the model given to it")
        per = torch.stack(list(self.by_modality(layers).values()))
        return per.sum() if modalities == "sum" else per.mean()


class _Recorder:
    kind = "record"

    def __init__(self, maps: AttentionMaps):
        self.maps = maps

    def record(self, key: LayerKey, q, k, bias, kpm, scale) -> None:
        if key in self.maps:
            raise RuntimeError(f"layer {key[0]!r} ({key[1]}) ran twice under record_attention_maps(); "
                               "record one forward per context")
        with torch.no_grad():
            w, u = _ops.pooled_attention_maps(q, k, bias=bias, key_padding_mask=kpm, query_padding_mask=kpm,
                                              scale=scale, space=self.maps.space)
        self.maps[key] = (w.detach(), u.detach())


class _Distiller:
    kind = "distill"

    def __init__(self, maps: AttentionMaps, losses: DistillLosses, pool: str, normalize: bool):
        self.maps, self.out, self.space, self.pool, self.normalize = maps, losses, maps.space, pool, normalize

    def teacher(self, key: LayerKey):
        try:
            return self.maps[key]
        except KeyError:
            raise KeyError(f"no teacher maps for layer {key[0]!r} ({key[1]}): the teacher maps hold "
                           f"{sorted(self.maps)}; record them on a copy of this model with the same patched "
                           "layers and modalities") from None

    def add(self, key: LayerKey, loss) -> None:
        if key in self.out.losses:
            raise RuntimeError(f"layer {key[0]!r} ({key[1]}) ran twice under attention_distillation(); "
                               "one student forward per context")
        self.out.losses[key] = loss


class _LayerHook:
    __slots__ = ("state", "name")

    def __init__(self, state, name):
        self.state, self.name = state, name


def shared_key_layers(model) -> Dict[str, "SharedKeyAttention"]:
    """``{path: module}`` of every SharedKeyAttention in `model` (an nn.Module, or a mapping
    ``{prefix: nn.Module}`` for several streams)."""
    if isinstance(model, nn.Module):
        items = [("", model)]
    elif isinstance(model, Mapping):
        items = list(model.items())
        for prefix, m in items:
            if not isinstance(prefix, str) or not isinstance(m, nn.Module):
                raise TypeError("model must be an nn.Module or a mapping {str: nn.Module}, got an entry "
                                f"{prefix!r}: {type(m).__name__}")
    else:
        raise TypeError(f"model must be an nn.Module or a mapping {{str: nn.Module}}, got {type(model).__name__}")
    out: Dict[str, SharedKeyAttention] = {}
    for prefix, m in items:
        for name, mod in m.named_modules():
            if isinstance(mod, SharedKeyAttention):
                path = ".".join(p for p in (prefix, name) if p)
                out[path] = mod
    return out


@contextlib.contextmanager
def _hooked(model, state, what: str):
    layers = shared_key_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no SharedKeyAttention layer (patch it first, "
                         "e.g. mmcl_fast.nn.patch_bert)")
    saved = {path: mod._mmcl_hook for path, mod in layers.items()}
    try:
        for path, mod in layers.items():
            mod._mmcl_hook = _LayerHook(state, path)
        yield
    finally:
        for path, mod in layers.items():
            mod._mmcl_hook = saved[path]


@contextlib.contextmanager
def record_attention_maps(model, *, space: str = "scores") -> Iterator[AttentionMaps]:
    """The teacher's side: every SharedKeyAttention of `model` that runs inside the block records
    ``pooled_attention_maps`` of its q, keys, bias and padding mask (in no_grad, detached), keyed
    by ``(layer path, modality)``. Run one teacher forward per block."""
    if space not in _ska.SPACES:
        raise ValueError(f"space must be one of {_ska.SPACES}, got {space!r}")
    maps = AttentionMaps(space)
    with _hooked(model, _Recorder(maps), "record_attention_maps"):
        yield maps


@contextlib.contextmanager
def attention_distillation(model, teacher_maps: AttentionMaps, *, pool: str = "width",
                           normalize: bool = True) -> Iterator[DistillLosses]:
    """The student's side: every SharedKeyAttention of `model` that runs inside the block computes
    its output and its asymmetric ReLU distillation loss against ``teacher_maps`` (from
    record_attention_maps, whose space it uses) in one call of
    ``mmcl_fast.ops.shared_key_attention_distill``; the yielded DistillLosses collects them."""
    if not isinstance(teacher_maps, AttentionMaps):
        raise TypeError("teacher_maps must be the AttentionMaps yielded by record_attention_maps(), got "
                        f"{type(teacher_maps).__name__}")
    _ska._check_space_pool(teacher_maps.space, pool)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    losses = DistillLosses()
    with _hooked(model, _Distiller(teacher_maps, losses, pool, normalize), "attention_distillation"):
        yield losses


# -- the module --------------------------------------------------------------------------------
class SharedKeyAttention(nn.Module):
    """Drop-in self-attention with keys from a shared bank (MSPT):

        q = q_proj(x), v = v_proj(x)            [B, H, L, D]
        k = bank(L)                             [H, L, D]   (no key projection)
        S = scale q k^T + bias[m][:, :L, :L]    (padded keys: excluded)
        out = out_proj(merge_heads(dropout(softmax(S)) v))      [B, L, hidden]

    Args:
        hidden_size, num_heads: as in any multi-head attention (head_dim = hidden_size / num_heads).
        bank: the SharedKeyBank (registered as a submodule: several modules share it), or None for
            ordinary self-keys from a key projection ``k_proj``.
        max_len: the per-modality learnable bias ``[H, max_len, max_len]`` (zeros at init): an int
            (one bias, for `modality`), a mapping ``{modality: max_len}`` (one module serving
            several streams), or None (no learned bias).
        modality: the default modality of forward() (and its bias when max_len is an int).
        dropout: dropout on the attention probabilities P in training, inside the fused op
            (mmcl_fast.ops.shared_key_attention's dropout_p; the mask is drawn from torch's
            generator, so torch.manual_seed makes a step repeatable). The distillation loss is
            of the undropped maps.
        qkv_bias: biases of the q / v (/ k) projections. out_proj: False for no output projection.
        scale: default 1/sqrt(head_dim).

    forward(hidden_states [B, L, hidden], key_padding_mask [B, L] bool (True = padded) or None,
    modality=None) -> [B, L, hidden]. Under attention_distillation() it also adds its loss.
    """

    def __init__(self, hidden_size: int, num_heads: int, bank: Optional[SharedKeyBank] = None,
                 max_len: Union[int, Mapping[str, int], None] = None, *, modality: str = "default",
                 dropout: float = 0.0, qkv_bias: bool = True, out_proj: bool = True,
                 scale: Optional[float] = None, device=None, dtype=None):
        super().__init__()
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        dd = dict(device=device, dtype=dtype)
        self._setup(num_heads, hidden_size // num_heads, bank, max_len, modality, scale, **dd)
        self.hidden_size = hidden_size
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias, **dd)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias, **dd) if bank is None else None
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias, **dd)
        self.out_proj = nn.Linear(hidden_size, hidden_size, **dd) if out_proj else None
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.attn_dropout = nn.Dropout(float(dropout))

    # -- shared set-up (also used by the patched HF / timm layers) --
    def _setup(self, num_heads, head_dim, bank, max_len, modality, scale, device=None, dtype=None):
        if not isinstance(modality, str) or not modality:
            raise ValueError(f"modality must be a non-empty str, got {modality!r}")
        if bank is not None:
            if not isinstance(bank, SharedKeyBank):
                raise TypeError(f"bank must be a SharedKeyBank or None, got {type(bank).__name__}")
            if bank.num_heads != num_heads or bank.head_dim != head_dim:
                raise ValueError(f"bank has num_heads={bank.num_heads}, head_dim={bank.head_dim}; this attention "
                                 f"needs num_heads={num_heads}, head_dim={head_dim}")
        if scale is not None:
            if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
                raise ValueError(f"scale must be a finite number or None, got {scale!r}")
            scale = float(scale)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.modality = modality
        self.bank = bank
        if max_len is None:
            lens = {}
        elif isinstance(max_len, Mapping):
            lens = dict(max_len)
        else:
            lens = {modality: max_len}
        for m, n in lens.items():
            if not isinstance(m, str) or not m:
                raise ValueError(f"max_len keys must be modality names (non-empty str), got {m!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"max_len must be a positive int (or a mapping modality -> positive int), got {n!r}"
                                 + (f" for modality {m!r}" if isinstance(max_len, Mapping) else ""))
        if lens and modality not in lens:
            self.modality = next(iter(lens))
        self.attn_bias = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(num_heads, n, n, device=device, dtype=dtype)) for m, n in lens.items()})
        self._mmcl_hook = None

    def max_len(self, modality: Optional[str] = None) -> Optional[int]:
        m = self.modality if modality is None else modality
        return self.attn_bias[m].shape[-1] if m in self.attn_bias else None

    # -- overridable pieces --
    def _project(self, x):
        """(q, k or None, v), each [B, H, L, D] (k is None when the keys come from the bank)."""
        B, L, _ = x.shape
        split = lambda t: t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        k = None if self.bank is not None else split(self.k_proj(x))
        return split(self.q_proj(x)), k, split(self.v_proj(x))

    def _transform_keys(self, k):
        return k

    def _merge(self, o, x):
        B, L = x.shape[:2]
        o = o.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return o if self.out_proj is None else self.out_proj(o)

    def _dropout_p(self) -> float:
        return self.attn_dropout.p

    # -- the core --
    def _bias(self, L: int, modality: str):
        if not len(self.attn_bias):
            return None
        if modality not in self.attn_bias:
            raise ValueError(f"modality {modality!r} has no bias in this layer; it has {list(self.attn_bias)}")
        b = self.attn_bias[modality]
        if L > b.shape[-1]:
            raise ValueError(f"sequence length {L} exceeds max_len={b.shape[-1]} of modality {modality!r}: "
                             "make the layer with a larger max_len")
        return b[:, :L, :L]

    def _attention(self, x, key_padding_mask, modality, extra_bias=None):
        """[B, H, L, D]: projections, keys, bias (+ `extra_bias`, a mask that is not a padding
        mask, [B|1, H, L, L]), attention, and the distillation hook."""
        L = x.shape[1]
        q, k, v = self._project(x)
        k = self._transform_keys(self.bank(L) if k is None else k)
        bias = self._bias(L, modality)
        if extra_bias is not None:
            bias = extra_bias.to(q.dtype) if bias is None else bias + extra_bias.to(q.dtype)
        kpm = key_padding_mask
        p = self._dropout_p() if self.training else 0.0
        hook = self._mmcl_hook
        if hook is not None:
            if extra_bias is not None:
                raise NotImplementedError(
                    "attention maps are recorded / distilled with key padding masks only; this layer got a "
                    "general attention mask (or is_causal), which the pooled maps would sum over")
            key = (hook.name, modality)
            state = hook.state
            if state.kind == "record":
                state.record(key, q, k, bias, kpm, self.scale)
            else:
                tw, th = state.teacher(key)
                out, loss = _ops.shared_key_attention_distill(
                    q, k, v, teacher_width=tw, teacher_height=th, bias=bias, key_padding_mask=kpm,
                    query_padding_mask=kpm, scale=self.scale, space=state.space, pool=state.pool,
                    normalize=state.normalize, dropout_p=p)
                state.add(key, loss)
                return out
        return _ops.shared_key_attention(q, k, v, bias=bias, key_padding_mask=kpm, scale=self.scale, dropout_p=p)

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                modality: Optional[str] = None) -> torch.Tensor:
        x = hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [B, L, hidden_size={self.hidden_size}], got {_shape(x)}")
        if not x.is_floating_point():
            raise TypeError(f"hidden_states must be a floating-point tensor, got {x.dtype}")
        B, L = x.shape[:2]
        if L == 0 or B == 0:
            raise ValueError(f"hidden_states is empty: {_shape(x)}")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor [B, L] (True = padded), got "
                                + (str(key_padding_mask.dtype) if isinstance(key_padding_mask, torch.Tensor)
                                   else type(key_padding_mask).__name__))
            if tuple(key_padding_mask.shape) != (B, L):
                raise ValueError(f"key_padding_mask must be [B, L] = [{B}, {L}], got {_shape(key_padding_mask)}")
        if modality is not None and not isinstance(modality, str):
            raise TypeError(f"modality must be a str or None, got {type(modality).__name__}")
        modality = self.modality if modality is None else modality
        return self._merge(self._attention(x, key_padding_mask, modality), x)

    def extra_repr(self) -> str:
        biases = {m: b.shape[-1] for m, b in self.attn_bias.items()}
        keys = "bank" if self.bank is not None else "self"
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, keys={keys}, max_len={biases}, "
                f"modality={self.modality!r}, dropout={self._dropout_p()}")
