"""The public ops of mmcl_fast, one module per op family."""
from .modality_step import (
    modality_adamw_,
    modality_adamw_rows_,
    modality_scores,
    modality_sgd_,
    modulation_coefficients,
    philox_normal,
    split_head_logits,
)
from .filtered_rank import build_filter, filtered_rank, filtered_rank_counts, rank_metrics
from .kge_scores import kge_scores
from .modulated_embedding import anchor_penalty, interpolate_weights, modulated_embedding
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
    "modality_adamw_rows_",
    "modality_sgd_",
    "philox_normal",
    "shared_key_attention",
    "shared_key_attention_distill",
    "pooled_attention_maps",
    "asymmetric_relu_distance",
    "modulated_embedding",
    "interpolate_weights",
    "anchor_penalty",
    "filtered_rank",
    "filtered_rank_counts",
    "rank_metrics",
    "build_filter",
    "kge_scores",
]
