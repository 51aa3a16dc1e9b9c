"""Data-parallel training across processes started by `torchrun` (torch.distributed): the one
place that knows whether this process is one of several, and the collectives the SAE and the
trainer use. Outside torchrun every function is the single-process identity.

    torchrun --nproc_per_node N -m msae_core.cli train ...     # nccl on GPUs, gloo on the CPU

Each rank takes its 1/N of every global batch; gradients are averaged across ranks after the
backward (so a step equals the single-process step on the whole batch, up to float rounding); the
momentum tracker and the dead-latent counter see the whole batch (`gather_rows`, `any_fired`);
rank 0 alone writes the run folder.
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


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The ranks' (n, ...) tensors stacked in rank order: the global batch's rows."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def any_fired(fired_F: torch.Tensor) -> torch.Tensor:
    """Per latent, whether it fired on any rank."""
    if world_size() == 1:
        return fired_F
    out = fired_F.to(torch.int32)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.bool()


def average_gradients_(params) -> None:
    """Average every parameter's gradient across ranks, in place (one flat all-reduce)."""
    n = world_size()
    if n == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= n
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
