"""`mofot`: continual multimodal knowledge-graph embedding over growing snapshots (MoFot, "Towards
Multimodal Continual Knowledge Embedding with Modality Forgetting Modulation", AAAI 2026; DESIGN.md
8.2), with its baselines in the same harness.

MoFot's code is not public; this is our reading of the paper's description (DESIGN.md 6, 8.2):

- Model (`mmcl_fast.nn.MultimodalKGE`): a learned structure row per entity plus frozen feature
  modalities (entity-name text through all-MiniLM-L6-v2, flag images through EfficientNet-Lite0,
  numeric literals, or matrices a user brings), projected per modality and fused by
  `modulated_embedding` (FiLM gamma/beta per modality, gates read from the structure row, a
  missing-modality mask); scores TransE L1/L2, DistMult, ComplEx, RotatE; the self-adversarial
  negative-sampling loss (or margin ranking).
- Multimodal weight modulation: the per-modality projections are merged across snapshots by
  `interpolate_weights` (W_i = (1 - 1/i) W_{i-1} + (1/i) sigma W_new / ||W_new||).
- Multimodal feature modulation: the FiLM parameters and structure-conditioned gates of the fusion.
- Modality forgetting modulation: after every epoch of snapshot i >= 1, each modality's forgetting
  rate is measured on old entities (a seeded sample of at most 2,048 of the entities known before
  the snapshot) as the relative drift of its FiLM-ed representation since the snapshot began,
  rho_m = mean_e ||r_m(e) - r_m^0(e)|| / mean_e ||r_m^0(e)||; each modality's anchor strength for the
  next epochs is lambda * clip(rho_m / mean_m' rho_m', 1/4, 4): a modality that forgets faster is
  held harder. The rates at the end of each snapshot are kept (`summary()["forgetting_rates"]`).
- Anchors (inside the optimizer step, op family A's anchor term): old entity and relation rows
  toward their values at the snapshot's start with LKGE's per-row weights
  w_e = n_old(e) / (n_old(e) + n_new(e)) (training facts mentioning e before / in the snapshot)
  times the structure's strength; each modality's projection, FiLM rows, gate rows and sigmas
  toward their start with that modality's strength.

Baselines, same model, data, epochs and optimizer: `finetune` (no regulariser, projections not
interpolated), `retrain` (re-initialised at each snapshot and trained on every training fact seen
so far), `ewc` (per-element Fisher: the mean squared gradient over the last epoch of each snapshot,
averaged over snapshots, scaled by one constant so that its mean over the anchored elements is 1 and
`reg_lambda` means the same across strategies), `lkge` (LKGE's per-row regulariser on entity and
relation rows alone; its masked autoencoder and embedding transfer are not part of this baseline).

Optimisation: `ModalityAdamW`; with `sparse=True` (default) the entity table gets a row-sparse
gradient and a lazy step (only the rows a batch touches move; moments of untouched rows are not
decayed), like torch's SparseAdam; `sparse=False` gives dense AdamW everywhere.

Evaluation after each snapshot on every snapshot's test facts (future ones too, for FWT): filtered
MRR and Hits@1/3/10 of head and tail prediction with realistic ties (`filtered_rank`), candidates the
entities known at max(trained snapshot, tested snapshot) (`candidates="snapshot"`: LKGE's way, only
the tested snapshot's entities), filtered by every fact of those snapshots. Under torch.distributed
the training batches and the ranking queries are sharded over the ranks (DDP averages gradients;
each rank draws the same negatives), so the result matrix matches one process to round-off.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch

from ..continual.config import check
from ..continual.experiment import Experiment
from ..continual.link_prediction import link_prediction
from ..continual.loop import ContinualMethod
from ..continual.streams import Task
from ..nn.kge import FeatureSource, MultimodalKGE, kge_loss
from ..optim import ModalityAdamW
from .digits import MAX_THREADS, _device, check_device

STRATEGIES = ("mofot", "finetune", "retrain", "ewc", "lkge")
BUNDLED_KGS = ("umls", "nations", "kinships", "countries")

# reg_lambda when none is given: chosen per strategy on UMLS's valid facts (5 HYBRID snapshots,
# seed 0, the other defaults; `mmcl-fast compare mofot --set eval_split=valid --set reg_lambda=X` for
# X in 0.01, 0.03, 0.1, 1, 10): the best valid average MRR of each strategy
DEFAULT_REG_LAMBDA = {"mofot": 0.03, "ewc": 0.1, "lkge": 0.01, "finetune": 0.0, "retrain": 0.0}

# preset=tiny: what CI and the tests run (seconds); applied to the keys left at their defaults
TINY = {"dim": 32, "epochs": 3, "batch_size": 256, "snapshots": 3, "negatives": 8}


@dataclasses.dataclass
class MoFotConfig:
    """Every knob of a MoFot run (`mmcl-fast run mofot --help` lists them)."""

    # data: a bundled KG (umls, nations, kinships, countries), "lkge:<folder>" (LKGE's snapshot
    # folders), "file:<triples.tsv>" (one KG, cut into snapshots here)
    kg: str = "umls"
    snapshots: int = 5
    growth: Literal["entity", "relation", "fact", "hybrid"] = "hybrid"
    snapshot_seed: int = 0  # the snapshots' seed: the same for every strategy and run seed
    # feature modalities: "auto" (every modality the KG has), "none", or a comma list of
    # text / image / numeric; extra matrices a user brings: "name=path.npy,name2=path.pt"
    modalities: str = "auto"
    features: str = ""
    cache_dir: str = ""  # feature cache ("": $MMCL_FAST_CACHE or ~/.cache/mmcl_fast)
    strategy: Literal["mofot", "finetune", "retrain", "ewc", "lkge"] = "mofot"
    score: Literal["transe_l1", "transe_l2", "distmult", "complex", "rotate"] = "transe_l1"
    loss: Literal["self_adversarial", "margin"] = "self_adversarial"
    margin: float = 6.0
    adversarial_temperature: float = 1.0
    dim: int = 128
    negatives: int = 32
    batch_size: int = 512
    epochs: int = 60
    lr: float = 5e-3
    weight_decay: float = 0.0
    reg_lambda: float | None = None  # the anchors' strength (None: DEFAULT_REG_LAMBDA[strategy])
    interpolation: bool = True  # mofot only
    forgetting_modulation: bool = True  # mofot only
    sparse: bool = True  # row-sparse gradient and lazy step for the entity table
    candidates: Literal["known", "snapshot"] = "known"
    eval_split: Literal["test", "valid"] = "test"  # "valid": score the valid facts (choosing hyper-parameters)
    ties: Literal["realistic", "optimistic", "pessimistic"] = "realistic"
    eval_future: bool = True
    init_eval: bool = True
    forgetting: Literal["max", "last"] = "max"
    preset: Literal["none", "tiny"] = "none"
    seed: int = 0
    device: str = "cpu"
    threads: int = 0

    def __post_init__(self):
        if self.preset == "tiny":
            defaults = {f.name: f.default for f in dataclasses.fields(MoFotConfig)}
            for key, value in TINY.items():
                if getattr(self, key) == defaults[key]:
                    setattr(self, key, value)
        if self.reg_lambda is None:
            self.reg_lambda = DEFAULT_REG_LAMBDA[self.strategy]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float):
                check(f.name, math.isfinite(v), "a finite number", v)
        for key in ("snapshots", "dim", "negatives", "batch_size", "epochs"):
            check(key, getattr(self, key) >= 1, ">= 1", getattr(self, key))
        check("lr", self.lr > 0, "> 0", self.lr)
        for key in ("weight_decay", "reg_lambda", "margin", "adversarial_temperature"):
            check(key, getattr(self, key) >= 0, ">= 0", getattr(self, key))
        check("dim", self.score not in ("complex", "rotate") or self.dim % 2 == 0,
              f"even for score {self.score!r} ([re | im] halves)", self.dim)
        kind = self.kg.split(":", 1)[0]
        check("kg", self.kg in BUNDLED_KGS or (kind in ("lkge", "file") and ":" in self.kg and self.kg.split(":", 1)[1]),
              f"one of {BUNDLED_KGS}, 'lkge:<folder>' or 'file:<triples file>'", self.kg)
        check("threads", 0 <= self.threads <= MAX_THREADS, f"in [0, {MAX_THREADS}]", self.threads)
        check_device("device", self.device)
        parse_features(self.features)  # names the bad entry now, not after the data is built

    @property
    def kg_name(self) -> str:
        return self.kg if self.kg in BUNDLED_KGS else self.kg.split(":", 1)[0]


def parse_features(spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, sep, path = item.partition("=")
        check("features", bool(sep and name.strip() and path.strip()), "'name=path,...' entries", item)
        check("features", name.strip().isidentifier(), "entries whose modality name is an identifier "
              "(letters, digits, _)", item)
        check("features", name.strip() not in out and name.strip() != "structure",
              "distinct modality names other than 'structure'", item)
        out[name.strip()] = path.strip()
    return out


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def load_snapshots(config: MoFotConfig):
    """The KGSnapshots of config.kg (bundled KGs and triple files cut by the LKGE protocol)."""
    from ..data import build_snapshots, pykeen_kg, read_triples_file
    from ..data.snapshots import KGSnapshots

    kind, _, path = config.kg.partition(":")
    if config.kg == "countries":
        from ..data.countries import countries_kg

        kg = countries_kg()
    elif config.kg in BUNDLED_KGS:
        kg = pykeen_kg(config.kg)
    elif kind == "lkge":
        return KGSnapshots.read_lkge(path)
    else:
        kg = read_triples_file(path)
    return build_snapshots(kg, config.snapshots, config.growth, seed=config.snapshot_seed)


def load_features(config: MoFotConfig, names: list[str]) -> dict[str, FeatureSource]:
    """The feature modalities of the run, rows aligned with `names` (the stream's entities)."""
    wanted = config.modalities.strip().lower()
    cache = config.cache_dir or None
    if wanted == "none":
        mods: list[str] = []
    elif wanted == "auto":
        mods = ["text"] + (["image"] if config.kg_name == "countries" else []) + (
            ["numeric"] if config.kg_name == "nations" else [])
    else:
        mods = [m.strip() for m in wanted.split(",") if m.strip()]
    out: dict[str, FeatureSource] = {}
    user = parse_features(config.features)
    if not mods and not user:
        return out
    from ..data import features as F

    if mods:
        for name, fm in F.kg_modalities(config.kg_name, names, mods, cache_dir=cache).items():
            out[name] = FeatureSource(fm.values, fm.mask)
    for name, path in user.items():
        if name in out:
            raise ValueError(f"config key 'features': modality {name!r} is already given by 'modalities'")
        fm = F.load_feature_matrix(path, names, modality=name)
        out[name] = FeatureSource(fm.values, fm.mask)
    return out


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def lkge_weights(old: torch.Tensor, new: torch.Tensor, column: tuple[int, ...], count: int) -> torch.Tensor:
    """LKGE's per-row regularisation weights n_old / (n_old + n_new) for ids [0, count): n_old
    (n_new) = the training facts before (in) the snapshot that mention the id in `column`s."""
    def n(t):
        return sum(torch.bincount(t[:, c], minlength=count)[:count] for c in column).double()

    n_old, n_new = n(old), n(new)
    return (n_old / (n_old + n_new).clamp_min(1.0)).float()


class MoFotMethod(ContinualMethod):
    """The strategies of the module docstring over one snapshot stream."""

    metric = "mrr"

    def __init__(self, config: MoFotConfig, snapshots, features: Mapping[str, FeatureSource]):
        self.config = config
        self.snapshots = snapshots
        self.features = dict(features)
        self.epochs = config.epochs
        self.device = _device(config.device)
        self.model: MultimodalKGE | None = None
        self.trained = -1

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self, stream) -> None:
        c = self.config
        if c.threads and self.device.type == "cpu":
            torch.set_num_threads(c.threads)
        self.generator = torch.Generator().manual_seed(c.seed)
        self.trained = -1
        self.fisher: dict[str, torch.Tensor] = {}
        self.fisher_snapshots = 0
        self.forgetting_rates: list[dict[str, float]] = []
        self.strengths: dict[str, float] = {}
        interpolation = c.strategy == "mofot" and c.interpolation
        self.model = MultimodalKGE(self.snapshots.num_entities, self.snapshots.num_relations, c.dim, c.score,
                                   features=self.features, interpolation=interpolation,
                                   sparse_grad=c.sparse).to(self.device)
        self.model.reset_parameters(torch.Generator().manual_seed(c.seed))
        self.net = self.model
        rank, world = _distributed()
        if world > 1:
            # the buffers (features, masks, W_prev) are the same on every rank by construction:
            # nothing to send at each forward
            ddp = torch.nn.parallel.DistributedDataParallel
            sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                    else {"broadcast_buffers": False})
            self.net = ddp(self.model, **sync)
        self.opt: ModalityAdamW | None = None
        self._reps = None

    # -- snapshot switch ------------------------------------------------------------------------
    def _train_facts(self, i: int) -> torch.Tensor:
        return self.snapshots.upto(i) if self.config.strategy == "retrain" else self.snapshots[i].train

    def before_task(self, task: Task) -> None:
        c, i = self.config, task.index
        self._reps = None
        self._facts = self._train_facts(i).to(self.device)
        self._steps_in_last_epoch = 0
        if c.strategy == "retrain":
            self.model.reset_parameters(torch.Generator().manual_seed(c.seed * 1000 + i))
        self.model.begin_snapshot(i + 1)
        self._start = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self._drift_rows = None
        self.strengths = {m: 1.0 for m in self.model.modalities}
        if c.strategy == "mofot" and c.forgetting_modulation and i > 0:
            n_old = self.snapshots[i - 1].num_entities
            g = torch.Generator().manual_seed(c.seed * 7919 + i)
            rows = torch.randperm(n_old, generator=g)[:2048].sort()[0].to(self.device)
            self._drift_rows = rows
            self._drift_start = self.model.modality_representations(rows)
        self._fisher_epoch: dict[str, torch.Tensor] = {}
        self.opt = ModalityAdamW(self._param_groups(i), lr=c.lr, weight_decay=c.weight_decay, seed=c.seed)

    def _param_groups(self, i: int) -> list[dict[str, Any]]:
        """One group per tensor family, with its anchor (old rows / start values) where the
        strategy regularises it."""
        c, m = self.config, self.model
        named = {n: p for n, p in m.named_parameters() if p.requires_grad}
        plain = [{"params": [p], "name": n} for n, p in named.items()]
        if i == 0 or c.strategy in ("finetune", "retrain") or c.reg_lambda == 0:
            return plain
        prev = self.snapshots[i - 1]
        n_old_e, n_old_r = prev.num_entities, prev.num_relations
        lam = c.reg_lambda
        groups = []
        if c.strategy == "ewc":
            scale = self._fisher_scale(n_old_e, n_old_r)
            for n, p in named.items():
                rows = {"entity.weight": n_old_e, "relation.weight": n_old_r}.get(n, p.shape[0] if p.dim() else None)
                f = self.fisher[n][:rows] if p.dim() else self.fisher[n]
                groups.append({"params": [p], "name": n, "anchor": self._start[n][:rows] if p.dim() else self._start[n],
                               "anchor_weight": (f * scale).contiguous(), "anchor_lambda": lam})
            return groups
        old = self.snapshots.upto(i - 1)
        new = self.snapshots[i].train
        w_e = lkge_weights(old, new, (0, 2), n_old_e).to(self.device)
        w_r = lkge_weights(old, new, (1,), n_old_r).to(self.device)
        for n, p in named.items():
            g: dict[str, Any] = {"params": [p], "name": n}
            if n == "entity.weight":
                g.update(anchor=self._start[n][:n_old_e], anchor_weight=w_e, anchor_lambda=lam)
            elif n == "relation.weight":
                g.update(anchor=self._start[n][:n_old_r], anchor_weight=w_r, anchor_lambda=lam)
            elif c.strategy == "mofot":
                g.update(anchor=self._start[n], anchor_weight=self._modality_weight(n), anchor_lambda=lam)
            groups.append(g)
        return groups

    def _modality_weight(self, name: str) -> torch.Tensor:
        """The anchor weight of a fusion parameter: its modality's strength, per row for the
        [M, D] / [M] tensors, per entry for sigma, a scalar for one modality's projection (kept as
        a tensor and updated in place when the strengths change)."""
        mods = self.model.modalities
        f = torch.tensor([self.strengths.get(m, 1.0) for m in mods], device=self.device)
        if name in ("gamma", "beta", "gate", "gate_bias"):
            return f
        if name == "sigma":
            return f[1:].repeat_interleave(2)
        mod = name.split(".", 1)[1].rsplit("_", 1)[0]  # proj.<modality>_weight
        return f[mods.index(mod)].reshape(1)

    def _fisher_scale(self, n_old_e: int, n_old_r: int) -> float:
        total, count = 0.0, 0
        for n, f in self.fisher.items():
            part = f[:n_old_e] if n == "entity.weight" else f[:n_old_r] if n == "relation.weight" else f
            total += float(part.sum())
            count += part.numel()
        return count / total if total > 0 else 1.0

    # -- training -------------------------------------------------------------------------------
    def num_batches(self, task: Task) -> int:
        return math.ceil(self._train_facts(task.index).shape[0] / self.config.batch_size)

    def train_batches(self, task: Task, epoch: int):
        c = self.config
        facts = self._facts
        n_known = self.snapshots[task.index].num_entities
        rank, world = _distributed()
        perm = torch.randperm(facts.shape[0], generator=self.generator).to(self.device)
        for s in range(0, facts.shape[0], c.batch_size):
            pos = facts[perm[s:s + c.batch_size]]
            neg = torch.randint(0, n_known, (pos.shape[0], c.negatives), generator=self.generator).to(self.device)
            b = pos.shape[0]
            if world > 1:  # every rank drew the same global batch; each takes its share
                lo, hi = b * rank // world, b * (rank + 1) // world
                yield pos[lo:hi], neg[lo:hi], b, epoch
            else:
                yield pos, neg, b, epoch

    def train_step(self, task: Task, batch):
        c = self.config
        pos, neg, global_b, epoch = batch
        _, world = _distributed()
        self.model.train()
        self._reps = None
        ps, ns = self.net(pos, neg, c.negatives // 2)
        margin = c.margin if c.score not in ("distmult", "complex") else 0.0
        losses = kge_loss(ps, ns, c.loss, margin, c.adversarial_temperature)
        # DDP averages the ranks' gradients: scaled so that the result is the mean over the global
        # batch whatever the shards' sizes
        loss = losses.sum() * (world / global_b)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.strategy == "ewc" and epoch == self.epochs - 1:
            self._accumulate_fisher()
        self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def _accumulate_fisher(self) -> None:
        self._steps_in_last_epoch += 1
        for n, p in self.model.named_parameters():
            if p.grad is None:
                continue
            acc = self._fisher_epoch.setdefault(n, torch.zeros_like(p))
            g = p.grad
            if g.is_sparse:
                g = g.coalesce()
                acc.index_add_(0, g.indices()[0], g.values() ** 2)
            else:
                acc.add_(g * g)

    def after_epoch(self, task: Task, epoch: int) -> None:
        if self._drift_rows is None:
            return
        now = self.model.modality_representations(self._drift_rows)
        start = self._drift_start
        mask = self.model.modality_mask.index_select(0, self._drift_rows).t()  # [M, U]
        rates = {}
        for k, m in enumerate(self.model.modalities):
            sel = mask[k]
            if not bool(sel.any()):
                continue
            num = (now[k][sel] - start[k][sel]).norm(dim=1).mean()
            den = start[k][sel].norm(dim=1).mean().clamp_min(1e-12)
            rates[m] = float(num / den)
        self._last_rates = rates
        mean = sum(rates.values()) / max(len(rates), 1)
        if mean > 0:
            self.strengths = {m: min(4.0, max(0.25, r / mean)) for m, r in rates.items()}
        self._apply_strengths()

    def _apply_strengths(self) -> None:
        lam = self.config.reg_lambda
        for g in self.opt.param_groups:
            n = g.get("name")
            if g.get("anchor") is None:
                continue
            if n in ("entity.weight", "relation.weight"):
                g["anchor_lambda"] = lam * self.strengths.get("structure", 1.0)
            else:
                w = g["anchor_weight"][0]
                w.copy_(self._modality_weight(n).to(w.dtype))

    def after_task(self, task: Task) -> None:
        c = self.config
        self.trained = task.index
        self._reps = None
        if self._drift_rows is not None:
            self.forgetting_rates.append({"snapshot": task.index, **getattr(self, "_last_rates", {})})
        if c.strategy == "ewc":
            steps = max(self._steps_in_last_epoch, 1)
            t = self.fisher_snapshots
            for n, p in self.model.named_parameters():
                if not p.requires_grad:
                    continue
                f_new = self._fisher_epoch.get(n, torch.zeros_like(p)) / steps
                old = self.fisher.get(n, torch.zeros_like(p))
                self.fisher[n] = (old * t + f_new) / (t + 1)
            self.fisher_snapshots += 1
            self._fisher_epoch = {}

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, task: Task) -> dict[str, float]:
        c = self.config
        self.model.eval()
        now = max(self.trained, task.index)
        count = self.snapshots[now].num_entities if c.candidates == "known" else self.snapshots[task.index].num_entities
        if self._reps is None:
            self._reps = self.model.entity_representations(self.snapshots.num_entities)
        known = self.snapshots.known(now).to(self.device)
        out = link_prediction(self._reps, self.model.relation.weight, task.test.to(self.device), known, c.score,
                              num_candidates=count, ties=c.ties)
        out.pop("count")
        return out

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self):
        return {"model": self.model.state_dict(), "generator": self.generator.get_state(), "trained": self.trained,
                "fisher": self.fisher, "fisher_snapshots": self.fisher_snapshots,
                "forgetting_rates": self.forgetting_rates}

    def load_state_dict(self, state) -> None:
        self.model.load_state_dict(state["model"])
        self.generator.set_state(state["generator"])
        self.trained = int(state["trained"])
        self.fisher = {k: v.to(self.device) for k, v in state["fisher"].items()}
        self.fisher_snapshots = int(state["fisher_snapshots"])
        self.forgetting_rates = list(state["forgetting_rates"])

    def summary(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots.describe(), "modalities": self.model.modalities if self.model else None,
                "forgetting_rates": self.forgetting_rates}


def make_experiment(config: MoFotConfig, snapshots=None, features: Mapping[str, FeatureSource] | None = None) -> Experiment:
    """The run of `config`; `snapshots` (a KGSnapshots, e.g. from a PyKEEN dataset a user has:
    build_snapshots(from_pykeen(ds))) and `features` replace what config.kg would load."""
    snaps = load_snapshots(config) if snapshots is None else snapshots
    feats = load_features(config, snaps.entities) if features is None else features
    method = MoFotMethod(config, snaps, feats)
    return Experiment(stream=snaps.task_stream(config.eval_split), method=method, eval_future=config.eval_future,
                      init_eval=config.init_eval, forgetting=config.forgetting)


def build(config: MoFotConfig) -> Experiment:
    return make_experiment(config)


def _register():
    from . import register_method

    register_method("mofot", "continual multimodal KG embedding over growing snapshots (UMLS, Nations, Kinships, "
                             "countries with flags, LKGE folders): MoFot and its baselines", MoFotConfig, build)


_register()


__all__ = ["MoFotConfig", "MoFotMethod", "STRATEGIES", "build", "load_features", "load_snapshots", "make_experiment",
           "lkge_weights"]
