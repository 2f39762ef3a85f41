
import pytest
import torch

import mmcl_fast
from mmcl_fast.backend import why_not


def cpu_backends():
    """Backends that can run CPU tensors here: reference always; cpu when built; triton under
    TRITON_INTERPRET=1. Missing ones are still listed, and skipped with the reason."""
    out = []
    for name in ("reference", "cpu", "triton"):
        reason = why_not(name, torch.device("cpu"), torch.float32)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, mmcl_fast {mmcl_fast.__version__}"]
    for name, st in mmcl_fast.available_backends().items():
        lines.append(f"  backend {name:9s} {'yes' if st else 'no '}  {st.reason}")
    return lines


@pytest.fixture(autouse=True)
def _reset_backend_choice():
    mmcl_fast.set_backend(None)
    yield
    mmcl_fast.set_backend(None)


# -- helpers the op-family test files share ---------------------------------------------------------
GPU = torch.cuda.is_available()


def gpu_backends():
    """cuda and triton, each skipped (with the reason) where there is no GPU."""
    return [pytest.param(b, marks=pytest.mark.skipif(not GPU, reason="no GPU"), id=b) for b in ("cuda", "triton")]


def skip_unless(backend, device=torch.device("cpu"), dtype=torch.float32):
    reason = why_not(backend, torch.device(device), dtype)
    if reason:
        pytest.skip(reason)


def assert_close(a, b, tol, what):
    """max |a - b| <= tol * max(1, max |b|), both finite and of one shape (a relative bound that
    does not blow up near zero)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    if a.numel() == 0:
        return
    err = (a.double() - b.double()).abs().max().item()
    scale = max(1.0, b.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a gloo process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
