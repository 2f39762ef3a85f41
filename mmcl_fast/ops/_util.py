"""Small helpers the op modules share: argument descriptions, the dtype kernels accumulate in,
whether the compiled extension has an op, and the data-dependent checks that need a host sync."""
from __future__ import annotations

import torch


def shape_str(t) -> str:
    """'[2, 3]' for a tensor, the type name for anything else (for error messages)."""
    if isinstance(t, torch.Tensor):
        return "[" + ", ".join(str(s) for s in t.shape) + "]"
    return type(t).__name__


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate (and return statistics) in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_op(name: str) -> bool:
    """Whether torch.ops.mmcl_fast has `name` (False for an extension built before it existed)."""
    try:
        getattr(torch.ops.mmcl_fast, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def checking_values() -> bool:
    """Data-dependent checks (index ranges, CSR order) read tensor values, a host sync. They run
    in eager mode; under torch.compile they are skipped (the kernels still refuse out-of-range
    ids: the C++ kernels raise, the CUDA kernels assert)."""
    return not torch.compiler.is_compiling()


def refuse_double_backward(ctx, op: str) -> None:
    """The backward kernels have no backward of their own: refuse create_graph=True (it would
    silently give zero second derivatives) instead of answering wrong."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ctx.saved_tensors):
        raise RuntimeError(f"mmcl_fast.{op}: the kernel backends are differentiable once; for "
                           "create_graph=True (double backward) use the reference backend")
