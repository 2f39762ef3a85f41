"""Knowledge-graph embedding with several modalities per entity, on op family C.

Scores (h, t entity rows of width D; complex scores hold [re | im] halves):

    transe_l1  -||h + r - t||_1          transe_l2  -||h + r - t||_2
    distmult   <h, r, t>                 complex    Re <h, r, conj(t)>      (r in C^{D/2})
    rotate     -sum_k |h_k r_k - t_k|    with r_k = exp(i theta_k), theta in R^{D/2}

`compose_query` turns (known entity, relation) into the query that `mmcl_fast.ops.filtered_rank`
ranks every candidate against, for tail prediction (h, r, ?) and head prediction (?, r, t):
TransE h + r | t - r; DistMult h r | r t; ComplEx h r | conj(r) t; RotatE h r | t conj(r) (|r| = 1).

`MultimodalKGE` gives each entity a learned structure row plus one row per frozen feature
modality (text, image, numeric ...: `values [N, F]` with a mask of the entities that have it),
projected to D by a per-modality linear map, and fuses them with `modulated_embedding`:

    p_{e,m}  = s_e (structure)  |  W_m x_{e,m} + b_m (feature modality m)
    h_e      = sum_m a_{e,m} (gamma_m * p_{e,m} + beta_m),   a_e = softmax over e's modalities of
               the gate logits G s_e + g (the gates read the structure row: the features are
               modulated toward the structural representation)

With `interpolation=True` the projections are merged across snapshots by
`interpolate_weights`: W_eff = (1 - 1/i) W_prev + (1/i) sigma W_new / ||W_new||_F (i = snapshot
number from 1; `begin_snapshot` freezes the current W_eff as W_prev and restarts W_new and sigma from
it, so the model is continuous across the switch while later snapshots move it less).

Only the distinct entities of a batch are projected and gathered (never all N); the structure
table's gradient is a coalesced sparse COO tensor over those rows (`sparse_grad=True`), which the
row-sparse step of `mmcl_fast.optim.ModalityAdamW` (and torch's SparseAdam, and DDP with gloo)
takes as it is.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..ops import interpolate_weights, kge_scores, modulated_embedding
from ..ops.kge_scores import SCORES, _cmul, score_triples

LOSSES = ("self_adversarial", "margin")


def check_score(score: str, dim: int) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score in ("complex", "rotate") and dim % 2:
        raise ValueError(f"score {score!r} needs an even dim ([re | im] halves), got {dim}")


def relation_width(score: str, dim: int) -> int:
    return dim // 2 if score == "rotate" else dim


def _conj(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([x[..., :h], -x[..., h:]], -1)


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cos(theta), torch.sin(theta)], -1)


def compose_query(known: torch.Tensor, r: torch.Tensor, score: str, side: str) -> torch.Tensor:
    """The query of `filtered_rank` for predicting the `side` ("tail" or "head") entity given the
    other one (`known`) and the relation rows `r`."""
    if side not in ("head", "tail"):
        raise ValueError(f"side must be 'head' or 'tail', got {side!r}")
    tail = side == "tail"
    if score in ("transe_l1", "transe_l2"):
        return known + r if tail else known - r
    if score == "distmult":
        return known * r
    if score == "complex":
        return _cmul(known, r if tail else _conj(r))
    if score == "rotate":
        rot = _rotation(r)
        return _cmul(known, rot if tail else _conj(rot))
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def kge_loss(pos: torch.Tensor, neg: torch.Tensor, loss: str = "self_adversarial", margin: float = 6.0,
             temperature: float = 1.0) -> torch.Tensor:
    """Per-positive losses [b] of scores pos [b] and neg [b, K].

    self_adversarial (RotatE, Sun et al. 2019): (-log sig(margin + pos) - sum_k p_k log sig(-margin - neg_k)) / 2,
        p = softmax(temperature * neg) treated as a constant (margin 0 for DistMult / ComplEx).
    margin: mean_k relu(margin - pos + neg_k) (PyKEEN's MarginRankingLoss over the pairs)."""
    if loss == "self_adversarial":
        w = torch.softmax(temperature * neg.detach(), dim=-1)
        pos_term = -nn.functional.logsigmoid(margin + pos)
        neg_term = -(w * nn.functional.logsigmoid(-margin - neg)).sum(-1)
        return 0.5 * (pos_term + neg_term)
    if loss == "margin":
        return torch.relu(margin - pos[:, None] + neg).mean(-1)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


class _RowGather(torch.autograd.Function):
    """table[rows] for distinct sorted rows, whose backward is the coalesced sparse gradient of the
    table (indices = rows): no [N, D] gradient is made, and no coalescing is needed downstream."""

    @staticmethod
    def forward(ctx, table, rows):
        ctx.save_for_backward(rows)
        ctx.size = table.shape
        return table.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        g = torch.sparse_coo_tensor(rows[None], grad.contiguous(), ctx.size, is_coalesced=True,
                                    check_invariants=False)
        return g, None


class FeatureSource:
    """A frozen feature modality: values [N, F] (float) and mask [N] (bool, True = present)."""

    def __init__(self, values: torch.Tensor, mask: torch.Tensor | None = None):
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            raise ValueError(f"feature values must be a 2-D tensor [N, F], got {getattr(values, 'shape', values)!r}")
        if mask is None:
            mask = torch.ones(values.shape[0], dtype=torch.bool)
        if mask.shape != (values.shape[0],) or mask.dtype != torch.bool:
            raise ValueError(f"feature mask must be bool [{values.shape[0]}], got {mask.dtype} {tuple(mask.shape)}")
        if not torch.isfinite(values).all():
            raise ValueError("feature values hold NaN or inf")
        self.values, self.mask = values, mask


def standardise(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows centred on the mean of the present rows and scaled to unit L2 norm (absent rows 0), so
    that every modality enters the projection on one scale whatever its encoder."""
    v = values.float()
    if bool(mask.any()):
        v = v - v[mask].mean(0, keepdim=True)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.where(mask[:, None], v, torch.zeros_like(v))


class MultimodalKGE(nn.Module):
    """See the module docstring. `features` maps modality names to `FeatureSource`s with
    `num_entities` rows; with none the model is structure-only (h_e = s_e)."""

    def __init__(self, num_entities: int, num_relations: int, dim: int = 128, score: str = "transe_l1",
                 features: Mapping[str, FeatureSource] | None = None, interpolation: bool = False,
                 init_range: float | None = None, sparse_grad: bool = True):
        super().__init__()
        check_score(score, dim)
        self.score, self.dim = score, dim
        self.sparse_grad = bool(sparse_grad)
        self.interpolation = bool(interpolation)
        features = dict(features or {})
        self.feature_names = list(features)
        self.modalities = ["structure"] + self.feature_names
        M = len(self.modalities)
        self.entity = nn.Embedding(num_entities, dim, sparse=self.sparse_grad)
        self.relation = nn.Embedding(num_relations, relation_width(score, dim))
        # RotatE's range (gamma + 2) / D with gamma = 6 for every score: rows of a comparable scale
        self.init_range = init_range if init_range is not None else 8.0 / dim
        masks = [torch.ones(num_entities, dtype=torch.bool)]
        self.proj = nn.ParameterDict()
        for name, src in features.items():
            if src.values.shape[0] != num_entities:
                raise ValueError(f"feature modality {name!r} has {src.values.shape[0]} rows, expected "
                                 f"{num_entities} (one per entity)")
            self.register_buffer(f"x_{name}", standardise(src.values, src.mask), persistent=False)
            masks.append(src.mask.bool())
            self.proj[f"{name}_weight"] = nn.Parameter(torch.empty(dim, src.values.shape[1]))
            self.proj[f"{name}_bias"] = nn.Parameter(torch.zeros(dim))
        self.register_buffer("modality_mask", torch.stack(masks, 1), persistent=False)
        self.gamma = nn.Parameter(torch.ones(M, dim), requires_grad=M > 1)
        self.beta = nn.Parameter(torch.zeros(M, dim), requires_grad=M > 1)
        self.gate = nn.Parameter(torch.zeros(M, dim), requires_grad=M > 1)
        self.gate_bias = nn.Parameter(torch.zeros(M), requires_grad=M > 1)
        K = 2 * len(self.feature_names)
        self.sigma = nn.Parameter(torch.ones(K), requires_grad=self.interpolation and K > 0)
        for name in self.feature_names:
            for part in ("weight", "bias"):
                self.register_buffer(f"prev_{name}_{part}", torch.zeros_like(self.proj[f"{name}_{part}"]))
        self.snapshot_number = 1
        self.reset_parameters()

    # -- parameters -------------------------------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        a = self.init_range
        with torch.no_grad():
            self.entity.weight.uniform_(-a, a, generator=generator)
            if self.score == "rotate":
                self.relation.weight.uniform_(-math.pi, math.pi, generator=generator)
            else:
                self.relation.weight.uniform_(-a, a, generator=generator)
            for name in self.feature_names:
                w = self.proj[f"{name}_weight"]
                # standardised inputs have unit norm: entries of spread a / sqrt(3) give projected
                # rows of the structure rows' spread
                w.normal_(0.0, a / math.sqrt(3.0), generator=generator)
                self.proj[f"{name}_bias"].zero_()
            self.gamma.fill_(1.0)
            self.beta.zero_()
            self.gate.zero_()
            self.gate_bias.zero_()
            for name in self.feature_names:
                for part in ("weight", "bias"):
                    getattr(self, f"prev_{name}_{part}").zero_()
            self.snapshot_number = 1
            self.sigma.copy_(self._norms(self._new_weights()))

    def _new_weights(self) -> list[torch.Tensor]:
        return [self.proj[f"{n}_{p}"] for n in self.feature_names for p in ("weight", "bias")]

    def _prev_weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"prev_{n}_{p}") for n in self.feature_names for p in ("weight", "bias")]

    @staticmethod
    def _norms(ws: Sequence[torch.Tensor]) -> torch.Tensor:
        if not ws:
            return torch.zeros(0)
        return torch.stack([w.detach().norm().clamp_min(1e-12) for w in ws])

    def effective_projections(self) -> list[torch.Tensor]:
        """[W_text, b_text, W_image, b_image, ...] as used by the forward (interpolated or not)."""
        new = self._new_weights()
        if not self.interpolation or not new:
            return new
        return interpolate_weights(self._prev_weights(), new, self.sigma, self.snapshot_number)

    @torch.no_grad()
    def begin_snapshot(self, number: int) -> None:
        """Start snapshot `number` (from 1): W_prev <- the current W_eff, W_new <- W_eff and
        sigma <- ||W_eff||, so that W_eff is unchanged by the switch."""
        if number < 1:
            raise ValueError(f"snapshot number must be >= 1, got {number}")
        if self.interpolation and self.feature_names:
            eff = [w.detach().clone() for w in self.effective_projections()]
            for prev, new, w in zip(self._prev_weights(), self._new_weights(), eff):
                prev.copy_(w)
                new.copy_(w)
            self.sigma.copy_(self._norms(eff))
        self.snapshot_number = int(number)

    def get_extra_state(self):
        return {"snapshot_number": self.snapshot_number}

    def set_extra_state(self, state) -> None:
        self.snapshot_number = int(state["snapshot_number"])

    # -- representations --------------------------------------------------------------------------
    def _structure_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.sparse_grad and torch.is_grad_enabled() and self.entity.weight.requires_grad:
            return _RowGather.apply(self.entity.weight, rows)
        return self.entity.weight.index_select(0, rows)

    def modality_rows(self, rows: torch.Tensor, projections: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """[M, U, D]: p_{e,m} of the distinct entities `rows`, before FiLM and gating."""
        s = self._structure_rows(rows)
        if not self.feature_names:
            return s[None]
        ws = self.effective_projections() if projections is None else projections
        out = [s]
        for k, name in enumerate(self.feature_names):
            x = getattr(self, f"x_{name}").index_select(0, rows)
            out.append(torch.addmm(ws[2 * k + 1], x, ws[2 * k].t()))
        return torch.stack(out)

    def representations(self, rows: torch.Tensor) -> torch.Tensor:
        """Fused representations h_e of the distinct entities `rows` -> [U, D]."""
        tables = self.modality_rows(rows)
        if not self.feature_names:
            return tables[0]
        gates = torch.addmm(self.gate_bias, tables[0], self.gate.t())  # [U, M]
        return modulated_embedding(tables, torch.arange(rows.numel(), device=rows.device), self.gamma, self.beta,
                                   gate_logits=gates, modality_mask=self.modality_mask.index_select(0, rows))

    @torch.no_grad()
    def entity_representations(self, count: int, chunk: int = 4096) -> torch.Tensor:
        """h_e of entities [0, count) -> [count, D] (for ranking)."""
        outs = []
        for s in range(0, count, chunk):
            outs.append(self.representations(torch.arange(s, min(s + chunk, count), device=self.entity.weight.device)))
        return torch.cat(outs) if outs else self.entity.weight.new_zeros((0, self.dim))

    @torch.no_grad()
    def modality_representations(self, rows: torch.Tensor) -> torch.Tensor:
        """[M, U, D]: each modality's FiLM-ed row gamma_m p_{e,m} + beta_m (what the gates mix):
        the representation whose drift measures a modality's forgetting."""
        return self.gamma[:, None, :] * self.modality_rows(rows) + self.beta[:, None, :]

    # -- training ---------------------------------------------------------------------------------
    def forward(self, positives: torch.Tensor, negatives: torch.Tensor, num_head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of positives [b, 3] and their negatives [b, K] (entity ids: the first
        `num_head` replace the head, the rest the tail) -> (pos [b], neg [b, K])."""
        b, K = negatives.shape
        ids = torch.cat([positives[:, 0], positives[:, 2], negatives.reshape(-1)])
        rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        # the fused op scores every triple from the [U, D] rows of the batch's distinct entities:
        # no [b, K, D] tensor of gathered negatives, one pass over the rows
        return kge_scores(self.representations(rows), self.relation(positives[:, 1]), inverse[:b],
                          inverse[b:2 * b], inverse[2 * b:].view(b, K), num_head, self.score)
