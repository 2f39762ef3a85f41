
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
