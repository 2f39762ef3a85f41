"""MoFot under torch.distributed: two gloo processes (DDP training on shards of each batch, ranking
sharded by query) give the same MRR matrix as one process, and the replicas stay identical."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port

pytestmark = [pytest.mark.distributed]
pytest.importorskip("pykeen")

WORLD = 2


def _experiment(sparse):
    from mmcl_fast.methods.mofot import MoFotConfig, load_snapshots, make_experiment
    from mmcl_fast.nn.kge import FeatureSource

    config = MoFotConfig(kg="umls", preset="tiny", modalities="none", strategy="mofot", sparse=sparse, threads=1)
    snaps = load_snapshots(config)
    g = torch.Generator().manual_seed(0)
    feats = {"text": FeatureSource(torch.randn(snaps.num_entities, 10, generator=g))}
    return make_experiment(config, snapshots=snaps, features=feats)


def _run(out_dir, sparse):
    from mmcl_fast.continual.experiment import run_experiment

    exp = _experiment(sparse)
    res = run_experiment(exp, out_dir, method_name="mofot", config={"sparse": sparse}, progress=False, print_fn=None,
                         plots=False)
    R = np.array([[np.nan if v is None else v for v in row] for row in res["result_matrix"]["matrix"]])
    return R, {n: p.detach().clone() for n, p in exp.method.model.named_parameters()}


def _worker(rank, port, out_dir, sparse):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        R, params = _run(os.path.join(out_dir, f"run{rank}"), sparse)
        torch.save({"R": R, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sparse", [False, True])
def test_two_processes_equal_one(tmp_path, sparse):
    if sparse:
        from mmcl_fast.optim import ModalityAdamW

        p = torch.nn.Parameter(torch.zeros(3, 2))
        p.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (3, 2))
        try:
            ModalityAdamW([p], lr=0.1).step()
        except TypeError:
            pytest.skip("ModalityAdamW takes no sparse gradient in this build")
    mp.spawn(_worker, args=(free_port(), str(tmp_path), sparse), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.set_num_threads(1)
    R1, _ = _run(str(tmp_path / "single"), sparse)
    assert np.isfinite(R1).all()
    # every rank reports the same (all-reduced) matrix, and the replicas did not drift apart
    assert np.array_equal(ranks[0]["R"], ranks[1]["R"])
    for n, p in ranks[0]["params"].items():
        assert torch.allclose(p, ranks[1]["params"][n], atol=1e-6), n
    # two processes on halves of each batch = one process on the whole batch (round-off only)
    # (not the parameters themselves: Adam divides by the root of the second moment, so round-off in
    # near-zero gradients moves a parameter by up to a step's size, and that adds up over the steps)
    np.testing.assert_allclose(ranks[0]["R"], R1, atol=2e-3)
    assert not np.array_equal(R1, np.zeros_like(R1))


def test_torchrun_cli_writes_one_run(tmp_path):
    """`torchrun --nproc_per_node 2 -m mmcl_fast.cli run mofot ...`: rank 0 writes the run's folder,
    and its MRR matrix is the one-process matrix."""
    import json
    import subprocess
    import sys

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed beside this Python")
    common = ["run", "mofot", "--set", "preset=tiny", "--set", "modalities=none", "--set", "threads=1",
              "--no-progress", "--quiet"]
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mmcl_fast.cli", *common,
                          "-o", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "mmcl_fast.cli", *common, "-o", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]

    def matrix(d):
        rows = json.loads((tmp_path / d / "results.json").read_text())["result_matrix"]["matrix"]
        return np.array([[np.nan if v is None else v for v in r] for r in rows])

    assert (tmp_path / "ddp" / "result_matrix.png").exists()
    assert not (tmp_path / "ddp" / ".rank1" / "result_matrix.png").exists()
    np.testing.assert_allclose(matrix("ddp"), matrix("one"), atol=2e-3)
