"""Which backends exist, which one runs an op, and why: the one place that decides.

Backends:
  reference  plain PyTorch, the executable spec; always there, any device, any float dtype
  cpu        the C++ kernels of mmcl_fast._C; CPU tensors, float32/float64
  cuda       the CUDA kernels of mmcl_fast._C; CUDA tensors, float32/float16/bfloat16
  triton     the Triton kernels of mmcl_fast.kernels; CUDA tensors, or CPU tensors when
             TRITON_INTERPRET=1 (testing only: float32/float16)

Choice, in order: the innermost `use_backend(...)`, then `set_backend(...)`, then the environment
variable MMCL_FAST_BACKEND, then automatic (CUDA tensors: the op's preferred GPU backend, then the
other, then reference; CPU tensors: cpu, then reference). A forced backend that cannot serve the
inputs raises BackendUnavailableError with the reason; it never falls back silently.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import threading
from typing import Iterator, Mapping, Optional, Sequence

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "MMCL_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for (forced) but cannot serve the given tensors."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here; `reason` says why not (or what it runs on)."""

    name: str
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


_state = threading.local()
_global_choice: Optional[str] = None


@functools.lru_cache(maxsize=None)
def _extension():
    """(module or None, error text)."""
    if os.environ.get("MMCL_FAST_NO_EXT", "0") in ("1", "true"):
        return None, "disabled by MMCL_FAST_NO_EXT=1"
    try:
        return importlib.import_module("mmcl_fast._C"), ""
    except ImportError as exc:  # not built, or built against another torch
        return None, f"mmcl_fast._C did not import: {exc}"


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"mmcl_fast::{op}", key)
    except RuntimeError:
        return False


def _has_compiled_op(op: str) -> bool:
    if torch.compiler.is_compiling():
        return _has_compiled_op_constant(op)
    return extension_loaded() and hasattr(torch.ops.mmcl_fast, op)


@torch.compiler.assume_constant_result
def _has_compiled_op_constant(op: str) -> bool:
    return extension_loaded() and hasattr(torch.ops.mmcl_fast, op)


def extension_loaded() -> bool:
    return _extension()[0] is not None


def compiled_with_cuda() -> bool:
    return extension_loaded() and _has_kernel("modality_adamw_", "CUDA")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
        return f"triton did not import: {exc!r}"
    return ""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> Mapping[str, BackendStatus]:
    """Every backend with whether it can run here and, when not, why."""
    out = {"reference": BackendStatus("reference", True, "plain PyTorch (always available)")}
    ext, err = _extension()
    out["cpu"] = (
        BackendStatus("cpu", True, "C++ kernels of mmcl_fast._C")
        if ext is not None
        else BackendStatus("cpu", False, f"extension not built: {err}")
    )
    if ext is None:
        out["cuda"] = BackendStatus("cuda", False, f"extension not built: {err}")
    elif not compiled_with_cuda():
        out["cuda"] = BackendStatus(
            "cuda", False, "mmcl_fast._C was built without CUDA kernels (no CUDA torch or no nvcc)"
        )
    elif not torch.cuda.is_available():
        out["cuda"] = BackendStatus("cuda", False, "no GPU: torch.cuda.is_available() is False")
    else:
        out["cuda"] = BackendStatus("cuda", True, "CUDA kernels of mmcl_fast._C")
    terr = _triton_import_error()
    if terr:
        out["triton"] = BackendStatus("triton", False, terr)
    elif torch.cuda.is_available():
        out["triton"] = BackendStatus("triton", True, "Triton kernels on the GPU")
    elif triton_interpreting():
        out["triton"] = BackendStatus(
            "triton", True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; for testing)"
        )
    else:
        out["triton"] = BackendStatus(
            "triton", False, "no GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
        )
    return out


def _check_name(name: Optional[str]) -> Optional[str]:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force `name` for every op from now on (None: back to automatic / MMCL_FAST_BACKEND)."""
    global _global_choice
    _global_choice = _check_name(name)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force `name` inside the `with` block (this thread only); None means automatic."""
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(_check_name(name))
    try:
        yield
    finally:
        stack.pop()


def forced_backend() -> Optional[str]:
    """The backend the user forced, if any (context manager, then set_backend, then env var)."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_choice is not None:
        return _global_choice
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS} or 'auto', got {env!r}")
    return env


_DTYPES = {
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
}


def why_not(name: str, device: torch.device, dtype: torch.dtype, contiguous: bool = True) -> str:
    """Empty when backend `name` can run an op on tensors of this device and dtype, else why."""
    if torch.compiler.is_compiling():
        # what the machine can run is a constant of the process: torch.compile takes it as one
        # (the import and dispatcher queries behind it cannot be traced)
        return _why_not_constant(name, device.type, dtype, contiguous)
    return _why_not(name, device, dtype, contiguous)


@torch.compiler.assume_constant_result
def _why_not_constant(name: str, device_type: str, dtype: torch.dtype, contiguous: bool) -> str:
    return _why_not(name, torch.device(device_type), dtype, contiguous)


def _why_not(name: str, device: torch.device, dtype: torch.dtype, contiguous: bool) -> str:
    status = available_backends()[name]
    if not status:
        return f"backend {name!r} is unavailable: {status.reason}"
    if name == "cpu" and device.type != "cpu":
        return f"backend 'cpu' runs CPU tensors, got {device.type}"
    if name == "cuda" and device.type != "cuda":
        return f"backend 'cuda' runs CUDA tensors, got {device.type}"
    if name == "triton":
        if device.type == "cpu" and not triton_interpreting():
            return "backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' runs CUDA tensors, got {device.type}"
        if device.type == "cpu" and dtype == torch.bfloat16:
            return "backend 'triton' under the interpreter supports float32/float16, not bfloat16"
    if dtype not in _DTYPES[name]:
        names = ", ".join(str(d).replace("torch.", "") for d in _DTYPES[name])
        return f"backend {name!r} supports {names}, got {str(dtype).replace('torch.', '')}"
    if name != "reference" and not contiguous:
        return f"backend {name!r} needs contiguous tensors"
    return ""


def choose_backend(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    contiguous: bool = True,
    gpu_preference: Sequence[str] = ("cuda", "triton"),
    compiled_op: Optional[str] = None,
) -> str:
    """The backend that runs `op` on these tensors (see the module docstring for the order).
    `compiled_op`: the mmcl_fast._C op the cpu and cuda backends call (an extension built before
    that op existed cannot serve it)."""

    def reason(name: str) -> str:
        why = why_not(name, device, dtype, contiguous)
        if not why and compiled_op is not None and name in ("cpu", "cuda") and not _has_compiled_op(compiled_op):
            why = f"mmcl_fast._C has no op {compiled_op!r} (built from older sources: rebuild it)"
        return why

    forced = forced_backend()
    if forced is not None:
        why = reason(forced)
        if why:
            raise BackendUnavailableError(f"mmcl_fast.{op}: {why}")
        return forced
    order = list(gpu_preference) if device.type == "cuda" else ["cpu"]
    for name in order + ["reference"]:
        if not reason(name):
            return name
    raise TypeError(f"mmcl_fast.{op}: no backend supports dtype {dtype} on {device}")
