"""Optimizers built on op family A: ModalityAdamW, ModalitySGD and param_groups_by_modality.

Param groups are ordinary torch groups with an optional "modality": str key. At each step the
optimizer turns per-modality scores (or given coefficients) into coefficients k on the device
(DESIGN.md 4.1) and runs one fused multi-tensor step per group, device and dtype (DESIGN.md 4.2):
gradients of a modality's groups are scaled by k_m, optionally with GE noise, and optionally pulled
toward an anchor. With neither scores nor coefficients the step is plain torch AdamW / SGD.

ModalityAdamW also takes sparse COO gradients (nn.Embedding(sparse=True), torch.sparse_coo_tensor):
such a parameter gets a row-sparse, lazy AdamW step (mmcl_fast.ops.modality_adamw_rows_), see the
class docstring.

Extras kept on the device, saved by state_dict():
- cross-task carry: the running mean of the coefficients applied during the current task; after
  `end_task()` the coefficient used is carry * mean_prev + (1 - carry) * k;
- modulation window `modulation_steps=(start, end)`: modulation (and noise) only while
  start <= (steps taken in the current task) < end.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import backend as _backend
from ..ops import modality_step as _ops


def _real(name: str, value, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not (low <= value <= high):
        raise ValueError(f"{name} must be finite and in [{low}, {high}], got {value}")
    return value


class _ModalityOptimizer(torch.optim.Optimizer):
    """What ModalityAdamW and ModalitySGD share: modalities, coefficients, carry, window, anchors."""

    def __init__(self, params, defaults, *, alpha, noise, carry, modulation_steps, seed, modalities):
        self.alpha = _ops._check_alpha(alpha)
        self.noise = bool(noise)
        self.carry = _real("carry", carry, 0.0, 1.0)
        if modulation_steps is not None:
            if len(tuple(modulation_steps)) != 2:
                raise ValueError(f"modulation_steps must be (start, end) or None, got {modulation_steps!r}")
            start, end = (int(x) for x in modulation_steps)
            if start < 0 or end < start:
                raise ValueError(f"modulation_steps must satisfy 0 <= start <= end, got {modulation_steps!r}")
            modulation_steps = (start, end)
        self.modulation_steps = modulation_steps
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self._fixed_modalities = None if modalities is None else [str(m) for m in modalities]
        defaults = dict(defaults, modality=None, anchor=None, anchor_weight=None, anchor_lambda=0.0)
        super().__init__(params, defaults)
        self.modalities: List[str] = self._modality_order()
        self._global_step = 0  # step() calls so far: the noise counter
        self._task_step = 0  # step() calls in the current task: the window's clock
        self._task = 0
        self._k_sum: Optional[torch.Tensor] = None
        self._k_count = 0
        self._k_prev: Optional[torch.Tensor] = None
        self.last_coefficients: Optional[torch.Tensor] = None
        self._plans: Dict[tuple, dict] = {}

    # -- groups ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        modality = param_group.get("modality")
        if modality is not None and not isinstance(modality, str):
            raise TypeError(f"a param group's 'modality' must be a str or None, got {type(modality).__name__}")
        fixed = getattr(self, "_fixed_modalities", None)
        if modality is not None and fixed is not None and modality not in fixed:
            raise ValueError(f"param group has unknown modality {modality!r}; modalities are {fixed}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if not p.is_floating_point():
                raise TypeError(f"params must be floating point, got a {p.dtype} parameter")
        group["anchor"], group["anchor_weight"] = self._normalise_anchor(group)
        group["anchor_lambda"] = _real("anchor_lambda", group["anchor_lambda"])
        if hasattr(self, "modalities"):
            self.modalities = self._modality_order()
            self._plans = {}

    @staticmethod
    def _normalise_anchor(group) -> Tuple[Optional[list], Optional[list]]:
        """anchor / anchor_weight as lists aligned with the group's params (None entries allowed)."""
        anchor, weight = group.get("anchor"), group.get("anchor_weight")
        n = len(group["params"])
        if anchor is None:
            if weight is not None:
                raise ValueError("param group has anchor_weight but no anchor")
            return None, None
        if isinstance(anchor, torch.Tensor):
            if n != 1:
                raise ValueError(f"a single anchor tensor needs a group with one parameter; this group has {n} (pass a list)")
            anchor = [anchor]
        anchor = [None if a is None else a.detach() for a in anchor]
        if len(anchor) != n:
            raise ValueError(f"anchor has {len(anchor)} entries but the group has {n} parameters")
        if weight is None or isinstance(weight, (numbers.Real, torch.Tensor)):
            weight = [weight] * n
        weight = list(weight)
        if len(weight) != n:
            raise ValueError(f"anchor_weight has {len(weight)} entries but the group has {n} parameters")
        return anchor, weight

    def _modality_order(self) -> List[str]:
        if self._fixed_modalities is not None:
            return list(self._fixed_modalities)
        order: List[str] = []
        for g in self.param_groups:
            m = g.get("modality")
            if m is not None and m not in order:
                order.append(m)
        return order

    # -- coefficients ---------------------------------------------------------------------------
    def _as_vector(self, name: str, values) -> torch.Tensor:
        if isinstance(values, Mapping):
            unknown = [k for k in values if k not in self.modalities]
            if unknown:
                raise ValueError(f"{name} names unknown modalities {unknown}; modalities are {self.modalities}")
            missing = [m for m in self.modalities if m not in values]
            if missing:
                raise ValueError(f"{name} lacks modalities {missing}")
            values = torch.stack([torch.as_tensor(values[m]).reshape(()) for m in self.modalities])
        if not isinstance(values, torch.Tensor):
            values = torch.as_tensor(values)
        if values.dim() != 1 or values.numel() != len(self.modalities):
            raise ValueError(f"{name} must have one entry per modality ({len(self.modalities)}: {self.modalities}), got shape {tuple(values.shape)}")
        if not values.is_floating_point():
            values = values.float()
        return values.detach().float()

    def _in_window(self) -> bool:
        if self.modulation_steps is None:
            return True
        start, end = self.modulation_steps
        return start <= self._task_step < end

    def _coefficients(self, scores, coefficients) -> Optional[torch.Tensor]:
        if scores is None and coefficients is None:
            self.last_coefficients = None
            return None
        if scores is not None and coefficients is not None:
            raise ValueError("pass scores or coefficients, not both")
        if not self.modalities:
            raise ValueError("scores/coefficients given but no param group has a 'modality'")
        if scores is not None:
            s = self._as_vector("scores", scores)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                s = s.clone()
                torch.distributed.all_reduce(s)  # every rank then computes the same k
            if len(self.modalities) < 2:
                raise ValueError("scores need at least 2 modalities to compare")
            k = _ops.modulation_coefficients(s, self.alpha)
        else:
            k = self._as_vector("coefficients", coefficients)
        if not self._in_window():
            self.last_coefficients = torch.ones_like(k)
            return None
        if self._k_prev is not None and self._k_prev.numel() != k.numel():
            # a modality joined after the last end_task(): it has no history to carry, so its
            # coefficient is used as it is
            prev = self._k_prev.to(k.device)
            self._k_prev = torch.cat([prev, k[prev.numel():]]) if prev.numel() < k.numel() else prev[: k.numel()]
        if self._k_sum is not None and self._k_sum.numel() != k.numel():
            self._k_sum, self._k_count = None, 0  # the running mean restarts with the new modality
        if self.carry > 0 and self._k_prev is not None:
            k = self.carry * self._k_prev.to(k.device) + (1.0 - self.carry) * k
        self._k_sum = k.clone() if self._k_sum is None else self._k_sum + k.to(self._k_sum.device)
        self._k_count += 1
        self.last_coefficients = k
        return k

    def end_task(self) -> None:
        """Freeze this task's mean coefficient for the carry and restart the window's clock."""
        if self._k_count > 0:
            self._k_prev = self._k_sum / self._k_count
        self._k_sum = None
        self._k_count = 0
        self._task += 1
        self._task_step = 0

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, scores=None, coefficients=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every gradient is classified (dense or sparse; sparse ones checked and coalesced) before
        # anything changes, so that a refused gradient leaves the parameters, their state and the
        # coefficient history alone
        work = []
        for group in self.param_groups:
            buckets: Dict[Tuple[torch.device, torch.dtype], List[int]] = defaultdict(list)
            sparse = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.layout == torch.sparse_coo:
                    sparse.append((i, self._sparse_rows(group, i)))
                else:
                    buckets[(p.device, p.dtype)].append(i)
            work.append((group, buckets, sparse))
        k = self._coefficients(scores, coefficients)
        k_on: Dict[torch.device, torch.Tensor] = {}

        def coef_on(device):
            if device not in k_on:
                # to a GPU: asynchronous; to the CPU: the kernel reads it at once, so wait
                k_on[device] = k.to(device, non_blocking=device.type != "cpu")
            return k_on[device]

        for group, buckets, sparse in work:
            modality = group.get("modality")
            midx = self.modalities.index(modality) if (k is not None and modality is not None) else -1
            for (device, _), idx in buckets.items():
                self._group_step(group, idx, coef_on(device) if midx >= 0 else None, midx)
            for i, (rows, values, sparse_dim) in sparse:
                device = group["params"][i].device
                self._sparse_step(group, i, rows, values, sparse_dim, coef_on(device) if midx >= 0 else None, midx)
        self._global_step += 1
        self._task_step += 1
        return loss

    def _param_name(self, p) -> str:
        """'parameter <index>' (the index in the optimizer's parameters, as in its state_dict)."""
        return f"parameter {self._param_ids()[id(p)]}"

    def _sparse_rows(self, group, i):
        """(rows, values, sparse_dim) of the sparse gradient of group["params"][i], or a clear error
        when this optimizer or group cannot take it."""
        raise TypeError(f"{type(self).__name__} takes dense gradients; {self._param_name(group['params'][i])} "
                        "has a sparse gradient (ModalityAdamW takes sparse COO gradients)")

    def _anchor_args(self, group, idx):
        if group["anchor"] is None or group["anchor_lambda"] == 0.0:
            return None, None
        return [group["anchor"][i] for i in idx], [group["anchor_weight"][i] for i in idx]

    def _param_ids(self) -> Dict[int, int]:
        """A stable index of every parameter of the optimizer: the noise's tensor id."""
        ids: Dict[int, int] = {}
        for g in self.param_groups:
            for p in g["params"]:
                ids.setdefault(id(p), len(ids))
        return ids

    def _plan(self, group, idx, make, prepare=None):
        """The checked, per-call-constant part of a group's op arguments, built (and validated in
        full by the op's own checks) the first time a set of parameters steps, then reused: the
        per-step Python work is then a few list builds, not a validation of every tensor.
        `prepare` (creating missing state) runs only when a plan is built."""
        params = group["params"]
        anchors = group["anchor"] if group["anchor_lambda"] != 0.0 else None

        def key():
            return (
                id(group), bool(group.get("amsgrad")), tuple(idx),
                # a cleared or shrunk state (state.clear(), del state[p]): a new plan
                id(self.state), len(self.state),
                None if anchors is None else (tuple(id(anchors[i]) for i in idx),
                                              tuple(id(group["anchor_weight"][i]) for i in idx)),
            )

        plan = self._plans.get(key())
        if plan is not None and any(params[i] is not p for i, p in zip(idx, plan["params"])):
            plan = None  # a parameter of the group was replaced
        if plan is None:
            if len(self._plans) >= 64:  # patterns of params without grads come and go
                self._plans.clear()
            if prepare is not None:
                prepare()
            plan = make()
            if plan.get("exclusive"):
                # this plan re-pointed state tensors (the step counts) of its parameters: a plan of
                # the same group built before it may hold stale ones
                for other in [k for k in self._plans if k[0] == id(group)]:
                    del self._plans[other]
            self._plans[key()] = plan
        return plan

    def _step_args(self, group, plan, coef, midx):
        """The arguments that change from step to step, checked each time (they are few)."""
        grads = [p.grad for p in plan["params"]]
        for i, g in enumerate(grads):
            if g.layout != torch.strided:
                raise TypeError(f"the fused step takes dense gradients; parameter {plan['tensor_ids'][i]} has a {g.layout} gradient")
        if coef is None:
            coef = plan["ones"]
        return grads, coef, dict(noise=self.noise and midx >= 0, seed=self.seed, noise_step=self._global_step)

    def _run(self, op, plan, args):
        device, dtype = plan["params"][0].device, plan["params"][0].dtype
        contiguous = plan["contiguous"] and all(g.is_contiguous() for g in args[1])
        backend = _backend.choose_backend(op, device, dtype, contiguous=contiguous)
        _ops.run_step(op, args, backend)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["modality_state"] = {
            "modalities": list(self.modalities),
            "global_step": self._global_step,
            "task_step": self._task_step,
            "task": self._task,
            "k_sum": None if self._k_sum is None else self._k_sum.clone(),
            "k_count": self._k_count,
            "k_prev": None if self._k_prev is None else self._k_prev.clone(),
        }
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("modality_state", None)
        super().load_state_dict(state_dict)
        self._plans = {}  # the state tensors were replaced
        for st in self.state.values():
            # the step counts are read on the host every step: keep them there (torch leaves them
            # where map_location put them)
            if isinstance(st.get("step"), torch.Tensor) and st["step"].device.type != "cpu":
                st["step"] = st["step"].to("cpu", torch.float32)
        for group in self.param_groups:
            for key, value in self.defaults.items():  # a torch.optim state dict lacks our keys
                group.setdefault(key, value)
            group["anchor"], group["anchor_weight"] = self._normalise_anchor(group)
        if extra is not None:
            if list(extra["modalities"]) != list(self.modalities):
                raise ValueError(f"state_dict was saved with modalities {extra['modalities']}, this optimizer has {self.modalities}")
            self._global_step = int(extra["global_step"])
            self._task_step = int(extra["task_step"])
            self._task = int(extra["task"])
            self._k_sum = extra["k_sum"]
            self._k_count = int(extra["k_count"])
            self._k_prev = extra["k_prev"]


class ModalityAdamW(_ModalityOptimizer):
    """AdamW (torch semantics) with per-modality gradient modulation, fused over all tensors.

    >>> opt = ModalityAdamW(param_groups_by_modality(model, {"vision": ["vis.*"], "text": ["txt.*"]}))
    >>> loss.backward(); opt.step(scores=modality_scores(unimodal_logits, y))

    Sparse gradients. A parameter whose .grad is a sparse COO tensor (nn.Embedding(sparse=True),
    torch.sparse_coo_tensor; uncoalesced ones, e.g. after DDP's all-reduce, are coalesced here) gets
    a lazy AdamW step, torch.optim.SparseAdam's semantics with AdamW's arithmetic: only the rows
    present in the gradient (the entries of its sparse dimensions) are read and written; their
    moments and values get the update with the group's coefficient k, decoupled weight decay, and,
    for rows inside the anchor, the anchor term. Rows not present are left exactly as they were:
    no decay, no moment decay, and no anchor pull. That is consistent, not an omission: the anchor
    term only modifies the gradient, and a lazy step never moves a row it does not list, so an
    untouched row cannot drift from its anchor. The parameter's step count (for the bias
    corrections) counts the steps in which it had a gradient; its moments are dense tensors like
    torch's, so state_dict() has the same layout for dense and sparse parameters and a parameter
    may switch between the two. Not supported with sparse gradients (a ValueError naming the
    option): amsgrad, and noise on a modality group (GE noise acts on every element). On a GPU
    the sparse step reads the number of distinct rows on the host (one sync, as SparseAdam's
    coalescing); the dense step makes none.
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, alpha: float = 0.1, noise: bool = False,
                 carry: float = 0.0, modulation_steps: Optional[Tuple[int, int]] = None, seed: int = 0,
                 modalities: Optional[Sequence[str]] = None):
        lr = _real("lr", lr)
        eps = _real("eps", eps)
        weight_decay = _real("weight_decay", weight_decay)
        if len(tuple(betas)) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        betas = tuple(_real(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))
        if betas[0] >= 1.0 or betas[1] >= 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad))
        super().__init__(params, defaults, alpha=alpha, noise=noise, carry=carry,
                         modulation_steps=modulation_steps, seed=seed, modalities=modalities)

    def _group_step(self, group, idx, coef, midx):
        def prepare():  # missing state, created when a plan is built
            for i in idx:
                self._init_state(group["params"][i], group["amsgrad"])

        def make():
            params = [group["params"][i] for i in idx]
            ids = self._param_ids()
            anchors, weights = self._anchor_args(group, idx)
            states = [self.state[p] for p in params]
            # The step counts live in one flat host tensor, and each state["step"] is a 0-d view of
            # it (torch.optim's layout, always current): one add_ and one tolist() per step
            # instead of an op per tensor (390 tensors: ~2 ms of host time on a GPU machine).
            flat = torch.tensor([float(s["step"]) for s in states], dtype=torch.float32)
            for i, s in enumerate(states):
                s["step"] = flat[i]
            args = _ops.validate_adamw_args(
                params, [p.grad for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
                tensor_ids=[ids[id(p)] for p in params], anchors=anchors, anchor_weights=weights,
                anchor_lambda=group["anchor_lambda"])
            return dict(params=args[0], exp_avgs=args[2], exp_avg_sqs=args[3], max_sqs=args[4],
                        steps=flat, exclusive=True, tensor_ids=args[16], anchors=args[17],
                        weights=args[18], ones=torch.ones(1, device=params[0].device),
                        contiguous=all(t.is_contiguous() for t in args[0] + args[2] + args[3] + args[4]))

        lr, beta1, beta2, eps, weight_decay, anchor_lambda = self._hyper(group)
        plan = self._plan(group, idx, make, prepare)
        grads, coef, noise = self._step_args(group, plan, coef, midx)
        plan["steps"].add_(1.0)
        args = (plan["params"], grads, plan["exp_avgs"], plan["exp_avg_sqs"], plan["max_sqs"],
                plan["steps"].tolist(), coef, midx, lr, beta1,
                beta2, eps, weight_decay, noise["noise"], noise["seed"],
                noise["noise_step"], plan["tensor_ids"], plan["anchors"], plan["weights"], anchor_lambda)
        self._run("modality_adamw_", plan, args)

    def _init_state(self, p, amsgrad: bool):
        """torch.optim.AdamW's state of p, created where missing."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _hyper(group) -> Tuple[float, ...]:
        """(lr, beta1, beta2, eps, weight_decay, anchor_lambda) of a group, checked (a group's values
        may be changed between steps, e.g. by a scheduler)."""
        beta1, beta2 = (_ops._finite(f"betas[{i}]", b) for i, b in enumerate(group["betas"]))
        lr, eps, weight_decay, anchor_lambda = (
            _ops._finite(k, group[k]) for k in ("lr", "eps", "weight_decay", "anchor_lambda"))
        return lr, beta1, beta2, eps, weight_decay, anchor_lambda

    def _sparse_rows(self, group, i):
        p = group["params"][i]
        if group["amsgrad"]:
            raise ValueError(f"amsgrad is not supported with sparse gradients ({self._param_name(p)}): "
                             "use a dense gradient or a group with amsgrad=False")
        if self.noise and group.get("modality") is not None:
            raise ValueError(f"noise is not supported with sparse gradients ({self._param_name(p)}, in the "
                             f"modality group {group['modality']!r}): GE noise acts on every element")
        grad = p.grad
        if grad.shape != p.shape:
            raise ValueError(f"the sparse gradient of {self._param_name(p)} has shape {list(grad.shape)}, "
                             f"the parameter {list(p.shape)}")
        if grad.dtype != p.dtype:
            raise TypeError(f"the sparse gradient of {self._param_name(p)} is {grad.dtype}, the parameter {p.dtype}")
        if grad.device != p.device:
            raise ValueError(f"the sparse gradient of {self._param_name(p)} is on {grad.device}, the parameter on {p.device}")
        sparse_dim = grad.sparse_dim()
        if sparse_dim > 1 and not p.is_contiguous():
            raise ValueError(f"{self._param_name(p)}: a gradient sparse in {sparse_dim} dimensions needs a "
                             "contiguous parameter (its sparse dimensions are stepped as the rows of a view)")
        return _ops.sparse_grad_rows(grad)

    def _sparse_step(self, group, i, rows, values, sparse_dim, coef, midx):
        p = group["params"][i]
        state = self._init_state(p, False)
        anchor_on = group["anchor"] is not None and group["anchor_lambda"] != 0.0
        anchor = group["anchor"][i] if anchor_on else None
        weight = group["anchor_weight"][i] if anchor_on else None
        key = ("rows", id(group), i, id(p), sparse_dim, id(state["exp_avg"]), id(state["exp_avg_sq"]),
               id(anchor), id(weight))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            plan = self._plans[key] = self._rows_plan(p, state, anchor, weight, sparse_dim)
        lr, beta1, beta2, eps, weight_decay, anchor_lambda = self._hyper(group)
        state["step"].add_(1.0)
        if rows.numel() == 0:
            return
        values = values.contiguous()
        op = "modality_adamw_rows_"
        backend = _ops.choose_step_backend(op, p.device, p.dtype, plan["contiguous"])
        _ops.run_step(op, (plan["param"], rows.contiguous(), values, plan["exp_avg"], plan["exp_avg_sq"],
                           float(state["step"]), plan["ones"] if coef is None else coef, midx, lr, beta1,
                           beta2, eps, weight_decay, plan["anchor"], plan["weight"], anchor_lambda), backend)

    def _rows_plan(self, p, state, anchor, weight, sparse_dim):
        """The per-parameter constants of the sparse step: the tensors as the row-sparse op sees them
        (for a gradient sparse in s > 1 dimensions, views whose rows are the entries of the first s
        dimensions) and the checked anchor and weight."""
        name = self._param_name(p)
        anchor, weight = _ops._check_anchor(anchor, weight, p, f"the anchor of {name}",
                                            f"the anchor_weight of {name}", name)
        views = [p, state["exp_avg"], state["exp_avg_sq"]]
        if sparse_dim > 1:
            views = [t.view((-1,) + tuple(p.shape[sparse_dim:])) for t in views]
            if anchor is not None:
                per_leading_row = weight is not None and weight.numel() == anchor.shape[0] != anchor.numel()
                if per_leading_row:  # one weight per row of the view
                    weight = weight.repeat_interleave(anchor[0].numel() // views[0][0].numel())
                anchor = anchor.view((-1,) + tuple(p.shape[sparse_dim:]))
        return dict(param=views[0], exp_avg=views[1], exp_avg_sq=views[2], anchor=anchor, weight=weight,
                    ones=torch.ones(1, device=p.device), contiguous=all(t.is_contiguous() for t in views))


class ModalitySGD(_ModalityOptimizer):
    """SGD (torch semantics: momentum, dampening, nesterov, weight decay) with per-modality
    gradient modulation, fused over all tensors."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, alpha: float = 0.1, noise: bool = False,
                 carry: float = 0.0, modulation_steps: Optional[Tuple[int, int]] = None, seed: int = 0,
                 modalities: Optional[Sequence[str]] = None):
        lr = _real("lr", lr)
        momentum = _real("momentum", momentum)
        dampening = _real("dampening", dampening)
        weight_decay = _real("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening == 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=bool(nesterov))
        super().__init__(params, defaults, alpha=alpha, noise=noise, carry=carry,
                         modulation_steps=modulation_steps, seed=seed, modalities=modalities)

    def _group_step(self, group, idx, coef, midx):
        use_momentum = group["momentum"] != 0

        def make():
            params = [group["params"][i] for i in idx]
            ids = self._param_ids()
            anchors, weights = self._anchor_args(group, idx)
            args = _ops.validate_sgd_args(
                params, [p.grad for p in params], tensor_ids=[ids[id(p)] for p in params],
                anchors=anchors, anchor_weights=weights, anchor_lambda=group["anchor_lambda"])
            return dict(params=args[0], tensor_ids=args[14], anchors=args[15], weights=args[16],
                        ones=torch.ones(1, device=params[0].device),
                        contiguous=all(t.is_contiguous() for t in args[0]))

        plan = self._plan(group, idx, make)
        grads, coef, noise = self._step_args(group, plan, coef, midx)
        bufs, first = [], []
        if use_momentum:
            for p in plan["params"]:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                first.append(int(buf is None))
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(buf)
        contiguous_bufs = all(b.is_contiguous() for b in bufs)
        lr, momentum, dampening, weight_decay, anchor_lambda = (
            _ops._finite(k, group[k]) for k in ("lr", "momentum", "dampening", "weight_decay", "anchor_lambda"))
        args = (plan["params"], grads, bufs, first or [0] * len(grads), coef, midx, lr, momentum,
                dampening, weight_decay, bool(group["nesterov"]), noise["noise"], noise["seed"],
                noise["noise_step"], plan["tensor_ids"], plan["anchors"], plan["weights"], anchor_lambda)
        self._run("modality_sgd_", dict(plan, contiguous=plan["contiguous"] and contiguous_bufs), args)


def param_groups_by_modality(
    model: nn.Module,
    patterns: Mapping[str, Union[str, Iterable[str]]],
    **group_options,
) -> List[dict]:
    """Param groups from name patterns (fnmatch), one group per modality plus one plain group.

    `patterns` maps a modality to patterns of parameter names (as in model.named_parameters());
    a parameter matching two modalities is an error; unmatched trainable parameters go to a plain
    group without "modality". `group_options` (lr, weight_decay, ...) are copied into every group.
    """
    if not isinstance(patterns, Mapping) or not patterns:
        raise ValueError("patterns must be a non-empty mapping of modality -> name patterns")
    pats = {}
    for modality, pat in patterns.items():
        if not isinstance(modality, str):
            raise TypeError(f"modality names must be str, got {modality!r}")
        pats[modality] = [pat] if isinstance(pat, str) else list(pat)
    groups: Dict[Optional[str], list] = {m: [] for m in pats}
    groups[None] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hits = [m for m, ps in pats.items() if any(fnmatch.fnmatchcase(name, q) for q in ps)]
        if len(hits) > 1:
            raise ValueError(f"parameter {name!r} matches the patterns of several modalities: {hits}")
        groups[hits[0] if hits else None].append(p)
    out = []
    for modality, params in groups.items():
        if params:
            g = dict(group_options, params=params)
            if modality is not None:
                g["modality"] = modality
            out.append(g)
    return out
