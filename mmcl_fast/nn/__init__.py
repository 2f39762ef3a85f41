"""Modules built on the op families, and their integration into Hugging Face / timm models.

Op family C (embedding modulation, MoFot): MultimodalKGE (a KG embedding with frozen feature
modalities fused by modulated_embedding, interpolated projections), its scores, losses and queries
(mmcl_fast.nn.kge).

Op family B (shared-key attention, MSPT): SharedKeyBank, SharedKeyAttention, the distillation
contexts (record_attention_maps, attention_distillation) and the patching helpers of
mmcl_fast.nn.patching (transformers and timm are imported only when those helpers run).
"""
from .patching import (
    HF_ATTENTION_NAME,
    hf_attention_forward,
    hf_attention_mask,
    make_banks,
    patch_bert,
    patch_clip_vision,
    patch_timm_vit,
    register_hf_attention,
    unpatch,
    use_fused_attention_timm,
)
from .kge import FeatureSource, MultimodalKGE, compose_query, kge_loss, score_triples
from .shared_key_attention import (
    AttentionMaps,
    DistillLosses,
    SharedKeyAttention,
    SharedKeyBank,
    attention_distillation,
    record_attention_maps,
    shared_key_layers,
)

__all__ = [
    "FeatureSource",
    "MultimodalKGE",
    "compose_query",
    "kge_loss",
    "score_triples",
    "SharedKeyBank",
    "SharedKeyAttention",
    "AttentionMaps",
    "DistillLosses",
    "record_attention_maps",
    "attention_distillation",
    "shared_key_layers",
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
