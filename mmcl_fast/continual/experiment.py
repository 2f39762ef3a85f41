"""A whole continual run into a folder: train (resuming when the folder has a checkpoint), then
write the results and the report.

The folder ends up with
  log.jsonl           one JSON object per evaluation (written by the loop as it goes)
  checkpoint.pt       the state after the last finished task (for resuming)
  results.json        the result matrix, the metrics, the config, the versions, the timings
  result_matrix.png   the heat map of the result matrix
  curves.png          average score and forgetting over tasks
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from . import report
from .loop import Callback, ContinualMethod, ContinualTrainer
from .results import jsonable
from .streams import TaskStream

RESULTS = "results.json"
MATRIX_PNG = "result_matrix.png"
CURVES_PNG = "curves.png"


@dataclasses.dataclass
class Experiment:
    """What a method's builder returns: the stream, the method, and how the loop evaluates."""

    stream: TaskStream
    method: ContinualMethod
    eval_future: bool = False
    init_eval: bool = False
    forgetting: str = "max"


def versions() -> dict[str, Any]:
    import mmcl_fast

    return {
        "mmcl_fast": mmcl_fast.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backends": [name for name, st in mmcl_fast.available_backends().items() if st],
    }


def check_output_dir(output_dir: str) -> None:
    """ValueError unless `output_dir` is a folder or does not exist yet."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output {output_dir!r} exists and is not a folder: a run writes a folder of files "
                         "(log.jsonl, results.json, ...); pass a folder path")


def run_experiment(experiment: Experiment, output_dir: str, *, method_name: str, config: dict[str, Any],
                   progress: bool | None = None, resume: bool = True, stop_after: int | None = None,
                   callbacks: Sequence[Callback] = (), print_fn: Callable[[str], None] | None = print,
                   plots: bool = True) -> dict[str, Any]:
    """Run `experiment` into `output_dir` and return what results.json holds."""
    check_output_dir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    full_config = {"method": method_name, **config}
    trainer = ContinualTrainer(experiment.stream, experiment.method, output_dir,
                               eval_future=experiment.eval_future, init_eval=experiment.init_eval,
                               callbacks=callbacks, progress=progress, config=full_config)
    results = trainer.run(resume=resume, stop_after=stop_after)
    if print_fn is not None and trainer.resumed_from is not None:
        print_fn(f"resumed from {trainer.checkpoint_path} at task {trainer.resumed_from}")
    summary = results.summary(experiment.forgetting)
    stream = experiment.stream
    payload = {
        "method": method_name,
        "metric": results.metric,
        "scenario": stream.scenario,
        "tasks": stream.describe(),
        "complete": results.rows_done == results.num_tasks,
        "result_matrix": results.to_dict(),
        "metrics": summary,
        "extra_metrics": results.extra_summary(),
        "method_summary": experiment.method.summary() if hasattr(experiment.method, "summary") else None,
        "config": config,
        "versions": versions(),
        "training": trainer.training_summary(),
        "total_seconds": trainer.elapsed(),
        "resumed_from_task": trainer.resumed_from,
        "argv": sys.argv,
    }
    tmp = os.path.join(output_dir, RESULTS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(jsonable(payload), f, indent=2, default=str)
    os.replace(tmp, os.path.join(output_dir, RESULTS))
    if plots and importlib.util.find_spec("matplotlib") is None:
        plots = False  # the results are worth keeping without their pictures
        if print_fn is not None:
            print_fn("matplotlib is not installed: no PNG report (pip install 'mmcl_fast[run]')")
    if results.rows_done and plots:
        done = results.done()
        report.plot_result_matrix(done, results.task_names, os.path.join(output_dir, MATRIX_PNG),
                                  metric=results.metric, title=f"{method_name}: {results.metric}")
        sizes = results.test_sizes if results.test_sizes and sum(results.test_sizes) > 0 else None
        report.plot_curves(done, results.task_names, os.path.join(output_dir, CURVES_PNG), metric=results.metric,
                           forgetting_variant=experiment.forgetting, weights=sizes, title=method_name)
    if print_fn is not None and results.rows_done:
        print_fn(report.format_table(results.done(), results.task_names, results.metric, summary,
                                     init=results.init if results.has_init else None))
        written = ["log.jsonl", RESULTS] + ([MATRIX_PNG, CURVES_PNG] if plots else [])
        print_fn(f"wrote {output_dir}: {', '.join(written)}")
    return payload
