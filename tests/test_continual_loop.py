"""The training loop: hooks, evaluation, the log, checkpoints, and a resumed run that ends with the
same result matrix as one that never stopped."""
import importlib.util
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from mmcl_fast.continual import (
    Callback,
    ContinualMethod,
    ContinualTrainer,
    MultimodalData,
    Task,
    TaskStream,
)
from mmcl_fast.continual.loop import ResumeError
from mmcl_fast.methods import get_method


@pytest.fixture(autouse=True)
def _restore_threads():
    # the digits method sets torch's CPU threads (config key `threads`): give the others theirs back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _digits_synthetic(**overrides):
    """The digits method on a tiny synthetic stream: 3 tasks of 2 classes, 3 epochs at a high
    learning rate, enough to learn each task (so that a resumed run that diverged would show)."""
    values = {"dataset": "synthetic", "num_tasks": 3, "classes_per_task": 2, "synthetic_train_per_class": 24,
              "synthetic_test_per_class": 8, "hidden": 16, "feature_dim": 8, "epochs": 3, "lr": 1e-2,
              "batch_size": 16, "memory_per_class": 4, "replay_batch_size": 8, "replay_epochs": 1}
    values.update(overrides)
    spec = get_method("digits")
    return spec.build(spec.make_config(values))


def _trainer(experiment, out, **kwargs):
    return ContinualTrainer(experiment.stream, experiment.method, None if out is None else str(out), eval_future=experiment.eval_future,
                            init_eval=experiment.init_eval, progress=False, **kwargs)


class _Crash(Callback):
    """Raises on the given step of the given task: a run killed mid-task."""

    def __init__(self, task, step):
        self.task, self.step, self.seen = task, step, 0

    def after_step(self, trainer, task, batch, loss):
        if task.index == self.task:
            self.seen += 1
            if self.seen == self.step:
                raise KeyboardInterrupt("killed")


def _assert_same_state(a, b, where="state"):
    """`a` and `b` (nested dicts / lists of tensors and plain values) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b.cpu()), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        # torch's Optimizer.load_state_dict adds `differentiable: False` to the param groups of an
        # optimizer whose defaults lack it: metadata, not state
        a, b = ({k: v for k, v in d.items() if not (k == "differentiable" and v is False)} for d in (a, b))
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("overrides", [
    {},  # herding memory mixed into batches, OGM-GE modulation
    {"memory_policy": "reservoir", "replay": "phase", "noise": True, "carry": 0.5},
], ids=["herding-mixed", "reservoir-phase-noise-carry"])
def test_a_resumed_run_gives_the_same_result_matrix(tmp_path, overrides):
    whole = _trainer(_digits_synthetic(**overrides), tmp_path / "whole")
    R_whole = whole.run().R.copy()
    assert np.isfinite(R_whole).all()  # eval_future: every entry was evaluated
    # the config learns: a resumed run that diverged would not end with the same scores by chance
    assert (np.diag(R_whole) >= 0.9).all() and R_whole[-1].mean() > 0.6

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        _trainer(_digits_synthetic(**overrides), out, callbacks=[_Crash(task=1, step=3)]).run()
    # killed in task 1: the checkpoint is after task 0; the log may hold nothing of task 1 yet
    resumed = _trainer(_digits_synthetic(**overrides), out)
    R_resumed = resumed.run().R
    assert resumed.resumed_from == 1
    assert np.array_equal(R_whole, R_resumed)  # exactly, not approximately
    # and the method ends in the same state: weights, optimizer state, replay memory, generators
    state = resumed.method.state_dict()
    assert state["memory"] is not None and state["memory"]["targets"].numel() > 0
    _assert_same_state(whole.method.state_dict(), state, "method")
    keys = [(r["task_trained"], r["task_evaluated"], r["score"]) for r in _log(out)]
    assert keys == [(r["task_trained"], r["task_evaluated"], r["score"]) for r in _log(tmp_path / "whole")]


def test_stopping_between_tasks_and_resuming_matches_too(tmp_path):
    whole = _trainer(_digits_synthetic(), tmp_path / "whole").run().R.copy()
    out = tmp_path / "parts"
    first = _trainer(_digits_synthetic(), out)
    assert first.run(stop_after=0).rows_done == 1
    # a task's evaluation lines were logged before it stopped: they are kept, not repeated
    assert [r["task_trained"] for r in _log(out)] == [None] * 3 + [0] * 3
    rest = _trainer(_digits_synthetic(), out).run()
    assert rest.rows_done == 3 and np.array_equal(rest.R, whole)
    assert len(_log(out)) == 3 + 3 * 3


def test_resuming_with_another_config_is_refused(tmp_path):
    _trainer(_digits_synthetic(), tmp_path, config={"epochs": 2}).run(stop_after=0)
    with pytest.raises(ResumeError, match="epochs: 2 -> 3"):
        _trainer(_digits_synthetic(epochs=3), tmp_path, config={"epochs": 3}).run()
    # starting over is allowed, and removes the stale checkpoint first
    t = _trainer(_digits_synthetic(epochs=3), tmp_path, config={"epochs": 3})
    assert t.run(resume=False, stop_after=0).rows_done == 1 and t.resumed_from is None


class _Toy(ContinualMethod):
    """A method that learns nothing: its score on task j after task i is (i + 1) / 10 + j / 100."""

    metric = "toy"
    epochs = 2

    def __init__(self):
        self.trained = -1

    def num_batches(self, task):
        return 3

    def train_batches(self, task, epoch):
        return [("batch", task.index, epoch, k) for k in range(3)]

    def train_step(self, task, batch):
        return torch.tensor(float(batch[3]))

    def after_task(self, task):
        self.trained = task.index

    def evaluate(self, task):
        return (self.trained + 1) / 10 + task.index / 100

    def state_dict(self):
        return {"trained": self.trained}

    def load_state_dict(self, state):
        self.trained = state["trained"]


def _toy_stream(test_sizes=(2, 2, 2)):
    tasks = []
    for t, n in enumerate(test_sizes):
        data = MultimodalData({"x": torch.zeros(4, 1)}, torch.full((4,), t))
        test = data.subset(torch.arange(n)) if n else None
        tasks.append(Task(t, f"t{t}", train=data, test=test, introduces={"classes": [t]}))
    return TaskStream(tasks)


class _Recorder(Callback):
    def __init__(self):
        self.events = []

    def before_task(self, trainer, task):
        self.events.append(("before_task", task.index))

    def after_task(self, trainer, task):
        self.events.append(("after_task", task.index))

    def before_epoch(self, trainer, task, epoch):
        self.events.append(("before_epoch", task.index, epoch))

    def after_epoch(self, trainer, task, epoch):
        self.events.append(("after_epoch", task.index, epoch))

    def before_step(self, trainer, task, batch):
        self.events.append(("before_step", batch[1:]))

    def after_step(self, trainer, task, batch, loss):
        self.events.append(("after_step", batch[1:], float(loss)))

    def after_evaluation(self, trainer, record):
        self.events.append(("eval", record["task_trained"], record["task_evaluated"]))


def test_hooks_run_in_order_and_only_seen_tasks_are_evaluated(tmp_path):
    rec = _Recorder()
    trainer = ContinualTrainer(_toy_stream(), _Toy(), str(tmp_path), callbacks=[rec], progress=False)
    results = trainer.run()
    first_task = rec.events[: rec.events.index(("after_task", 0)) + 2]
    expected = [("before_task", 0)]
    for e in range(2):
        expected.append(("before_epoch", 0, e))
        for k in range(3):
            expected += [("before_step", (0, e, k)), ("after_step", (0, e, k), float(k))]
        expected.append(("after_epoch", 0, e))
    expected += [("after_task", 0), ("eval", 0, 0)]
    assert first_task == expected
    assert trainer.global_step == 3 * 2 * 3
    # without eval_future the upper triangle stays empty
    R = results.R
    assert R[0, 0] == pytest.approx(0.1) and R[2, 1] == pytest.approx(0.31)
    assert np.isnan(R[0, 1]) and np.isnan(R[1, 2])
    assert [(r["task_trained"], r["task_evaluated"]) for r in _log(tmp_path)] == \
        [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    # the mean loss of each epoch, (0 + 1 + 2) / 3
    assert trainer.training_summary()[0]["epoch_losses"] == [1.0, 1.0]


def test_init_eval_and_eval_future_fill_the_whole_matrix(tmp_path):
    trainer = ContinualTrainer(_toy_stream(), _Toy(), str(tmp_path), eval_future=True, init_eval=True, progress=False)
    results = trainer.run()
    assert results.init.tolist() == pytest.approx([0.0, 0.01, 0.02])  # trained = -1: (−1 + 1)/10 + j/100
    assert np.isfinite(results.R).all()
    s = results.summary()
    # FWT = mean(R01 - b1, R12 - b2) = mean(0.11 - 0.01, 0.22 - 0.02) = 0.15
    assert s["fwt"] == pytest.approx(0.15)
    log = _log(tmp_path)
    assert len(log) == 3 + 9 and log[0]["task_trained"] is None
    assert {"task_trained", "task_evaluated", "score", "metric", "eval_seconds", "time"} <= set(log[0])


def test_a_task_without_test_data_scores_nan_and_metrics_stay_finite(tmp_path):
    trainer = ContinualTrainer(_toy_stream((2, 0, 2)), _Toy(), str(tmp_path), progress=False)
    results = trainer.run()
    assert np.isnan(results.R[:, 1]).all()
    s = results.summary()
    assert all(math.isfinite(v) for k, v in s.items() if isinstance(v, float))
    assert [r["score"] for r in _log(tmp_path) if r["task_evaluated"] == 1] == [None, None]


def test_without_an_output_folder_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = ContinualTrainer(_toy_stream(), _Toy(), None, progress=False).run()
    assert results.rows_done == 3 and os.listdir(tmp_path) == []


def test_the_progress_bar_runs(tmp_path, capsys):
    pytest.importorskip("tqdm")
    ContinualTrainer(_toy_stream(), _Toy(), None, progress=True).run()
    err = capsys.readouterr().err
    assert "task 3/3" in err and "loss" in err


class _Random(_Toy):
    """Scores drawn from the global generators (torch, Python, NumPy), seeded in setup as a fresh
    process would: a resumed run matches only if the loop restores all three."""

    def setup(self, stream):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)

    def evaluate(self, task):
        return float(torch.rand(())) + random.random() + float(np.random.rand())


class _CrashInEvaluation(Callback):
    """Raises at the n-th evaluation: a run killed after logging part of a task's evaluations."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def after_evaluation(self, trainer, record):
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt("killed")


def test_resume_restores_the_global_generators_and_cuts_the_log(tmp_path):
    whole = ContinualTrainer(_toy_stream(), _Random(), str(tmp_path / "whole"), progress=False).run().R.copy()
    out = str(tmp_path / "cut")
    # evaluations 1 (task 0), 2 and 3 (task 1): killed after logging task 1's first evaluation
    with pytest.raises(KeyboardInterrupt):
        ContinualTrainer(_toy_stream(), _Random(), out, progress=False, callbacks=[_CrashInEvaluation(2)]).run()
    assert [r["task_trained"] for r in _log(out)] == [0, 1]
    # a second session killed while training task 1 again: the stale line is cut when it opens
    with pytest.raises(KeyboardInterrupt):
        ContinualTrainer(_toy_stream(), _Random(), out, progress=False, callbacks=[_Crash(task=1, step=1)]).run()
    assert [r["task_trained"] for r in _log(out)] == [0]
    resumed = ContinualTrainer(_toy_stream(), _Random(), out, progress=False).run()
    assert np.array_equal(resumed.R, whole, equal_nan=True)
    # the half-logged task 1 was redone: its stale line is gone, not duplicated
    assert [(r["task_trained"], r["task_evaluated"]) for r in _log(out)] == \
        [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    assert [r["score"] for r in _log(out)] == [r["score"] for r in _log(tmp_path / "whole")]


def test_digits_learns_and_replay_keeps_the_first_task():
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed")
    spec = get_method("digits")
    results = {}
    for replay in ("mixed", "none"):
        exp = spec.build(spec.make_config({"num_tasks": 2, "epochs": 5, "replay": replay}))
        results[replay] = ContinualTrainer(exp.stream, exp.method, None, progress=False).run().R
    R = results["mixed"]
    assert R[0, 0] > 0.95 and R[1, 1] > 0.85  # measured 1.0 and 0.93: two digit classes are easy
    # class-incremental without replay forgets task 0 almost entirely; replay keeps most of it
    assert results["none"][1, 0] < 0.2
    assert R[1, 0] > 0.8  # measured 0.90 (0.0 without replay)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_digits_on_the_gpu_resumes_exactly(tmp_path):
    whole = _trainer(_digits_synthetic(device="cuda"), tmp_path / "whole").run().R.copy()
    out = tmp_path / "stopped"
    _trainer(_digits_synthetic(device="cuda"), out).run(stop_after=0)
    trainer = _trainer(_digits_synthetic(device="cuda"), out)
    resumed = trainer.run().R
    assert np.array_equal(whole, resumed)
    # the checkpoint was read with map_location="cpu": the memory is back on the GPU with the model
    memory = trainer.method.memory
    assert memory._targets.device.type == "cuda" and memory.data().device.type == "cuda"
    assert _digits_synthetic(device="cuda").method.device.type == "cuda"


def test_digits_scores_future_tasks_and_init_under_the_same_mask():
    # FWT compares R[j-1, j] with b_j: both must mask the logits to the same classes (those of tasks
    # 0..j), or R[j-1, j] is 0 by construction (its own classes masked out)
    experiment = _digits_synthetic()
    method, stream = experiment.method, experiment.stream
    method.setup(stream)
    assert stream[1].classes == [2, 3]
    with torch.no_grad():
        method.model.head.bias[2] = 100.0  # every sample predicted as class 2 (task 1) where allowed
    b1 = method.evaluate(stream[1])  # at initialisation
    method.trained = 0  # as if task 0 was trained, the model unchanged
    assert method.evaluate(stream[1]) == b1 == 0.5  # half of task 1's test samples are class 2
    # the seen tasks keep their mask: class 2 is not a candidate for task 0's samples yet
    assert not method._allowed(stream[0].test.targets, method.trained)[:, 2].any()
    # and a run with no training at all has FWT 0 (R[j-1, j] = b_j)
    experiment = _digits_synthetic(epochs=1, lr=1e-12, replay="none")
    R = _trainer(experiment, None).run()
    assert R.summary()["fwt"] == pytest.approx(0.0, abs=0.07)


def test_run_twice_on_one_trainer_starts_over():
    trainer = ContinualTrainer(_toy_stream(), _Toy(), None, progress=False, init_eval=True)
    first = trainer.run().R.copy()
    steps = trainer.global_step
    second = trainer.run()
    assert second.rows_done == 3 and np.array_equal(second.R, first, equal_nan=True)
    assert trainer.global_step == steps and len(trainer.task_logs) == 3 and trainer.resumed_from is None
    experiment = _digits_synthetic()
    t = _trainer(experiment, None)
    assert np.array_equal(t.run().R.copy(), t.run().R)


def test_progress_default_when_stderr_is_none(monkeypatch):
    monkeypatch.setattr("sys.stderr", None)
    assert ContinualTrainer(_toy_stream(), _Toy(), None).progress is False
