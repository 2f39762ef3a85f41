"""Task streams: seeded class orders, class-incremental splits, what each task introduces, the
synthetic stream and the digits stream."""
import importlib.util

import pytest
import torch

from mmcl_fast.continual import (
    MultimodalData,
    Task,
    TaskStream,
    class_incremental_stream,
    class_order,
    stratified_split,
    synthetic_stream,
)


def _labelled(n_classes=10, per_class=6):
    y = torch.arange(n_classes).repeat_interleave(per_class)
    ids = torch.arange(y.numel()).float().unsqueeze(1)
    return MultimodalData({"id": ids, "img": torch.randn(y.numel(), 2, 2)}, y)


def test_class_order_is_seeded_and_reproducible():
    classes = list(range(10))
    assert class_order(classes) == classes
    assert class_order(classes, seed=3) == class_order(classes, seed=3)
    assert class_order(classes, seed=3) != class_order(classes, seed=4)
    assert sorted(class_order(classes, seed=3)) == classes


def test_class_incremental_split_covers_every_class_once():
    train, test = _labelled(), _labelled(per_class=2)
    stream = class_incremental_stream(train, test, classes_per_task=2, seed=7)
    order = class_order(list(range(10)), seed=7)
    assert len(stream) == 5 and stream.scenario == "class-incremental"
    seen = []
    for t, task in enumerate(stream):
        # relabelled in order of arrival: task t holds labels 2t, 2t+1
        assert task.classes == [2 * t, 2 * t + 1]
        assert task.train.classes() == task.classes and task.test.classes() == task.classes
        assert [stream.class_names[c] for c in task.classes] == [str(c) for c in order[2 * t: 2 * t + 2]]
        seen += task.classes
        # the samples are the original ones of those classes
        orig = train.targets[task.train.inputs["id"].flatten().long()]
        assert sorted(set(orig.tolist())) == sorted(order[2 * t: 2 * t + 2])
    assert seen == list(range(10))
    assert sum(len(t.train) for t in stream) == len(train)
    assert stream.seen(1) == [0, 1, 2, 3]
    assert stream.test_sizes == [4] * 5


def test_same_seed_same_stream_other_seed_other_order():
    a = class_incremental_stream(_labelled(), classes_per_task=2, seed=1)
    b = class_incremental_stream(_labelled(), classes_per_task=2, seed=1)
    c = class_incremental_stream(_labelled(), classes_per_task=2, seed=2)
    assert a.class_names == b.class_names != c.class_names
    for ta, tb in zip(a, b):
        assert torch.equal(ta.train.inputs["id"], tb.train.inputs["id"])


def test_uneven_tasks_and_explicit_orders():
    stream = class_incremental_stream(_labelled(5), classes_per_task=[3, 2], order=[4, 3, 2, 1, 0])
    assert [t.classes for t in stream] == [[0, 1, 2], [3, 4]]
    assert stream.class_names[0] == "4"
    assert [t.classes for t in class_incremental_stream(_labelled(5), classes_per_task=2, seed=None)] == \
        [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="sum to 5"):
        class_incremental_stream(_labelled(5), classes_per_task=[3, 3])
    with pytest.raises(ValueError, match="permutation"):
        class_incremental_stream(_labelled(5), order=[0, 1, 2])


def test_test_classes_absent_from_training_are_an_error():
    train = _labelled(3)
    test = MultimodalData({"id": torch.zeros(1, 1), "img": torch.zeros(1, 2, 2)}, torch.tensor([7]))
    with pytest.raises(ValueError, match="lacks"):
        class_incremental_stream(train, test)


def test_stratified_split_is_disjoint_complete_and_proportional():
    y = torch.arange(4).repeat_interleave(20)
    train, valid, test = stratified_split(y, [0.6, 0.1, 0.3], seed=0)
    everything = torch.cat([train, valid, test])
    assert sorted(everything.tolist()) == list(range(80))
    for c in range(4):
        assert (y[train] == c).sum() == 12 and (y[valid] == c).sum() == 2 and (y[test] == c).sum() == 6
    assert torch.equal(stratified_split(y, [0.5, 0.5], seed=1)[0], stratified_split(y, [0.5, 0.5], seed=1)[0])
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(y, [0.5, 0.6])


def test_synthetic_stream_is_reproducible_and_multimodal():
    a = synthetic_stream(num_tasks=3, classes_per_task=2, modalities={"v": 5, "t": 4}, train_per_class=10,
                         test_per_class=4, valid_per_class=2, seed=11)
    b = synthetic_stream(num_tasks=3, classes_per_task=2, modalities={"v": 5, "t": 4}, train_per_class=10,
                         test_per_class=4, valid_per_class=2, seed=11)
    assert len(a) == 3
    for ta, tb in zip(a, b):
        assert ta.train.modalities == ["v", "t"]
        assert ta.train.inputs["v"].shape == (20, 5) and ta.train.inputs["t"].shape == (20, 4)
        assert len(ta.test) == 8 and len(ta.valid) == 4
        assert torch.equal(ta.train.inputs["v"], tb.train.inputs["v"])
    # the seed decides the stream: the same seed the same data, another seed other data
    kw = {"num_tasks": 3, "classes_per_task": 2, "modalities": {"v": 5, "t": 4}, "train_per_class": 10,
          "test_per_class": 4, "valid_per_class": 2}
    c = synthetic_stream(seed=12, **kw)
    for ta, tc in zip(a, c):
        assert ta.classes == tc.classes and ta.train.inputs["v"].shape == tc.train.inputs["v"].shape
        assert not torch.equal(ta.train.inputs["v"], tc.train.inputs["v"])
        assert not torch.equal(ta.test.inputs["t"], tc.test.inputs["t"])
    again = synthetic_stream(seed=12, **kw)
    for tc, tg in zip(c, again):
        for split in ("train", "test", "valid"):
            x, y = getattr(tc, split), getattr(tg, split)
            assert torch.equal(x.targets, y.targets)
            assert all(torch.equal(x.inputs[m], y.inputs[m]) for m in x.inputs)
    # the first modality is the better separated one by default (the imbalance to modulate)
    d = synthetic_stream(num_tasks=1, classes_per_task=2, train_per_class=200, seed=0)
    x, y = d[0].train.inputs, d[0].train.targets
    gap = {m: (x[m][y == 0].mean(0) - x[m][y == 1].mean(0)).norm() / x[m].shape[1] ** 0.5 for m in x}
    assert gap["a"] > gap["b"]


def test_tasks_say_what_they_introduce():
    t = Task(0, "snapshot0", train=torch.zeros(5, 3), test=torch.zeros(2, 3),
             introduces={"entities": [0, 1, 2], "relations": [0]})
    assert t.entities == [0, 1, 2] and t.relations == [0] and t.classes == [] and t.n_test == 2
    assert Task(1, "x", train=None).n_test == 0
    with pytest.raises(ValueError, match="unknown keys"):
        Task(0, "bad", train=None, introduces={"colours": [1]})
    s = TaskStream([t, Task(1, "snapshot1", train=None, introduces={"entities": [2, 3]})])
    assert s.seen(1, "entities") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="position"):
        TaskStream([Task(1, "x", train=None)])
    with pytest.raises(ValueError, match="scenario"):
        TaskStream([t], scenario="online")


def test_multimodal_data_checks_and_batches():
    d = _labelled(2, 5)
    batches = list(d.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [y.numel() for _, y in batches] == [4, 4, 2] and d.num_batches(4) == 3
    ids = torch.cat([x["id"] for x, _ in batches]).flatten()
    assert sorted(ids.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="rows"):
        MultimodalData({"a": torch.zeros(3, 2)}, torch.zeros(4, dtype=torch.long))


def test_digits_stream_two_halves_five_tasks():
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed")
    from mmcl_fast.methods.digits import DigitsConfig, digits_stream

    stream = digits_stream(DigitsConfig())
    assert len(stream) == 5 and [t.classes for t in stream] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    x = stream[0].train.inputs
    assert set(x) == {"left", "right"} and x["left"].shape[1:] == (8, 4) == x["right"].shape[1:]
    total = sum(len(t.train) + len(t.valid) + len(t.test) for t in stream)
    assert total == 1797
    again = digits_stream(DigitsConfig())
    assert torch.equal(stream[2].test.inputs["left"], again[2].test.inputs["left"])
    shuffled = digits_stream(DigitsConfig(shuffle_classes=True, seed=5, num_tasks=2))
    assert len(shuffled) == 2 and sum(len(t.classes) for t in shuffled) == 4
