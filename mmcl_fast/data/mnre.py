"""MNRE (multimodal relation extraction) on disk, and the IMRE continual protocol of MSPT.

MNRE (Zheng et al., 2021) and our offline WordNet data set share one layout:

    <root>/ours_rel2id.json                   {"None": 0, "/per/per/parent": 1, ...}
    <root>/txt/ours_{train,val,test}.txt      one sample per line
    <root>/img_org/{train,val,test}/<img_id>

A line is a dict {"token": [...], "h": {"name", "pos"}, "t": {"name", "pos"}, "img_id", "relation"},
`pos` a token span [start, end). The released files are Python literals (single quotes), so a line
that is not JSON is read with `ast.literal_eval`.

IMRE (Chen et al., "Continual Multimodal Knowledge Graph Construction", IJCAI 2024) learns the
relations in tasks: the relations other than "None" are cut into `num_tasks` groups (a seeded
shuffle of rel2id's order, or an explicit split such as MSPT's sep5/sep7/sep10 files). "None" is no
relation to learn but the negative class of every task, so its samples are partitioned among the
tasks (seeded) and every task trains and is tested on a share of them.

A malformed line is a ValueError naming the file and the line, raised before anything is built.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence

import torch

NONE = "None"
MISSING_IMAGE = ("error", "skip", "keep")
_KEYS = ("token", "h", "t", "img_id", "relation")


@dataclasses.dataclass(frozen=True)
class RESample:
    """One sentence with a head and a tail entity (token spans [start, end)) and their relation."""

    tokens: tuple[str, ...]
    head: tuple[int, int]
    tail: tuple[int, int]
    head_name: str
    tail_name: str
    image: str  # absolute path, "" when images are not checked or the image is missing ("keep")
    relation: str
    source: str  # "<path>:<lineno>"
    image_id: str = ""  # the line's img_id (keys image feature caches even when image is "")


class SampleList(list):
    """A list of samples that also tells how many were dropped for a missing image (`skipped`)."""

    skipped: int = 0


def check_missing_image(missing_image: str) -> None:
    if missing_image not in MISSING_IMAGE:
        raise ValueError(f"missing_image must be one of {MISSING_IMAGE}, got {missing_image!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_rel2id(path) -> dict[str, int]:
    """{relation name: id} from a JSON object; ids distinct ints, "None" present."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rel2id file {path!r} does not exist (a JSON object relation name -> id)")
    with open(path, encoding="utf-8-sig") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object relation name -> id, got {type(obj).__name__}")
    seen: dict[int, str] = {}
    for name, i in obj.items():
        if not _is_int(i):
            raise ValueError(f"{path}: relation {name!r} has id {i!r}, not an int")
        if i in seen:
            raise ValueError(f"{path}: relations {seen[i]!r} and {name!r} share id {i}")
        seen[i] = name
    if NONE not in obj:
        raise ValueError(f"{path}: no {NONE!r} relation (the negative class every MNRE rel2id has)")
    return dict(obj)


def _parse_line(text: str, where: str):
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(f"{where}: neither JSON nor a Python literal ({type(e).__name__}: {e}): "
                         f"{text[:120]!r}") from None


def _span(ent, key: str, n: int, where: str) -> tuple[str, tuple[int, int]]:
    if not isinstance(ent, dict) or "name" not in ent or "pos" not in ent:
        raise ValueError(f"{where}: {key!r} must be a dict with 'name' and 'pos', got {ent!r}"[:300])
    name, pos = ent["name"], ent["pos"]
    if not isinstance(name, str):
        raise ValueError(f"{where}: {key}.name must be a str, got {name!r}")
    if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and all(_is_int(p) for p in pos)):
        raise ValueError(f"{where}: {key}.pos must be two ints [start, end), got {pos!r}")
    if not 0 <= pos[0] < pos[1] <= n:
        raise ValueError(f"{where}: {key}.pos {list(pos)} is not a span [start, end) of the {n} tokens")
    return name, (pos[0], pos[1])


def parse_mnre_line(line: str, where: str, rel2id: Mapping[str, int] | None = None) -> RESample | None:
    """The sample of one line (image "" until resolved against a folder), None for a blank line."""
    text = line.strip()
    if not text:
        return None
    d = _parse_line(text, where)
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a dict, got {type(d).__name__}")
    missing = [k for k in _KEYS if k not in d]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    tokens = d["token"]
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)):
        raise ValueError(f"{where}: 'token' must be a non-empty list of str")
    head_name, head = _span(d["h"], "h", len(tokens), where)
    tail_name, tail = _span(d["t"], "t", len(tokens), where)
    rel, img = d["relation"], d["img_id"]
    if not isinstance(rel, str):
        raise ValueError(f"{where}: 'relation' must be a str, got {rel!r}")
    if rel2id is not None and rel not in rel2id:
        raise ValueError(f"{where}: relation {rel!r} is not in rel2id")
    if not (isinstance(img, str) and img):
        raise ValueError(f"{where}: 'img_id' must be a non-empty str, got {img!r}")
    return RESample(tuple(tokens), head, tail, head_name, tail_name, "", rel, where, img)


def read_mnre_file(path, rel2id: Mapping[str, int] | None = None, image_dir=None,
                   missing_image: str = "error") -> SampleList:
    """The samples of one MNRE text file. With `image_dir`, each sample's image is
    `<image_dir>/<img_id>` (absolute); a missing one is an error, dropped ("skip", counted in
    `.skipped`) or kept with image "" ("keep"). Without it, image is ""."""
    check_missing_image(missing_image)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNRE file {path!r} does not exist (one sample dict per line)")
    if image_dir is not None and not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder {os.fspath(image_dir)!r} does not exist "
                                "(it should hold the img_id files)")
    return _attach_images(_read_lines(path, rel2id), image_dir, missing_image)


def _read_lines(path: str, rel2id: Mapping[str, int] | None) -> list[RESample]:
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            s = parse_mnre_line(line, f"{path}:{lineno}", rel2id)
            if s is not None:
                out.append(s)
    return out


def _attach_images(samples: Sequence[RESample], image_dir, missing_image: str = "error") -> SampleList:
    """The samples with image = `<image_dir>/<image_id>` (absolute); image_dir None: image ""."""
    out = SampleList()
    for s in samples:
        image = ""
        if image_dir is not None:
            image = os.path.abspath(os.path.join(image_dir, s.image_id))
            if not os.path.isfile(image):
                if missing_image == "error":
                    raise FileNotFoundError(f"{s.source}: image {image!r} does not exist")
                if missing_image == "skip":
                    out.skipped += 1
                    continue
                image = ""
        out.append(dataclasses.replace(s, image=image))
    return out


@dataclasses.dataclass
class MNREData:
    train: list[RESample]
    valid: list[RESample]
    test: list[RESample]
    rel2id: dict[str, int]
    root: str
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # per split, missing images

    def relations(self) -> list[str]:
        """The relations other than "None", in id order."""
        return [r for r in sorted(self.rel2id, key=self.rel2id.__getitem__) if r != NONE]


def load_mnre(root, *, train="txt/ours_train.txt", valid="txt/ours_val.txt", test="txt/ours_test.txt",
              rel2id="ours_rel2id.json", images="img_org", missing_image: str = "error") -> MNREData:
    """An MNRE-layout folder; file and folder arguments are relative to `root` (or absolute).
    `images` holds train/ val/ test/ subfolders; None: images are not looked for."""
    check_missing_image(missing_image)
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"MNRE folder {root!r} does not exist")
    files = {k: os.path.join(root, v) for k, v in (("train", train), ("valid", valid), ("test", test))}
    for k, p in files.items():
        if not os.path.isfile(p):
            raise FileNotFoundError(f"MNRE {k} file {p!r} does not exist (one sample dict per line)")
    dirs = dict.fromkeys(files)
    if images is not None:
        subs = {"train": "train", "valid": "val", "test": "test"}
        dirs = {k: os.path.join(root, images, sub) for k, sub in subs.items()}
        for k, p in dirs.items():
            if not os.path.isdir(p):
                raise FileNotFoundError(f"MNRE {k} image folder {p!r} does not exist "
                                        f"({os.path.join(root, images)!r} should hold train/ val/ test/)")
    r2i = read_rel2id(os.path.join(root, rel2id))
    # every file is parsed before any image is looked for, so a bad line anywhere fails first
    parsed = {k: _read_lines(p, r2i) for k, p in files.items()}
    splits = {k: _attach_images(parsed[k], dirs[k], missing_image) for k in files}
    return MNREData(splits["train"], splits["valid"], splits["test"], r2i, root,
                    {k: v.skipped for k, v in splits.items()})


# ------------------------------------------------------------------------------------------------
# the IMRE protocol
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class IMRETask:
    index: int
    relations: list[str]  # the task's relations other than "None"
    train: list[RESample]
    valid: list[RESample]
    test: list[RESample]


def _cut(n: int, k: int) -> list[tuple[int, int]]:
    """k consecutive [start, end) ranges over n, sizes differing by at most 1, larger first."""
    q, r = divmod(n, k)
    bounds, start = [], 0
    for i in range(k):
        end = start + q + (i < r)
        bounds.append((start, end))
        start = end
    return bounds


def _split_groups(split, rel2id: Mapping[str, int]) -> list[list[str]]:
    if isinstance(split, (str, os.PathLike)):
        where = os.fspath(split)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"IMRE split file {where!r} does not exist "
                                    "(JSON: a list of lists of relation names, or {\"task_0\": [...], ...})")
        with open(where, encoding="utf-8-sig") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(obj, dict):
            keyed = {}
            for key, group in obj.items():
                m = re.search(r"(\d+)$", str(key))
                if m is None or int(m.group(1)) in keyed:
                    raise ValueError(f"{where}: key {key!r} is not a distinct task number such as 'task_0' or '0'")
                keyed[int(m.group(1))] = group
            obj = [keyed[i] for i in sorted(keyed)]
    else:
        where, obj = "split", split
    if not isinstance(obj, (list, tuple)) or not obj:
        raise ValueError(f"{where}: expected a non-empty list of lists of relation names")
    groups, seen = [], set()
    for i, group in enumerate(obj):
        if not isinstance(group, (list, tuple)) or not group or not all(isinstance(r, str) for r in group):
            raise ValueError(f"{where}: task {i} must be a non-empty list of relation names, got {group!r}"[:300])
        for r in group:
            if r == NONE:
                raise ValueError(f"{where}: task {i} lists {NONE!r}, which every task shares and no split may hold")
            if r not in rel2id:
                raise ValueError(f"{where}: task {i} lists {r!r}, which is not in rel2id")
            if r in seen:
                raise ValueError(f"{where}: relation {r!r} is listed twice")
            seen.add(r)
        groups.append(list(group))
    left = [r for r in rel2id if r != NONE and r not in seen]
    if left:
        # their samples would silently belong to no task
        raise ValueError(f"{where}: relation(s) {', '.join(map(repr, left))} are in no task")
    return groups


def imre_tasks(data: MNREData, num_tasks: int | None = None, *, seed: int | None = 0, split=None) -> list[IMRETask]:
    """The IMRE tasks of `data`: `num_tasks` (default 5) groups of relations in a seeded order
    (seed None: rel2id order), or the groups of `split` (a list of lists of names, or a JSON file
    path); "None" samples of each split are partitioned among the tasks (seeded)."""
    relations = data.relations()
    if split is not None:
        groups = _split_groups(split, data.rel2id)
        if num_tasks is not None and num_tasks != len(groups):
            raise ValueError(f"num_tasks={num_tasks} but the split has {len(groups)} tasks")
    else:
        num_tasks = 5 if num_tasks is None else num_tasks
        if not _is_int(num_tasks) or not 1 <= num_tasks <= len(relations):
            raise ValueError(f"num_tasks must be an int in [1, {len(relations)}] (the relations other than "
                             f"{NONE!r}), got {num_tasks!r}")
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    if split is None:
        order = relations
        if seed is not None:
            order = [relations[i] for i in torch.randperm(len(relations), generator=gen).tolist()]
        groups = [order[a:b] for a, b in _cut(len(order), num_tasks)]
    k = len(groups)
    task_of = {r: i for i, g in enumerate(groups) for r in g}
    parts: dict[str, list[list[RESample]]] = {}
    for name in ("train", "valid", "test"):
        samples = getattr(data, name)
        for s in samples:
            if s.relation != NONE and s.relation not in task_of:
                raise ValueError(f"{s.source}: relation {s.relation!r} is not in rel2id")
        none = [i for i, s in enumerate(samples) if s.relation == NONE]
        perm = torch.randperm(len(none), generator=gen).tolist() if seed is not None else range(len(none))
        perm = list(perm)
        none_task = {}
        for t, (a, b) in enumerate(_cut(len(none), k)):
            for j in perm[a:b]:
                none_task[none[j]] = t
        out = [[] for _ in range(k)]
        for i, s in enumerate(samples):
            out[none_task[i] if s.relation == NONE else task_of[s.relation]].append(s)
        parts[name] = out
    return [IMRETask(t, groups[t], parts["train"][t], parts["valid"][t], parts["test"][t]) for t in range(k)]


def cumulative_test(tasks: Sequence[IMRETask], t: int) -> list[RESample]:
    """The test samples of tasks 0..t (what a model is scored on after learning task t)."""
    if not 0 <= t < len(tasks):
        raise IndexError(f"task {t} is outside [0, {len(tasks)})")
    return [s for task in tasks[: t + 1] for s in task.test]


def describe(tasks: Sequence[IMRETask]) -> list[dict]:
    return [{"index": t.index, "relations": list(t.relations), "n_train": len(t.train), "n_valid": len(t.valid),
             "n_test": len(t.test), "n_none_train": sum(s.relation == NONE for s in t.train)} for t in tasks]
