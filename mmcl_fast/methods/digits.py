"""`digits`: a class-incremental demo on scikit-learn's handwritten digits, with two views of each
8x8 image as two modalities.

- Stream: the 1,797 digits split per class (seeded) into train / valid / test, then into tasks of
  `classes_per_task` classes (5 tasks of 2 classes by default). Labels are renumbered in the
  order the classes arrive.
- Modalities: the image's left half and right half (8x4 pixels each), so each view alone is a
  weaker, different witness of the digit: the imbalance that gradient modulation balances.
  `dataset="synthetic"` swaps in `synthetic_stream` (Gaussian blobs, two modalities) for tests.
- Model: one MLP encoder per modality, a linear fusion head on the concatenated features.
- Training: cross-entropy over the classes seen so far (class-incremental; task-incremental masks
  to the task's classes), op family A's `ModalityAdamW` (or `ModalitySGD`) with OGM-GE modulation:
  unimodal logits from the fusion head (`split_head_logits`), scores (`modality_scores`), then
  `opt.step(scores=...)`; the encoders are the modulated groups, the head is not.
- Replay: a `ReplayMemory` (20 per class, herding on the fused features by default), mixed into
  each batch or trained on as a phase after each task.
- Evaluation: class-incremental, a sample of task j scored after training task i may be
  predicted as any class of tasks 0..max(i, j): the classes seen so far, plus the evaluated task's
  own classes (and those before it) when j is a future task. The scores at initialisation b_j
  (before any training, i = -1) use the same mask, classes of tasks 0..j, so that forward transfer
  FWT = mean_j (R[j-1, j] - b_j) compares accuracies over the same label set (masking R[j-1, j] to
  the classes seen up to j-1 would make it exactly 0). Task-incremental: each task's own classes.
  Every task is evaluated after each task, the future ones too (`eval_future`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..continual.config import check
from ..continual.data import MultimodalData
from ..continual.experiment import Experiment
from ..continual.loop import ContinualMethod
from ..continual.replay import ReplayMemory
from ..continual.streams import (
    Task,
    TaskStream,
    class_incremental_stream,
    class_order,
    stratified_split,
    synthetic_stream,
)
from ..ops import modality_scores, split_head_logits
from ..optim import ModalityAdamW, ModalitySGD, param_groups_by_modality


@dataclasses.dataclass
class DigitsConfig:
    """Every knob of the digits run (`mmcl-fast run digits --help` lists them)."""

    dataset: Literal["digits", "synthetic"] = "digits"
    num_tasks: int = 5
    classes_per_task: int = 2
    shuffle_classes: bool = False  # False: classes in order 0, 1, ...; True: a permutation from `seed`
    scenario: Literal["class-incremental", "task-incremental"] = "class-incremental"
    valid_fraction: float = 0.1
    test_fraction: float = 0.3
    synthetic_train_per_class: int = 40
    synthetic_test_per_class: int = 20
    hidden: int = 64
    feature_dim: int = 32
    epochs: int = 15
    batch_size: int = 32
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    modulation: bool = True  # OGM-GE gradient modulation of the two encoders
    alpha: float = 0.3
    noise: bool = False  # OGM-GE's "GE": Gaussian noise with each gradient's std
    carry: float = 0.0
    memory_per_class: int = 20
    memory_policy: Literal["random", "herding", "reservoir"] = "herding"
    replay: Literal["mixed", "phase", "none"] = "mixed"
    replay_batch_size: int = 32
    replay_epochs: int = 3
    eval_future: bool = True
    init_eval: bool = True
    forgetting: Literal["max", "last"] = "max"
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto" (a GPU when there is one)
    # torch's CPU threads for the run (0: leave torch's setting). The model is tiny: its matrices
    # are too small to split, and more threads only add synchronisation (14x slower measured on a
    # busy 2-core machine)
    threads: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):  # inf / nan would only crash (or silently poison) training
            v = getattr(self, f.name)
            if isinstance(v, float):
                check(f.name, math.isfinite(v), "a finite number", v)
        for key in ("num_tasks", "classes_per_task", "hidden", "feature_dim", "epochs", "batch_size",
                    "synthetic_train_per_class", "synthetic_test_per_class"):
            check(key, getattr(self, key) >= 1, ">= 1", getattr(self, key))
        for key in ("memory_per_class", "replay_batch_size", "replay_epochs"):
            check(key, getattr(self, key) >= 0, ">= 0", getattr(self, key))
        check("threads", 0 <= self.threads <= MAX_THREADS, f"in [0, {MAX_THREADS}] (0: torch's own setting)",
              self.threads)
        check("lr", self.lr > 0, "> 0", self.lr)
        for key in ("weight_decay", "alpha"):
            check(key, getattr(self, key) >= 0, ">= 0", getattr(self, key))
        for key in ("momentum", "carry"):
            check(key, 0 <= getattr(self, key) <= 1, "in [0, 1]", getattr(self, key))
        check("valid_fraction", 0 <= self.valid_fraction < 1, "in [0, 1)", self.valid_fraction)
        # every task needs test data to be scored
        check("test_fraction", 0 < self.test_fraction < 1, "in (0, 1)", self.test_fraction)
        check("test_fraction", self.valid_fraction + self.test_fraction < 1,
              "less than 1 - valid_fraction (some data must be left to train on)", self.test_fraction)
        if self.dataset == "digits":
            check("num_tasks", self.num_tasks * self.classes_per_task <= 10,
                  "at most 10 / classes_per_task (digits has 10 classes)", self.num_tasks)
        check_device("device", self.device)


# torch's CPU threads: more than this is a typo (a huge value can crash the thread pool)
MAX_THREADS = 256


def check_device(key: str, name: str) -> None:
    """ValueError naming `key` unless `name` is "auto", "cpu", "mps" or "cuda[:i]" and that device
    exists here."""
    if name == "auto":
        return
    kind, sep, index = name.partition(":")
    ok_form = kind in ("cpu", "cuda", "mps") and (not sep or (index.isdigit() and kind != "cpu"))
    check(key, ok_form, "'cpu', 'cuda', 'cuda:<index>', 'mps' or 'auto'", name)
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check(key, n > 0, "a device that exists ('cuda' but no GPU is available here; 'cpu' or 'auto')", name)
        check(key, not index or int(index) < n, f"a GPU index below {n} (the GPUs here)", name)
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        check(key, mps is not None and mps.is_available(), "a device that exists (no MPS here)", name)
        check(key, not index or int(index) == 0, "'mps' or 'mps:0'", name)


class TwoViewNet(nn.Module):
    """One MLP encoder per modality and a linear fusion head on the concatenated features."""

    def __init__(self, dims: dict[str, int], hidden: int, feature_dim: int, num_classes: int):
        super().__init__()
        self.modalities = list(dims)
        self.encoders = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim), nn.ReLU())
            for m, d in dims.items()
        })
        self.head = nn.Linear(feature_dim * len(dims), num_classes)

    def features(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.encoders[m](inputs[m].flatten(1)) for m in self.modalities]

    def forward(self, inputs: dict[str, torch.Tensor]):
        feats = self.features(inputs)
        return self.head(torch.cat(feats, 1)), feats


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_digits_arrays():
    """(images [1797, 8, 8] in 0..16, targets [1797]) of scikit-learn's digits.

    Read straight from scikit-learn's bundled digits.csv.gz (64 pixels then the label per row,
    what `sklearn.datasets.load_digits` parses) when the file is where scikit-learn keeps it:
    importing sklearn.datasets costs seconds and this is the only thing needed from it."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits stream needs scikit-learn (pip install 'mmcl_fast[run]')")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        flat = np.loadtxt(path, delimiter=",")
        images, targets = flat[:, :-1].reshape(-1, 8, 8), flat[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, targets = bunch.images, bunch.target
    return images, targets


def digits_data(config: DigitsConfig):
    """(train, valid, test) MultimodalData of the left / right halves of the digit images."""
    raw_images, raw_targets = load_digits_arrays()
    images = torch.tensor(raw_images, dtype=torch.float32) / 16.0  # pixel values are 0..16
    targets = torch.tensor(raw_targets, dtype=torch.long)
    inputs = {"left": images[:, :, :4].contiguous(), "right": images[:, :, 4:].contiguous()}
    data = MultimodalData(inputs, targets)
    fractions = [1 - config.valid_fraction - config.test_fraction, config.valid_fraction, config.test_fraction]
    train, valid, test = (data.subset(i) for i in stratified_split(targets, fractions, seed=config.seed))
    return train, (valid if len(valid) else None), test


def digits_stream(config: DigitsConfig) -> TaskStream:
    scenario = config.scenario
    n_classes = config.num_tasks * config.classes_per_task
    if config.dataset == "synthetic":
        return synthetic_stream(num_tasks=config.num_tasks, classes_per_task=config.classes_per_task,
                                modalities={"left": 32, "right": 32},
                                train_per_class=config.synthetic_train_per_class,
                                test_per_class=config.synthetic_test_per_class, seed=config.seed, scenario=scenario)
    train, valid, test = digits_data(config)
    order = class_order(train.classes(), config.seed if config.shuffle_classes else None)[:n_classes]

    def keep(d):
        if d is None:
            return None
        return d.subset(torch.nonzero(torch.isin(d.targets, torch.tensor(order))).flatten())

    return class_incremental_stream(keep(train), keep(test), keep(valid), classes_per_task=config.classes_per_task,
                                    order=order, scenario=scenario, name="digits")


class DigitsMethod(ContinualMethod):
    """The two-view MLP trained with OGM-GE modulation and replay (see the module docstring)."""

    metric = "accuracy"

    def __init__(self, config: DigitsConfig):
        self.config = config
        self.epochs = config.epochs
        self.device = _device(config.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.model: TwoViewNet | None = None
        self.opt = None
        self.memory: ReplayMemory | None = None
        self.trained = -1  # the last task trained
        self.stream: TaskStream | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, stream: TaskStream) -> None:
        c = self.config
        self.stream = stream
        # a fresh start (a second run of the same method too); a resumed run then loads its state
        self.generator = torch.Generator().manual_seed(c.seed)
        self.trained = -1
        if c.threads and self.device.type == "cpu":
            torch.set_num_threads(c.threads)
        first = stream[0].train
        dims = {m: int(x[0].numel()) for m, x in first.inputs.items()}
        self.num_classes = len(stream.seen(len(stream) - 1))
        # class masks: row t = the classes a sample of task t may be predicted as
        self.task_of_class = torch.zeros(self.num_classes, dtype=torch.long)
        for task in stream:
            self.task_of_class[torch.tensor(task.classes, dtype=torch.long)] = task.index
        self.task_of_class = self.task_of_class.to(self.device)
        torch.manual_seed(c.seed)  # the initial weights
        self.model = TwoViewNet(dims, c.hidden, c.feature_dim, self.num_classes).to(self.device)
        groups = param_groups_by_modality(self.model, {m: [f"encoders.{m}.*"] for m in dims})
        common = {"alpha": c.alpha, "noise": c.noise, "carry": c.carry, "seed": c.seed}
        if c.optimizer == "adamw":
            self.opt = ModalityAdamW(groups, lr=c.lr, weight_decay=c.weight_decay, **common)
        else:
            self.opt = ModalitySGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, **common)
        if c.replay != "none" and c.memory_per_class > 0:
            self.memory = ReplayMemory(capacity_per_class=c.memory_per_class, policy=c.memory_policy,
                                       device=self.device, seed=c.seed)

    def _data(self, data: MultimodalData) -> MultimodalData:
        return data if data.device == self.device else data.to(self.device)

    # -- training -------------------------------------------------------------------------------
    def num_batches(self, task: Task) -> int:
        return task.train.num_batches(self.config.batch_size)

    def train_batches(self, task: Task, epoch: int):
        c = self.config
        for x, y in self._data(task.train).batches(c.batch_size, shuffle=True, generator=self.generator):
            replayed = None
            if self.memory is not None and c.replay == "mixed" and len(self.memory):
                replayed = self.memory.sample(c.replay_batch_size, self.generator)
            yield (x, y, replayed)

    def _allowed(self, y: torch.Tensor, task_index: int) -> torch.Tensor:
        """[N, C] bool: the classes each sample may be predicted as."""
        classes = torch.arange(self.num_classes, device=y.device)
        if self.stream.scenario == "task-incremental":
            return self.task_of_class[classes].unsqueeze(0) == self.task_of_class[y].unsqueeze(1)
        seen = self.task_of_class[classes] <= task_index
        return seen.unsqueeze(0).expand(y.numel(), -1)

    def _step(self, x: dict[str, torch.Tensor], y: torch.Tensor, task_index: int) -> torch.Tensor:
        self.model.train()
        logits, feats = self.model(x)
        allowed = self._allowed(y, task_index)
        loss = nn.functional.cross_entropy(logits.masked_fill(~allowed, float("-inf")), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.modulation:
            with torch.no_grad():
                z = split_head_logits([f.detach() for f in feats], self.model.head.weight, self.model.head.bias)
                z = z.masked_fill(~allowed.unsqueeze(0), float("-inf"))
                self.opt.step(scores=modality_scores(z, y))
        else:
            self.opt.step()
        return loss.detach()

    def train_step(self, task: Task, batch):
        x, y, replayed = batch
        if replayed is not None:
            rx, ry = replayed
            x = {m: torch.cat([x[m], rx[m]]) for m in x}
            y = torch.cat([y, ry])
        return self._step(x, y, task.index)

    def after_step(self, task: Task, batch, loss) -> None:
        if self.memory is not None and self.config.memory_policy == "reservoir":
            x, y, _ = batch  # only the new samples go through the reservoir
            self.memory.add(MultimodalData(x, y))

    def _features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.eval()
        return torch.cat(self.model.features(inputs), 1)

    def after_task(self, task: Task) -> None:
        c = self.config
        self.trained = task.index
        if self.memory is not None and c.memory_policy != "reservoir":
            self.memory.add(self._data(task.train), features=self._features)
        if self.memory is not None and c.replay == "phase" and len(self.memory):
            for _ in range(c.replay_epochs):
                for x, y in self.memory.data().batches(c.batch_size, shuffle=True, generator=self.generator):
                    self._step(x, y, task.index)
        self.opt.end_task()

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, task: Task) -> float:
        self.model.eval()
        correct = 0
        for x, y in self._data(task.test).batches(1024):
            logits, _ = self.model(x)
            # the classes seen so far, and the evaluated task's own (a future task, or the scores
            # at initialisation): R[i, j] (j > i) and b_j use the same mask (see the module docstring)
            allowed = self._allowed(y, max(self.trained, task.index))
            logits = logits.masked_fill(~allowed, float("-inf"))
            correct += int((logits.argmax(1) == y).sum())
        return correct / len(task.test)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self):
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "memory": None if self.memory is None else self.memory.state_dict(),
            "generator": self.generator.get_state(),
            "trained": self.trained,
        }

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        self.generator.set_state(state["generator"])
        self.trained = int(state["trained"])


def build(config: DigitsConfig) -> Experiment:
    stream = digits_stream(config)
    return Experiment(stream=stream, method=DigitsMethod(config), eval_future=config.eval_future,
                      init_eval=config.init_eval, forgetting=config.forgetting)


def _register():
    from . import register_method

    register_method("digits", "class-incremental scikit-learn digits, two image halves as two modalities, "
                              "OGM-GE modulated AdamW and replay (a CPU demo in minutes)", DigitsConfig, build)


_register()
