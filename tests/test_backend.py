"""Backend discovery, the user's overrides, and the build."""
import os
import subprocess
import sys

import pytest
import torch

import mmcl_fast
from mmcl_fast.backend import choose_backend, forced_backend

CPU = torch.device("cpu")


def test_available_backends_lists_all_with_reasons():
    av = mmcl_fast.available_backends()
    assert list(av) == ["reference", "cpu", "cuda", "triton"]
    assert av["reference"]
    for name, st in av.items():
        assert st.name == name and isinstance(st.reason, str) and st.reason
    if not torch.cuda.is_available():
        assert not av["cuda"]


@pytest.mark.skipif(os.environ.get("MMCL_FAST_EXPECT_EXTENSION") != "1", reason="set MMCL_FAST_EXPECT_EXTENSION=1 where the install must have compiled mmcl_fast._C")
def test_the_install_compiled_the_extension():
    assert mmcl_fast.available_backends()["cpu"], mmcl_fast.available_backends()["cpu"].reason
    for op in ("modality_adamw_", "modality_sgd_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmcl_fast::{op}", "CPU")


def test_automatic_choice_on_cpu():
    expect = "cpu" if mmcl_fast.available_backends()["cpu"] else "reference"
    assert choose_backend("x", CPU, torch.float32) == expect
    # float16 on the CPU: only the reference serves it
    assert choose_backend("x", CPU, torch.float16) == "reference"
    # non-contiguous tensors go to the reference
    assert choose_backend("x", CPU, torch.float32, contiguous=False) == "reference"


def test_override_precedence(monkeypatch):
    monkeypatch.setenv("MMCL_FAST_BACKEND", "reference")
    assert forced_backend() == "reference"
    mmcl_fast.set_backend("cpu")
    assert forced_backend() == "cpu"
    with mmcl_fast.use_backend("triton"):
        assert forced_backend() == "triton"
        with mmcl_fast.use_backend(None):
            assert forced_backend() is None
        assert forced_backend() == "triton"
    assert forced_backend() == "cpu"
    mmcl_fast.set_backend(None)
    assert forced_backend() == "reference"
    monkeypatch.setenv("MMCL_FAST_BACKEND", "auto")
    assert forced_backend() is None


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        mmcl_fast.set_backend("gpu")
    with pytest.raises(ValueError, match="backend"):
        with mmcl_fast.use_backend("fast"):
            pass
    monkeypatch.setenv("MMCL_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="MMCL_FAST_BACKEND"):
        forced_backend()


def test_forced_backend_that_cannot_serve_raises():
    with mmcl_fast.use_backend("cuda"):
        with pytest.raises(mmcl_fast.BackendUnavailableError, match="cuda"):
            choose_backend("op", CPU, torch.float32)
    with mmcl_fast.use_backend("reference"):
        assert choose_backend("op", CPU, torch.float32) == "reference"
    if mmcl_fast.available_backends()["cpu"]:
        with mmcl_fast.use_backend("cpu"):
            with pytest.raises(mmcl_fast.BackendUnavailableError, match="float16"):
                choose_backend("op", CPU, torch.float16)


def test_package_works_without_the_extension():
    code = (
        "import torch, mmcl_fast\n"
        "av = mmcl_fast.available_backends()\n"
        "assert not av['cpu'] and 'MMCL_FAST_NO_EXT' in av['cpu'].reason, av['cpu']\n"
        "lin = torch.nn.Linear(3, 2)\n"
        "opt = mmcl_fast.optim.ModalityAdamW([{'params': lin.parameters(), 'modality': 'a'}], lr=0.1)\n"
        "lin(torch.ones(4, 3)).sum().backward()\n"
        "w = lin.weight.detach().clone()\n"
        "opt.step(coefficients=torch.tensor([0.5]))\n"
        "assert not torch.equal(w, lin.weight)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, MMCL_FAST_NO_EXT="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
