"""Replay memory: a few stored samples of earlier tasks, held as tensors on the model's device.

Capacity is per class (MSPT keeps 6 per class) or total; with a total capacity the slots are
shared equally among the classes seen so far (the first `capacity mod classes` classes get one
more), so adding classes shrinks the older classes' sets, as in iCaRL.

Selection policies:
- "random": a uniform random subset of each class (drawn without replacement).
- "herding": iCaRL's herding (Rebuffi et al., CVPR 2017, Algorithm 4): with features phi (L2
  normalised by default) and the class mean mu = (1/n) sum_i phi(x_i), the k-th exemplar is
      p_k = argmin_{x not yet chosen} || mu - (1/k) (phi(x) + sum_{j<k} phi(p_j)) ||,
  so the running mean of the first k exemplars approximates the class mean as well as one
  greedy step can. The order is a priority: shrinking a class keeps its first exemplars.
- "reservoir": reservoir sampling (Vitter 1985, Algorithm R) over the stream of samples offered
  by `add`: after n samples each one is in the memory with probability capacity / n. With a
  per-class capacity there is one reservoir per class. Samples are never re-selected.

`add(data, features)` offers samples; with "random" and "herding" the samples of a class are
selected together with that class's stored exemplars (call it once per task with the task's
training data, after training, as iCaRL and MSPT do); with "reservoir" call it as often as you
like (e.g. on every training batch). Replay is either mixed into batches (`sample`) or a phase
of its own (`data()` gives the whole memory as a data set).
"""
from __future__ import annotations

import torch

from .data import MultimodalData

POLICIES = ("random", "herding", "reservoir")


def herding_order(features: torch.Tensor, m: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Indices of the first `m` exemplars chosen by iCaRL herding from `features` [n, d]
    (all n by default), in the order they are chosen."""
    if features.dim() != 2:
        raise ValueError(f"features must be [n, d], got {tuple(features.shape)}")
    n = features.shape[0]
    m = n if m is None else min(int(m), n)
    phi = features.detach().to(torch.float64)
    if normalize:
        phi = torch.nn.functional.normalize(phi, dim=1)
    mu = phi.mean(0)
    chosen = torch.zeros(n, dtype=torch.bool, device=phi.device)
    total = torch.zeros_like(mu)
    order: list[int] = []
    for k in range(1, m + 1):
        dist = (mu.unsqueeze(0) - (total.unsqueeze(0) + phi) / k).norm(dim=1)
        dist = dist.masked_fill(chosen, float("inf"))
        i = int(torch.argmin(dist))  # ties: the lowest index, deterministically
        order.append(i)
        chosen[i] = True
        total += phi[i]
    return torch.tensor(order, dtype=torch.long, device=features.device)


def _usable_device(name: str | None) -> torch.device | None:
    if name is None:
        return None
    device = torch.device(name)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        return None
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return None
    return device


class ReplayMemory:
    """Stored samples of earlier tasks (see the module docstring for the policies)."""

    def __init__(self, capacity_per_class: int | None = None, capacity: int | None = None,
                 policy: str = "random", device=None, seed: int = 0, normalize_features: bool = True):
        if (capacity_per_class is None) == (capacity is None):
            raise ValueError("give exactly one of capacity_per_class and capacity")
        for name, v in (("capacity_per_class", capacity_per_class), ("capacity", capacity)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.capacity_per_class = capacity_per_class
        self.capacity = capacity
        self.policy = policy
        self.device = torch.device(device) if device is not None else None
        self.normalize_features = bool(normalize_features)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._inputs: dict[str, torch.Tensor] | None = None
        self._targets: torch.Tensor | None = None
        # reservoir: samples offered so far, in total and per class
        self._offered = 0
        self._offered_per_class: dict[int, int] = {}

    # -- what is stored -------------------------------------------------------------------------
    def __len__(self) -> int:
        return 0 if self._targets is None else int(self._targets.numel())

    def classes(self) -> list[int]:
        return [] if self._targets is None else sorted(int(c) for c in torch.unique(self._targets).tolist())

    def counts(self) -> dict[int, int]:
        if self._targets is None:
            return {}
        c, n = torch.unique(self._targets, return_counts=True)
        return {int(a): int(b) for a, b in zip(c.tolist(), n.tolist())}

    def data(self) -> MultimodalData | None:
        """The whole memory as a data set (None when empty), for a replay phase."""
        if not len(self):
            return None
        return MultimodalData(self._inputs, self._targets)

    def sample(self, batch_size: int, generator: torch.Generator | None = None):
        """A batch ({m: X_m}, Y) of up to `batch_size` distinct stored samples, uniformly at random
        (None when empty), for mixing into a training batch."""
        n = len(self)
        if n == 0 or batch_size <= 0:
            return None
        idx = torch.randperm(n, generator=generator or self.generator)[:batch_size].to(self._targets.device)
        return {m: x[idx] for m, x in self._inputs.items()}, self._targets[idx]

    # -- adding ---------------------------------------------------------------------------------
    def add(self, data: MultimodalData, features=None) -> None:
        """Offer `data`'s samples to the memory (see the module docstring).

        `features` are what herding compares: a tensor [N, d] for `data`'s samples, or a function
        mapping a batch of inputs {m: X_m} to features [n, d] (needed when a class of `data` is
        already stored, so that its stored exemplars are ranked with the same features); without
        them herding uses the flattened inputs of all modalities side by side. Other policies
        ignore them."""
        if not isinstance(data, MultimodalData):
            raise TypeError(f"data must be a MultimodalData, got {type(data).__name__}")
        if len(data) == 0:
            return
        if self._inputs is not None:
            if list(self._inputs) != data.modalities:
                raise ValueError(f"the memory holds modalities {list(self._inputs)}, got {data.modalities}")
            for m, x in self._inputs.items():
                if x.shape[1:] != data.inputs[m].shape[1:]:
                    raise ValueError(f"the memory holds {m!r} samples of shape {tuple(x.shape[1:])}, "
                                     f"got {tuple(data.inputs[m].shape[1:])}")
        data = data.to(self.device or data.device)
        if isinstance(features, torch.Tensor):
            if features.dim() != 2 or features.shape[0] != len(data):
                raise ValueError(f"features must be [{len(data)}, d], got {tuple(features.shape)}")
            features = features.detach().to(data.device)
        elif features is not None and not callable(features):
            raise TypeError("features must be a tensor [N, d], a function of the inputs, or None")
        if self.policy == "reservoir":
            self._add_reservoir(data)
        else:
            self._add_selected(data, features)

    def _store(self, data: MultimodalData, index: torch.Tensor) -> None:
        index = index.to(data.device)
        self._inputs = {m: x[index].clone() for m, x in data.inputs.items()}
        self._targets = data.targets[index].clone()

    def _quotas(self, classes: list[int]) -> dict[int, int]:
        if self.capacity_per_class is not None:
            return {c: self.capacity_per_class for c in classes}
        base, extra = divmod(self.capacity, max(len(classes), 1))
        return {c: base + (1 if i < extra else 0) for i, c in enumerate(sorted(classes))}

    def _herding_features(self, pool: MultimodalData, n_old: int, features) -> torch.Tensor:
        if features is None:
            return torch.cat([x.reshape(len(pool), -1).to(torch.float64) for x in pool.inputs.values()], 1)
        if callable(features):
            with torch.no_grad():
                return torch.cat([features(x) for x, _ in pool.batches(1024)]).detach()
        # a tensor covers the new samples only: the stored ones are never candidates then (checked
        # by the caller), so their rows are placeholders
        return torch.cat([features.new_zeros(n_old, features.shape[1]), features])

    def _add_selected(self, data: MultimodalData, features) -> None:
        old = self.data()
        n_old = 0 if old is None else len(old)
        new_classes = data.classes()
        stored = self.classes()
        again = [c for c in new_classes if c in stored]
        if self.policy == "herding" and again and isinstance(features, torch.Tensor):
            raise ValueError(f"classes {again} are already in the memory: herding must rank their stored "
                             "exemplars too, so pass features as a function of the inputs, not a tensor")
        # stored exemplars first, so that a class that appears again competes with its exemplars
        pool = data if old is None else MultimodalData.concat([old, data])
        feats = self._herding_features(pool, n_old, features) if self.policy == "herding" else None
        classes = sorted(set(stored) | set(new_classes))
        quotas = self._quotas(classes)
        keep: list[torch.Tensor] = []
        for c in classes:
            idx = torch.nonzero(pool.targets == c).flatten()
            q = min(quotas[c], idx.numel())
            if c in new_classes:
                if self.policy == "herding":
                    chosen = idx[herding_order(feats[idx], q, self.normalize_features)]
                else:
                    perm = torch.randperm(idx.numel(), generator=self.generator).to(idx.device)
                    chosen = idx[perm[:q]]
            else:
                chosen = idx[:q]  # stored in priority order: shrinking keeps the first ones
            keep.append(chosen)
        self._store(pool, torch.cat(keep))

    def _add_reservoir(self, data: MultimodalData) -> None:
        if self._inputs is None:
            self._inputs = {m: x[:0].clone() for m, x in data.inputs.items()}
            self._targets = data.targets[:0].clone()
        # Algorithm R, one sample at a time: the random draws come from the CPU generator, so a
        # run is the same on every device; the tensor writes are batched per call
        u = torch.rand(len(data), generator=self.generator, dtype=torch.float64).tolist()
        targets = data.targets.tolist()
        slots: dict[int, int] = {}  # memory slot -> index in data (a later sample overwrites)
        appended: list[int] = []
        labels = self._targets.tolist()
        for i, (c, r) in enumerate(zip(targets, u)):
            c = int(c)
            if self.capacity_per_class is not None:
                seen = self._offered_per_class.get(c, 0)
                cap = self.capacity_per_class
                members = [s for s, lab in enumerate(labels) if lab == c]
            else:
                seen, cap, members = self._offered, self.capacity, None
            if seen < cap:
                labels.append(c)
                appended.append(i)
            else:
                j = int(r * (seen + 1))  # uniform in 0..seen
                if j < cap:
                    slot = members[j] if members is not None else j
                    if slot >= len(self._targets):  # a slot appended in this very call
                        appended[slot - len(self._targets)] = i
                    else:
                        slots[slot] = i
            self._offered += 1
            self._offered_per_class[c] = self._offered_per_class.get(c, 0) + 1
        if slots:
            dst = torch.tensor(list(slots), dtype=torch.long, device=self._targets.device)
            src = torch.tensor(list(slots.values()), dtype=torch.long, device=data.device)
            for m, x in self._inputs.items():
                x[dst] = data.inputs[m][src]
            self._targets[dst] = data.targets[src]
        if appended:
            src = torch.tensor(appended, dtype=torch.long, device=data.device)
            self._inputs = {m: torch.cat([x, data.inputs[m][src]]) for m, x in self._inputs.items()}
            self._targets = torch.cat([self._targets, data.targets[src]])

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "capacity_per_class": self.capacity_per_class, "capacity": self.capacity, "policy": self.policy,
            "inputs": None if self._inputs is None else {m: x.clone() for m, x in self._inputs.items()},
            "targets": None if self._targets is None else self._targets.clone(),
            "offered": self._offered, "offered_per_class": dict(self._offered_per_class),
            "generator": self.generator.get_state(),
            "device": None if self._targets is None else str(self._targets.device),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("capacity_per_class", "capacity", "policy"):
            if state[key] != getattr(self, key):
                raise ValueError(f"replay memory state was saved with {key}={state[key]!r}, "
                                 f"this memory has {getattr(self, key)!r}")
        # the tensors go back to this memory's device (a checkpoint loaded with map_location="cpu"
        # must not leave the memory on the CPU beside a model on a GPU); a memory without a device
        # of its own keeps the samples where they were when saved, when that device exists here
        device = self.device if self.device is not None else _usable_device(state.get("device"))
        inputs, targets = state["inputs"], state["targets"]
        if targets is not None and device is not None:
            inputs = {m: x.to(device) for m, x in inputs.items()}
            targets = targets.to(device)
        self._inputs = None if inputs is None else dict(inputs)
        self._targets = targets
        self._offered = int(state["offered"])
        self._offered_per_class = {int(k): int(v) for k, v in state["offered_per_class"].items()}
        self.generator.set_state(state["generator"])
