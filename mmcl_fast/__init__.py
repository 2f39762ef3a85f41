"""mmcl_fast: accelerated kernels and training core for multimodal continual learning."""
from ._version import __version__
from .backend import (
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    set_backend,
    use_backend,
)
from . import nn, ops, optim  # noqa: E402

__all__ = [
    "__version__",
    "available_backends",
    "set_backend",
    "use_backend",
    "BackendStatus",
    "BackendUnavailableError",
    "nn",
    "ops",
    "optim",
]
