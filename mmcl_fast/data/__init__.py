"""Data for the methods: knowledge graphs and their snapshots (LKGE protocol and folder format), the
countries KG with flag images, frozen per-entity feature matrices (text, image, numeric); MNRE and
Twitter-2017 in their released layouts with MSPT's IMRE / IMNER protocols, and the offline WordNet
data set in those layouts (`wordnet_mkg`, distant supervision)."""
from .kg import KnowledgeGraph, from_pykeen, nations_literals, pykeen_kg, read_triples_file
from .mnre import IMRETask, MNREData, RESample, imre_tasks, load_mnre, read_mnre_file
from .snapshots import GROWTH, KGSnapshots, Snapshot, build_snapshots
from .twitter2017 import IMNERTask, NERSample, TwitterData, imner_tasks, load_twitter2017, read_twitter_file

__all__ = [
    "GROWTH",
    "IMNERTask",
    "IMRETask",
    "KGSnapshots",
    "KnowledgeGraph",
    "MNREData",
    "NERSample",
    "RESample",
    "Snapshot",
    "TwitterData",
    "build_snapshots",
    "from_pykeen",
    "imner_tasks",
    "imre_tasks",
    "load_mnre",
    "load_twitter2017",
    "nations_literals",
    "pykeen_kg",
    "read_mnre_file",
    "read_triples_file",
    "read_twitter_file",
]
