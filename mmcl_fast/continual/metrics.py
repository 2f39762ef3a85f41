"""Continual-learning metrics from one result matrix.

`R[i, j]` is the score (accuracy, micro-F1, MRR ...) on task j's test data after training task i;
tasks are numbered from 0 here, so a stream of T tasks has rows and columns 0..T-1, and the
metrics "after task t" use row t. Entries may be NaN: a task without test data, or a pair that was
not evaluated (the scores on future tasks, j > i, are optional). NaN entries are left out of every
mean. Forgetting, BWT and FWT are 0.0 when they are empty by definition (after the first task /
a single row: there is no earlier task to forget or transfer to), and NaN when pairs exist but
none of them could be measured (e.g. FWT without scores at initialisation, or without the scores
on future tasks): "not measured" is not "no transfer". An average score with no score at all is
NaN too. Summaries written as JSON carry null for NaN (`results.jsonable`).

Definitions (and where they come from):
- average score after task t (GEM's ACC when t = T-1):  A_t = mean_{j<=t} R[t, j]
  (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, eq. 2).
- test-size-weighted average after task t:  A^w_t = sum_{j<=t} n_j R[t, j] / sum_{j<=t} n_j,
  n_j the size of task j's test set: LKGE's "whole" MRR over the union of the snapshots' test
  sets (Cui et al., "Lifelong Embedding Learning and Transfer for Growing Knowledge Graphs",
  AAAI 2023), exact for any score that is a mean over test items.
- forgetting after task t, max-based (Chaudhry et al., "Riemannian Walk for Incremental
  Learning", ECCV 2018, eq. 11):  f_j = max_{j<=l<t} R[l, j] - R[t, j],  F_t = mean_{j<t} f_j.
  The maximum runs over the rows after task j was trained (l >= j): a score before training, only
  present when future tasks are evaluated, is not knowledge that could be forgotten.
- forgetting after task t, last-based (Avalanche's `forgetting` metric, Lomonaco et al., 2021):
  f_j = R[j, j] - R[t, j],  F_t = mean_{j<t} f_j.
- backward transfer (GEM, eq. 3):  BWT = mean_{j<T-1} (R[T-1, j] - R[j, j]).
- forward transfer (GEM, eq. 4):  FWT = mean_{1<=j<=T-1} (R[j-1, j] - b_j), b_j the score on
  task j at initialisation (before any training).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FORGETTING_VARIANTS = ("max", "last")


def as_matrix(R) -> np.ndarray:
    """R as a float64 array [rows, T] with rows <= T (a run in progress has fewer rows)."""
    a = np.array(R, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] > a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"a result matrix must be [rows, T] with 1 <= rows <= T, got shape {a.shape}")
    return a


def _row(a: np.ndarray, t: int | None) -> int:
    t = a.shape[0] - 1 if t is None else int(t)
    if t < 0:
        t += a.shape[0]
    if not 0 <= t < a.shape[0]:
        raise ValueError(f"task {t} is outside the {a.shape[0]} rows of the result matrix")
    return t


def _mean(values: list[float], pairs: int) -> float:
    """The mean of the measured `values` out of `pairs` candidate pairs: 0.0 when there is no pair
    at all (empty by definition), NaN when there are pairs but none was measured."""
    if values:
        return float(np.mean(values))
    return 0.0 if pairs == 0 else math.nan


def average_score(R, t: int | None = None, weights: Sequence[float] | None = None) -> float:
    """A_t = mean_{j<=t} R[t, j] (GEM), or with `weights` (test sizes n_j) the weighted mean
    sum n_j R[t, j] / sum n_j (LKGE). Tasks without a score or with weight 0 are left out; NaN
    when no task up to t has a score."""
    a = as_matrix(R)
    t = _row(a, t)
    scores = a[t, : t + 1]
    if weights is None:
        w = np.ones(t + 1)
    else:
        w = np.array(weights, dtype=np.float64)
        if w.shape != (a.shape[1],) or (w < 0).any():
            raise ValueError(f"weights must be {a.shape[1]} non-negative numbers (one per task), got {list(weights)}")
        w = w[: t + 1]
    ok = ~np.isnan(scores) & (w > 0)
    if not ok.any():
        return math.nan
    return float((w[ok] * scores[ok]).sum() / w[ok].sum())


def average_curve(R, weights: Sequence[float] | None = None) -> list[float]:
    """[A_0, ..., A_{rows-1}]: the average score after each task."""
    a = as_matrix(R)
    return [average_score(a, t, weights) for t in range(a.shape[0])]


def forgetting(R, t: int | None = None, variant: str = "max") -> float:
    """F_t: the mean over j < t of f_j (max-based, Chaudhry et al. 2018, or last-based,
    Avalanche; see the module docstring). 0.0 when there is no j (t = 0), NaN when no f_j could be
    measured."""
    if variant not in FORGETTING_VARIANTS:
        raise ValueError(f"forgetting variant must be one of {FORGETTING_VARIANTS}, got {variant!r}")
    a = as_matrix(R)
    t = _row(a, t)
    values = []
    for j in range(t):
        now = a[t, j]
        if variant == "max":
            before = a[j:t, j]
            before = before[~np.isnan(before)]
            best = before.max() if before.size else math.nan
        else:
            best = a[j, j]
        if not (math.isnan(now) or math.isnan(best)):
            values.append(best - now)
    return _mean(values, t)


def forgetting_curve(R, variant: str = "max") -> list[float]:
    """[F_0, ..., F_{rows-1}]: forgetting after each task (F_0 = 0)."""
    a = as_matrix(R)
    return [forgetting(a, t, variant) for t in range(a.shape[0])]


def backward_transfer(R) -> float:
    """BWT = mean_{j<T-1} (R[T-1, j] - R[j, j]) (GEM), with T-1 the last row of R; 0.0 for a
    single row, NaN when no pair could be measured."""
    a = as_matrix(R)
    t = a.shape[0] - 1
    values = [a[t, j] - a[j, j] for j in range(t) if not (math.isnan(a[t, j]) or math.isnan(a[j, j]))]
    return _mean(values, t)


def forward_transfer(R, init: Sequence[float]) -> float:
    """FWT = mean_{1<=j<=t} (R[j-1, j] - b_j) (GEM) over the rows of R, b = `init` the scores at
    initialisation; pairs with a missing score are left out. 0.0 for a single row (no pair), NaN
    when no pair could be measured (no scores at initialisation, future tasks not evaluated)."""
    a = as_matrix(R)
    b = np.array(init, dtype=np.float64)
    if b.shape != (a.shape[1],):
        raise ValueError(f"init must hold one score per task ({a.shape[1]}), got {list(init)}")
    values = [a[j - 1, j] - b[j] for j in range(1, a.shape[0]) if not (math.isnan(a[j - 1, j]) or math.isnan(b[j]))]
    return _mean(values, a.shape[0] - 1)


def summarize(R, init: Sequence[float] | None = None, test_sizes: Sequence[int] | None = None,
              forgetting_variant: str = "max") -> dict[str, object]:
    """Every metric of R after its last row: the final and per-task average score (weighted by
    test size too when `test_sizes` is given), forgetting (the chosen variant, and both by name),
    BWT, and FWT when `init` is given (None otherwise)."""
    a = as_matrix(R)
    out: dict[str, object] = {
        "tasks_done": int(a.shape[0]),
        "average": average_score(a),
        "average_curve": average_curve(a),
        "forgetting_variant": forgetting_variant,
        "forgetting": forgetting(a, variant=forgetting_variant),
        "forgetting_curve": forgetting_curve(a, forgetting_variant),
        "forgetting_max": forgetting(a, variant="max"),
        "forgetting_last": forgetting(a, variant="last"),
        "bwt": backward_transfer(a),
        "fwt": forward_transfer(a, init) if init is not None else None,
    }
    if test_sizes is not None:
        out["weighted_average"] = average_score(a, weights=test_sizes)
        out["weighted_average_curve"] = average_curve(a, weights=test_sizes)
    return out
