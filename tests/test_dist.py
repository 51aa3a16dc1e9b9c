"""The collectives of data-parallel training, on two gloo ranks in this machine's processes: rows
gathered when the ranks hold different numbers of them (--outliers exclude), the sparse gather of
active latents equal to the dense one, and the gradient average weighed by each rank's rows."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _work(rank: int, port: int, out: dict) -> None:
    import torch.distributed as tdist

    from msae_core import dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(rank)
        n = 5 if rank == 0 else 3  # unequal local batches
        f = torch.relu(torch.randn(n, 40, generator=g)) * (torch.rand(n, 40, generator=g) < 0.1)
        out[f"rows{rank}"] = dist.gather_rows(f)
        out[f"sparse{rank}"] = dist.gather_sparse_rows(f)
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(rank + 1))  # rank 0: mean-loss gradient 1 over 5 rows; rank 1: 2 over 3
        dist.average_gradients_([p], n_rows=n)
        out[f"grad{rank}"] = p.grad.clone()
        out[f"f{rank}"] = f
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_collectives_with_unequal_local_batches():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_work, args=(port, out), nprocs=2, join=True)
    want = torch.cat([out["f0"], out["f1"]])
    for r in (0, 1):
        assert torch.equal(out[f"rows{r}"], want)  # 5 + 3 rows, in rank order
        assert torch.equal(out[f"sparse{r}"], want)  # only the nonzero entries travelled
        torch.testing.assert_close(out[f"grad{r}"], torch.full((3,), (5 * 1 + 3 * 2) / 8))
