"""The public ops of mmcl_fast, one module per op family."""
from .modality_step import (
    modality_adamw_,
    modality_scores,
    modality_sgd_,
    modulation_coefficients,
    philox_normal,
    split_head_logits,
)
from .shared_key_attention import (
    asymmetric_relu_distance,
    pooled_attention_maps,
    shared_key_attention,
    shared_key_attention_distill,
)

__all__ = [
    "modality_scores",
    "modulation_coefficients",
    "split_head_logits",
    "modality_adamw_",
    "modality_sgd_",
    "philox_normal",
    "shared_key_attention",
    "shared_key_attention_distill",
    "pooled_attention_maps",
    "asymmetric_relu_distance",
]
