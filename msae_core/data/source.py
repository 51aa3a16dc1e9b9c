"""What the trainer reads activations from: one protocol for an activation store
(data.store.ActivationStore) and the model streamed into a mixing buffer (data.stream.ActivationStream),
and the streamed sub-protocol where the two differ (PEP 544: structural, no base class to inherit).
An entry point opens its source once (runs.config.RunConfig.check) and passes it down; code that must
tell the two apart reads `source.streamed`, typed here, instead of probing with getattr.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch


@runtime_checkable
class ActivationSource(Protocol):
    """Batches of activation rows, deterministic in (seed, step)."""

    streamed: ClassVar[bool]  # False: a store, read in any order; True: a stream, read in order

    @property
    def d_in(self) -> int: ...

    def batch_raw(self, step: int, batch_size: int, seed: int = 0, out: torch.Tensor | None = None,
                  part: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Batch `step` (this rank's `part` of it), (B, D)."""

    def input_sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """`n` rows the SAE's input scale is fitted on."""

    def nonfinite_problem(self) -> str | None:
        """What is non-finite in the source, in one line (None: nothing found)."""


@runtime_checkable
class StreamedSource(ActivationSource, Protocol):
    """A stream: its mixing buffer is part of a checkpoint, and it counts what it read."""

    windows_used: int

    def state(self, step: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """The buffer before batch `step`: (json fields, tensors) for the checkpoint."""

    def restore(self, fields: dict, tensors: dict[str, torch.Tensor]) -> None: ...

    def outlier_summary(self) -> dict | None: ...

    def finish_cache(self) -> None: ...
