"""Metrics of mmcl_fast.continual against matrices worked out by hand (the arithmetic is written
next to each expected number)."""
import json
import math

import numpy as np
import pytest

from mmcl_fast.continual import metrics
from mmcl_fast.continual.report import format_table
from mmcl_fast.continual.results import ResultMatrix

nan = math.nan

# R[i, j]: score on task j after training task i. The upper triangle (j > i) holds scores on tasks
# not trained yet; R[1, 0] = 0.95 > R[0, 0] (task 0 improved after task 1) separates max-based from
# last-based forgetting, and R[0, 1] = 0.85 > R[1, 1] is a score *before* task 1 was trained, which
# max-based forgetting must not count.
R = [[0.90, 0.85, 0.20],
     [0.95, 0.80, 0.15],
     [0.50, 0.70, 0.95]]
INIT = [0.10, 0.05, 0.10]
SIZES = [10, 30, 60]


def test_average_score_per_row():
    assert metrics.average_score(R, 0) == pytest.approx(0.90)
    assert metrics.average_score(R, 1) == pytest.approx((0.95 + 0.80) / 2)  # 0.875
    assert metrics.average_score(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)  # 0.71666...
    assert metrics.average_curve(R) == pytest.approx([0.90, 0.875, 2.15 / 3])


def test_average_ignores_the_upper_triangle():
    other = np.array(R)
    other[0, 1:] = [0.0, 1.0]
    other[1, 2] = 1.0
    assert metrics.average_curve(other) == pytest.approx(metrics.average_curve(R))


def test_test_size_weighted_average_lkge():
    # after task 2: (10*0.50 + 30*0.70 + 60*0.95) / (10+30+60) = (5 + 21 + 57) / 100
    assert metrics.average_score(R, weights=SIZES) == pytest.approx(0.83)
    # after task 1: (10*0.95 + 30*0.80) / 40 = 33.5 / 40
    assert metrics.average_score(R, 1, weights=SIZES) == pytest.approx(0.8375)
    # equal weights give the plain mean
    assert metrics.average_score(R, weights=[5, 5, 5]) == pytest.approx(2.15 / 3)


def test_forgetting_max_based_chaudhry():
    # after task 2: f_0 = max(R00, R10) - R20 = 0.95 - 0.50 = 0.45;
    #               f_1 = max(R11) - R21 = 0.80 - 0.70 = 0.10 (R01 = 0.85 is before training, not counted)
    assert metrics.forgetting(R, variant="max") == pytest.approx((0.45 + 0.10) / 2)  # 0.275
    # after task 1: f_0 = R00 - R10 = 0.90 - 0.95 = -0.05
    assert metrics.forgetting(R, 1, variant="max") == pytest.approx(-0.05)
    assert metrics.forgetting_curve(R, "max") == pytest.approx([0.0, -0.05, 0.275])


def test_forgetting_last_based_avalanche():
    # after task 2: f_0 = R00 - R20 = 0.90 - 0.50 = 0.40; f_1 = R11 - R21 = 0.80 - 0.70 = 0.10
    assert metrics.forgetting(R, variant="last") == pytest.approx(0.25)
    assert metrics.forgetting_curve(R, "last") == pytest.approx([0.0, -0.05, 0.25])


def test_bwt_gem():
    # mean(R20 - R00, R21 - R11) = mean(0.50 - 0.90, 0.70 - 0.80) = mean(-0.40, -0.10)
    assert metrics.backward_transfer(R) == pytest.approx(-0.25)


def test_fwt_gem_with_scores_at_initialisation():
    # mean(R01 - b1, R12 - b2) = mean(0.85 - 0.05, 0.15 - 0.10) = mean(0.80, 0.05)
    assert metrics.forward_transfer(R, INIT) == pytest.approx(0.425)


def test_a_single_task_is_nan_free():
    one = [[0.7]]
    s = metrics.summarize(one, init=[0.1], test_sizes=[5])
    assert s["average"] == pytest.approx(0.7)
    assert s["forgetting"] == 0.0 and s["forgetting_last"] == 0.0
    assert s["bwt"] == 0.0 and s["fwt"] == 0.0
    assert s["weighted_average"] == pytest.approx(0.7)


def _all_finite(x):
    if isinstance(x, dict):
        return all(_all_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_all_finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def test_a_task_without_test_data_is_left_out():
    # task 1 has no test data: its column is NaN everywhere
    Rn = [[0.90, nan, 0.20],
          [0.60, nan, 0.10],
          [0.50, nan, 0.90]]
    assert metrics.average_score(Rn) == pytest.approx((0.50 + 0.90) / 2)
    assert metrics.average_score(Rn, 1) == pytest.approx(0.60)  # only task 0 has a score in row 1
    # f_0 = max(0.90, 0.60) - 0.50 = 0.40; task 1 has nothing to forget
    assert metrics.forgetting(Rn) == pytest.approx(0.40)
    assert metrics.backward_transfer(Rn) == pytest.approx(0.50 - 0.90)
    # only j = 2 has both scores: R12 - b2 = 0.10 - 0.10
    assert metrics.forward_transfer(Rn, INIT) == pytest.approx(0.0)
    # weighted, n_1 = 0: (10*0.50 + 30*0.90) / 40 = 32 / 40
    s = metrics.summarize(Rn, init=INIT, test_sizes=[10, 0, 30])
    assert s["weighted_average"] == pytest.approx(0.80)
    assert _all_finite(s)


def test_a_run_in_progress_uses_its_last_row():
    partial = [row[:] for row in R[:2]]
    assert metrics.average_score(partial) == pytest.approx(0.875)
    assert metrics.forgetting(partial) == pytest.approx(-0.05)
    assert metrics.backward_transfer(partial) == pytest.approx(0.95 - 0.90)
    # FWT over the rows there: R01 - b1 only
    assert metrics.forward_transfer(partial, INIT) == pytest.approx(0.80)


def test_summary_collects_every_metric():
    s = metrics.summarize(R, init=INIT, test_sizes=SIZES, forgetting_variant="last")
    assert s["forgetting"] == pytest.approx(0.25) and s["forgetting_variant"] == "last"
    assert s["forgetting_max"] == pytest.approx(0.275)
    assert s["bwt"] == pytest.approx(-0.25) and s["fwt"] == pytest.approx(0.425)
    assert s["weighted_average"] == pytest.approx(0.83)
    assert metrics.summarize(R)["fwt"] is None


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="variant"):
        metrics.forgetting(R, variant="mean")
    with pytest.raises(ValueError, match="rows"):
        metrics.average_score([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    with pytest.raises(ValueError, match="init"):
        metrics.forward_transfer(R, [0.1])
    with pytest.raises(ValueError, match="weights"):
        metrics.average_score(R, weights=[1, -1, 1])
    with pytest.raises(ValueError, match="outside"):
        metrics.average_score(R, 3)


def test_result_matrix_json_round_trip_writes_null_for_missing():
    rm = ResultMatrix(["a", "b"], metric="mrr", test_sizes=[3, 0])
    rm.record_init(0, 0.1)
    rm.record(0, 0, 0.5)
    rm.finish_row(0)
    d = json.loads(json.dumps(rm.to_dict(), allow_nan=False))  # strict JSON: no NaN tokens
    assert d["matrix"] == [[0.5, None], [None, None]]
    back = ResultMatrix.from_dict(d)
    assert back.rows_done == 1 and back.task_names == ["a", "b"] and back.metric == "mrr"
    np.testing.assert_array_equal(back.R, rm.R)
    assert back.summary()["average"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="row 2 finished but 1 rows"):
        back.finish_row(2)  # rows finish in order


def test_table_shows_each_score_and_the_row_average():
    text = format_table(R, ["t0", "t1", "t2"], "accuracy", metrics.summarize(R, init=INIT), init=INIT)
    lines = text.splitlines()
    assert lines[0].split()[-4:] == ["t0", "t1", "t2", "avg"]
    assert lines[2].split()[0] == "init"
    assert lines[4].split() == ["t1", "0.9500", "0.8000", "0.1500", "0.8750"]
    assert "BWT -0.2500" in text and "FWT 0.4250" in text


def test_unmeasurable_transfer_and_forgetting_are_nan_not_zero():
    # pairs exist (3 rows) but none could be measured: NaN, not "no transfer"
    assert math.isnan(metrics.forward_transfer(R, [nan, nan, nan]))
    upper_missing = [[0.9, nan, nan], [0.8, 0.9, nan], [0.7, 0.8, 0.9]]
    assert math.isnan(metrics.forward_transfer(upper_missing, INIT))
    no_diag = [[nan, nan, nan], [0.5, nan, nan], [0.5, 0.5, 0.9]]
    assert math.isnan(metrics.backward_transfer(no_diag))
    assert math.isnan(metrics.forgetting(no_diag, variant="last"))
    # empty by definition (a single row): 0.0
    assert metrics.forward_transfer([[0.5, nan]], [0.1, 0.2]) == 0.0
    assert metrics.backward_transfer([[0.5, nan]]) == 0.0
    # and a summary with NaN is written as null in JSON
    from mmcl_fast.continual.results import jsonable

    s = jsonable(metrics.summarize(upper_missing, init=INIT))
    assert s["fwt"] is None and "NaN" not in json.dumps(s)
