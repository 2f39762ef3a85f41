"""The public ops of mmcl_fast, one module per op family."""
from .modality_step import (
    modality_adamw_,
    modality_scores,
    modality_sgd_,
    modulation_coefficients,
    philox_normal,
    split_head_logits,
)

__all__ = [
    "modality_scores",
    "modulation_coefficients",
    "split_head_logits",
    "modality_adamw_",
    "modality_sgd_",
    "philox_normal",
]
