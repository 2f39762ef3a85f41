"""Replay memory: capacity, class balance, herding's documented choice, reservoir uniformity,
state_dict round trips."""
import pytest
import torch

from mmcl_fast.continual import MultimodalData, ReplayMemory, herding_order


def _data(classes, per_class, start_id=0, dim=3, seed=0):
    """Samples whose modality "id" holds a unique sample id, so tests can tell which were kept."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(per_class)
    ids = torch.arange(start_id, start_id + y.numel()).float().unsqueeze(1)
    return MultimodalData({"id": ids, "x": torch.randn(y.numel(), dim, generator=g)}, y)


def _ids(memory):
    return sorted(int(v) for v in memory.data().inputs["id"].flatten().tolist())


@pytest.mark.parametrize("policy", ["random", "herding", "reservoir"])
def test_per_class_capacity_is_respected(policy):
    mem = ReplayMemory(capacity_per_class=6, policy=policy, seed=1)
    mem.add(_data([0, 1, 2], 50))
    assert mem.counts() == {0: 6, 1: 6, 2: 6}
    mem.add(_data([3, 4], 50, start_id=1000))
    assert mem.counts() == {c: 6 for c in range(5)}
    assert len(mem) == 30


@pytest.mark.parametrize("policy", ["random", "herding"])
def test_per_class_sets_of_old_classes_stay_put(policy):
    mem = ReplayMemory(capacity_per_class=4, policy=policy, seed=0)
    mem.add(_data([0, 1], 20))
    before = _ids(mem)
    mem.add(_data([2], 20, start_id=100))
    after = _ids(mem)
    assert [i for i in after if i < 100] == before
    assert len([i for i in after if i >= 100]) == 4


@pytest.mark.parametrize("policy", ["random", "herding"])
def test_total_capacity_is_shared_equally_and_shrinks_old_classes_by_priority(policy):
    mem = ReplayMemory(capacity=10, policy=policy, seed=3)
    mem.add(_data([0, 1, 2], 30))
    # 10 slots over 3 classes: 4, 3, 3 (the first class takes the remainder)
    assert mem.counts() == {0: 4, 1: 3, 2: 3}
    first = {c: mem.data().inputs["id"][mem.data().targets == c].flatten().tolist() for c in (0, 1, 2)}
    mem.add(_data([3, 4], 30, start_id=500))
    assert mem.counts() == {c: 2 for c in range(5)}
    for c in (0, 1, 2):
        kept = mem.data().inputs["id"][mem.data().targets == c].flatten().tolist()
        assert kept == first[c][:2]  # the first exemplars (highest priority) survive


def test_a_class_with_fewer_samples_than_its_quota_keeps_them_all():
    mem = ReplayMemory(capacity_per_class=5, policy="random")
    mem.add(MultimodalData({"x": torch.arange(7.0).unsqueeze(1)}, torch.tensor([0, 0, 1, 1, 1, 1, 1])))
    assert mem.counts() == {0: 2, 1: 5}


def test_herding_picks_the_documented_samples():
    # 1-D features (not normalised) [-3, 1, 2, 9]: class mean mu = 9 / 4 = 2.25.
    # k=1: |2.25 - x| is smallest for x = 2 (index 2).
    # k=2: |2.25 - (2 + x)/2|: x=-3 -> 2.75, x=1 -> 0.75, x=9 -> 3.25: index 1.
    # k=3: |2.25 - (3 + x)/3|: x=-3 -> 2.25, x=9 -> 1.75: index 3; then index 0.
    feats = torch.tensor([[-3.0], [1.0], [2.0], [9.0]])
    assert herding_order(feats, normalize=False).tolist() == [2, 1, 3, 0]
    assert herding_order(feats, 2, normalize=False).tolist() == [2, 1]
    # the memory keeps those two for this class
    mem = ReplayMemory(capacity_per_class=2, policy="herding", normalize_features=False)
    data = MultimodalData({"id": torch.arange(4.0).unsqueeze(1)}, torch.zeros(4, dtype=torch.long))
    mem.add(data, features=feats)
    assert mem.data().inputs["id"].flatten().tolist() == [2.0, 1.0]


def test_herding_running_mean_tracks_the_class_mean():
    # herding's first k exemplars approximate the class mean better than the first k of a random
    # order (iCaRL's reason for it), on clustered data with outliers
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(60, 4, generator=g), 8 + torch.randn(5, 4, generator=g)])
    mu = feats.mean(0)
    order = herding_order(feats, 10, normalize=False)
    rand = torch.randperm(65, generator=g)[:10]
    for k in (1, 5, 10):
        err_h = (feats[order[:k]].mean(0) - mu).norm()
        err_r = (feats[rand[:k]].mean(0) - mu).norm()
        assert err_h < err_r
    assert len(set(order.tolist())) == 10  # without replacement


def test_herding_normalises_features_by_default():
    # after L2 normalisation, [1, 0] and [100, 0] are the same point: the order changes
    feats = torch.tensor([[1.0, 0.0], [100.0, 0.0], [0.0, 1.0]])
    raw = herding_order(feats, normalize=False).tolist()
    unit = herding_order(feats).tolist()
    assert raw != unit


def test_herding_of_a_class_that_reappears_needs_a_feature_function():
    mem = ReplayMemory(capacity_per_class=3, policy="herding")
    mem.add(_data([0], 10), features=torch.randn(10, 2))
    again = _data([0], 10, start_id=100)
    with pytest.raises(ValueError, match="function"):
        mem.add(again, features=torch.randn(10, 2))
    mem.add(again, features=lambda inputs: inputs["x"])
    assert mem.counts() == {0: 3}


def test_reservoir_keeps_each_sample_with_probability_capacity_over_n():
    # Algorithm R: after n = 40 samples offered (in batches of 8) with capacity 10, every sample is
    # kept with probability 10 / 40 = 0.25, the first as likely as the last. 400 seeded trials:
    # the std of a frequency is sqrt(0.25 * 0.75 / 400) = 0.022, the band below is 4.5 stds wide.
    n, cap, trials = 40, 10, 400
    hits = torch.zeros(n)
    data = _data([0, 1], n // 2)
    for seed in range(trials):
        mem = ReplayMemory(capacity=cap, policy="reservoir", seed=seed)
        for start in range(0, n, 8):
            mem.add(data.subset(torch.arange(start, start + 8)))
        assert len(mem) == cap
        hits[torch.tensor(_ids(mem))] += 1
    freq = hits / trials
    assert ((freq > 0.15) & (freq < 0.35)).all(), freq


def test_per_class_reservoir_balances_classes():
    mem = ReplayMemory(capacity_per_class=3, policy="reservoir", seed=0)
    data = _data([0, 1, 2], 20)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    for start in range(0, len(data), 7):
        mem.add(data.subset(perm[start:start + 7]))
    assert mem.counts() == {0: 3, 1: 3, 2: 3}
    # each stored sample really is of the class it is stored under
    ids = mem.data().inputs["id"].flatten().long()
    assert torch.equal(data.targets[ids], mem.data().targets)


def test_sample_gives_distinct_stored_samples():
    mem = ReplayMemory(capacity_per_class=5, policy="random")
    assert mem.sample(4) is None
    mem.add(_data([0, 1], 10))
    x, y = mem.sample(4)
    assert y.numel() == 4 and len(set(x["id"].flatten().tolist())) == 4
    x, y = mem.sample(100)
    assert y.numel() == 10  # never more than stored


@pytest.mark.parametrize("policy", ["random", "herding", "reservoir"])
def test_state_dict_round_trip(policy):
    a = ReplayMemory(capacity_per_class=4, policy=policy, seed=5)
    a.add(_data([0, 1], 12))
    b = ReplayMemory(capacity_per_class=4, policy=policy, seed=99)
    b.load_state_dict(a.state_dict())
    assert _ids(a) == _ids(b)
    # the generators travel too: the same future choices
    more = _data([1, 2], 12, start_id=200)
    a.add(more)
    b.add(more)
    assert _ids(a) == _ids(b)
    assert torch.equal(a.sample(3)[1], b.sample(3)[1])
    with pytest.raises(ValueError, match="capacity_per_class"):
        ReplayMemory(capacity_per_class=5, policy=policy).load_state_dict(a.state_dict())


def test_memory_stores_on_its_device_and_checks_inputs():
    mem = ReplayMemory(capacity=4, policy="random", device="cpu")
    mem.add(_data([0], 6))
    assert mem.data().device.type == "cpu"
    with pytest.raises(ValueError, match="modalities"):
        mem.add(MultimodalData({"other": torch.zeros(2, 3)}, torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="shape"):
        mem.add(MultimodalData({"id": torch.zeros(2, 2), "x": torch.zeros(2, 3)}, torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="exactly one"):
        ReplayMemory(capacity=3, capacity_per_class=2)
    with pytest.raises(ValueError, match="policy"):
        ReplayMemory(capacity=3, policy="fifo")


def test_loading_puts_the_samples_on_the_memorys_device():
    # a checkpoint read with map_location="cpu" holds CPU tensors: a memory built for another device
    # (a GPU in a real run; the meta device here) must get them back on its own device
    a = ReplayMemory(capacity_per_class=4, policy="random", seed=5)
    a.add(_data([0, 1], 12))
    state = a.state_dict()
    assert state["device"] == "cpu"
    b = ReplayMemory(capacity_per_class=4, policy="random", device="meta")
    b.load_state_dict(state)
    assert b._targets.device.type == "meta" and all(x.device.type == "meta" for x in b._inputs.values())
    # a memory without a device of its own keeps the samples where they were saved from
    state["device"] = "meta"
    c = ReplayMemory(capacity_per_class=4, policy="random")
    c.load_state_dict(state)
    assert c._targets.device.type == "meta"
    # ... unless that device is not here: then they stay where the checkpoint put them
    state["device"] = "cuda:63"
    d = ReplayMemory(capacity_per_class=4, policy="random")
    d.load_state_dict(state)
    assert d._targets.device.type == "cpu"
