"""Optimizers built on op family A."""
from .modality import ModalityAdamW, ModalitySGD, param_groups_by_modality

__all__ = ["ModalityAdamW", "ModalitySGD", "param_groups_by_modality"]
