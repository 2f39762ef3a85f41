"""The `mmcl-fast` command, in process: run end to end into a temporary folder, config errors that
name the key, info, and bench (its table logic and its errors)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from mmcl_fast import bench
from mmcl_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "dataset=synthetic", "--num-tasks", "2", "--epochs", "1", "--hidden", "8", "--feature-dim", "4",
        "--set", "synthetic_train_per_class=12", "--set", "synthetic_test_per_class=4", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # the digits method sets torch's CPU threads
    yield
    torch.set_num_threads(n)


def test_run_writes_the_log_results_and_pictures(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "digits", "--output", str(out)] + TINY) == 0
    printed = capsys.readouterr().out
    assert "after \\ on" in printed and "BWT" in printed
    for name in ("log.jsonl", "results.json", "result_matrix.png", "curves.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    for png in ("result_matrix.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # init_eval (2 lines) + eval_future after each of 2 tasks (2 x 2 lines)
    assert [(r["task_trained"], r["task_evaluated"]) for r in log] == \
        [(None, 0), (None, 1), (0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(0.0 <= r["score"] <= 1.0 and r["metric"] == "accuracy" for r in log)
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["method"] == "digits"
    matrix = results["result_matrix"]["matrix"]
    assert [[r["score"] for r in log if r["task_trained"] == i] for i in (0, 1)] == matrix
    assert results["config"]["epochs"] == 1 and results["config"]["dataset"] == "synthetic"
    assert results["versions"]["torch"] == torch.__version__
    assert {"average", "forgetting", "bwt", "fwt"} <= set(results["metrics"])


def test_run_again_resumes_and_a_changed_config_is_refused(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["run", "digits", "-o", out, "--stop-after", "0", "--quiet"] + TINY) == 0
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is False
    assert main(["run", "digits", "-o", out] + TINY) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True
    assert main(["run", "digits", "-o", out, "--lr", "0.01"] + TINY) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "lr" in err and "--fresh" in err


@pytest.mark.parametrize("args, key", [
    (["--set", "epochs=two"], "epochs"),
    (["--set", "no_such_key=1"], "no_such_key"),
    (["--lr", "-1"], "lr"),
    (["--memory-policy", "fifo"], "memory_policy"),
    (["--set", "modulation=maybe"], "modulation"),
    (["--lr", "inf"], "lr"),
    (["--alpha", "nan"], "alpha"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--set", "threads=100000"], "threads"),
    (["--test-fraction", "0"], "test_fraction"),
    (["--set", "synthetic_test_per_class=0"], "synthetic_test_per_class"),
    (["--device", "cuda:x"], "device"),
    (["--device", "cpu:0"], "device"),
    (["--device", "cuda:99"], "device"),
])
def test_bad_config_values_name_the_key(tmp_path, capsys, args, key):
    assert main(["run", "digits", "-o", str(tmp_path)] + args) == 2
    err = capsys.readouterr().err
    assert f"'{key}'" in err
    assert not os.listdir(tmp_path)  # nothing ran


def test_cuda_without_a_gpu_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["run", "digits", "-o", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "'device'" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_negative_stop_after_and_an_output_file_are_usage_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "digits", "-o", str(out), "--stop-after", "-1"] + TINY) == 2
    assert "--stop-after" in capsys.readouterr().err and not out.exists()
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main(["run", "digits", "-o", str(f)] + TINY) == 2
    assert "not a folder" in capsys.readouterr().err and f.read_text() == "x"


def test_cross_field_checks_see_the_merged_config(tmp_path):
    from mmcl_fast.methods import get_method

    spec = get_method("digits")
    # 10 tasks of 1 class are valid, though 10 tasks of the default 2 classes are not: the layers
    # are merged before the dataclass checks them
    c = spec.make_config({"num_tasks": "10"}, overrides={"classes_per_task": "1"})
    assert (c.num_tasks, c.classes_per_task) == (10, 1)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"num_tasks": 10}))
    c = spec.make_config({"classes_per_task": "1"}, file=str(cfg))
    assert (c.num_tasks, c.classes_per_task) == (10, 1)
    with pytest.raises(ValueError, match="num_tasks"):
        spec.make_config({"num_tasks": "10"})
    # and the same through the command line (parsed as `run` does; the run itself is not done here)
    from mmcl_fast.cli import build_parser
    from mmcl_fast.continual.config import parse_assignments

    for cli in (["--num-tasks", "10", "--set", "classes_per_task=1"],
                ["--config", str(cfg), "--classes-per-task", "1"]):
        args = build_parser().parse_args(["run", "digits", "-o", "x"] + cli)
        flags = {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("cfg:")}
        c = spec.make_config(flags, file=args.config, overrides=parse_assignments(args.set or []))
        assert (c.num_tasks, c.classes_per_task) == (10, 1)


def test_config_file_is_checked_and_flags_override_it(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochs": 1, "batchsize": 8}))
    assert main(["run", "digits", "-o", str(tmp_path / "a"), "--config", str(bad)]) == 2
    assert "'batchsize'" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"alpha": "strong"}))
    assert main(["run", "digits", "-o", str(tmp_path / "b"), "--config", str(wrong)]) == 2
    assert "'alpha'" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"epochs": 3, "lr": 0.01}))
    from mmcl_fast.methods import get_method

    spec = get_method("digits")
    config = spec.make_config({"epochs": "2"}, file=str(good))  # the flag beats the file
    assert config.epochs == 2 and config.lr == 0.01


def test_yaml_config_when_pyyaml_is_there(tmp_path, capsys):
    if importlib.util.find_spec("yaml") is None:
        pytest.skip("pyyaml is not installed")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\nnum_tasks: oops\n")
    assert main(["run", "digits", "-o", str(tmp_path / "x"), "--config", str(cfg)] + TINY[:2]) == 2
    assert "'num_tasks'" in capsys.readouterr().err


def test_run_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    assert "digits" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "digits", "--help"])
    assert "--memory-policy" in capsys.readouterr().out


def test_info_reports_version_backends_and_device(capsys):
    import mmcl_fast

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert mmcl_fast.__version__ in text and "reference" in text and "device:" in text
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["backends"]["reference"]["available"] is True
    assert set(d["backends"]) == {"reference", "cpu", "cuda", "triton"}
    assert "digits" in d["methods"]


def _bench_json():
    def b(group, name, median, **extra):
        return {"group": group, "name": name, "stats": {"median": median}, "extra_info": extra}

    return {"machine_info": {"node": "box", "cpu": {"brand_raw": "CPU"}, "python_version": "3"},
            "benchmarks": [
                b("C-rank-15k", "test_rank[ours[cpu]]", 0.002, device="cpu", torch="x", threads=2, backends="cpu"),
                b("C-rank-15k", "test_rank[lkge_materialise]", 0.020),
                b("C-modemb-4096", "test_modemb[ours[cpu]]", 0.010),
                b("C-modemb-4096", "test_modemb[eager_reference]", 0.030),
                b("C-modemb-4096", "test_modemb[compiled_reference]", 0.015),
                b("A-noise", "test_noise_ours[cpu]", 0.1, bytes=2e8),
                b("A-noise", "test_noise_seed_style_loop", 0.4, bytes=2e8),
            ]}


def test_bench_table_uses_each_groups_baseline():
    rows = {(r["group"], r["name"]): r for r in bench.rows(_bench_json())}
    # C-rank: the baseline is the row whose name contains "[lkge": 0.020 / 0.002 = 10x
    assert rows[("C-rank-15k", "rank[lkge_materialise]")]["speedup"] == pytest.approx(1.0)
    assert rows[("C-rank-15k", "rank[ours[cpu]]")]["speedup"] == pytest.approx(10.0)
    # C-modemb: "[eager_reference": 0.030 / 0.010 = 3x, compiled 0.030 / 0.015 = 2x
    assert rows[("C-modemb-4096", "modemb[ours[cpu]]")]["speedup"] == pytest.approx(3.0)
    assert rows[("C-modemb-4096", "modemb[compiled_reference]")]["speedup"] == pytest.approx(2.0)
    # A-noise: by name; 2e8 bytes in 0.1 s = 2 GB/s
    assert rows[("A-noise", "noise_ours[cpu]")]["speedup"] == pytest.approx(4.0)
    assert rows[("A-noise", "noise_ours[cpu]")]["gbps"] == pytest.approx(2.0)
    text = bench.format_report(_bench_json(), markdown=True)
    assert text.splitlines()[0].startswith("# box") and "| C-rank-15k | rank[lkge_materialise] |" in text


def test_benchmarks_report_script_is_a_wrapper(tmp_path):
    path = tmp_path / "out.json"
    path.write_text(json.dumps(_bench_json()))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "report.py"), str(path)],
                         capture_output=True, text=True, check=True)
    assert res.stdout == bench.format_report(_bench_json()) + "\n"


def test_bench_from_json_and_errors(tmp_path, capsys):
    path = tmp_path / "out.json"
    path.write_text(json.dumps(_bench_json()))
    assert main(["bench", "--from-json", str(path)]) == 0
    assert "x vs baseline" in capsys.readouterr().out
    assert main(["bench", "--benchmarks", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--benchmarks" in err
    (tmp_path / "junk.json").write_text("{}")
    assert main(["bench", "--from-json", str(tmp_path / "junk.json")]) == 2


def test_bench_runs_pytest_benchmark_and_prints_the_table(tmp_path, capsys):
    if importlib.util.find_spec("pytest_benchmark") is None:
        pytest.skip("pytest-benchmark is not installed")
    f = tmp_path / "bench_tiny.py"
    f.write_text("def test_sum(benchmark):\n    benchmark(sum, range(10))\n")
    out = tmp_path / "out.json"
    rc = main(["bench", "--benchmarks", str(f), "--json", str(out), "-k", "sum", "-q", "-p", "no:cacheprovider",
               "--benchmark-min-rounds=1", "--benchmark-max-time=0.001"])
    assert rc == 0
    assert json.loads(out.read_text())["benchmarks"][0]["name"] == "test_sum"
    assert "sum" in capsys.readouterr().out.split("x vs baseline")[-1]


def test_bench_failed_run_does_not_print_an_old_table(tmp_path, capsys, monkeypatch):
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "out.json"
    out.write_text(json.dumps(_bench_json()))  # an earlier run's table
    monkeypatch.setattr(bench.subprocess, "call", lambda cmd, **kw: 3)  # pytest fails before writing any JSON
    assert main(["bench", "--benchmarks", str(tmp_path), "--json", str(out)]) == 3
    assert "x vs baseline" not in capsys.readouterr().out and not out.exists()


def test_config_coercion_of_every_annotation_kind():
    import dataclasses
    from typing import Literal, Optional

    from mmcl_fast.continual.config import config_from_dict

    @dataclasses.dataclass
    class C:
        n: int = 1
        x: float = 0.5
        flag: bool = False
        name: str = "a"
        limit: Optional[int] = None  # noqa: UP045  (the typing.Union spelling, on purpose)
        cap: int | None = 3
        mode: Literal["fast", "slow"] = "fast"
        sizes: tuple[int, ...] = (1, 2)
        pair: tuple[int, float] = (1, 2.0)

    c = config_from_dict(C, {"n": "4", "x": 2, "flag": "yes", "limit": "7", "cap": "none", "mode": "slow",
                             "sizes": "[3, 4, 5]", "pair": [2, "0.5"]})
    assert (c.n, c.x, c.flag, c.limit, c.cap, c.mode, c.sizes, c.pair) == \
        (4, 2.0, True, 7, None, "slow", (3, 4, 5), (2, 0.5))
    assert config_from_dict(C, {"limit": None}).limit is None
    for key, value in [("n", 1.5), ("n", True), ("x", "fast"), ("flag", 2), ("name", 3), ("limit", "x"),
                       ("cap", 2.5), ("mode", "medium"), ("sizes", ["a"]), ("pair", [1])]:
        with pytest.raises(ValueError, match=f"'{key}"):
            config_from_dict(C, {key: value})
