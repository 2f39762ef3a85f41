"""Task streams: ordered tasks (or knowledge-graph snapshots) with their data and what each one
introduces, plus builders for class-incremental streams and a synthetic multimodal stream.

A `Task` carries train / valid / test data of any kind (a `MultimodalData`, a triple tensor of a
KG snapshot, a torch Dataset ...) and `introduces`, a mapping of what is new with it:
"classes", "relations" (relation types), "entity_types", "entities". A `TaskStream` is the
ordered list plus the scenario ("class-incremental" by default: one head over every class seen so
far, no task identity at test time; "task-incremental": the task's identity is given at test
time; "domain-incremental": the classes stay, the inputs change).

Orders are seeded: the same seed gives the same class order and the same splits on every machine
(torch.Generator on the CPU).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .data import MultimodalData

# "snapshot-incremental": a growing knowledge graph (new entities, relations and facts per snapshot)
SCENARIOS = ("class-incremental", "task-incremental", "domain-incremental", "snapshot-incremental")
INTRODUCES_KEYS = ("classes", "relations", "entity_types", "entities")


@dataclasses.dataclass
class Task:
    """One task of a stream (or one snapshot of a growing knowledge graph)."""

    index: int
    name: str
    train: Any
    valid: Any = None
    test: Any = None
    introduces: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        unknown = [k for k in self.introduces if k not in INTRODUCES_KEYS]
        if unknown:
            raise ValueError(f"task {self.name!r}: introduces has unknown keys {unknown}; "
                             f"known: {list(INTRODUCES_KEYS)}")
        self.introduces = {k: list(v) for k, v in self.introduces.items()}

    @property
    def classes(self) -> list[Any]:
        return self.introduces.get("classes", [])

    @property
    def relations(self) -> list[Any]:
        return self.introduces.get("relations", [])

    @property
    def entities(self) -> list[Any]:
        return self.introduces.get("entities", [])

    @property
    def entity_types(self) -> list[Any]:
        return self.introduces.get("entity_types", [])

    @property
    def n_test(self) -> int:
        """Size of the test data (0 when there is none): the weight of this task in
        test-size-weighted averages."""
        return 0 if self.test is None else len(self.test)

    def describe(self) -> dict[str, Any]:
        def size(d):
            return None if d is None else len(d)

        return {"index": self.index, "name": self.name, "n_train": size(self.train),
                "n_valid": size(self.valid), "n_test": size(self.test),
                "introduces": {k: [_jsonable(v) for v in vs] for k, vs in self.introduces.items()}}


def _jsonable(v):
    return v.item() if isinstance(v, torch.Tensor) else v


class TaskStream(Sequence[Task]):
    """An ordered list of tasks and the scenario they are learnt in."""

    def __init__(self, tasks: Sequence[Task], scenario: str = "class-incremental", name: str = "",
                 class_names: Mapping[Any, str] | None = None):
        tasks = list(tasks)
        if not tasks:
            raise ValueError("a stream needs at least one task")
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
        for i, t in enumerate(tasks):
            if t.index != i:
                raise ValueError(f"task {t.name!r} has index {t.index} but is at position {i}")
        self.tasks = tasks
        self.scenario = scenario
        self.name = name
        self.class_names = dict(class_names or {})

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i):
        return self.tasks[i]

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def seen(self, t: int, key: str = "classes") -> list[Any]:
        """Everything of kind `key` introduced by tasks 0..t, in order of introduction."""
        out: list[Any] = []
        for task in self.tasks[: t + 1]:
            for v in task.introduces.get(key, []):
                if v not in out:
                    out.append(v)
        return out

    @property
    def test_sizes(self) -> list[int]:
        return [t.n_test for t in self.tasks]

    def describe(self) -> list[dict[str, Any]]:
        return [t.describe() for t in self.tasks]


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def class_order(classes: Sequence[Any], seed: int | None = None) -> list[Any]:
    """The classes sorted (seed None), or in a permutation drawn from `seed`: the same on every
    machine for the same seed."""
    ordered = sorted(classes)
    if seed is None:
        return ordered
    perm = torch.randperm(len(ordered), generator=_generator(seed)).tolist()
    return [ordered[i] for i in perm]


def stratified_split(targets: torch.Tensor, fractions: Sequence[float], seed: int = 0) -> list[torch.Tensor]:
    """Indices of len(fractions) disjoint parts with each class split in the given proportions
    (the last part takes the rounding remainder): seeded, so the same on every machine."""
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    gen = _generator(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    targets = targets.cpu()
    for c in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        start = 0
        for k, f in enumerate(fractions):
            stop = idx.numel() if k == len(fractions) - 1 else start + round(f * idx.numel())
            parts[k].append(idx[start:stop])
            start = stop
    return [torch.sort(torch.cat(p))[0] for p in parts]


def class_incremental_stream(
    train: MultimodalData,
    test: MultimodalData | None = None,
    valid: MultimodalData | None = None,
    classes_per_task: int | Sequence[int] = 2,
    seed: int | None = 0,
    order: Sequence[Any] | None = None,
    relabel: bool = True,
    scenario: str = "class-incremental",
    name: str = "",
) -> TaskStream:
    """Split labelled data into tasks by class.

    The class order is `order` if given, else `class_order(classes, seed)`; task t takes the next
    `classes_per_task` classes (an int, or one count per task). With `relabel`, class
    `order[i]` becomes label i in every split (so task t's labels are contiguous and a head can
    grow or be masked by label range); `stream.class_names[i]` keeps the original class.
    """
    classes = train.classes()
    order = list(order) if order is not None else class_order(classes, seed)
    if sorted(order) != classes:
        raise ValueError(f"order {order} must be a permutation of the classes {classes}")
    if isinstance(classes_per_task, int):
        if classes_per_task < 1:
            raise ValueError(f"classes_per_task must be >= 1, got {classes_per_task}")
        counts = [classes_per_task] * (len(order) // classes_per_task)
        if len(order) % classes_per_task:
            counts.append(len(order) % classes_per_task)
    else:
        counts = [int(c) for c in classes_per_task]
        if any(c < 1 for c in counts) or sum(counts) != len(order):
            raise ValueError(f"classes_per_task {counts} must be positive and sum to {len(order)} classes")
    label_of = {c: i for i, c in enumerate(order)} if relabel else {c: c for c in order}

    def relabelled(data):
        if data is None or not relabel:
            return data
        lut = torch.full((max(classes) + 1,), -1, dtype=torch.long)
        for c, i in label_of.items():
            lut[c] = i
        y = data.targets.long().cpu()
        if y.numel() and (y.min() < 0 or y.max() > max(classes) or (lut[y] < 0).any()):
            raise ValueError("valid/test data hold classes that the training data lacks")
        return MultimodalData(data.inputs, lut[y].to(data.device))

    train, test, valid = relabelled(train), relabelled(test), relabelled(valid)
    tasks, start = [], 0
    for t, count in enumerate(counts):
        labels = [label_of[c] for c in order[start:start + count]]
        start += count

        def pick(data, labels=labels):
            if data is None:
                return None
            mask = torch.isin(data.targets, torch.tensor(labels, device=data.device))
            return data.subset(torch.nonzero(mask).flatten())

        tasks.append(Task(index=t, name=f"task{t}", train=pick(train), valid=pick(valid), test=pick(test),
                          introduces={"classes": labels}))
    names = {label_of[c]: str(c) for c in order}
    return TaskStream(tasks, scenario=scenario, name=name, class_names=names)


def synthetic_stream(
    num_tasks: int = 3,
    classes_per_task: int = 2,
    modalities: Mapping[str, int] | None = None,
    train_per_class: int = 40,
    test_per_class: int = 20,
    valid_per_class: int = 0,
    separation: Mapping[str, float] | None = None,
    seed: int = 0,
    scenario: str = "class-incremental",
) -> TaskStream:
    """A class-incremental stream of Gaussian blobs seen through several modalities.

    Each class c has a mean mu_{c,m} ~ N(0, I) in each modality m (dimension `modalities[m]`); a
    sample is x_m = separation[m] * mu_{c,m} + N(0, I). Unequal separations give one modality that
    is easier than the other (the imbalance that gradient modulation is for). The default: two
    modalities "a" (dim 8, separation 2.0) and "b" (dim 6, separation 1.0).
    """
    modalities = dict(modalities or {"a": 8, "b": 6})
    separation = dict(separation or {m: 2.0 if i == 0 else 1.0 for i, m in enumerate(modalities)})
    if set(separation) != set(modalities):
        raise ValueError(f"separation must name the modalities {list(modalities)}, got {list(separation)}")
    if num_tasks < 1 or classes_per_task < 1 or train_per_class < 1 or test_per_class < 0 or valid_per_class < 0:
        raise ValueError("num_tasks, classes_per_task and train_per_class must be >= 1, the others >= 0")
    gen = _generator(seed)
    n_classes = num_tasks * classes_per_task
    means = {m: torch.randn(n_classes, d, generator=gen) for m, d in modalities.items()}

    def draw(per_class):
        y = torch.arange(n_classes).repeat_interleave(per_class)
        inputs = {m: separation[m] * means[m][y] + torch.randn(y.numel(), d, generator=gen)
                  for m, d in modalities.items()}
        return MultimodalData(inputs, y)

    train, test = draw(train_per_class), draw(test_per_class)
    valid = draw(valid_per_class) if valid_per_class else None
    return class_incremental_stream(train, test, valid, classes_per_task=classes_per_task, seed=None,
                                    scenario=scenario, name="synthetic")
