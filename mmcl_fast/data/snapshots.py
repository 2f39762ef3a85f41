"""Growing knowledge graphs: a KG cut into snapshots by the LKGE protocol, and LKGE's folder format.

LKGE (Cui et al., "Lifelong Embedding Learning and Transfer for Growing Knowledge Graphs", AAAI
2023) simulates a growing KG with snapshots; its datasets (and those of IncDE, FastKGE ...) are
folders `0/train.txt 0/valid.txt 0/test.txt 1/...`, each file one tab-separated
(head, relation, tail) triple of names per line, holding the facts NEW in that snapshot.

`build_snapshots(kg, num_snapshots=5, growth=..., seed=...)` cuts any KG that way:

- growth "entity": entities arrive in equal groups along a breadth-first walk of the graph (from a
  seeded start, neighbours in seeded order); a fact is ready once both its entities have arrived.
  "relation": relations arrive in equal groups (seeded order); a fact is ready with its relation.
  "fact": facts arrive in equal groups (seeded order). "hybrid": a fact is ready once its two
  entities, its relation and the fact itself have arrived, each along its own seeded order whose
  groups are front-loaded (cumulative share ((i + 1) / S) ** (1/3)) so that the maximum of the three
  arrives in roughly equal numbers: new entities, new relations and new facts in every snapshot.
- Snapshot 0 takes the facts ready at level 0. Snapshot i >= 1 takes the ready facts that touch an
  entity known before it (every new fact touches an already known entity, as in LKGE); a ready
  fact between two entities that are both new waits for the next snapshot, and those still
  waiting after the last one are dropped (counted in `dropped`).
- Each snapshot's facts are split 3:1:1 into train / valid / test (seeded). A valid or test fact
  that mentions an entity or relation no training fact of this or an earlier snapshot mentions is
  moved to train, so that nothing is evaluated that the model could not have learnt.
- Entities and relations are numbered in order of arrival (snapshot by snapshot, train first), as
  LKGE's loader numbers them: the entities known after snapshot i are exactly ids
  [0, num_entities(i)), which is what "candidates = the entities known now" ranks over.

Everything is seeded with numpy's PCG64: the same KG and seed give the same snapshots anywhere.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .kg import KnowledgeGraph, read_named_triples, write_triples

GROWTH = ("entity", "relation", "fact", "hybrid")
SPLITS = ("train", "valid", "test")


@dataclasses.dataclass
class Snapshot:
    """The facts new in snapshot `index` ([n, 3] id triples) and the sizes of the vocabulary known
    after it (entity ids [0, num_entities), relation ids [0, num_relations))."""

    index: int
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    num_entities: int
    num_relations: int

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def all(self) -> torch.Tensor:
        return torch.cat([self.train, self.valid, self.test])


class KGSnapshots:
    """An ordered list of snapshots over one vocabulary numbered by arrival."""

    def __init__(self, snapshots: Sequence[Snapshot], entities: Sequence[str], relations: Sequence[str],
                 name: str = "kg", growth: str | None = None, seed: int | None = None, dropped: int = 0):
        self.snapshots = list(snapshots)
        self.entities = [str(e) for e in entities]
        self.relations = [str(r) for r in relations]
        self.name = name
        self.growth = growth
        self.seed = seed
        self.dropped = int(dropped)
        self._check()

    def _check(self) -> None:
        if not self.snapshots:
            raise ValueError("a snapshot stream needs at least one snapshot")
        prev_e = prev_r = 0
        for s in self.snapshots:
            if s.train.shape[0] == 0:
                raise ValueError(f"{self.name}: snapshot {s.index} has no training fact")
            if s.num_entities < prev_e or s.num_relations < prev_r:
                raise ValueError(f"{self.name}: snapshot {s.index} knows fewer entities/relations than the one before")
            for split in SPLITS:
                t = s.split(split)
                if t.numel() and (int(t[:, [0, 2]].max()) >= s.num_entities or int(t[:, 1].max()) >= s.num_relations):
                    raise ValueError(f"{self.name}: snapshot {s.index} {split} holds an id beyond the vocabulary "
                                     "known after it (ids must be numbered by arrival)")
            prev_e, prev_r = s.num_entities, s.num_relations
        if prev_e > len(self.entities) or prev_r > len(self.relations):
            raise ValueError(f"{self.name}: the snapshots use more entities/relations than are named")

    def __len__(self) -> int:
        return len(self.snapshots)

    def __getitem__(self, i: int) -> Snapshot:
        return self.snapshots[i]

    def __iter__(self):
        return iter(self.snapshots)

    @property
    def num_entities(self) -> int:
        return self.snapshots[-1].num_entities

    @property
    def num_relations(self) -> int:
        return self.snapshots[-1].num_relations

    def upto(self, i: int, split: str = "train") -> torch.Tensor:
        """The `split` facts of snapshots 0..i."""
        return torch.cat([s.split(split) for s in self.snapshots[: i + 1]])

    def known(self, i: int) -> torch.Tensor:
        """Every fact (train, valid, test) of snapshots 0..i: the filter of the ranking."""
        return torch.cat([s.all() for s in self.snapshots[: i + 1]])

    def stats(self) -> list[dict[str, Any]]:
        out = []
        prev_e = prev_r = 0
        for s in self.snapshots:
            out.append({"snapshot": s.index, "train": int(s.train.shape[0]), "valid": int(s.valid.shape[0]),
                        "test": int(s.test.shape[0]), "entities": s.num_entities, "new_entities": s.num_entities - prev_e,
                        "relations": s.num_relations, "new_relations": s.num_relations - prev_r})
            prev_e, prev_r = s.num_entities, s.num_relations
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "growth": self.growth, "seed": self.seed, "dropped": self.dropped,
                "snapshots": self.stats()}

    def format_stats(self) -> str:
        rows = [["snapshot", "train", "valid", "test", "entities (new)", "relations (new)"]]
        for st in self.stats():
            rows.append([str(st["snapshot"]), str(st["train"]), str(st["valid"]), str(st["test"]),
                         f"{st['entities']} (+{st['new_entities']})", f"{st['relations']} (+{st['new_relations']})"])
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows]
        extra = f"{self.name}: growth {self.growth or 'given'}" + (f", seed {self.seed}" if self.seed is not None else "")
        if self.dropped:
            extra += f", {self.dropped} facts dropped (between two entities new in the last snapshot)"
        return extra + "\n" + "\n".join(lines)

    # -- the LKGE folder format ------------------------------------------------------------------
    def write_lkge(self, path: str) -> None:
        """`path/<i>/{train,valid,test}.txt` (tab-separated names, each snapshot's new facts), plus
        entities.txt / relations.txt (names in id order) and stats.json. Written into a temporary
        folder first and moved into place, so a failure leaves nothing half-written."""
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise ValueError(f"output {path!r} exists and is not an empty folder")
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.tmp{os.getpid()}")
        os.makedirs(tmp)
        try:
            for s in self.snapshots:
                d = os.path.join(tmp, str(s.index))
                os.makedirs(d)
                for split in SPLITS:
                    write_triples(os.path.join(d, f"{split}.txt"), s.split(split), self.entities, self.relations)
            for fname, names in (("entities.txt", self.entities), ("relations.txt", self.relations)):
                with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                    f.writelines(n + "\n" for n in names)
            with open(os.path.join(tmp, "stats.json"), "w") as f:
                json.dump(self.describe(), f, indent=2)
            if os.path.isdir(path):
                os.rmdir(path)
            os.replace(tmp, path)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def read_lkge(cls, path: str, name: str | None = None) -> KGSnapshots:
        """Read an LKGE-style folder (0/, 1/, ... each with train.txt, valid.txt, test.txt).

        Ids are given by order of appearance (train, then valid, then test, snapshot by snapshot).
        Errors name the file and line: a malformed line, a valid/test fact whose entity or relation
        no training fact of that snapshot or an earlier one has (it could not be learnt), a missing
        file, a snapshot without training facts."""
        if not os.path.isdir(path):
            raise ValueError(f"LKGE folder {path!r} does not exist")
        folders = []
        while os.path.isdir(os.path.join(path, str(len(folders)))):
            folders.append(os.path.join(path, str(len(folders))))
        if not folders:
            raise ValueError(f"{path!r} holds no snapshot folder 0/ (the LKGE format: 0/train.txt, 0/valid.txt, "
                             "0/test.txt, 1/...)")
        parsed = []
        for d in folders:
            files = {}
            for split in SPLITS:
                f = os.path.join(d, f"{split}.txt")
                if not os.path.isfile(f):
                    raise ValueError(f"{f!r} is missing (each snapshot folder needs train.txt, valid.txt, test.txt)")
                files[split] = (f, read_named_triples(f))
            if not files["train"][1]:
                raise ValueError(f"{files['train'][0]!r} holds no triple: snapshot {len(parsed)} is empty")
            parsed.append(files)
        ent: dict[str, int] = {}
        rel: dict[str, int] = {}
        snaps = []
        for i, files in enumerate(parsed):
            ids = {}
            for split in SPLITS:
                fname, rows = files[split]
                out = []
                for h, r, t, lineno in rows:
                    if split == "train":
                        out.append((ent.setdefault(h, len(ent)), rel.setdefault(r, len(rel)), ent.setdefault(t, len(ent))))
                        continue
                    for kind, value, vocab in (("entity", h, ent), ("relation", r, rel), ("entity", t, ent)):
                        if value not in vocab:
                            raise ValueError(f"{fname}:{lineno}: {split} fact mentions {kind} {value!r}, which no "
                                             f"training fact of snapshot {i} or earlier has (it cannot be learnt)")
                    out.append((ent[h], rel[r], ent[t]))
                ids[split] = torch.tensor(out, dtype=torch.long).reshape(-1, 3)
            snaps.append(Snapshot(i, ids["train"], ids["valid"], ids["test"], len(ent), len(rel)))
        return cls(snaps, list(ent), list(rel), name=name or os.path.basename(os.path.normpath(path)))

    # -- the continual core's view ------------------------------------------------------------------
    def task_stream(self, eval_split: str = "test"):
        """A `TaskStream` whose task i holds snapshot i's new train / valid / test facts and
        introduces its new entities and relations (by name). eval_split="valid" puts the valid facts
        where the loop evaluates (task.test), for choosing hyper-parameters without the test set."""
        from ..continual.streams import Task, TaskStream

        if eval_split not in ("test", "valid"):
            raise ValueError(f"eval_split must be 'test' or 'valid', got {eval_split!r}")

        tasks = []
        prev_e = prev_r = 0
        for s in self.snapshots:
            tasks.append(Task(index=s.index, name=f"snapshot{s.index}", train=s.train, valid=s.valid,
                              test=s.split(eval_split),
                              introduces={"entities": self.entities[prev_e:s.num_entities],
                                          "relations": self.relations[prev_r:s.num_relations]}))
            prev_e, prev_r = s.num_entities, s.num_relations
        return TaskStream(tasks, scenario="snapshot-incremental", name=self.name)


# ------------------------------------------------------------------------------------------------
# the builder
# ------------------------------------------------------------------------------------------------


def _levels(n: int, S: int, rng: np.random.Generator, order: np.ndarray | None = None,
            front: float = 1.0) -> np.ndarray:
    """The level (0..S-1) of each of n items arriving in `order` (seeded permutation if None):
    cumulative share of arrivals by the end of level i = ((i + 1) / S) ** front."""
    order = rng.permutation(n) if order is None else order
    cum = np.array([((i + 1) / S) ** front for i in range(S)])
    position = np.empty(n, dtype=np.float64)
    position[order] = (np.arange(n) + 0.5) / max(n, 1)
    return np.minimum(np.searchsorted(cum, position, side="left"), S - 1)


def _bfs_order(triples: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Entities in breadth-first order over the undirected graph: seeded start, seeded neighbour
    order, a seeded restart in each further connected component."""
    h, t = triples[:, 0], triples[:, 2]
    src = np.concatenate([h, t])
    dst = np.concatenate([t, h])
    perm = rng.permutation(src.shape[0])  # seeded neighbour order
    src, dst = src[perm], dst[perm]
    by = np.argsort(src, kind="stable")
    src, dst = src[by], dst[by]
    start = np.searchsorted(src, np.arange(n + 1))
    seen = np.zeros(n, dtype=bool)
    order = []
    for root in rng.permutation(n):
        if seen[root]:
            continue
        seen[root] = True
        queue = [root]
        k = 0
        while k < len(queue):
            e = queue[k]
            k += 1
            for nb in dst[start[e]:start[e + 1]]:
                if not seen[nb]:
                    seen[nb] = True
                    queue.append(nb)
        order.extend(queue)
    return np.array(order, dtype=np.int64)


def fact_levels(kg: KnowledgeGraph, num_snapshots: int, growth: str, rng: np.random.Generator) -> np.ndarray:
    """The snapshot each fact is ready at, by growth pattern (see the module docstring)."""
    tr = kg.triples.numpy()
    S, T = num_snapshots, tr.shape[0]
    if growth == "fact":
        return _levels(T, S, rng)
    if growth == "relation":
        return _levels(kg.num_relations, S, rng)[tr[:, 1]]
    front = 1.0 if growth == "entity" else 1.0 / 3.0
    ent = _levels(kg.num_entities, S, rng, order=_bfs_order(tr, kg.num_entities, rng), front=front)
    lv = np.maximum(ent[tr[:, 0]], ent[tr[:, 2]])
    if growth == "hybrid":
        lv = np.maximum(lv, _levels(kg.num_relations, S, rng, front=front)[tr[:, 1]])
        lv = np.maximum(lv, _levels(T, S, rng, front=front))
    return lv


def build_snapshots(kg: KnowledgeGraph, num_snapshots: int = 5, growth: str = "hybrid", seed: int = 0,
                    ratios: Sequence[float] = (3, 1, 1)) -> KGSnapshots:
    """Cut `kg` into `num_snapshots` snapshots by the LKGE protocol (module docstring)."""
    if growth not in GROWTH:
        raise ValueError(f"growth must be one of {GROWTH}, got {growth!r}")
    if isinstance(num_snapshots, bool) or not isinstance(num_snapshots, int) or num_snapshots < 1:
        raise ValueError(f"num_snapshots must be an int >= 1, got {num_snapshots!r}")
    if len(ratios) != 3 or any(not np.isfinite(r) or r < 0 for r in ratios) or ratios[0] <= 0:
        raise ValueError(f"ratios must be (train, valid, test) >= 0 with train > 0, got {list(ratios)}")
    if len(kg) < num_snapshots:
        raise ValueError(f"{kg.name} has {len(kg)} facts: too few for {num_snapshots} snapshots")
    rng = np.random.default_rng(seed)
    tr = kg.triples.numpy()
    levels = fact_levels(kg, num_snapshots, growth, rng)
    assigned = np.full(tr.shape[0], -1, dtype=np.int64)
    split_of = np.zeros(tr.shape[0], dtype=np.int64)  # 0 train, 1 valid, 2 test
    known_e = np.zeros(kg.num_entities, dtype=bool)
    known_r = np.zeros(kg.num_relations, dtype=bool)
    shares = np.cumsum(np.asarray(ratios, dtype=np.float64)) / float(sum(ratios))
    for i in range(num_snapshots):
        ready = (assigned < 0) & (levels <= i)
        if i > 0:
            ready &= known_e[tr[:, 0]] | known_e[tr[:, 2]]
        idx = np.nonzero(ready)[0]
        if idx.size == 0:
            raise ValueError(f"{kg.name}: snapshot {i} of {num_snapshots} would be empty (growth {growth!r}, seed "
                             f"{seed}); use fewer snapshots")
        idx = idx[rng.permutation(idx.size)]
        bounds = np.round(shares * idx.size).astype(np.int64)
        parts = np.split(idx, bounds[:2])
        assigned[idx] = i
        split_of[parts[1]] = 1
        split_of[parts[2]] = 2
        # what training teaches by the end of this snapshot; a valid/test fact outside it moves to
        # train (which may teach more, so repeat until nothing moves)
        train_e, train_r = known_e.copy(), known_r.copy()
        held = np.concatenate(parts[1:])
        train_e[tr[parts[0], 0]] = True
        train_e[tr[parts[0], 2]] = True
        train_r[tr[parts[0], 1]] = True
        while held.size:
            bad = ~(train_e[tr[held, 0]] & train_e[tr[held, 2]] & train_r[tr[held, 1]])
            if not bad.any():
                break
            moved = held[bad]
            split_of[moved] = 0
            train_e[tr[moved, 0]] = True
            train_e[tr[moved, 2]] = True
            train_r[tr[moved, 1]] = True
            held = held[~bad]
        known_e, known_r = train_e, train_r
    dropped = int((assigned < 0).sum())
    # ids by arrival: snapshot by snapshot, train facts first, head then tail, in the seeded order
    new_e = np.full(kg.num_entities, -1, dtype=np.int64)
    new_r = np.full(kg.num_relations, -1, dtype=np.int64)
    n_e = n_r = 0
    per = []
    for i in range(num_snapshots):
        mine = np.nonzero(assigned == i)[0]
        mine = mine[np.argsort(split_of[mine], kind="stable")]
        for h, r, t in tr[mine]:
            if new_e[h] < 0:
                new_e[h] = n_e
                n_e += 1
            if new_r[r] < 0:
                new_r[r] = n_r
                n_r += 1
            if new_e[t] < 0:
                new_e[t] = n_e
                n_e += 1
        mapped = np.stack([new_e[tr[mine, 0]], new_r[tr[mine, 1]], new_e[tr[mine, 2]]], 1)
        sp = split_of[mine]
        per.append(Snapshot(i, *(torch.from_numpy(mapped[sp == k].copy()) for k in range(3)), n_e, n_r))
    ent_names = [""] * n_e
    for old, new in enumerate(new_e):
        if new >= 0:
            ent_names[new] = kg.entities[old]
    rel_names = [""] * n_r
    for old, new in enumerate(new_r):
        if new >= 0:
            rel_names[new] = kg.relations[old]
    return KGSnapshots(per, ent_names, rel_names, name=kg.name, growth=growth, seed=seed, dropped=dropped)
