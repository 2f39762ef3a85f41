"""A labelled multimodal data set held as tensors: one tensor per modality and a target vector.

Batches are slices of the tensors (no DataLoader, no per-sample Python): for the small streams of
tests and demos, and for the replay memory, which stores its samples in the same form.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class MultimodalData(torch.utils.data.Dataset):
    """`inputs[m]` is Tensor[N, ...] for each modality m; `targets` is Tensor[N] of class ids.

    Indexing one sample gives `({m: x_m}, y)`; `batches()` yields `({m: X_m}, Y)` slices.
    """

    def __init__(self, inputs: Mapping[str, torch.Tensor], targets: torch.Tensor):
        if not isinstance(inputs, Mapping) or not inputs:
            raise ValueError("inputs must be a non-empty mapping of modality name -> tensor")
        if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
            raise ValueError(f"targets must be a 1-D tensor, got {getattr(targets, 'shape', targets)!r}")
        n = targets.shape[0]
        for name, x in inputs.items():
            if not isinstance(name, str):
                raise TypeError(f"modality names must be str, got {name!r}")
            if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != n:
                raise ValueError(f"inputs[{name!r}] must be a tensor with {n} rows (as targets), got "
                                 f"{tuple(getattr(x, 'shape', ()))}")
            if x.device != targets.device:
                raise ValueError(f"inputs[{name!r}] is on {x.device} but targets on {targets.device}")
        self.inputs: dict[str, torch.Tensor] = dict(inputs)
        self.targets = targets

    @property
    def modalities(self) -> list[str]:
        return list(self.inputs)

    @property
    def device(self) -> torch.device:
        return self.targets.device

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i):
        return {m: x[i] for m, x in self.inputs.items()}, self.targets[i]

    def classes(self) -> list[int]:
        return sorted(int(c) for c in torch.unique(self.targets).tolist())

    def subset(self, index: torch.Tensor) -> MultimodalData:
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return MultimodalData({m: x[index] for m, x in self.inputs.items()}, self.targets[index])

    def to(self, device) -> MultimodalData:
        return MultimodalData({m: x.to(device) for m, x in self.inputs.items()}, self.targets.to(device))

    @staticmethod
    def concat(parts: Sequence[MultimodalData]) -> MultimodalData:
        parts = [p for p in parts if p is not None]
        if not parts:
            raise ValueError("nothing to concatenate")
        names = parts[0].modalities
        for p in parts[1:]:
            if p.modalities != names:
                raise ValueError(f"cannot concatenate data with modalities {names} and {p.modalities}")
        return MultimodalData({m: torch.cat([p.inputs[m] for p in parts]) for m in names},
                              torch.cat([p.targets for p in parts]))

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[Batch]:
        """Slices of `batch_size` samples; the order is a permutation drawn from `generator` (a CPU
        generator, so that the order does not depend on the device) when `shuffle`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield {m: x[idx] for m, x in self.inputs.items()}, self.targets[idx]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)
