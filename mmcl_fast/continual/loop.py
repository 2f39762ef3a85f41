"""The training loop that every continual method plugs into.

A method (a `ContinualMethod`) says how to train on a task and how to score one; the loop
(`ContinualTrainer`) runs the stream: for each task t,

    before_task -> for each epoch: before_epoch -> [before_step -> train_step -> after_step]* -> after_epoch
    -> after_task -> evaluate on every seen task (j <= t; all tasks with eval_future) -> checkpoint

calling each hook on the method and then on every `Callback`. Evaluations land in the result
matrix and, one JSON object per line, in `log.jsonl` of the output folder. After each task the
loop writes `checkpoint.pt` (the method's state, the result matrix, the random generators' states
and where the log ended), so that a stopped run resumes at the next task and ends with the same
result matrix as one that never stopped (the loop restores torch's, Python's and NumPy's global
generators; a method keeps its own generators in its state_dict).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .results import ResultMatrix, jsonable
from .streams import Task, TaskStream

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
CHECKPOINT_FORMAT = 1


class ResumeError(ValueError):
    """A checkpoint that this run cannot resume from (another config, stream or format)."""


class ContinualMethod:
    """What a method implements for `ContinualTrainer`; the hooks are optional.

    Required: `train_batches(task, epoch)` (an iterable of batches, of any form the method's
    `train_step` takes; replay may be mixed in here), `train_step(task, batch)` (forward,
    backward, optimizer step; returns the loss as a 0-d tensor or a float, or None) and
    `evaluate(task)` (the score on the task's test data, a float). `state_dict` /
    `load_state_dict` must cover everything a resumed run needs (model, optimizer, replay memory,
    the method's random generators).
    """

    metric: str = "accuracy"
    epochs: int = 1

    def setup(self, stream: TaskStream) -> None:
        """Called once before the first task (also when resuming, before load_state_dict)."""

    def num_epochs(self, task: Task) -> int:
        return self.epochs

    def num_batches(self, task: Task) -> int | None:
        """Batches per epoch, for the progress bar's total (None: unknown)."""
        return None

    def train_batches(self, task: Task, epoch: int) -> Iterable[Any]:
        raise NotImplementedError

    def train_step(self, task: Task, batch: Any):
        raise NotImplementedError

    def evaluate(self, task: Task) -> float:
        raise NotImplementedError

    def before_task(self, task: Task) -> None: ...
    def after_task(self, task: Task) -> None: ...
    def before_epoch(self, task: Task, epoch: int) -> None: ...
    def after_epoch(self, task: Task, epoch: int) -> None: ...
    def before_step(self, task: Task, batch: Any) -> None: ...
    def after_step(self, task: Task, batch: Any, loss) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Callback:
    """Observers of a run (the trainer passes itself first). `after_evaluation` gets the record
    written to the log."""

    def before_task(self, trainer, task: Task) -> None: ...
    def after_task(self, trainer, task: Task) -> None: ...
    def before_epoch(self, trainer, task: Task, epoch: int) -> None: ...
    def after_epoch(self, trainer, task: Task, epoch: int) -> None: ...
    def before_step(self, trainer, task: Task, batch: Any) -> None: ...
    def after_step(self, trainer, task: Task, batch: Any, loss) -> None: ...
    def after_evaluation(self, trainer, record: dict[str, Any]) -> None: ...


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
            for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]


class _Progress:
    """A tqdm bar per task showing the epoch, the loss and tqdm's own speed (steps/s); a no-op
    when disabled or when tqdm is missing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def start(self, desc: str, total: int | None) -> None:
        if not self.enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.enabled = False
            return
        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True)

    def update(self, **postfix) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclasses.dataclass
class _TaskLog:
    task: int
    epoch_losses: list[float | None] = dataclasses.field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


class ContinualTrainer:
    """Runs a method over a stream, evaluates, logs and checkpoints (see the module docstring).

    output_dir   where log.jsonl and checkpoint.pt go (None: nothing is written, no resume)
    eval_future  evaluate after each task on the tasks not trained yet too (the upper triangle of
                 R; needed for forward transfer)
    init_eval    evaluate every task before training: the scores at initialisation b_j of FWT
    progress     show a progress bar (None: when stderr is a terminal)
    config       the run's config (a JSON-able dict), stored in the checkpoint; resuming with a
                 different config is refused, naming the keys that differ
    """

    def __init__(self, stream: TaskStream, method: ContinualMethod, output_dir: str | None = None, *,
                 eval_future: bool = False, init_eval: bool = False, callbacks: Sequence[Callback] = (),
                 progress: bool | None = None, config: dict[str, Any] | None = None,
                 loss_every: int = 10):
        self.stream = stream
        self.method = method
        self.output_dir = output_dir
        self.eval_future = bool(eval_future)
        self.init_eval = bool(init_eval)
        self.callbacks = list(callbacks)
        if progress is None:  # sys.stderr is None under pythonw and some embedders
            progress = sys.stderr is not None and sys.stderr.isatty()
        self.progress = bool(progress)
        self.config = dict(config or {})
        self.loss_every = max(1, int(loss_every))
        self.results = ResultMatrix([t.name for t in stream], metric=getattr(method, "metric", "accuracy"),
                                    test_sizes=stream.test_sizes)
        self.global_step = 0
        self.task_logs: list[_TaskLog] = []
        self.resumed_from: int | None = None
        self._stop = False
        self._start_time = time.time()
        self._elapsed_before = 0.0  # seconds spent by earlier sessions of a resumed run

    # -- paths ----------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str | None:
        return None if self.output_dir is None else os.path.join(self.output_dir, CHECKPOINT)

    @property
    def log_path(self) -> str | None:
        return None if self.output_dir is None else os.path.join(self.output_dir, LOG)

    def request_stop(self) -> None:
        """Stop after the current task (once its evaluation and checkpoint are written)."""
        self._stop = True

    def elapsed(self) -> float:
        return self._elapsed_before + time.time() - self._start_time

    # -- hooks ----------------------------------------------------------------------------------
    def _hook(self, name: str, *args) -> None:
        getattr(self.method, name)(*args)
        for cb in self.callbacks:
            getattr(cb, name)(self, *args)

    # -- the run --------------------------------------------------------------------------------
    def run(self, resume: bool = True, stop_after: int | None = None) -> ResultMatrix:
        """Train on every task not done yet and return the result matrix.

        resume      continue from output_dir's checkpoint when there is one (False: start over,
                    overwriting the log)
        stop_after  stop once task `stop_after` is trained and evaluated (None: the whole stream)
        """
        self._stop = False
        self._start_time = time.time()
        if self.output_dir is not None:
            os.makedirs(self.output_dir, exist_ok=True)
        self.method.setup(self.stream)
        start = 0
        log_offset = 0
        if resume and self.checkpoint_path is not None and os.path.exists(self.checkpoint_path):
            start, log_offset = self._load_checkpoint()
        elif self.checkpoint_path is not None and os.path.exists(self.checkpoint_path):
            # starting over: a stale checkpoint must not outlive the log it pointed into
            os.remove(self.checkpoint_path)
        if start == 0:
            self._reset()  # a second run() on this trainer starts from a clean slate too
        log = self._open_log(log_offset)
        try:
            if start == 0 and self.init_eval and not self.results.has_init:
                self._evaluate_init(log)
            for t in range(start, len(self.stream)):
                self._train_task(self.stream[t])
                self._evaluate_after(t, log)
                self.results.finish_row(t)
                if log is not None:
                    log.flush()
                self._save_checkpoint(t + 1, log.tell() if log is not None else 0)
                if self._stop or (stop_after is not None and t >= stop_after):
                    break
        finally:
            if log is not None:
                log.close()
        return self.results

    def _reset(self) -> None:
        self.results = ResultMatrix([t.name for t in self.stream], metric=getattr(self.method, "metric", "accuracy"),
                                    test_sizes=self.stream.test_sizes)
        self.global_step = 0
        self.task_logs = []
        self.resumed_from = None
        self._elapsed_before = 0.0

    def _open_log(self, offset: int):
        """The log, open for the whole run (run() closes it), positioned where the checkpoint
        says the previous session's log ended."""
        if self.log_path is None:
            return None
        exists = os.path.exists(self.log_path)
        if offset and exists and os.path.getsize(self.log_path) < offset:
            return open(self.log_path, "a")  # the log was cut by hand: keep what is there
        mode = "r+" if offset and exists else "w"
        f = open(self.log_path, mode)  # noqa: SIM115
        if mode == "r+":
            # drop what a stopped session logged after its last checkpoint: those evaluations are
            # redone
            f.truncate(offset)
            f.seek(offset)
        return f

    def _train_task(self, task: Task) -> None:
        T = len(self.stream)
        tlog = _TaskLog(task=task.index)
        t0 = time.time()
        self._hook("before_task", task)
        epochs = int(self.method.num_epochs(task))
        bar = _Progress(self.progress)
        per_epoch = self.method.num_batches(task)
        total = None if per_epoch is None else per_epoch * epochs
        bar.start(f"task {task.index + 1}/{T} {task.name}", total)
        try:
            for epoch in range(epochs):
                self._hook("before_epoch", task, epoch)
                loss_sum, n = None, 0
                shown = None
                for batch in self.method.train_batches(task, epoch):
                    self._hook("before_step", task, batch)
                    loss = self.method.train_step(task, batch)
                    self._hook("after_step", task, batch, loss)
                    self.global_step += 1
                    tlog.steps += 1
                    if loss is not None:
                        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
                        loss_sum = loss.float() if loss_sum is None else loss_sum + loss.float()
                        n += 1
                        # reading the loss syncs a GPU: only every few steps, for the bar
                        if bar.enabled and (n - 1) % self.loss_every == 0:
                            shown = f"{float(loss):.4f}"
                    bar.update(epoch=f"{epoch + 1}/{epochs}", **({"loss": shown} if shown else {}))
                tlog.epoch_losses.append(None if loss_sum is None else float(loss_sum) / n)
                self._hook("after_epoch", task, epoch)
            self._hook("after_task", task)
        finally:
            bar.close()
        tlog.train_seconds = time.time() - t0
        self.task_logs.append(tlog)

    def _score(self, task: Task) -> tuple[float, dict[str, float]]:
        """The task's score and any further metrics: `evaluate` returns a number, or a mapping
        holding the run's metric (e.g. {"mrr": ..., "hits@10": ...})."""
        if task.n_test == 0:
            return math.nan, {}  # nothing to score: left out of every metric
        out = self.method.evaluate(task)
        if isinstance(out, Mapping):
            metric = self.results.metric
            if metric not in out:
                raise KeyError(f"evaluate() returned {sorted(out)} without the run's metric {metric!r}")
            extra = {str(k): float(v) for k, v in out.items() if k != metric}
            return float(out[metric]), extra
        return float(out), {}

    def _evaluate_init(self, log) -> None:
        for task in self.stream:
            t0 = time.time()
            score, extra = self._score(task)
            self.results.record_init(task.index, score)
            self._write(log, None, task, score, time.time() - t0, extra)

    def _evaluate_after(self, t: int, log) -> None:
        tlog = self.task_logs[-1]
        for task in self.stream:
            if task.index > t and not self.eval_future:
                break
            t0 = time.time()
            score, extra = self._score(task)
            dt = time.time() - t0
            tlog.eval_seconds += dt
            self.results.record(t, task.index, score, extra)
            self._write(log, t, task, score, dt, extra)

    def _write(self, log, trained: int | None, task: Task, score: float, seconds: float,
               extra: dict[str, float] | None = None) -> None:
        record = {
            "task_trained": trained,
            "task_trained_name": None if trained is None else self.stream[trained].name,
            "task_evaluated": task.index,
            "task_evaluated_name": task.name,
            "metric": self.results.metric,
            "score": None if math.isnan(score) else score,
            **({"metrics": extra} if extra else {}),
            "n_test": task.n_test,
            "step": self.global_step,
            "eval_seconds": round(seconds, 6),
            "elapsed_seconds": round(self.elapsed(), 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if log is not None:
            log.write(json.dumps(record) + "\n")
        for cb in self.callbacks:
            cb.after_evaluation(self, record)

    # -- checkpoints ----------------------------------------------------------------------------
    def training_summary(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(t) for t in self.task_logs]

    def _save_checkpoint(self, next_task: int, log_offset: int) -> None:
        if self.checkpoint_path is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "next_task": next_task,
            "results": self.results.to_dict(),
            "method": self.method.state_dict(),
            "rng": _rng_state(),
            "global_step": self.global_step,
            "task_logs": self.training_summary(),
            "log_offset": log_offset,
            "config": self.config,
            "elapsed_seconds": self.elapsed(),
        }
        tmp = self.checkpoint_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)  # a crash mid-write leaves the previous checkpoint

    def _load_checkpoint(self):
        # the checkpoint holds numpy / python RNG states besides tensors: weights_only=False; it
        # is a file this library wrote into the run's own folder
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ResumeError(f"{self.checkpoint_path} has checkpoint format {state.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT}")
        diff = _config_difference(state.get("config", {}), self.config)
        if diff:
            raise ResumeError(f"{self.checkpoint_path} was written by a run with another config ("
                             + "; ".join(diff) + "): start over in another folder or without resuming")
        results = ResultMatrix.from_dict(state["results"])
        if results.task_names != self.results.task_names:
            raise ResumeError(f"{self.checkpoint_path} is for tasks {results.task_names}, "
                             f"this stream has {self.results.task_names}")
        self.results = results
        self.method.load_state_dict(state["method"])
        _set_rng_state(state["rng"])
        self.global_step = int(state["global_step"])
        self.task_logs = [_TaskLog(**t) for t in state["task_logs"]]
        self._elapsed_before = float(state.get("elapsed_seconds", 0.0))
        self.resumed_from = int(state["next_task"])
        return int(state["next_task"]), int(state["log_offset"])


__all__ = ["CHECKPOINT", "LOG", "Callback", "ContinualMethod", "ContinualTrainer", "ResumeError", "jsonable"]
