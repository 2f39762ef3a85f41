"""Optimizers built on op family A."""
