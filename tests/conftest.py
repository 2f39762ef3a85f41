import os

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


# -- small data sets in MNRE's and Twitter-2017's own layouts (MSPT) --------------------------------
MNRE_RELATIONS = ("/per/loc/born_in", "/loc/loc/part_of", "/org/loc/based_in", "/per/org/member_of",
                  "/misc/loc/made_in", "/per/per/peer")
NER_WORDS = {"PER": ["Ada", "Lovelace"], "LOC": ["Paris"], "ORG": ["United", "Nations"], "MISC": ["Olympics"]}


def _fixture_images(folder, names):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i, name in enumerate(names):
        img = Image.new("RGB", (40, 30), colours[i % len(colours)])
        img.paste((255, 255, 255), (5 + 3 * i, 5, 15 + 3 * i, 20))
        img.save(os.path.join(folder, name))


def write_mnre_fixture(root, per_relation=(4, 2, 2), none=(6, 3, 3)):
    """A tiny MNRE folder (ours_rel2id.json, txt/ours_{train,val,test}.txt, img_org/<split>/):
    `per_relation` (train, val, test) lines per relation, `none` lines of None. Returns root."""
    import json

    root = str(root)
    rel2id = {"None": 0, **{r: i + 1 for i, r in enumerate(MNRE_RELATIONS)}}
    os.makedirs(os.path.join(root, "txt"), exist_ok=True)
    with open(os.path.join(root, "ours_rel2id.json"), "w") as f:
        json.dump(rel2id, f)
    images = ["a.jpg", "b.jpg", "c.jpg"]
    for s, split in enumerate(("train", "val", "test")):
        lines = []
        for r, rel in enumerate(("None",) + MNRE_RELATIONS):
            n = none[s] if rel == "None" else per_relation[s]
            for k in range(n):
                words = ["word%d" % (r + k), "Alice", "met", "the", "thing%d" % r, "in", "Rome", "today"]
                lines.append({"token": words, "h": {"name": "Alice", "pos": [1, 2]},
                              "t": {"name": "Rome", "pos": [6, 7]}, "img_id": images[(r + k) % 3], "relation": rel})
        with open(os.path.join(root, "txt", f"ours_{'val' if split == 'val' else split}.txt"), "w") as f:
            for i, line in enumerate(lines):  # the released files are Python literals: mix both forms
                f.write((repr(line) if i % 2 else json.dumps(line)) + "\n")
        _fixture_images(os.path.join(root, "img_org", split), images)
    return root


def write_twitter_fixture(root, sizes=(16, 6, 8)):
    """A tiny Twitter-2017 folder (train.txt, valid.txt, test.txt) with its images in
    <root>/../twitter2017_images. Sentence k mentions the types TYPES[k % 4] and, every third one,
    TYPES[(k + 1) % 4]. Returns (root, images)."""
    root = str(root)
    images = os.path.join(os.path.dirname(root.rstrip("/")), "twitter2017_images")
    os.makedirs(root, exist_ok=True)
    types = ("PER", "LOC", "ORG", "MISC")
    for split, n in zip(("train", "valid", "test"), sizes):
        blocks = []
        for k in range(n):
            # every fifth sentence is longer, so tasks pad to different widths
            words, tags = ["RT", "today"] + ["so"] * (4 * (k % 5 == 4)), ["O", "O"] + ["O"] * (4 * (k % 5 == 4))
            for j, ty in enumerate([types[k % 4]] + ([types[(k + 1) % 4]] if k % 3 == 0 else [])):
                ws = NER_WORDS[ty]
                words += ws + ["and"]
                tags += [f"B-{ty}"] + [f"I-{ty}"] * (len(ws) - 1) + ["O"]
            blocks.append(f"IMGID:{split}{k % 3}\n" + "".join(f"{w}\t{t}\n" for w, t in zip(words, tags)))
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(blocks))
        _fixture_images(images, [f"{split}{i}.jpg" for i in range(3)])
    return root, images
