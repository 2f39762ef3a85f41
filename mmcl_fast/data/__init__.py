"""Data for the methods: knowledge graphs and their snapshots (LKGE protocol and folder format), the
countries KG with flag images, and frozen per-entity feature matrices (text, image, numeric)."""
from .kg import KnowledgeGraph, from_pykeen, nations_literals, pykeen_kg, read_triples_file
from .snapshots import GROWTH, KGSnapshots, Snapshot, build_snapshots

__all__ = [
    "GROWTH",
    "KGSnapshots",
    "KnowledgeGraph",
    "Snapshot",
    "build_snapshots",
    "from_pykeen",
    "nations_literals",
    "pykeen_kg",
    "read_triples_file",
]
