"""Two gloo processes on the CPU: replicas stay bit-identical, and without noise they follow a
single-process run on the concatenated batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mmcl_fast.ops import modality_scores, split_head_logits
from mmcl_fast.optim import ModalityAdamW, param_groups_by_modality

from conftest import free_port

pytestmark = pytest.mark.distributed

STEPS = 20
WORLD = 2


class Fusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = nn.Linear(6, 8)
        self.text = nn.Linear(4, 8)
        self.head = nn.Linear(16, 3)

    def features(self, xv, xt):
        return torch.relu(self.vision(xv)), torch.relu(self.text(xt))

    def forward(self, xv, xt):
        return self.head(torch.cat(self.features(xv, xt), 1))


def _data():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(2 * 8, 6, generator=g), torch.randn(2 * 8, 4, generator=g), torch.randint(0, 3, (2 * 8,), generator=g)) for _ in range(STEPS)]


def _train(model, opt, batches, loss_scale=1.0):
    for xv, xt, y in batches:
        opt.zero_grad()
        hv, ht = model.features(xv, xt)
        logits = model.head(torch.cat([hv, ht], 1))
        (nn.functional.cross_entropy(logits, y) * loss_scale).backward()
        with torch.no_grad():
            scores = modality_scores(split_head_logits([hv, ht], model.head.weight, model.head.bias), y)
        if dist.is_initialized():
            for p in model.parameters():  # DDP-style mean of the gradients
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        opt.step(scores=scores)


def _make(noise):
    torch.manual_seed(0)
    model = Fusion()
    opt = ModalityAdamW(param_groups_by_modality(model, {"vision": "vision.*", "text": "text.*"}), lr=1e-2, alpha=0.5, noise=noise, seed=4)
    return model, opt


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        shard = [(xv[rank::WORLD], xt[rank::WORLD], y[rank::WORLD]) for xv, xt, y in _data()]
        for noise in (False, True):
            model, opt = _make(noise)
            _train(model, opt, shard)
            torch.save({"params": [p.detach() for p in model.parameters()], "k": opt.last_coefficients},
                       os.path.join(out_dir, f"rank{rank}_noise{int(noise)}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Both ranks' final parameters and coefficients, without and with noise (one spawn: starting
    the processes costs far more than the 2 x 20 steps)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return {noise: [torch.load(out / f"rank{r}_noise{int(noise)}.pt") for r in range(WORLD)] for noise in (False, True)}


@pytest.mark.parametrize("noise", [False, True])
def test_replicas_stay_bit_identical(noise, rank_results):
    r0, r1 = rank_results[noise]
    assert torch.equal(r0["k"], r1["k"])
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    start = _make(noise)[0]
    assert not torch.equal(r0["params"][0], start.vision.weight.detach())
    if noise:  # the noise did act (and identically on both ranks)
        quiet = rank_results[False][0]
        assert not torch.equal(r0["params"][0], quiet["params"][0])


def test_two_ranks_equal_one_process_on_the_whole_batch(rank_results):
    ranks = rank_results[False]
    model, opt = _make(False)
    _train(model, opt, _data())
    # the scores summed over ranks are the scores of the whole batch, and the mean of the ranks'
    # mean gradients is the whole batch's mean gradient
    assert not torch.equal(opt.last_coefficients, torch.ones(2))  # modulation was active
    torch.testing.assert_close(ranks[0]["k"], opt.last_coefficients)
    for a, b in zip(ranks[0]["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-5)
