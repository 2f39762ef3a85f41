"""Knowledge graphs and their snapshots: the LKGE protocol's properties for every growth pattern (on
PyKEEN's UMLS and on a small fixture), the LKGE folder format (round trip and a hand-written
fixture), PyKEEN interop, and every bad input named by file and line."""
import os

import pytest
import torch

from mmcl_fast.data import GROWTH, KnowledgeGraph, build_snapshots, from_pykeen, pykeen_kg, read_triples_file
from mmcl_fast.data.snapshots import KGSnapshots


def fixture_kg() -> KnowledgeGraph:
    """A connected KG of 40 entities and 6 relations: a ring, chords and a hub."""
    named = []
    for i in range(40):
        named.append((f"e{i}", f"r{i % 3}", f"e{(i + 1) % 40}"))
        named.append((f"e{i}", f"r{3 + i % 2}", f"e{(i * 7 + 3) % 40}"))
        if i % 4 == 0:
            named.append(("hub", "r5", f"e{i}"))
    return KnowledgeGraph.from_named(named, "fixture")


@pytest.fixture(scope="module")
def umls():
    pytest.importorskip("pykeen")
    return pykeen_kg("umls")


def named_set(triples, snaps):
    return {(snaps.entities[h], snaps.relations[r], snaps.entities[t]) for h, r, t in triples.tolist()}


def check_protocol(kg: KnowledgeGraph, snaps: KGSnapshots, S: int):
    assert len(snaps) == S
    all_named = set(kg.named_triples())
    seen = set()
    known_e = known_r = 0
    for s in snaps:
        parts = {sp: named_set(s.split(sp), snaps) for sp in ("train", "valid", "test")}
        for sp, p in parts.items():
            assert len(p) == s.split(sp).shape[0], "a fact repeats inside a split"
            assert p <= all_named, f"snapshot {s.index} {sp} holds a fact the KG does not have"
            assert not (p & seen), f"snapshot {s.index} {sp} repeats an earlier fact"
            seen |= p
        # every new fact touches an entity known before the snapshot
        if s.index > 0:
            t = s.all()
            touches = (t[:, 0] < known_e) | (t[:, 2] < known_e)
            assert bool(touches.all()), f"snapshot {s.index}: a new fact touches no entity known before it"
        # ids by arrival; the new entities and relations of the snapshot appear in its training facts
        tr = s.train
        assert int(s.all()[:, [0, 2]].max()) < s.num_entities and int(s.all()[:, 1].max()) < s.num_relations
        assert set(range(known_e, s.num_entities)) <= set(tr[:, [0, 2]].flatten().tolist())
        assert set(range(known_r, s.num_relations)) <= set(tr[:, 1].tolist())
        # no valid/test fact mentions an entity or relation no training fact so far has
        taught_e = set(snaps.upto(s.index)[:, [0, 2]].flatten().tolist())
        taught_r = set(snaps.upto(s.index)[:, 1].tolist())
        for sp in ("valid", "test"):
            held = s.split(sp)
            assert set(held[:, [0, 2]].flatten().tolist()) <= taught_e
            assert set(held[:, 1].tolist()) <= taught_r
        # 3:1:1, up to rounding and the facts moved to train
        n = s.all().shape[0]
        for sp in ("valid", "test"):
            assert s.split(sp).shape[0] <= round(n / 5) + 1
        assert s.train.shape[0] >= 3 * n / 5 - 1
        known_e, known_r = s.num_entities, s.num_relations
    assert len(seen) + snaps.dropped == len(kg), "facts lost besides the dropped ones"


@pytest.mark.parametrize("growth", GROWTH)
def test_protocol_on_umls(umls, growth):
    snaps = build_snapshots(umls, 5, growth, seed=0)
    check_protocol(umls, snaps, 5)


@pytest.mark.parametrize("growth", GROWTH)
def test_protocol_on_fixture(growth):
    kg = fixture_kg()
    snaps = build_snapshots(kg, 4, growth, seed=3)
    check_protocol(kg, snaps, 4)


def test_growth_patterns_grow_what_they_name(umls):
    stats = {g: build_snapshots(umls, 5, g, seed=0).stats() for g in GROWTH}
    # entity: equal groups of new entities (the BFS groups, all of which arrive)
    new_e = [s["new_entities"] for s in stats["entity"]]
    assert max(new_e) - min(new_e) <= 2, new_e
    # relation: equal groups of new relations
    new_r = [s["new_relations"] for s in stats["relation"]]
    assert max(new_r) - min(new_r) <= 2, new_r
    # fact: equal numbers of facts
    sizes = [s["train"] + s["valid"] + s["test"] for s in stats["fact"]]
    assert max(sizes) - min(sizes) <= 0.02 * max(sizes), sizes
    # fact growth keeps almost every entity from the start; entity growth does not
    assert stats["fact"][0]["entities"] > 0.9 * umls.num_entities
    assert stats["entity"][0]["entities"] < 0.3 * umls.num_entities
    # hybrid: new entities and new relations keep coming
    assert all(s["new_entities"] > 0 for s in stats["hybrid"])
    assert sum(s["new_relations"] > 0 for s in stats["hybrid"]) >= 4


def test_seeded(umls):
    a, b = build_snapshots(umls, 5, "hybrid", seed=7), build_snapshots(umls, 5, "hybrid", seed=7)
    c = build_snapshots(umls, 5, "hybrid", seed=8)
    for x, y in zip(a, b):
        assert torch.equal(x.train, y.train) and torch.equal(x.test, y.test)
    assert a.entities == b.entities
    assert [x.train.tolist() for x in a] != [x.train.tolist() for x in c]


def test_bad_builder_arguments():
    kg = fixture_kg()
    with pytest.raises(ValueError, match="growth"):
        build_snapshots(kg, 3, "entities")
    with pytest.raises(ValueError, match="num_snapshots"):
        build_snapshots(kg, 0)
    with pytest.raises(ValueError, match="ratios"):
        build_snapshots(kg, 3, ratios=(0, 1, 1))
    tiny = KnowledgeGraph.from_named([("a", "r", "b"), ("b", "r", "c")], "tiny")
    with pytest.raises(ValueError, match="empty|too few"):
        build_snapshots(tiny, 5, "fact")


# -- the LKGE folder format ------------------------------------------------------------------------
def test_lkge_round_trip(tmp_path, umls):
    snaps = build_snapshots(umls, 5, "entity", seed=1)
    out = tmp_path / "ENTITY"
    snaps.write_lkge(str(out))
    assert sorted(os.listdir(out)) == ["0", "1", "2", "3", "4", "entities.txt", "relations.txt", "stats.json"]
    back = KGSnapshots.read_lkge(str(out))
    assert back.stats() == snaps.stats()
    for a, b in zip(snaps, back):
        for sp in ("train", "valid", "test"):
            assert named_set(a.split(sp), snaps) == named_set(b.split(sp), back)
    # the writer refuses a non-empty folder and leaves it alone
    with pytest.raises(ValueError, match="not an empty folder"):
        snaps.write_lkge(str(out))
    assert back.stats() == KGSnapshots.read_lkge(str(out)).stats()


def write_folder(root, snapshots):
    for i, splits in enumerate(snapshots):
        d = root / str(i)
        d.mkdir(parents=True)
        for name in ("train", "valid", "test"):
            (d / f"{name}.txt").write_text("".join(line + "\n" for line in splits.get(name, [])))


def test_lkge_fixture(tmp_path):
    """A folder written by hand in LKGE's format: ids by order of appearance, train first."""
    write_folder(tmp_path, [
        {"train": ["a\tlikes\tb", "b\tlikes\tc", "c\thates\ta"], "valid": ["a\tlikes\tc"], "test": ["b\thates\ta"]},
        {"train": ["d\tlikes\ta", "d\tknows\tb"], "valid": [], "test": ["d\tlikes\tb"]},
    ])
    s = KGSnapshots.read_lkge(str(tmp_path))
    assert s.entities == ["a", "b", "c", "d"] and s.relations == ["likes", "hates", "knows"]
    assert [x.num_entities for x in s] == [3, 4] and [x.num_relations for x in s] == [2, 3]
    assert s[1].train.tolist() == [[3, 0, 0], [3, 2, 1]]
    assert s[1].test.tolist() == [[3, 0, 1]]
    assert s.known(1).shape[0] == 8
    stream = s.task_stream()
    assert stream[1].entities == ["d"] and stream[1].relations == ["knows"]
    assert stream.test_sizes == [1, 1]


def test_lkge_names_with_spaces(tmp_path):
    write_folder(tmp_path, [{"train": ["New York\tcapital of\tUSA"], "test": ["New York\tcapital of\tUSA"]}])
    s = KGSnapshots.read_lkge(str(tmp_path))
    assert s.entities == ["New York", "USA"] and s.relations == ["capital of"]


def test_lkge_malformed_line_names_file_and_line(tmp_path):
    write_folder(tmp_path, [{"train": ["a\tr\tb", "a\tr", "b\tr\tc"]}])
    with pytest.raises(ValueError, match=r"0/train\.txt:2: expected 3 tab-separated fields"):
        KGSnapshots.read_lkge(str(tmp_path))


def test_lkge_unknown_entity_in_test(tmp_path):
    write_folder(tmp_path, [{"train": ["a\tr\tb"], "valid": ["a\tr\tb"], "test": ["a\tr\tb", "a\tr\tz"]}])
    with pytest.raises(ValueError, match=r"0/test\.txt:2: test fact mentions entity 'z'"):
        KGSnapshots.read_lkge(str(tmp_path))


def test_lkge_unknown_relation_in_valid(tmp_path):
    write_folder(tmp_path, [{"train": ["a\tr\tb"], "valid": ["a\tq\tb"]}])
    with pytest.raises(ValueError, match=r"0/valid\.txt:1: valid fact mentions relation 'q'"):
        KGSnapshots.read_lkge(str(tmp_path))


def test_lkge_empty_snapshot(tmp_path):
    write_folder(tmp_path, [{"train": ["a\tr\tb"]}, {"train": [], "test": []}])
    with pytest.raises(ValueError, match=r"1/train\.txt.*holds no triple: snapshot 1 is empty"):
        KGSnapshots.read_lkge(str(tmp_path))


def test_lkge_missing_pieces(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        KGSnapshots.read_lkge(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no snapshot folder 0"):
        KGSnapshots.read_lkge(str(tmp_path))
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "train.txt").write_text("a\tr\tb\n")
    with pytest.raises(ValueError, match="valid.txt' is missing"):
        KGSnapshots.read_lkge(str(tmp_path))


# -- triple files and PyKEEN -------------------------------------------------------------------------
def test_read_triples_file(tmp_path):
    p = tmp_path / "kg.tsv"
    p.write_text("a\tr\tb\n\nb\tr\tc\na\tr\tb\n")
    kg = read_triples_file(str(p))
    assert kg.entities == ["a", "b", "c"] and len(kg) == 2  # the repeated fact kept once
    p.write_text("a\tr\tb\na\tr\tb\textra\n")
    with pytest.raises(ValueError, match=r"kg\.tsv:2: expected 3 tab-separated fields .* got 4"):
        read_triples_file(str(p))


def test_pykeen_interop(umls):
    from pykeen.datasets import UMLS

    ds = UMLS()
    kg = from_pykeen(ds)
    assert kg.num_entities == ds.num_entities and kg.num_relations == ds.num_relations
    assert len(kg) == ds.training.num_triples + ds.validation.num_triples + ds.testing.num_triples
    assert set(kg.named_triples()) == set(umls.named_triples())
    part = from_pykeen(ds.training, name="train-only")
    assert len(part) == ds.training.num_triples
    assert ("acquired_abnormality", "affects", "alga") in set(part.named_triples())
    with pytest.raises(TypeError, match="pykeen Dataset or TriplesFactory"):
        from_pykeen(object())
    with pytest.raises(ValueError, match="unknown PyKEEN KG"):
        pykeen_kg("fb15k")


def test_kg_validation():
    with pytest.raises(ValueError, match="outside"):
        KnowledgeGraph(torch.tensor([[0, 0, 5]]), ["a", "b"], ["r"])
    with pytest.raises(ValueError, match="names two ids"):
        KnowledgeGraph(torch.tensor([[0, 0, 1]]), ["a", "a"], ["r"])
