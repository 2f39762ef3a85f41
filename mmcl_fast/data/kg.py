"""Knowledge graphs as id triples over named entities and relations, and the ways in: triple files
(tab-separated names, the format of FB15k-237, LKGE, IncDE and FastKGE), PyKEEN datasets and
triples factories (its bundled UMLS, Nations and Kinships, or any `Dataset` / `TriplesFactory` a
user already has), read through PyKEEN's own classes.

    kg = pykeen_kg("umls")                    # or from_pykeen(my_dataset), read_triples_file(path)
    kg.triples                                # LongTensor [T, 3] of (head, relation, tail) ids
    kg.entities[kg.triples[0, 0]]             # the head's name

A malformed line is a ValueError naming the file and the line, raised before anything is built.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence

import torch

# PyKEEN's bundled KGs that the loaders know by name (class names in pykeen.datasets)
PYKEEN_KGS = {"umls": "UMLS", "nations": "Nations", "kinships": "Kinships"}


@dataclasses.dataclass
class KnowledgeGraph:
    """Distinct (head, relation, tail) id triples; `entities[i]` / `relations[i]` name id i."""

    triples: torch.Tensor
    entities: list[str]
    relations: list[str]
    name: str = "kg"

    def __post_init__(self):
        t = self.triples
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != 3:
            raise ValueError(f"triples must be a LongTensor [T, 3], got {getattr(t, 'shape', type(t).__name__)}")
        self.triples = t.long().cpu()
        self.entities = [str(e) for e in self.entities]
        self.relations = [str(r) for r in self.relations]
        for kind, names in (("entity", self.entities), ("relation", self.relations)):
            if len(set(names)) != len(names):
                dup = next(n for n in names if names.count(n) > 1)
                raise ValueError(f"{self.name}: {kind} name {dup!r} names two ids")
        if self.triples.numel():
            for col, kind, n in ((0, "head", len(self.entities)), (1, "relation", len(self.relations)),
                                 (2, "tail", len(self.entities))):
                lo, hi = int(self.triples[:, col].min()), int(self.triples[:, col].max())
                if lo < 0 or hi >= n:
                    raise ValueError(f"{self.name}: a triple's {kind} id {lo if lo < 0 else hi} is outside [0, {n})")

    @property
    def num_entities(self) -> int:
        return len(self.entities)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    def __len__(self) -> int:
        return int(self.triples.shape[0])

    def named_triples(self) -> list[tuple[str, str, str]]:
        return [(self.entities[h], self.relations[r], self.entities[t]) for h, r, t in self.triples.tolist()]

    @classmethod
    def from_named(cls, triples: Iterable[Sequence[str]], name: str = "kg") -> KnowledgeGraph:
        """Ids by order of first appearance (head, then tail); duplicate triples kept once."""
        ent: dict[str, int] = {}
        rel: dict[str, int] = {}
        ids = []
        for h, r, t in triples:
            ids.append((ent.setdefault(h, len(ent)), rel.setdefault(r, len(rel)), ent.setdefault(t, len(ent))))
        return cls(_distinct(torch.tensor(ids, dtype=torch.long).reshape(-1, 3)), list(ent), list(rel), name)

    def describe(self) -> dict:
        return {"name": self.name, "entities": self.num_entities, "relations": self.num_relations,
                "triples": len(self)}


def _distinct(triples: torch.Tensor) -> torch.Tensor:
    """The triples without repeats, in order of first occurrence."""
    if triples.shape[0] < 2:
        return triples
    _, inverse = torch.unique(triples, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), triples.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(triples.shape[0]), reduce="amin")
    return triples[torch.sort(first)[0]]


# ------------------------------------------------------------------------------------------------
# triple files
# ------------------------------------------------------------------------------------------------


def parse_triple_line(line: str, path: str, lineno: int) -> tuple[str, str, str] | None:
    """(head, relation, tail) of one line, None for a blank line. Fields are tab-separated (names
    may then hold spaces); a line without a tab is split on whitespace (some LKGE-style files)."""
    text = line.rstrip("\n").rstrip("\r")
    if not text.strip():
        return None
    fields = text.split("\t") if "\t" in text else text.split()
    fields = [f.strip() for f in fields]
    if len(fields) != 3 or not all(fields):
        raise ValueError(f"{path}:{lineno}: expected 3 tab-separated fields (head, relation, tail), "
                         f"got {len([f for f in fields if f])}: {text[:120]!r}")
    return fields[0], fields[1], fields[2]


def read_named_triples(path: str) -> list[tuple[str, str, str, int]]:
    """Every (head, relation, tail, line number) of a triple file; ValueError naming the file and
    line of the first malformed line (nothing is returned then)."""
    if not os.path.isfile(path):
        raise ValueError(f"triple file {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parsed = parse_triple_line(line, path, lineno)
            if parsed is not None:
                out.append((*parsed, lineno))
    return out


def read_triples_file(path: str, name: str | None = None) -> KnowledgeGraph:
    """A KG from one triple file (tab-separated head, relation, tail names per line)."""
    named = read_named_triples(path)
    return KnowledgeGraph.from_named([t[:3] for t in named], name or os.path.basename(path))


def write_triples(path: str, triples: torch.Tensor, entities: Sequence[str], relations: Sequence[str]) -> None:
    """Write id triples as tab-separated names (the LKGE / FB15k-237 format)."""
    for kind, names in (("entity", entities), ("relation", relations)):
        bad = [n for n in names if "\t" in n or "\n" in n or n != n.strip() or not n]
        if bad:
            raise ValueError(f"{kind} name {bad[0]!r} cannot be written to a tab-separated triple file")
    with open(path, "w", encoding="utf-8") as f:
        for h, r, t in triples.tolist():
            f.write(f"{entities[h]}\t{relations[r]}\t{entities[t]}\n")


# ------------------------------------------------------------------------------------------------
# PyKEEN
# ------------------------------------------------------------------------------------------------


def _is_factory(obj) -> bool:
    return hasattr(obj, "mapped_triples") and hasattr(obj, "entity_id_to_label")


def from_pykeen(source, name: str | None = None) -> KnowledgeGraph:
    """A KG from a PyKEEN `Dataset` (its training, validation and testing triples merged: the
    snapshot protocol splits them again) or a `TriplesFactory`; ids and names are PyKEEN's."""
    if _is_factory(source):
        factories = [source]
    elif all(hasattr(source, a) for a in ("training", "validation", "testing")):
        factories = [f for f in (source.training, source.validation, source.testing) if f is not None]
    else:
        raise TypeError(f"expected a pykeen Dataset or TriplesFactory, got {type(source).__name__}")
    first = factories[0]
    for f in factories[1:]:
        if f.entity_to_id != first.entity_to_id or f.relation_to_id != first.relation_to_id:
            raise ValueError("the dataset's factories do not share one entity/relation labelling")
    ent = first.entity_id_to_label
    rel = first.relation_id_to_label
    entities = [ent[i] for i in range(len(ent))]
    relations = [rel[i] for i in range(len(rel))]
    triples = _distinct(torch.cat([f.mapped_triples.long() for f in factories]))
    return KnowledgeGraph(triples, entities, relations,
                          name or getattr(source, "get_normalized_name", lambda: type(source).__name__.lower())())


def pykeen_kg(name: str) -> KnowledgeGraph:
    """PyKEEN's bundled "umls", "nations" or "kinships" (package data: no download), read through
    pykeen.datasets."""
    key = name.lower()
    if key not in PYKEEN_KGS:
        raise ValueError(f"unknown PyKEEN KG {name!r}; bundled ones: {', '.join(PYKEEN_KGS)}")
    try:
        import pykeen.datasets as pd
    except ImportError:
        raise ImportError("the PyKEEN KGs need pykeen (pip install pykeen)") from None
    return from_pykeen(getattr(pd, PYKEEN_KGS[key])(), key)


def nations_literals() -> dict[str, dict[str, float]]:
    """Nations' numeric literals (area, population ...) by country name, from PyKEEN's
    NationsLiteral: {entity: {literal: value}} for the entities that have them."""
    from pykeen.datasets.nations import NationsLiteral

    tf = NationsLiteral().training
    ent = tf.entity_id_to_label
    names = {i: n for n, i in tf.literals_to_id.items()}
    values = tf.numeric_literals
    out: dict[str, dict[str, float]] = {}
    for e in range(values.shape[0]):
        row = {names[j]: float(values[e, j]) for j in range(values.shape[1]) if values[e, j] != 0}
        if row:
            out[ent[e]] = row
    return out


def id_map(names: Sequence[str]) -> Mapping[str, int]:
    return {n: i for i, n in enumerate(names)}
