"""Batches for the training step, produced ahead of it by a background thread.

    with BatchLoader(store, batch_size, seed, start_step=s0, device=dev) as loader:
        x_BD = loader.next(s)      # batch s of the store's shuffled order, float32 on `dev`

Batch s equals `store.batch(s, batch_size, seed)`: the thread gathers batches s0, s0 + 1, ... in
order (`store.batch_raw`, in the store's dtype: float16 for a default harvest) while the steps
before them run, at most `depth` ahead. It gathers into buffers allocated once and reused in turn
(a fresh 38 MB tensor per batch costs more in page faults than the float16 -> float32 conversion
itself), so a batch returned by `next` stays valid until `next` has been called twice more: the
trainer uses a batch within its own step only.

On CUDA the buffers are pinned, a batch is copied with `non_blocking=True` and converted to float32
on the GPU (a buffer is refilled only after its copy has finished: a CUDA event per buffer). On the
CPU the thread also converts, so the training thread only takes finished batches. The thread's
work is torch calls that release the GIL (index_select from the mapped shards, the conversion), so
it overlaps the step within one process. An error in the thread is raised by the `next` call that
would have returned its batch.

A stream (data.stream: `streamed` is set) is served in the caller's thread: its batches come from
the model, on the device already.

Resident: when the whole store fits on the GPU (at most RESIDENT_FRACTION of its free memory, in
the store's dtype), the rows are copied there once and a batch is a gather on the device; no thread
then. `resident=True` forces it on any device (the tests use it on the CPU), False turns it off.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from msae_core.data.source import ActivationSource
    from msae_core.data.store import ActivationStore

RESIDENT_FRACTION = 0.4


def fits_on_device(store: "ActivationStore", device: torch.device) -> bool:
    """Whether the store's rows, in its dtype, take at most RESIDENT_FRACTION of the GPU's free
    memory (False on the CPU, where the page cache already keeps a store that fits in memory)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    itemsize = 2 if store.dtype == "float16" else 4
    return store.n_rows * store.d_in * itemsize <= RESIDENT_FRACTION * free


class BatchLoader:
    def __init__(self, store: "ActivationSource", batch_size: int, seed: int, start_step: int = 0,
                 device: torch.device | str = "cpu", depth: int = 2, resident: bool | None = None,
                 part: tuple[int, int] = (0, 1)):
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.part = part  # data-parallel (rank, ranks): this rank's slice of every batch
        self.local_size = batch_size // part[1]
        self.device = torch.device(device)
        self._on_cuda = self.device.type == "cuda"
        self._next_step = start_step
        self.resident = fits_on_device(store, self.device) if resident is None else resident
        self._rows_ND: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._in_order = store.streamed
        if self._in_order:  # a stream (data.stream) runs the model: served here, on the device
            return
        if self.resident:
            self._rows_ND = store.all_rows_raw(self.device)
            return
        # depth batches queued, one being filled, the caller's current and previous one
        self._n_buf = depth + 3
        self._raw: list[torch.Tensor | None] = [None] * self._n_buf
        self._f32: list[torch.Tensor | None] = [None] * self._n_buf
        self._copied: list[Any] = [None] * self._n_buf  # CUDA event: the buffer's copy is done
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start_step,), daemon=True,
                                        name="msae-batch-loader")
        self._thread.start()

    def _buffer(self, slot: int) -> torch.Tensor:
        if self._raw[slot] is None:
            self._raw[slot] = torch.empty((self.local_size, self.store.d_in), dtype=self.store.torch_dtype,
                                          pin_memory=self._on_cuda)
        return self._raw[slot]

    def _produce(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                slot = step % self._n_buf
                if self._copied[slot] is not None:
                    self._copied[slot].synchronize()
                raw_BD = self.store.batch_raw(step, self.batch_size, self.seed, out=self._buffer(slot),
                                              part=self.part)
                if not self._on_cuda:
                    if raw_BD.dtype == torch.float32:
                        self._f32[slot] = raw_BD
                    else:
                        if self._f32[slot] is None:
                            self._f32[slot] = torch.empty(raw_BD.shape, dtype=torch.float32)
                        self._f32[slot].copy_(raw_BD)
                if not self._put((step, slot, None)):
                    return
                step += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((step, None, exc))

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self, step: int) -> torch.Tensor:
        """Batch `step`, float32 (B, D) on the device; steps must be asked for in order."""
        if step != self._next_step:
            raise ValueError(f"BatchLoader serves steps in order: expected {self._next_step}, got {step}")
        if self._in_order:
            self._next_step += 1
            return self.store.batch_raw(step, self.batch_size, self.seed, part=self.part).to(self.device).float()
        if self._rows_ND is not None:
            self._next_step += 1
            idx = self.store.batch_indices(step, self.batch_size, self.seed)
            r, n = self.part
            idx = idx[r * self.local_size:(r + 1) * self.local_size].to(self.device, non_blocking=True)
            return self._rows_ND.index_select(0, idx).float()
        assert self._thread is not None
        while True:
            try:
                got, slot, exc = self._q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the batch loader's thread ended without a batch") from None
        if exc is not None:
            raise exc
        assert got == step, (got, step)
        self._next_step += 1
        if not self._on_cuda:
            return self._f32[slot]
        x_BD = self._raw[slot].to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._copied[slot] = ev
        return x_BD.float()

    def close(self) -> None:
        self._rows_ND = None
        if self._thread is None:
            return
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def limit_outliers(x_BD: torch.Tensor, max_norm: float | None, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch with its rows above `max_norm` dropped ("exclude") or scaled down to it
    ("clip"), how many rows were above it as a 0-d float tensor on the batch's device). "keep" or
    no max_norm: the batch as it is. "exclude" indexes by a mask (one host sync); "clip" does not."""
    if mode == "keep" or max_norm is None:
        return x_BD, torch.zeros((), device=x_BD.device)
    norm_B = x_BD.float().norm(dim=1)
    over_B = norm_B > max_norm
    n_over = over_B.sum().float()
    if mode == "exclude":
        return x_BD[~over_B], n_over
    if mode == "clip":
        factor_B = torch.where(over_B, max_norm / norm_B.clamp_min(1e-12), torch.ones_like(norm_B))
        return (x_BD.float() * factor_B[:, None]).to(x_BD.dtype), n_over
    raise ValueError(f"unknown outlier mode {mode!r}")
