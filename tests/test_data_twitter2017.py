"""Twitter-2017 files (UMT's IMGID blocks) and the IMNER protocol: a fixture with ragged
whitespace, OTHER read as MISC and an image found by another extension; every bad line named by file
and line; missing images; conlleval spans; relabelling; and the per-type tasks in both orders."""
import pytest

from mmcl_fast.data.twitter2017 import (
    ORDERS,
    TYPES,
    NERSample,
    TwitterData,
    describe,
    entity_spans,
    imner_tasks,
    load_twitter2017,
    read_twitter_file,
    relabel,
)

# 5 blocks; the line number of each IMGID line is noted for the sources
TRAIN = """IMGID:1
RT\tO
Kevin\tB-PER
Durant  \t  I-PER
in\tO
Oakland\tB-LOC

IMGID:2
Apple\tB-ORG
fans   O
love\tO
iPhone\tB-OTHER

IMGID:3
no\tO
entity\tO

IMGID:4
Obama\tB-PER
at\tO
White\tB-LOC
House\tI-LOC
with\tO
NBA\tB-ORG
IMGID:5
Paris\tI-LOC
Hilton\tB-PER
"""
SOURCES = [1, 8, 14, 18, 25]


def write(path, text):
    path.write_text(text)
    return path


def make_root(tmp_path, images=("1.jpg", "2.png", "3.jpg", "4.jpg", "5.jpg"), dev=False):
    root = tmp_path / "twitter2017"
    root.mkdir()
    write(root / "train.txt", TRAIN)
    write(root / ("dev.txt" if dev else "valid.txt"), "IMGID:2\nApple\tB-ORG\n\nIMGID:3\nx\tO\n")
    write(root / "test.txt", TRAIN)
    img = tmp_path / "twitter2017_images"
    img.mkdir()
    for name in images:
        (img / name).write_bytes(b"\xff\xd8")
    return root


def test_parse_fixture(tmp_path):
    root = make_root(tmp_path)
    data = load_twitter2017(root)
    assert [len(data.train), len(data.valid), len(data.test)] == [5, 2, 5]
    s = data.train[0]
    assert isinstance(s, NERSample)
    assert s.tokens == ("RT", "Kevin", "Durant", "in", "Oakland")
    assert s.tags == ("O", "B-PER", "I-PER", "O", "B-LOC")
    assert data.train[1].tokens == ("Apple", "fans", "love", "iPhone")
    assert data.train[1].tags == ("B-ORG", "O", "O", "B-MISC")  # OTHER is MISC
    assert data.train[4].tags == ("I-LOC", "B-PER")  # kept as written
    assert [x.image_id for x in data.train] == ["1", "2", "3", "4", "5"]
    path = root / "train.txt"
    assert [x.source for x in data.train] == [f"{path}:{n}" for n in SOURCES]
    images = tmp_path / "twitter2017_images"
    assert data.train[0].image == str(images / "1.jpg") and data.train[1].image == str(images / "2.png")
    assert data.skipped == {"train": 0, "valid": 0, "test": 0}
    assert all(x.image == "" for x in read_twitter_file(path))
    assert all(x.image == "" for x in load_twitter2017(root, images=False).test)


def test_dev_and_explicit_images(tmp_path):
    root = make_root(tmp_path, dev=True)
    (tmp_path / "twitter2017_images").rename(tmp_path / "pics")
    with pytest.raises(FileNotFoundError, match="no image folder: tried"):
        load_twitter2017(root)
    data = load_twitter2017(root, images="../pics")
    assert len(data.valid) == 2 and data.train[0].image == str(tmp_path / "pics" / "1.jpg")
    (tmp_path / "pics").rename(root / "images")
    assert load_twitter2017(root).train[0].image == str(root / "images" / "1.jpg")


@pytest.mark.parametrize("text, lineno, message", [
    ("IMGID:1\na\tO\nb\tB-FOO\n", 3, "unknown entity type 'FOO'"),
    ("IMGID:1\na\tO\n\nb\tB-PER\n", 4, "token line before any IMGID"),
    ("a\tO\n", 1, "token line before any IMGID"),
    ("IMGID:1\na\tX\n", 2, "malformed tag 'X'"),
    ("IMGID:1\na\tI-\n", 2, "malformed tag 'I-'"),
    ("IMGID:1\na\tO\nb\tb-PER\n", 3, "malformed tag 'b-PER'"),
    ("IMGID:1\na\tO\n\nIMGID:2\n\nIMGID:3\nc\tO\n", 4, "IMGID:2 has no token line"),
    ("IMGID:1\na\tO\nIMGID:2\n", 3, "IMGID:2 has no token line"),
    ("IMGID:1\nlonely\n", 2, "expected 'token<TAB>tag'"),
    ("IMGID:1\n\tO\n", 2, "expected 'token<TAB>tag'"),
    ("IMGID:\na\tO\n", 1, "IMGID line without an id"),
])
def test_bad_line_named(tmp_path, text, lineno, message):
    path = write(tmp_path / "bad.txt", text)
    with pytest.raises(ValueError) as e:
        read_twitter_file(path)
    assert f"{path}:{lineno}:" in str(e.value) and message in str(e.value)


def test_bad_file_fails_before_images(tmp_path):
    root = make_root(tmp_path, images=())
    write(root / "test.txt", TRAIN + "\nIMGID:9\nz\tB-FOO\n")
    # the bad tag, not the (earlier, train) missing image, is reported
    with pytest.raises(ValueError, match=r"test.txt:30: .*'FOO'"):
        load_twitter2017(root)


def test_missing_image(tmp_path):
    root = make_root(tmp_path, images=("1.jpg", "2.png", "3.jpg", "5.jpg"))
    path = root / "train.txt"
    with pytest.raises(FileNotFoundError) as e:
        load_twitter2017(root)
    assert f"{path}:18:" in str(e.value) and str(tmp_path / "twitter2017_images" / "4.jpg") in str(e.value)
    data = load_twitter2017(root, missing_image="skip")
    assert [s.image_id for s in data.train] == ["1", "2", "3", "5"] and data.skipped["train"] == 1
    kept = read_twitter_file(path, tmp_path / "twitter2017_images", missing_image="keep")
    assert len(kept) == 5 and kept[3].image == "" and kept[2].image
    assert read_twitter_file(path, tmp_path / "twitter2017_images", "skip").skipped == 1
    with pytest.raises(ValueError, match="missing_image"):
        read_twitter_file(path, missing_image="drop")


def test_missing_files(tmp_path):
    root = make_root(tmp_path)
    with pytest.raises(FileNotFoundError, match="Twitter NER folder"):
        load_twitter2017(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="image folder"):
        load_twitter2017(root, images="nope")
    (root / "valid.txt").unlink()
    with pytest.raises(FileNotFoundError, match="valid.txt or .*dev.txt"):
        load_twitter2017(root)
    with pytest.raises(FileNotFoundError, match="Twitter NER file"):
        read_twitter_file(root / "valid.txt")


# ------------------------------------------------------------------------------------------------
# spans, relabelling, IMNER
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tags, spans", [
    ((), []),
    (("O", "O"), []),
    (("B-PER", "I-PER", "O", "B-LOC"), [("PER", 0, 2), ("LOC", 3, 4)]),
    (("I-PER", "I-PER", "O"), [("PER", 0, 2)]),  # I- opening a sentence
    (("O", "I-ORG", "I-ORG"), [("ORG", 1, 3)]),  # I- after O starts a span
    (("B-PER", "I-LOC", "I-LOC"), [("PER", 0, 1), ("LOC", 1, 3)]),  # I- of another type starts one
    (("B-PER", "B-PER", "I-PER"), [("PER", 0, 1), ("PER", 1, 3)]),  # B- always starts one
    (("B-LOC", "B-ORG", "I-ORG", "B-MISC"), [("LOC", 0, 1), ("ORG", 1, 3), ("MISC", 3, 4)]),
])
def test_entity_spans(tags, spans):
    assert entity_spans(tags) == spans


def test_entity_spans_malformed():
    with pytest.raises(ValueError, match="malformed tag 'PER'"):
        entity_spans(("O", "PER"))


@pytest.mark.parametrize("tags, keep, out", [
    (("B-PER", "I-PER", "O", "B-LOC"), {"PER"}, ("B-PER", "I-PER", "O", "O")),
    (("B-PER", "I-PER", "O", "B-LOC"), {"LOC"}, ("O", "O", "O", "B-LOC")),
    (("O", "I-ORG", "I-ORG", "B-PER"), {"PER"}, ("O", "O", "O", "B-PER")),  # I- span removed whole
    (("B-ORG", "I-ORG", "I-PER"), {"PER"}, ("O", "O", "I-PER")),  # I-PER starts its own span
    (("B-LOC", "B-ORG", "I-ORG", "B-LOC"), {"LOC", "PER"}, ("B-LOC", "O", "O", "B-LOC")),  # adjacent spans
    (("B-LOC", "B-ORG", "I-ORG", "B-LOC"), {"ORG"}, ("O", "B-ORG", "I-ORG", "O")),
    (("B-MISC", "I-MISC"), TYPES, ("B-MISC", "I-MISC")),
    (("B-MISC", "I-MISC"), (), ("O", "O")),
])
def test_relabel(tags, keep, out):
    assert relabel(tags, keep) == out


def synthetic() -> TwitterData:
    rows = [
        ("B-PER I-PER O B-LOC", "p"), ("B-ORG O B-MISC I-MISC", "om"), ("O O", "none"), ("B-LOC I-LOC", "l"),
        ("B-MISC", "m"), ("B-PER O B-ORG I-ORG B-LOC", "pol"), ("O I-ORG I-ORG", "o"), ("B-LOC I-PER", "lp"),
    ]

    def split(name):
        return [NERSample(tuple(f"w{i}" for i in range(len(t.split()))), tuple(t.split()), "", sid, f"{name}:{sid}")
                for t, sid in rows]

    return TwitterData(split("train"), split("valid"), split("test"), "syn")


def types_of(s):
    return {t for t, _, _ in entity_spans(s.tags)}


@pytest.mark.parametrize("order", ["PLOM", "POLM", ("MISC", "ORG", "LOC", "PER")])
def test_imner_tasks(order):
    data = synthetic()
    tasks = imner_tasks(data, order)
    seq = ORDERS[order] if isinstance(order, str) else order
    assert [t.entity_type for t in tasks] == list(seq) and [t.index for t in tasks] == [0, 1, 2, 3]
    originals = {s.image_id: s for s in data.train}
    for t, task in enumerate(tasks):
        seen = seq[: t + 1]
        assert task.seen_types == tuple(seen)
        for part, source in ((task.train, data.train), (task.valid, data.valid)):
            # exactly the sentences holding the task's type, in order
            assert [s.image_id for s in part] == [s.image_id for s in source if seq[t] in types_of(s)]
        for s in task.train + task.valid + task.test:
            assert types_of(s) <= set(seen), "a tag of an unseen type remains"
            orig = originals[s.image_id]
            for typ, a, b in entity_spans(orig.tags):
                if typ in seen:
                    assert s.tags[a:b] == orig.tags[a:b], "a seen type lost its tags"
                else:
                    assert set(s.tags[a:b]) == {"O"}
        assert [s.image_id for s in task.test] == [s.image_id for s in data.test]
    assert [s.tags for s in tasks[-1].test] == [s.tags for s in data.test]
    d = describe(tasks)
    assert [x["n_train"] for x in d] == [len(t.train) for t in tasks]
    assert all(x["n_test"] == 8 for x in d)


def test_imner_plom_by_hand():
    tasks = imner_tasks(synthetic(), "PLOM")
    assert [s.image_id for s in tasks[0].train] == ["p", "pol", "lp"]
    assert [s.tags for s in tasks[0].train] == [("B-PER", "I-PER", "O", "O"), ("B-PER", "O", "O", "O", "O"),
                                                ("O", "I-PER")]
    assert [s.image_id for s in tasks[2].train] == ["om", "pol", "o"]
    assert tasks[2].train[0].tags == ("B-ORG", "O", "O", "O")
    assert describe(tasks)[1]["n_entities_train"] == 4  # p, l, pol, lp


@pytest.mark.parametrize("order", ["LPOM", ("PER", "LOC", "ORG"), ("PER", "LOC", "ORG", "ORG"),
                                   ("PER", "LOC", "ORG", "OTHER")])
def test_imner_bad_order(order):
    with pytest.raises(ValueError, match="order"):
        imner_tasks(synthetic(), order)


def test_imner_on_loaded_fixture(tmp_path):
    tasks = imner_tasks(load_twitter2017(make_root(tmp_path)), "POLM")
    assert [len(t.train) for t in tasks] == [3, 2, 3, 1]
