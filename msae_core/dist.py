"""Data-parallel training across processes started by `torchrun` (torch.distributed): the one
place that knows whether this process is one of several, and the collectives the SAE and the
trainer use. Outside torchrun every function is the single-process identity.

    torchrun --nproc_per_node N -m msae_core.cli train ...     # nccl on GPUs, gloo on the CPU

Each rank takes its 1/N of every global batch; gradients are averaged across ranks after the
backward (so a step equals the single-process step on the whole batch, up to float rounding); the
momentum tracker and the dead-latent counter see the whole batch (the trainer gathers the
tracker's rows with `gather_sparse_rows`; the counter asks `any_fired`); rank 0 alone writes the
run folder.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_name: str) -> str:
    """Join the process group torchrun describes (env://): nccl when the run is on CUDA, else gloo.
    Returns the device this rank trains on (cuda:LOCAL_RANK on GPUs)."""
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's `n`, in rank order (one small all-gather)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(sizes, mine)
    return [int(s) for s in sizes]


def _gather_padded(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Every rank's `t` (n_r, ...), rows padded to the largest n_r for the all-gather, trimmed back."""
    top = max(sizes)
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[:n] for p, n in zip(parts, sizes)]


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The ranks' (n_r, ...) tensors stacked in rank order: the global batch's rows. The ranks'
    row counts may differ (--outliers exclude drops rows per rank): they are gathered first."""
    if world_size() == 1:
        return t
    return torch.cat(_gather_padded(t.contiguous(), _gather_sizes(t.shape[0], t.device)))


def gather_sparse_rows(f_BF: torch.Tensor) -> torch.Tensor:
    """`gather_rows` of a sparse (B, F) activation tensor, exchanging only its nonzero entries
    (row, latent, value: about k per row) instead of the dense rows (at B 4,096 and F 65,536 a
    rank sent 1.07 GB a step, the k = 64 active entries are 3 MB); the dense global tensor is
    rebuilt on every rank and equals gather_rows(f_BF)."""
    if world_size() == 1:
        return f_BF
    rows_N, lat_N = f_BF.nonzero(as_tuple=True)
    vals_N = f_BF[rows_N, lat_N]
    batch = _gather_sizes(f_BF.shape[0], f_BF.device)
    nnz = _gather_sizes(len(vals_N), f_BF.device)
    rows = _gather_padded(rows_N.to(torch.int32), nnz)
    lats = _gather_padded(lat_N.to(torch.int32), nnz)
    vals = _gather_padded(vals_N, nnz)
    out = torch.zeros(sum(batch), f_BF.shape[1], dtype=f_BF.dtype, device=f_BF.device)
    offset = 0
    for r, l, v, b in zip(rows, lats, vals, batch):
        out[r.long() + offset, l.long()] = v
        offset += b
    return out


def any_fired(fired_F: torch.Tensor) -> torch.Tensor:
    """Per latent, whether it fired on any rank."""
    if world_size() == 1:
        return fired_F
    out = fired_F.to(torch.int32)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.bool()


def average_gradients_(params, n_rows: int | None = None) -> None:
    """Average every parameter's gradient across ranks, in place (one flat all-reduce). With
    `n_rows` (this rank's rows in the step, which --outliers exclude makes differ by rank) the
    average weighs each rank by its rows, so the result is the gradient of the global batch's mean
    loss; without, the ranks weigh alike (equal local batches)."""
    n = world_size()
    if n == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if n_rows is None:
        dist.all_reduce(flat)
        flat /= n
    else:
        flat = torch.cat([flat * float(n_rows), torch.tensor([float(n_rows)], dtype=flat.dtype, device=flat.device)])
        dist.all_reduce(flat)
        flat = flat[:-1] / flat[-1]
    pos = 0
    for g in grads:
        g.copy_(flat[pos:pos + g.numel()].view_as(g))
        pos += g.numel()


def all_max(x: float | int) -> float:
    """The largest of the ranks' values (one small all-reduce; a host sync)."""
    if world_size() == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_min_(t: torch.Tensor) -> torch.Tensor:
    """The ranks' smallest `t`, in place (on the device: no host sync)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def all_mean_(t: torch.Tensor) -> torch.Tensor:
    """The ranks' mean of `t`, in place."""
    if world_size() > 1:
        dist.all_reduce(t)
        t /= world_size()
    return t


def gather_objects(obj: object) -> list | None:
    """Rank 0: every rank's `obj` (picklable, CPU tensors), in rank order; other ranks: None."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class RankCollectives:
    """The ranks' collectives an SAE's statistics use under torchrun (the three methods and `world` of
    msae_core.sae.base.OneProcess; the trainer installs them with SAE.set_collectives)."""

    def any_fired(self, fired_F: torch.Tensor) -> torch.Tensor:
        return any_fired(fired_F)

    def global_rows(self, n: int) -> torch.Tensor:
        """The global batch's rows, summed on the device (no host sync; the ranks' rows differ
        when outliers are excluded)."""
        t = torch.tensor(n, dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t

    def all_min_(self, t: torch.Tensor) -> torch.Tensor:
        return all_min_(t)

    @property
    def world(self) -> int:
        return world_size()
