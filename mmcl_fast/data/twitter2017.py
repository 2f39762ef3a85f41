"""Twitter-2017 / Twitter-2015 (multimodal NER) as released by UMT, and the IMNER continual protocol
of MSPT.

UMT (Yu et al., ACL 2020) ships each split as CoNLL-style blocks, the format MSPT reads:

    IMGID:16_05_01_6
    RT<TAB>O
    Kevin<TAB>B-PER
    Durant<TAB>I-PER
    <blank line>

with the images in a sibling folder (`<root>/../twitter2017_images/<imgid>.jpg`). Tags are BIO over
PER, LOC, ORG and MISC; Twitter-2015 writes MISC as OTHER, normalised here to MISC. An I-X after O
or after another type is kept as written: the conlleval convention (and seqeval) read it as the
start of a span, and the real files have it.

IMNER (Chen et al., "Continual Multimodal Knowledge Graph Construction", IJCAI 2024) learns one
entity type per task in a fixed order (PLOM or POLM). Task t trains on the sentences holding its
type, with the types still to come relabelled O (they are not known yet: tagging them would leak
future labels); every task is tested on the whole test split relabelled to the types seen so far.

A malformed line is a ValueError naming the file and the line, raised before anything is built.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence

from .mnre import SampleList, check_missing_image

TYPES = ("PER", "LOC", "ORG", "MISC")
ALIASES = {"OTHER": "MISC"}
ORDERS = {"PLOM": ("PER", "LOC", "ORG", "MISC"), "POLM": ("PER", "ORG", "LOC", "MISC")}
_TAG = re.compile(r"([BI])-(\S+)")
# the last run of spaces/tabs separates token and tag (other unicode spaces may be tokens)
_LINE = re.compile(r"(.*?)[ \t]+([^ \t]+)[ \t]*")


@dataclasses.dataclass(frozen=True)
class NERSample:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    image: str  # absolute path, "" when images are not checked or the image is missing ("keep")
    image_id: str
    source: str  # "<path>:<lineno>" of the IMGID line

    def __post_init__(self):
        if len(self.tokens) != len(self.tags):
            raise ValueError(f"{self.source}: {len(self.tokens)} tokens but {len(self.tags)} tags")


def _split_tag(tag: str, where: str = "tags") -> tuple[str, str]:
    m = _TAG.fullmatch(tag)
    if m is None:
        raise ValueError(f"{where}: malformed tag {tag!r} (expected O, B-<type> or I-<type>)")
    return m.group(1), m.group(2)


def normalise_tag(tag: str, where: str) -> str:
    """The tag with OTHER read as MISC; ValueError for a malformed tag or an unknown type."""
    if tag == "O":
        return tag
    prefix, typ = _split_tag(tag, where)
    typ = ALIASES.get(typ, typ)
    if typ not in TYPES:
        raise ValueError(f"{where}: tag {tag!r} has unknown entity type {typ!r} (known: {', '.join(TYPES)})")
    return f"{prefix}-{typ}"


def _read_blocks(path: str) -> list[tuple[str, str, list[str], list[str]]]:
    """(image id, source, tokens, tags) of every block of a file."""
    blocks = []
    cur = None

    def close():
        if cur is not None and not cur[2]:
            raise ValueError(f"{cur[1]}: block IMGID:{cur[0]} has no token line")
        if cur is not None:
            blocks.append(cur)

    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            text = line.rstrip("\r\n")
            if not text.strip():
                close()
                cur = None
            elif text.startswith("IMGID:"):
                # a block may also end at the next IMGID line without a blank line in between
                close()
                img = text[len("IMGID:"):].strip()
                if not img:
                    raise ValueError(f"{where}: IMGID line without an id")
                cur = (img, where, [], [])
            else:
                if cur is None:
                    raise ValueError(f"{where}: token line before any IMGID line: {text[:80]!r}")
                m = _LINE.fullmatch(text)
                token = m.group(1).strip(" \t") if m else ""
                if not token:
                    raise ValueError(f"{where}: expected 'token<TAB>tag', got {text[:80]!r}")
                cur[2].append(token)
                cur[3].append(normalise_tag(m.group(2), where))
    close()
    return blocks


class _ImageFinder:
    """`<dir>/<id>.jpg`, else any `<dir>/<id>.*` (first by name); the folder is listed once."""

    def __init__(self, image_dir: str):
        self.dir = os.path.abspath(image_dir)
        self._by_stem: dict[str, str] | None = None

    def __call__(self, image_id: str) -> str | None:
        jpg = os.path.join(self.dir, image_id + ".jpg")
        if os.path.isfile(jpg):
            return jpg
        if self._by_stem is None:
            self._by_stem = {}
            for name in sorted(os.listdir(self.dir)):
                self._by_stem.setdefault(os.path.splitext(name)[0], name)
        name = self._by_stem.get(image_id)
        return os.path.join(self.dir, name) if name and os.path.isfile(os.path.join(self.dir, name)) else None


def _attach_images(blocks, image_dir, missing_image: str) -> SampleList:
    find = _ImageFinder(image_dir) if image_dir is not None else None
    out = SampleList()
    for img, source, tokens, tags in blocks:
        image = ""
        if find is not None:
            image = find(img) or ""
            if not image:
                if missing_image == "error":
                    raise FileNotFoundError(f"{source}: image {os.path.join(find.dir, img + '.jpg')!r} "
                                            f"(or {img}.* ) does not exist")
                if missing_image == "skip":
                    out.skipped += 1
                    continue
        out.append(NERSample(tuple(tokens), tuple(tags), image, img, source))
    return out


def read_twitter_file(path, image_dir=None, missing_image: str = "error") -> SampleList:
    """The sentences of one UMT-format file. With `image_dir`, each sentence's image is
    `<image_dir>/<imgid>.jpg` (or `.<other>`); a missing one is an error, dropped ("skip", counted
    in `.skipped`) or kept with image "" ("keep"). Without it, image is ""."""
    check_missing_image(missing_image)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Twitter NER file {path!r} does not exist (IMGID:<id> blocks of token<TAB>tag lines)")
    if image_dir is not None and not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder {os.fspath(image_dir)!r} does not exist (it should hold <imgid>.jpg)")
    return _attach_images(_read_blocks(path), image_dir, missing_image)


@dataclasses.dataclass
class TwitterData:
    train: list[NERSample]
    valid: list[NERSample]
    test: list[NERSample]
    root: str
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # per split, missing images


def load_twitter2017(root, *, images=None, missing_image: str = "error") -> TwitterData:
    """`<root>/train.txt`, `valid.txt` (or `dev.txt`) and `test.txt`. `images` (relative to root,
    or absolute): by default `<root>/../<root name>_images`, `<root>/../twitter2017_images` or
    `<root>/images`, the first that exists; False: images are not looked for."""
    check_missing_image(missing_image)
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Twitter NER folder {root!r} does not exist")
    files = {}
    for split, names in (("train", ["train.txt"]), ("valid", ["valid.txt", "dev.txt"]), ("test", ["test.txt"])):
        found = [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))]
        if not found:
            raise FileNotFoundError(f"Twitter NER {split} file {' or '.join(os.path.join(root, n) for n in names)!r} "
                                    "does not exist")
        files[split] = found[0]
    image_dir = None
    if images is None:
        parent = os.path.dirname(root)
        tried = list(dict.fromkeys([os.path.join(parent, os.path.basename(root) + "_images"),
                                    os.path.join(parent, "twitter2017_images"), os.path.join(root, "images")]))
        image_dir = next((d for d in tried if os.path.isdir(d)), None)
        if image_dir is None:
            raise FileNotFoundError(f"no image folder: tried {', '.join(map(repr, tried))} "
                                    "(give images=<folder>, or images=False not to look for images)")
    elif images is not False:
        image_dir = os.path.join(root, os.fspath(images))
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder {image_dir!r} does not exist (it should hold <imgid>.jpg)")
    # every file is parsed before any image is looked for, so a bad line anywhere fails first
    blocks = {k: _read_blocks(p) for k, p in files.items()}
    splits = {k: _attach_images(b, image_dir, missing_image) for k, b in blocks.items()}
    return TwitterData(splits["train"], splits["valid"], splits["test"], root,
                       {k: v.skipped for k, v in splits.items()})


# ------------------------------------------------------------------------------------------------
# spans and the IMNER protocol
# ------------------------------------------------------------------------------------------------


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) of every entity, end exclusive, by conlleval: B-X starts a span, I-X
    continues a span of type X and starts one after O or after another type."""
    spans = []
    cur = None  # [type, start]
    for i, tag in enumerate(tags):
        if tag == "O":
            typ = None
        else:
            prefix, typ = _split_tag(tag, f"tag {i}")
            if prefix == "I" and cur is not None and cur[0] == typ:
                continue
        if cur is not None:
            spans.append((cur[0], cur[1], i))
        cur = [typ, i] if typ is not None else None
    if cur is not None:
        spans.append((cur[0], cur[1], len(tags)))
    return spans


def relabel(tags: Sequence[str], keep_types: Iterable[str]) -> tuple[str, ...]:
    """The tags with every entity whose type is not in `keep_types` set to O, as a whole span (the
    I- tags that continue it go too); kept entities keep their tags as written."""
    keep = set(keep_types)
    out = list(tags)
    for typ, a, b in entity_spans(tags):
        if typ not in keep:
            out[a:b] = ["O"] * (b - a)
    return tuple(out)


@dataclasses.dataclass
class IMNERTask:
    index: int
    entity_type: str
    seen_types: tuple[str, ...]
    train: list[NERSample]  # sentences holding entity_type, the types after it relabelled O
    valid: list[NERSample]
    test: list[NERSample]  # the whole test split, relabelled to seen_types


def resolve_order(order) -> tuple[str, ...]:
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"unknown IMNER order {order!r}; named ones: {', '.join(ORDERS)} "
                             f"(or give a permutation of {TYPES})")
        return ORDERS[order]
    out = tuple(order)
    if sorted(out) != sorted(TYPES):
        raise ValueError(f"an IMNER order must be a permutation of {TYPES}, got {out}")
    return out


def imner_tasks(data: TwitterData, order="PLOM") -> list[IMNERTask]:
    """One task per entity type, in `order` (a key of ORDERS or a permutation of TYPES)."""
    order = resolve_order(order)

    def task_split(samples, typ, seen):
        return [dataclasses.replace(s, tags=relabel(s.tags, seen)) for s in samples
                if any(t == typ for t, _, _ in entity_spans(s.tags))]

    tasks = []
    for t, typ in enumerate(order):
        seen = order[: t + 1]
        tasks.append(IMNERTask(t, typ, seen, task_split(data.train, typ, seen), task_split(data.valid, typ, seen),
                               [dataclasses.replace(s, tags=relabel(s.tags, seen)) for s in data.test]))
    return tasks


def describe(tasks: Sequence[IMNERTask]) -> list[dict]:
    return [{"index": t.index, "entity_type": t.entity_type, "seen_types": list(t.seen_types),
             "n_train": len(t.train), "n_valid": len(t.valid), "n_test": len(t.test),
             "n_entities_train": sum(typ == t.entity_type for s in t.train for typ, _, _ in entity_spans(s.tags))}
            for t in tasks]
