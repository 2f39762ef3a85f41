"""MoFot end to end: the scores and queries against formulas by hand, the method's ranking against
PyKEEN's RankBasedEvaluator on the same model, filter and candidates, the continual mechanics
(LKGE weights, interpolation, forgetting rates, the anchor inside the optimizer) against formulas
computed by hand, every strategy on real snapshots, resuming, and bad input."""
import json
import math

import numpy as np
import pytest
import torch

import mmcl_fast
from mmcl_fast.continual.experiment import run_experiment
from mmcl_fast.continual.link_prediction import link_prediction
from mmcl_fast.methods import get_method
from mmcl_fast.methods.mofot import STRATEGIES, MoFotConfig, lkge_weights, make_experiment
from mmcl_fast.nn.kge import (SCORES, FeatureSource, MultimodalKGE, compose_query, kge_loss,
                              score_triples)
from mmcl_fast.ops import anchor_penalty
from mmcl_fast.ops.filtered_rank import reference_scores

pykeen = pytest.importorskip("pykeen")


def fake_features(names, dims=(("text", 12), ("image", 9)), seed=0):
    """Random feature modalities (the image one missing for every third entity)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (name, d) in enumerate(dims):
        mask = torch.ones(len(names), dtype=torch.bool)
        if k:
            mask[::3] = False
        out[name] = FeatureSource(torch.randn(len(names), d, generator=g), mask)
    return out


@pytest.fixture(scope="module")
def tiny_snapshots():
    from mmcl_fast.methods.mofot import load_snapshots

    return load_snapshots(MoFotConfig(kg="umls", preset="tiny"))


def tiny_experiment(snaps, **kw):
    config = MoFotConfig(kg="umls", preset="tiny", modalities="none", **kw)
    return config, make_experiment(config, snapshots=snaps, features=fake_features(snaps.entities))


# -- scores and queries ------------------------------------------------------------------------------
def _c(x):
    h = x.shape[-1] // 2
    return torch.complex(x[..., :h].double(), x[..., h:].double())


@pytest.mark.parametrize("score", SCORES)
def test_scores_by_hand(score):
    g = torch.Generator().manual_seed(1)
    h, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    r = torch.randn(5, 4 if score == "rotate" else 8, generator=g)
    got = score_triples(h, r, t, score).double()
    if score == "transe_l1":
        want = -(h + r - t).double().abs().sum(1)
    elif score == "transe_l2":
        want = -((h + r - t).double() ** 2).sum(1).sqrt()
    elif score == "distmult":
        want = (h * r * t).double().sum(1)
    elif score == "complex":
        want = (_c(h) * _c(r) * _c(t).conj()).sum(1).real
    else:
        want = -(_c(h) * torch.exp(1j * r.double()) - _c(t)).abs().sum(1)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("side", ["head", "tail"])
def test_composed_query_ranks_like_the_score(score, side):
    """filtered_rank's score of (query, candidate) orders the candidates exactly as the triple score
    of the candidate in the predicted position does."""
    g = torch.Generator().manual_seed(2)
    E = torch.randn(30, 8, generator=g, dtype=torch.float64)
    r = torch.randn(4 if score == "rotate" else 8, generator=g, dtype=torch.float64)
    known = E[3]
    q = compose_query(known[None], r[None], score, side)
    got = reference_scores(q, E, score)[0]
    want = score_triples(known[None], r[None], E, score) if side == "tail" else score_triples(E, r[None], known[None], score)
    if score == "transe_l2":
        want = -want ** 2  # the kernels rank squared distances: the same order
    assert torch.allclose(got, want, atol=1e-9)


def test_losses_by_hand():
    pos = torch.tensor([-1.0, 2.0])
    neg = torch.tensor([[-3.0, 0.5], [1.0, 1.0]])
    got = kge_loss(pos, neg, "self_adversarial", margin=2.0, temperature=1.0)
    sig = torch.sigmoid
    w0 = torch.softmax(neg[0], 0)
    want0 = 0.5 * (-torch.log(sig(torch.tensor(1.0))) - (w0 * torch.log(sig(-2.0 - neg[0]))).sum())
    assert abs(float(got[0]) - float(want0)) < 1e-6
    m = kge_loss(pos, neg, "margin", margin=1.0)
    assert torch.allclose(m, torch.tensor([(0 + 2.5) / 2, (0.0 + 0.0) / 2]))


# -- ranking against PyKEEN's evaluator ------------------------------------------------------------------
class _PyKEENView(torch.nn.Module):
    """Our trained model as PyKEEN's evaluator sees a model: full score rows from score_triples
    (not from the composed queries our ranking uses)."""

    def __init__(self, entities, relations, score):
        super().__init__()
        self.E, self.R, self.score = entities, relations, score
        self.num_entities, self.num_relations = entities.shape[0], relations.shape[0]

    @property
    def device(self):
        return self.E.device

    def predict(self, hrt_batch, target, slice_size=None, mode=None, **kw):
        h, r, t = self.E[hrt_batch[:, 0]], self.R[hrt_batch[:, 1]], self.E[hrt_batch[:, 2]]
        if target == "tail":
            return score_triples(h[:, None], r[:, None], self.E[None], self.score)
        return score_triples(self.E[None], r[:, None], t[:, None], self.score)


@pytest.mark.parametrize("candidates", ["known", "snapshot"])
def test_ranking_equals_pykeen_evaluator(tiny_snapshots, candidates):
    from pykeen.evaluation import RankBasedEvaluator

    snaps = tiny_snapshots
    config, exp = tiny_experiment(snaps, candidates=candidates, strategy="finetune")
    method = exp.method
    method.setup(exp.stream)
    for task in list(exp.stream)[:2]:
        method.before_task(task)
        for epoch in range(config.epochs):
            for batch in method.train_batches(task, epoch):
                method.train_step(task, batch)
        method.after_task(task)
    E = method.model.entity_representations(snaps.num_entities)
    R = method.model.relation.weight.detach()
    view = _PyKEENView(E, R, config.score)
    for j in range(len(snaps)):  # a seen snapshot, and a future one
        now = max(method.trained, j)
        count = snaps[now].num_entities if candidates == "known" else snaps[j].num_entities
        ours = method.evaluate(exp.stream[j])
        known = snaps.known(now)
        known = known[(known[:, [0, 2]] < count).all(1)]  # facts about non-candidates filter nothing
        res = RankBasedEvaluator(filtered=True).evaluate(
            view, snaps[j].test, additional_filter_triples=[known], batch_size=64, use_tqdm=False,
            restrict_entities_to=list(range(count)))
        assert abs(ours["mrr"] - res.get_metric("both.realistic.inverse_harmonic_mean_rank")) < 1e-6
        for k in (1, 3, 10):
            assert abs(ours[f"hits@{k}"] - res.get_metric(f"both.realistic.hits_at_{k}")) < 1e-6


def test_link_prediction_bad_input():
    E, R = torch.randn(5, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="score must be one of"):
        link_prediction(E, R, torch.tensor([[0, 0, 1]]), torch.tensor([[0, 0, 1]]), "transh")
    with pytest.raises(ValueError, match="test must be"):
        link_prediction(E, R, torch.tensor([0, 0, 1]), torch.tensor([[0, 0, 1]]), "transe_l1")


# -- the continual mechanics by hand ------------------------------------------------------------------
def test_lkge_weights_by_hand():
    old = torch.tensor([[0, 0, 1], [0, 1, 2], [1, 0, 2]])
    new = torch.tensor([[0, 0, 3], [2, 1, 3], [2, 0, 3]])
    w = lkge_weights(old, new, (0, 2), 3)
    # entity 0: 2 old, 1 new; entity 1: 2 old, 0 new; entity 2: 2 old, 2 new
    assert torch.allclose(w, torch.tensor([2 / 3, 1.0, 0.5]))
    wr = lkge_weights(old, new, (1,), 2)
    assert torch.allclose(wr, torch.tensor([2 / 4, 1 / 2]))


def test_interpolation_by_hand():
    names = [f"e{i}" for i in range(6)]
    m = MultimodalKGE(6, 2, 8, "transe_l1", features=fake_features(names), interpolation=True)
    w0 = [w.detach().clone() for w in m.effective_projections()]
    for w, v in zip(w0, m._new_weights()):  # snapshot 1: sigma = ||W|| so W_eff = W
        assert torch.allclose(w, v.detach(), atol=1e-6)
    m.begin_snapshot(2)
    for a, b in zip(w0, m.effective_projections()):  # the switch leaves W_eff where it was
        assert torch.allclose(a, b.detach(), atol=1e-6)
    with torch.no_grad():
        m.proj["text_weight"].mul_(3.0).add_(0.1)
        m.sigma[0] = 0.7
    eff = m.effective_projections()[0].detach()
    new = m.proj["text_weight"].detach()
    want = 0.5 * w0[0] + 0.5 * 0.7 * new / new.norm()
    assert torch.allclose(eff, want, atol=1e-6)
    m.begin_snapshot(3)
    with torch.no_grad():
        m.proj["text_weight"].copy_(new)
        m.sigma[0] = 2.0
    want3 = (2 / 3) * want + (1 / 3) * 2.0 * new / new.norm()
    assert torch.allclose(m.effective_projections()[0].detach(), want3, atol=1e-6)


def test_forgetting_rates_and_strengths_by_hand(tiny_snapshots):
    snaps = tiny_snapshots
    config, exp = tiny_experiment(snaps, strategy="mofot")
    method = exp.method
    method.setup(exp.stream)
    method.before_task(exp.stream[0])
    method.after_task(exp.stream[0])
    method.before_task(exp.stream[1])
    m = method.model
    rows = method._drift_rows
    n_old = snaps[0].num_entities
    assert rows.numel() == n_old and int(rows.max()) < n_old
    with torch.no_grad():
        m.entity.weight[:n_old] *= 1.5  # structure rows of old entities: drift exactly 0.5
        w = m.effective_projections()
        # W_eff = (1 - 1/i) W_prev + (1/i) sigma W_new / ||W_new||: scaling W_prev and sigma scales it
        m.prev_text_weight.mul_(1.1)
        m.prev_text_bias.mul_(1.1)
        m.sigma[:2] *= 1.1
    assert torch.allclose(m.effective_projections()[0], 1.1 * w[0], atol=1e-5)
    method.after_epoch(exp.stream[1], 0)
    rates = method._last_rates
    assert abs(rates["structure"] - 0.5) < 1e-5
    assert abs(rates["text"] - 0.1) < 1e-5
    assert rates["image"] < 1e-6  # untouched
    mean = (0.5 + 0.1 + rates["image"]) / 3
    want = {"structure": min(4.0, 0.5 / mean), "text": max(0.25, 0.1 / mean), "image": 0.25}
    for k, v in want.items():
        assert abs(method.strengths[k] - v) < 1e-4, (k, method.strengths)
    groups = {g["name"]: g for g in method.opt.param_groups}
    assert abs(groups["entity.weight"]["anchor_lambda"] - config.reg_lambda * want["structure"]) < 1e-4
    gw = groups["gamma"]["anchor_weight"][0]
    assert torch.allclose(gw, torch.tensor([want["structure"], want["text"], want["image"]]), atol=1e-4)
    assert abs(float(groups["proj.text_weight"]["anchor_weight"][0]) - want["text"]) < 1e-4


def test_anchor_in_the_optimizer_equals_penalty_plus_adamw(tiny_snapshots):
    """LKGE's anchors ride in ModalityAdamW's step: one step equals torch AdamW on the loss plus
    reg_lambda * anchor_penalty (per-row LKGE weights) of the old entity and relation rows."""
    snaps = tiny_snapshots
    config, exp = tiny_experiment(snaps, strategy="lkge", sparse=False, reg_lambda=0.3)
    method = exp.method
    method.setup(exp.stream)
    t0, t1 = exp.stream[0], exp.stream[1]
    method.before_task(t0)
    for batch in method.train_batches(t0, 0):
        method.train_step(t0, batch)
    method.after_task(t0)
    method.before_task(t1)
    m = method.model
    with torch.no_grad():  # move the old rows away from their anchors so the term is non-zero
        m.entity.weight.add_(0.05)
        m.relation.weight.sub_(0.02)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    batch = next(iter(method.train_batches(t1, 0)))
    pos, neg, b, _ = batch
    groups = {g["name"]: g for g in method.opt.param_groups}
    ge, gr = groups["entity.weight"], groups["relation.weight"]
    # the oracle: a copy of the model, torch AdamW, the penalty by autograd
    ref = MultimodalKGE(snaps.num_entities, snaps.num_relations, config.dim, config.score,
                        features=method.features, sparse_grad=False)
    ref.load_state_dict(m.state_dict())
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    ps, ns = ref(pos, neg, config.negatives // 2)
    loss = kge_loss(ps, ns, config.loss, config.margin, config.adversarial_temperature).sum() / b
    n_e, n_r = ge["anchor"][0].shape[0], gr["anchor"][0].shape[0]
    loss = loss + anchor_penalty([ref.entity.weight[:n_e], ref.relation.weight[:n_r]],
                                 [ge["anchor"][0], gr["anchor"][0]], [ge["anchor_weight"][0], gr["anchor_weight"][0]],
                                 lam=0.3)
    opt.zero_grad()
    loss.backward()
    opt.step()
    method.train_step(t1, batch)
    moved = 0
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), n
        moved += int(not torch.equal(p, before[n]))
    assert moved >= 2


# -- strategies on real snapshots ----------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_and_scores(tmp_path, tiny_snapshots, strategy):
    config, exp = tiny_experiment(tiny_snapshots, strategy=strategy)
    out = run_experiment(exp, str(tmp_path), method_name="mofot", config={"strategy": strategy}, progress=False,
                         print_fn=None, plots=False)
    R = np.array([[np.nan if v is None else v for v in row] for row in out["result_matrix"]["matrix"]])
    assert np.isfinite(R).all() and (R > 0).all() and (R <= 1).all()
    assert out["metrics"]["fwt"] is not None and out["extra_metrics"]["hits@10"]["average"] > 0
    # trained on snapshot 0, it ranks snapshot 0 better than random does (1 / #candidates)
    assert R[0, 0] > 3.0 / tiny_snapshots[0].num_entities
    if strategy == "mofot":
        assert len(out["method_summary"]["forgetting_rates"]) == len(tiny_snapshots) - 1


def test_mofot_modulates_and_interpolates(tiny_snapshots):
    config, exp = tiny_experiment(tiny_snapshots, strategy="mofot")
    m = exp.method
    m.setup(exp.stream)
    assert m.model.interpolation and m.model.sigma.requires_grad
    _, ft = tiny_experiment(tiny_snapshots, strategy="finetune")
    ft.method.setup(ft.stream)
    assert not ft.method.model.interpolation


@pytest.mark.parametrize("strategy", ["ewc", "mofot"])
def test_resume_gives_the_same_matrix(tmp_path, tiny_snapshots, strategy):
    """Stopped after a snapshot and resumed: the matrix of a run that never stopped (the Fisher,
    W_prev, the interpolation's snapshot number and the generators ride in the checkpoint)."""
    config, exp = tiny_experiment(tiny_snapshots, strategy=strategy)
    full = run_experiment(exp, str(tmp_path / "full"), method_name="mofot", config={"k": 1}, progress=False,
                          print_fn=None, plots=False)
    _, exp2 = tiny_experiment(tiny_snapshots, strategy=strategy)
    run_experiment(exp2, str(tmp_path / "part"), method_name="mofot", config={"k": 1}, progress=False,
                   print_fn=None, plots=False, stop_after=0)
    _, exp3 = tiny_experiment(tiny_snapshots, strategy=strategy)
    resumed = run_experiment(exp3, str(tmp_path / "part"), method_name="mofot", config={"k": 1}, progress=False,
                             print_fn=None, plots=False)
    assert resumed["resumed_from_task"] == 1
    assert resumed["result_matrix"]["matrix"] == full["result_matrix"]["matrix"]


def test_backends_give_the_same_training(tiny_snapshots):
    """One snapshot on the reference backend and on the kernels: the same MRR to round-off."""
    if not mmcl_fast.available_backends()["cpu"]:
        pytest.skip("the C++ extension is not built")
    scores = []
    for backend in ("reference", "cpu"):
        _, exp = tiny_experiment(tiny_snapshots, strategy="mofot", sparse=False)
        with mmcl_fast.use_backend(backend):
            m = exp.method
            m.setup(exp.stream)
            t = exp.stream[0]
            m.before_task(t)
            for batch in m.train_batches(t, 0):
                m.train_step(t, batch)
            m.after_task(t)
            scores.append(m.evaluate(t)["mrr"])
    assert abs(scores[0] - scores[1]) < 1e-4


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,match", [
    ("strategy", "replay", "strategy"), ("score", "transh", "score"), ("growth", "time", "growth"),
    ("kg", "fb15k", "kg"), ("kg", "lkge:", "kg"), ("dim", "0", "dim"), ("lr", "nan", "lr"),
    ("features", "text", "features"), ("features", "a=x.npy,a=y.npy", "features"),
    ("features", "my.text=x.npy", "identifier"),
])
def test_bad_config(key, value, match):
    with pytest.raises(ValueError, match=match):
        get_method("mofot").make_config(overrides={key: value})


def test_complex_needs_even_dim():
    with pytest.raises(ValueError, match="dim"):
        MoFotConfig(score="complex", dim=33)


def test_feature_rows_and_nan_are_refused():
    with pytest.raises(ValueError, match="'text' has 4 rows, expected 5"):
        MultimodalKGE(5, 2, 8, features={"text": FeatureSource(torch.randn(4, 3))})
    bad = torch.randn(5, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        FeatureSource(bad)


def test_a_users_feature_matrix(tmp_path, tiny_snapshots):
    """features=name=path: rows in the stream's entity order; a wrong row count or a NaN is an error
    naming the file, before any training."""
    n = tiny_snapshots.num_entities
    good, short, nan = tmp_path / "good.npy", tmp_path / "short.npy", tmp_path / "nan.npy"
    np.save(good, np.random.default_rng(0).standard_normal((n, 6)).astype(np.float32))
    np.save(short, np.zeros((n - 1, 6), dtype=np.float32))
    bad = np.zeros((n, 6), dtype=np.float32)
    bad[3, 2] = np.nan
    np.save(nan, bad)
    config = MoFotConfig(kg="umls", preset="tiny", modalities="none", features=f"extra={good}")
    exp = make_experiment(config, snapshots=tiny_snapshots)
    exp.method.setup(exp.stream)
    assert exp.method.model.modalities == ["structure", "extra"]
    for path, match in ((short, "short.npy.*rows"), (nan, "nan.npy.*(NaN|nan)")):
        with pytest.raises(ValueError, match=match):
            make_experiment(MoFotConfig(kg="umls", preset="tiny", modalities="none", features=f"extra={path}"),
                            snapshots=tiny_snapshots)


def test_empty_snapshot_from_a_tiny_kg(tmp_path):
    p = tmp_path / "kg.tsv"
    p.write_text("a\tr\tb\nb\tr\tc\n")
    with pytest.raises(ValueError, match="too few|empty"):
        make_experiment(MoFotConfig(kg=f"file:{p}", modalities="none"))


# -- the command line --------------------------------------------------------------------------------
def test_cli_run_and_compare(tmp_path, capsys):
    from mmcl_fast.cli import main

    lkge = tmp_path / "umls"
    assert main(["data", "snapshots", "--kg", "umls", "--growth", "entity", "--snapshots", "3", "-o", str(lkge)]) == 0
    common = ["--set", "preset=tiny", "--set", "modalities=none", "--set", f"kg=lkge:{lkge}", "--no-progress"]
    assert main(["run", "mofot", "-o", str(tmp_path / "run"), *common]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["metric"] == "mrr" and res["complete"]
    assert (tmp_path / "run" / "result_matrix.png").stat().st_size > 0
    assert main(["compare", "mofot", "--strategies", "finetune,mofot", "--seeds", "0,1", "-o", str(tmp_path / "cmp"),
                 *common, "--set", "mofot.reg_lambda=0.5"]) == 0
    run_cfg = {s: json.loads((tmp_path / "cmp" / s / "seed1" / "results.json").read_text())["config"]
               for s in ("finetune", "mofot")}
    assert run_cfg["mofot"]["reg_lambda"] == 0.5 and run_cfg["finetune"]["reg_lambda"] == 0.0
    assert run_cfg["mofot"]["seed"] == 1
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "finetune" in table and "mofot" in table and "±" in table
    cmp = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert len(cmp["runs"]) == 4 and math.isfinite(cmp["aggregate"]["mofot"]["average"]["mean"])
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    # bad input: a usage error, nothing run
    assert main(["compare", "mofot", "--strategies", "finetune", "--seeds", "x", "-o", str(tmp_path / "c2")]) == 2
    assert main(["run", "mofot", "-o", str(tmp_path / "r2"), "--set", "strategy=nope"]) == 2
    assert main(["compare", "mofot", "--strategies", "finetune", "-o", str(tmp_path / "c3"), "--set", "ewc.dim=8"]) == 2
    assert "strategy" in capsys.readouterr().err
