"""The continual-learning core (DESIGN.md section 7): task streams, replay memory, metrics, the
training loop and the reports that every method plugs into.

    stream = synthetic_stream(num_tasks=3)              # or class_incremental_stream(train, test, ...)
    memory = ReplayMemory(capacity_per_class=6, policy="herding", device=device)
    trainer = ContinualTrainer(stream, my_method, "runs/x", eval_future=True, init_eval=True)
    R = trainer.run()                                   # resumes from runs/x/checkpoint.pt
    R.summary()                                         # average, forgetting, BWT, FWT ...
"""
from .config import config_from_dict, config_to_dict, load_config_file, parse_assignment
from .data import MultimodalData
from .experiment import Experiment, run_experiment
from .loop import Callback, ContinualMethod, ContinualTrainer
from .metrics import (
    average_curve,
    average_score,
    backward_transfer,
    forgetting,
    forgetting_curve,
    forward_transfer,
    summarize,
)
from .replay import ReplayMemory, herding_order
from .results import ResultMatrix
from .streams import (
    Task,
    TaskStream,
    class_incremental_stream,
    class_order,
    stratified_split,
    synthetic_stream,
)

__all__ = [
    "Callback",
    "ContinualMethod",
    "ContinualTrainer",
    "Experiment",
    "MultimodalData",
    "ReplayMemory",
    "ResultMatrix",
    "Task",
    "TaskStream",
    "average_curve",
    "average_score",
    "backward_transfer",
    "class_incremental_stream",
    "class_order",
    "config_from_dict",
    "config_to_dict",
    "forgetting",
    "forgetting_curve",
    "forward_transfer",
    "herding_order",
    "load_config_file",
    "parse_assignment",
    "run_experiment",
    "stratified_split",
    "summarize",
    "synthetic_stream",
]
