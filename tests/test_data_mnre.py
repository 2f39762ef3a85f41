"""MNRE files and the IMRE protocol: a fixture in both line forms (JSON and Python literal), every
bad line named by file and line, missing images, and the protocol's properties (relations
partitioned into near-equal seeded groups or an explicit split, "None" shared out among the tasks,
cumulative test sets)."""
import dataclasses
import json
import os

import pytest

from mmcl_fast.data.mnre import (
    NONE,
    MNREData,
    RESample,
    cumulative_test,
    describe,
    imre_tasks,
    load_mnre,
    read_mnre_file,
    read_rel2id,
)

REL2ID = {"None": 0, "/per/per/parent": 1, "/loc/loc/part_of": 2, "/per/org/member_of": 3,
          "/org/loc/locate_at": 4, "/per/loc/place_of_residence": 5, "/misc/misc/part_of": 6,
          "/per/per/peer": 7}
RELS = [r for r in REL2ID if r != NONE]


def sample_dict(i, rel):
    return {"token": ["The", "Eiffel", "Tower", "is", "in", "Paris", "."],
            "h": {"name": "Eiffel Tower", "pos": [1, 3]}, "t": {"name": "Paris", "pos": [5, 6]},
            "img_id": f"img{i}.jpg", "relation": rel}


FIXTURE = [sample_dict(i, r) for i, r in enumerate(
    ["/loc/loc/part_of", "None", "/per/per/parent", "None", "/org/loc/locate_at", "/loc/loc/part_of"])]


def write_lines(path, dicts, literal_every=2):
    """Every `literal_every`-th line as a Python literal (single quotes, as MNRE ships), the rest JSON,
    with a blank line in between."""
    with open(path, "w") as f:
        for i, d in enumerate(dicts):
            f.write((repr(d) if i % literal_every == 0 else json.dumps(d)) + "\n")
            if i == 2:
                f.write("\n")


def make_root(tmp_path, train=FIXTURE, valid=FIXTURE[:2], test=FIXTURE[:3], images=True):
    root = tmp_path / "mnre"
    (root / "txt").mkdir(parents=True)
    (root / "ours_rel2id.json").write_text(json.dumps(REL2ID))
    for name, dicts in (("train", train), ("val", valid), ("test", test)):
        write_lines(root / "txt" / f"ours_{name}.txt", dicts)
        d = root / "img_org" / name
        d.mkdir(parents=True)
        if images:
            for s in dicts:
                (d / s["img_id"]).write_bytes(b"\x89PNG")
    return root


def test_parse_fixture_both_forms(tmp_path):
    root = make_root(tmp_path)
    data = load_mnre(root)
    assert [len(data.train), len(data.valid), len(data.test)] == [6, 2, 3]
    assert data.rel2id == REL2ID and data.skipped == {"train": 0, "valid": 0, "test": 0}
    s = data.train[1]
    assert isinstance(s, RESample)
    assert s.tokens[1:3] == ("Eiffel", "Tower") and s.head == (1, 3) and s.tail == (5, 6)
    assert s.head_name == "Eiffel Tower" and s.tail_name == "Paris" and s.relation == "None"
    assert s.image == str(root / "img_org" / "train" / "img1.jpg") and os.path.isabs(s.image)
    assert s.image_id == "img1.jpg"
    # the blank line after the third sample shifts the later line numbers
    path = str(root / "txt" / "ours_train.txt")
    assert [x.source for x in data.train] == [f"{path}:{n}" for n in (1, 2, 3, 5, 6, 7)]
    assert [x.relation for x in data.train] == [d["relation"] for d in FIXTURE]
    assert all(x.image == "" for x in load_mnre(root, images=None).train)
    # the two line forms read the same
    literal, js = tmp_path / "a.txt", tmp_path / "b.txt"
    literal.write_text(repr(FIXTURE[0]) + "\n")
    js.write_text(json.dumps(FIXTURE[0]) + "\n")
    a, b = read_mnre_file(literal), read_mnre_file(js)
    assert dataclasses.replace(a[0], source="") == dataclasses.replace(b[0], source="")


@pytest.mark.parametrize("bad, message", [
    ("{'token': ['a', 'b'], 'h': {'name': 'a', 'pos': [0, 1]", "neither JSON nor a Python literal"),
    (json.dumps({**sample_dict(9, "None"), "h": {"name": "x", "pos": [5, 9]}}), "h.pos [5, 9]"),
    (json.dumps({**sample_dict(9, "None"), "t": {"name": "x", "pos": [2, 2]}}), "t.pos [2, 2]"),
    (json.dumps({**sample_dict(9, "None"), "t": {"name": "x", "pos": [1]}}), "t.pos must be two ints"),
    (json.dumps(sample_dict(9, "/per/per/unknown")), "'/per/per/unknown' is not in rel2id"),
    (json.dumps({**sample_dict(9, "None"), "token": []}), "non-empty list of str"),
    (json.dumps({**sample_dict(9, "None"), "img_id": ""}), "'img_id' must be a non-empty str"),
    (json.dumps({k: v for k, v in sample_dict(9, "None").items() if k != "relation"}), "missing key(s) 'relation'"),
    ("[1, 2]", "expected a dict"),
])
def test_bad_line_named(tmp_path, bad, message):
    root = make_root(tmp_path)
    path = root / "txt" / "ours_val.txt"
    with open(path, "a") as f:
        f.write("\n" + bad + "\n")  # lines 1, 2, blank 3, bad 4
    with pytest.raises(ValueError) as e:
        load_mnre(root)
    assert f"{path}:4:" in str(e.value) and message in str(e.value)
    with pytest.raises(ValueError, match=f"ours_val.txt:4: "):
        read_mnre_file(path, REL2ID)


def test_unknown_relation_without_rel2id_is_fine(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text(json.dumps(sample_dict(0, "/new/rel")) + "\n")
    assert read_mnre_file(path)[0].relation == "/new/rel"


def test_missing_image(tmp_path):
    root = make_root(tmp_path)
    gone = root / "img_org" / "train" / "img2.jpg"
    gone.unlink()
    path = root / "txt" / "ours_train.txt"
    with pytest.raises(FileNotFoundError) as e:
        load_mnre(root)
    assert f"{path}:3:" in str(e.value) and str(gone) in str(e.value)
    data = load_mnre(root, missing_image="skip")
    assert len(data.train) == 5 and data.skipped["train"] == 1
    assert "img2.jpg" not in [s.image_id for s in data.train]
    kept = read_mnre_file(path, REL2ID, root / "img_org" / "train", missing_image="keep")
    assert len(kept) == 6 and kept[2].image == "" and kept[2].image_id == "img2.jpg" and kept[0].image
    skipped = read_mnre_file(path, REL2ID, root / "img_org" / "train", missing_image="skip")
    assert len(skipped) == 5 and skipped.skipped == 1
    with pytest.raises(ValueError, match="missing_image"):
        load_mnre(root, missing_image="ignore")


def test_missing_files_and_folders(tmp_path):
    root = make_root(tmp_path)
    with pytest.raises(FileNotFoundError, match="MNRE folder"):
        load_mnre(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="ours_test.txt"):
        load_mnre(root, test="txt/ours_test.txt.gone")
    with pytest.raises(FileNotFoundError, match="rel2id file"):
        load_mnre(root, rel2id="missing.json")
    with pytest.raises(FileNotFoundError, match="image folder.*train/ val/ test/"):
        load_mnre(root, images="img_vg")
    with pytest.raises(FileNotFoundError, match="image folder"):
        read_mnre_file(root / "txt" / "ours_train.txt", image_dir=tmp_path / "nope")


@pytest.mark.parametrize("content, message", [
    ('{"None": 0, "a": 1, "b": 1}', "share id 1"),
    ('{"None": 0, "a": "1"}', "not an int"),
    ('{"None": 0, "a": true}', "not an int"),
    ('{"a": 0, "b": 1}', "no 'None' relation"),
    ('["None"]', "expected a JSON object"),
    ('{"None": 0,\n "a": }', ":2: not valid JSON"),
])
def test_bad_rel2id(tmp_path, content, message):
    path = tmp_path / "rel2id.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        read_rel2id(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------------
# IMRE
# ------------------------------------------------------------------------------------------------


def synthetic(n_none=(23, 9, 11)) -> MNREData:
    """Each relation but /per/per/peer (which must still be assigned) twice in every split, and
    n_none "None" samples, interleaved."""
    def split(name, k_none):
        rels = [NONE] * k_none + RELS[:-1] * 2
        rels = [rels[(i * 11) % len(rels)] for i in range(len(rels))]  # 11 is prime to every length here
        assert sorted(rels) == sorted([NONE] * k_none + RELS[:-1] * 2)
        return [RESample(("a", "b"), (0, 1), (1, 2), "a", "b", "", r, f"{name}:{i}") for i, r in enumerate(rels)]

    return MNREData(*(split(n, k) for n, k in zip(("train", "valid", "test"), n_none)), dict(REL2ID), "syn")


def check_imre(data, tasks, k):
    assert len(tasks) == k and [t.index for t in tasks] == list(range(k))
    rels = [r for t in tasks for r in t.relations]
    assert sorted(rels) == sorted(RELS) and len(rels) == len(set(rels))
    for split in ("train", "valid", "test"):
        samples = getattr(data, split)
        got = [s for t in tasks for s in getattr(t, split)]
        assert sorted(s.source for s in got) == sorted(s.source for s in samples), "not a partition"
        for t in tasks:
            part = getattr(t, split)
            assert all(s.relation in t.relations or s.relation == NONE for s in part)
            idx = [samples.index(s) for s in part]
            assert idx == sorted(idx), "original order lost"
        n_none = sum(s.relation == NONE for s in samples)
        counts = [sum(s.relation == NONE for s in getattr(t, split)) for t in tasks]
        assert max(counts) - min(counts) <= 1 and sum(counts) == n_none
        if n_none >= k:
            assert min(counts) >= 1


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_imre_partition(k):
    data = synthetic()
    tasks = imre_tasks(data, k, seed=3)
    check_imre(data, tasks, k)
    sizes = [len(t.relations) for t in tasks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    d = describe(tasks)
    assert [x["n_train"] for x in d] == [len(t.train) for t in tasks]
    assert sum(x["n_none_train"] for x in d) == 23


def test_imre_seed_and_order():
    data = synthetic()
    a, b = imre_tasks(data, 3, seed=1), imre_tasks(data, 3, seed=1)
    assert [t.relations for t in a] == [t.relations for t in b]
    assert [[s.source for s in t.train] for t in a] == [[s.source for s in t.train] for t in b]
    orders = {tuple(r for t in imre_tasks(data, 3, seed=s) for r in t.relations) for s in range(6)}
    assert len(orders) > 1
    nones = {tuple(s.source for s in imre_tasks(data, 3, seed=s)[0].train if s.relation == NONE) for s in range(6)}
    assert len(nones) > 1
    plain = imre_tasks(data, 3, seed=None)
    assert [r for t in plain for r in t.relations] == RELS
    assert [t.relations for t in plain] == [RELS[:3], RELS[3:5], RELS[5:]]
    assert imre_tasks(data, 5, seed=0)[4].relations  # default num_tasks is 5
    assert len(imre_tasks(data, seed=0)) == 5


def test_imre_explicit_split(tmp_path):
    data = synthetic()
    split = [RELS[5:], RELS[:2], RELS[2:5]]
    tasks = imre_tasks(data, split=split)
    check_imre(data, tasks, 3)
    assert [t.relations for t in tasks] == split
    as_list, as_dict, as_num = tmp_path / "sep3.json", tmp_path / "sep3_dict.json", tmp_path / "sep3_num.json"
    as_list.write_text(json.dumps(split))
    # keys out of order, and task_10 after task_2 by number, not as text
    split4 = [RELS[5:6], RELS[:2], RELS[2:5], RELS[6:]]
    as_dict.write_text(json.dumps({"task_10": split4[3], "task_0": split4[0], "task_2": split4[2],
                                   "task_1": split4[1]}))
    as_num.write_text(json.dumps({"1": split[1], "0": split[0], "2": split[2]}))
    assert [t.relations for t in imre_tasks(data, split=as_list)] == split
    assert [t.relations for t in imre_tasks(data, split=str(as_dict))] == split4
    assert [t.relations for t in imre_tasks(data, split=as_num)] == split
    with pytest.raises(ValueError, match="num_tasks=5 but the split has 3"):
        imre_tasks(data, 5, split=split)


@pytest.mark.parametrize("split, message", [
    ([RELS[:3] + ["/nope"], RELS[3:]], "'/nope', which is not in rel2id"),
    ([RELS[:3], RELS[2:]], "listed twice"),
    ([RELS[:3] + [NONE], RELS[3:]], "'None'"),
    ([RELS[:3], RELS[3:-1]], "are in no task"),
    ([RELS, []], "task 1 must be a non-empty list"),
    ([], "non-empty list of lists"),
])
def test_imre_bad_split(tmp_path, split, message):
    data = synthetic()
    with pytest.raises(ValueError, match=message):
        imre_tasks(data, split=split)
    path = tmp_path / "sep.json"
    path.write_text(json.dumps(split))
    with pytest.raises(ValueError, match=message) as e:
        imre_tasks(data, split=path)
    assert str(path) in str(e.value)


def test_imre_bad_split_file(tmp_path):
    data = synthetic()
    with pytest.raises(FileNotFoundError, match="IMRE split file"):
        imre_tasks(data, split=tmp_path / "none.json")
    path = tmp_path / "sep.json"
    path.write_text('{"task_0": ["/per/per/parent"], "x": []}')
    with pytest.raises(ValueError, match=r"sep.json: key 'x'"):
        imre_tasks(data, split=path)
    path.write_text('[["/per/per/parent"],\n')
    with pytest.raises(ValueError, match=r"sep.json:2: not valid JSON"):
        imre_tasks(data, split=path)


@pytest.mark.parametrize("k", [0, 8, 2.0])
def test_imre_bad_num_tasks(k):
    with pytest.raises(ValueError, match="num_tasks"):
        imre_tasks(synthetic(), k)


def test_imre_few_none_samples():
    data = synthetic(n_none=(2, 0, 1))
    tasks = imre_tasks(data, 4, seed=0)
    check_imre(data, tasks, 4)
    assert sum(s.relation == NONE for t in tasks for s in t.train) == 2


def test_cumulative_test():
    data = synthetic()
    tasks = imre_tasks(data, 4, seed=2)
    prev = 0
    for t in range(4):
        cum = cumulative_test(tasks, t)
        assert cum == [s for task in tasks[: t + 1] for s in task.test]
        assert len(cum) > prev
        prev = len(cum)
    assert sorted(s.source for s in cumulative_test(tasks, 3)) == sorted(s.source for s in data.test)
    with pytest.raises(IndexError):
        cumulative_test(tasks, 4)


def test_imre_on_loaded_fixture(tmp_path):
    data = load_mnre(make_root(tmp_path))
    tasks = imre_tasks(data, 2, seed=0)
    assert sorted(r for t in tasks for r in t.relations) == sorted(RELS)
    assert [sum(s.relation == NONE for s in t.train) for t in tasks] == [1, 1]
