"""What a checkpoint costs the training thread: written in it (before) against copied out and
written by another thread (now).

    .venv/bin/python bench/checkpoint.py                 # TopK, D 2304, F 65536 (3.6 GB with Adam)
    .venv/bin/python bench/checkpoint.py --d-sae 16384

One run on this machine's disk: the synchronous write (weights, Adam state, trainer state into a
temporary folder, fsync, renames) against the copy the training thread now makes before a thread
writes (`copy.deepcopy` of the SAE to the CPU and `cpu_copy` of the optimizer state); each timed
twice after one untimed write (page cache and allocator warm), the faster kept.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=65536)
    args = ap.parse_args()
    from msae_core.sae import SAEConfig, build_sae
    from msae_core.runs.checkpoint import cpu_copy, write_checkpoint

    sae = build_sae(SAEConfig(arch="topk", d_in=args.d_in, d_sae=args.d_sae, k=64))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    sae.training_loss(torch.randn(64, args.d_in), 0)["loss"].backward()
    opt.step()
    n_bytes = sum(t.numel() * t.element_size() for t in sae.state_dict().values())
    n_bytes += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                   if torch.is_tensor(v))
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        run = Path(tmp)
        state = {"step": 1}

        def sync_write() -> None:
            write_checkpoint(run, sae, opt.state_dict(), state)

        def copy_out() -> None:
            copy.deepcopy(sae).to("cpu")
            cpu_copy(opt.state_dict())

        sync_write()
        times = {}
        for name, fn in (("write in the training thread", sync_write), ("copy out (then a thread writes)", copy_out)):
            best = float("inf")
            for _ in range(2):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            times[name] = best
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; TopK D {args.d_in}, F {args.d_sae}: "
          f"{n_bytes / 1e9:.2f} GB of weights, buffers and Adam state")
    for name, t in times.items():
        print(f"  {name:34s} {t:6.2f} s")
    a, b = times.values()
    print(f"  the training thread waits {a / b:.1f}x less per checkpoint")


if __name__ == "__main__":
    main()
