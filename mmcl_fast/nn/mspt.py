"""MSPT's two-stream model (DESIGN.md 8.1): a text stream and a vision stream whose last `L_M`
layers use shared-key attention (one SharedKeyBank per layer, shared by both streams, and a bias
per stream), with a relation head or a CRF tagging head on the fused features.

- Text stream: a transformers `BertModel` (pretrained all-MiniLM-L6-v2 by default, any local BERT
  directory, or one built from a config).
- Vision stream (`TokenVisionEncoder`): frozen patch tokens (EfficientNet-Lite0's 7x7 map, 1280
  channels) projected to the text stream's width, a learned [CLS] token in front, then a small
  BERT-geometry transformer encoder built from a config (no pretrained ViT ships offline). Its heads
  and head size equal the text stream's, so that the two can share key banks. Or
  (`PixelVisionEncoder`) a transformers CLIPVisionModel on the pixels, from a user's local weights
  or a config.
- Heads: relation extraction on [vision CLS; text CLS]; NER per word (the word's first sub-token)
  on [text token; vision CLS], with a linear-chain CRF (pytorch-crf) decoded only when evaluating.

The streams are patched by `mmcl_fast.nn.patch_bert`, so training uses the fused shared-key
attention (op family B) and distillation runs through `attention_distillation`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .patching import make_banks, patch_bert

NER_TYPES = ("PER", "LOC", "ORG", "MISC")
NER_TAGS = ("O",) + tuple(f"{p}-{t}" for t in NER_TYPES for p in ("B", "I"))


def _bert_config(hidden: int, heads: int, layers: int, max_positions: int, vocab: int, dropout: float):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=4 * hidden, max_position_embeddings=max_positions, type_vocab_size=1,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def _bert(config):
    from transformers import BertModel

    # eager attention in the unpatched layers: identical numbers on every machine, and the patched
    # layers run the fused op whatever this says
    return BertModel(config, add_pooling_layer=False)


class TokenVisionEncoder(nn.Module):
    """Frozen patch tokens [B, P, in_dim] -> states [B, 1 + P, hidden] (position 0: a learned CLS),
    through a trainable projection and a small BERT-geometry encoder."""

    def __init__(self, in_dim: int, hidden: int, heads: int, layers: int, num_tokens: int, dropout: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.trunc_normal_(self.cls, std=0.02)
        self.encoder = _bert(_bert_config(hidden, heads, layers, num_tokens + 1, 1, dropout))
        # inputs come as embeddings: the one-row word table is never read
        self.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        self.num_positions = num_tokens + 1

    @property
    def geometry(self) -> tuple[int, int, int]:
        c = self.encoder.config
        return c.num_attention_heads, c.hidden_size, c.num_hidden_layers

    def patch(self, layers: int, banks, max_len: int) -> list:
        return patch_bert(self.encoder, layers=layers, banks=banks, max_len=max_len, modality="vision")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj(tokens.to(self.proj.weight.dtype))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        return self.encoder(inputs_embeds=x).last_hidden_state


# CLIP's pixel normalisation (openai/clip-vit-base-patch32's preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PixelVisionEncoder(nn.Module):
    """A transformers CLIPVisionModel on pixels: uint8 images [B, 3, S, S] -> states [B, 1 + P,
    hidden] (position 0: CLIP's class token), normalised here with CLIP's mean and std."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.num_positions = getattr(model, "vision_model", model).embeddings.num_positions  # flat in transformers 5
        self.image_size = model.config.image_size

    @property
    def geometry(self) -> tuple[int, int, int]:
        c = self.encoder.config
        return c.num_attention_heads, c.hidden_size, c.num_hidden_layers

    def patch(self, layers: int, banks, max_len: int) -> list:
        from .patching import patch_clip_vision

        return patch_clip_vision(self.encoder, layers=layers, banks=banks, max_len=max_len, modality="vision")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.to(self.mean.dtype) / 255.0 - self.mean) / self.std
        return self.encoder(pixel_values=x).last_hidden_state


class MSPTModel(nn.Module):
    """The two streams, their shared key banks and the task head.

    `kind` "re": logits [B, C] over relations; "ner": emissions [B, W, C] over NER_TAGS per word
    (and a `crf`). `forward` returns (logits, (first-modality features, second-modality features))
    in the head's concatenation order, `modalities`, for split_head_logits."""

    def __init__(self, text: nn.Module, vision: nn.Module, kind: str, num_labels: int, *,
                 shared_layers: int = 3, shared_keys: bool = True, text_len: int = 64):
        super().__init__()
        if kind not in ("re", "ner"):
            raise ValueError(f"kind must be 're' or 'ner', got {kind!r}")
        cfg = text.config
        heads, hidden = cfg.num_attention_heads, cfg.hidden_size
        v_heads, v_hidden, v_layers = vision.geometry
        if (v_heads, v_hidden) != (heads, hidden):
            raise ValueError(f"the vision stream has {v_heads} heads in width {v_hidden}; the text stream {heads} "
                             f"in {hidden}: the streams share keys and a fused head, so they need the same")
        vision_len = vision.num_positions
        layers = min(cfg.num_hidden_layers, v_layers)
        if not 1 <= shared_layers <= layers:
            raise ValueError(f"shared_layers must be in [1, {layers}] (the shallower stream's depth), got {shared_layers}")
        self.kind = kind
        # the banks first: named_parameters() names a shared bank "banks.<i>.key" (not after a stream)
        self.banks = make_banks(shared_layers, heads, max(text_len, vision_len), hidden // heads) if shared_keys else None
        self.text = text
        self.vision = vision
        patched = patch_bert(self.text, layers=shared_layers, banks=self.banks, max_len=text_len, modality="text")
        patched += self.vision.patch(shared_layers, self.banks, vision_len)
        if shared_keys:
            # a patched layer keeps its key projection (same state-dict names) but reads the bank
            for layer in patched:
                for name in ("key", "k_proj"):
                    if isinstance(getattr(layer, name, None), nn.Module):
                        getattr(layer, name).requires_grad_(False)
        self.modalities = ("vision", "text") if kind == "re" else ("text", "vision")
        self.head = nn.Linear(2 * hidden, num_labels)
        self.crf = None
        if kind == "ner":
            from torchcrf import CRF

            self.crf = CRF(num_labels, batch_first=True)

    def forward(self, input_ids, attention_mask, image, word_index=None):
        text = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        vis_cls = self.vision(image)[:, 0]
        if self.kind == "re":
            feats = (vis_cls, text[:, 0])
            return self.head(torch.cat(feats, 1)), feats
        # one position per word: its first sub-token (padding words read position 0, masked later)
        idx = word_index.clamp_min(0)
        words = text.gather(1, idx.unsqueeze(-1).expand(-1, -1, text.shape[-1]))
        vis = vis_cls.unsqueeze(1).expand(-1, words.shape[1], -1)
        return self.head(torch.cat([words, vis], -1)), (words, vis)


def freeze_text(model: nn.Module, embeddings: bool, train_layers: int) -> None:
    """Freeze the text stream's word embeddings and all but its last `train_layers` layers (0: all
    layers train)."""
    if embeddings:
        model.embeddings.requires_grad_(False)
    layers = model.encoder.layer
    if train_layers and train_layers < len(layers):
        for layer in layers[: len(layers) - train_layers]:
            layer.requires_grad_(False)


def allowed_tags(seen_types: Sequence[str]) -> torch.Tensor:
    """[len(NER_TAGS)] bool: O and the B-/I- tags of the types seen."""
    return torch.tensor([t == "O" or t[2:] in seen_types for t in NER_TAGS], dtype=torch.bool)


__all__ = ["MSPTModel", "NER_TAGS", "NER_TYPES", "PixelVisionEncoder", "TokenVisionEncoder", "allowed_tags",
           "freeze_text"]
