"""Triton kernels of mmcl_fast, installed as mmcl_fast.kernels (one module per op family)."""
