"""The result matrix of a run as it fills up: R[i, j] (NaN until recorded), the scores at
initialisation, the test sizes, and JSON round trips (NaN is written as null)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import metrics


def _nan_to_none(x):
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _none_to_nan(x):
    return [math.nan if v is None else float(v) for v in x]


class ResultMatrix:
    """R[i, j] = score on task j after training task i, for a stream of `len(task_names)` tasks.

    `extra[name]` holds further metrics of the same evaluations (e.g. Hits@10 beside MRR), one
    [T, T] matrix per name, filled by `record(..., extra={name: value})`."""

    def __init__(self, task_names: Sequence[str], metric: str = "accuracy",
                 test_sizes: Sequence[int] | None = None):
        self.task_names = [str(n) for n in task_names]
        if not self.task_names:
            raise ValueError("a result matrix needs at least one task")
        T = len(self.task_names)
        if test_sizes is not None and len(test_sizes) != T:
            raise ValueError(f"test_sizes must hold {T} sizes, got {list(test_sizes)}")
        self.metric = metric
        self.test_sizes = None if test_sizes is None else [int(n) for n in test_sizes]
        self.R = np.full((T, T), math.nan)
        self.init = np.full(T, math.nan)
        self.extra: dict[str, np.ndarray] = {}
        self.rows_done = 0  # tasks trained (and evaluated) so far

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def record(self, trained: int, evaluated: int, score: float, extra: dict[str, float] | None = None) -> None:
        self.R[trained, evaluated] = float(score)
        for name, value in (extra or {}).items():
            if name not in self.extra:
                self.extra[name] = np.full(self.R.shape, math.nan)
            self.extra[name][trained, evaluated] = float(value)

    def extra_summary(self) -> dict[str, dict[str, float]]:
        """For each extra metric: its average over the seen tasks after the last trained task
        (test-size weighted too when the sizes are known), as `summary()` does for the score."""
        if self.rows_done == 0:
            return {}
        sizes = self.test_sizes if self.test_sizes is not None and sum(self.test_sizes) > 0 else None
        out = {}
        for name, m in self.extra.items():
            done = m[: self.rows_done]
            out[name] = {"average": metrics.average_score(done)}
            if sizes is not None:
                out[name]["weighted_average"] = metrics.average_score(done, weights=sizes)
        return out

    def record_init(self, evaluated: int, score: float) -> None:
        self.init[evaluated] = float(score)

    def finish_row(self, trained: int) -> None:
        if trained != self.rows_done:
            raise ValueError(f"row {trained} finished but {self.rows_done} rows were done")
        self.rows_done += 1

    @property
    def has_init(self) -> bool:
        return bool(np.isfinite(self.init).any())

    def done(self) -> np.ndarray:
        """The rows of the tasks trained so far, [rows_done, T]."""
        return self.R[: self.rows_done]

    def summary(self, forgetting_variant: str = "max") -> dict[str, Any]:
        if self.rows_done == 0:
            return {"tasks_done": 0}
        sizes = self.test_sizes if self.test_sizes is not None and sum(self.test_sizes) > 0 else None
        return metrics.summarize(self.done(), init=self.init if self.has_init else None,
                                 test_sizes=sizes, forgetting_variant=forgetting_variant)

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "task_names": list(self.task_names),
            "metric": self.metric,
            "test_sizes": self.test_sizes,
            "matrix": _nan_to_none(self.R.tolist()),
            "init": _nan_to_none(self.init.tolist()),
            "rows_done": self.rows_done,
            "extra": {name: _nan_to_none(m.tolist()) for name, m in self.extra.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResultMatrix:
        out = cls(d["task_names"], d.get("metric", "accuracy"), d.get("test_sizes"))
        out.R = np.array([_none_to_nan(row) for row in d["matrix"]], dtype=np.float64)
        out.init = np.array(_none_to_nan(d["init"]), dtype=np.float64)
        out.extra = {name: np.array([_none_to_nan(row) for row in m], dtype=np.float64)
                     for name, m in (d.get("extra") or {}).items()}
        out.rows_done = int(d["rows_done"])
        return out

    def as_lists(self) -> list[list[float | None]]:
        return _nan_to_none(self.R.tolist())


jsonable = _nan_to_none
