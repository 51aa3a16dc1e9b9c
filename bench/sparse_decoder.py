"""TopK step with the sparse decoder (embedding_bag over the k active rows) against the dense one.

    .venv/bin/python bench/sparse_decoder.py                 # CPU shape: D 640, F 4096, B 1024, k 32
    .venv/bin/python bench/sparse_decoder.py --shape research --rounds 2 --steps 1

The dense variant is the same TopKSAE with its decoder replaced by the (B, F) @ (F, D) product it
used before; both step the same way (loss, backward, Adam, decoder renormalisation) on the same
batches, timed in interleaved rounds (median of the rounds' mean step times), so machine load hits
both alike. Also printed: the decoder's FLOPs per step each way, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import cpu_name  # noqa: E402
from bench.train_step import SHAPES, _acts, time_rounds  # noqa: E402


def _stepper(d_in: int, d_sae: int, k: int, dense: bool, device: torch.device):
    from msae_core.sae import SAEConfig, build_sae

    sae = build_sae(SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k)).to(device)
    if dense:  # the decoder as it was: scatter into (B, F), then a dense matmul
        def dense_rows(vals_BK, idx_BK):
            f = torch.zeros(vals_BK.shape[0], d_sae, device=vals_BK.device, dtype=sae.W_dec.dtype)
            return f.scatter(-1, idx_BK, vals_BK.to(sae.W_dec.dtype)) @ sae.W_dec
        sae._decode_rows_n = dense_rows
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    t = {"s": 0}

    def step(x: torch.Tensor) -> None:
        loss = sae.training_loss(x, t["s"])["loss"]
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        sae.post_step_(t["s"])
        t["s"] += 1

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    D, F, B, k = SHAPES[args.shape]
    batches = [x.to(device) for x in _acts(8, B, D)]
    steppers = {"dense": _stepper(D, F, k, True, device), "sparse": _stepper(D, F, k, False, device)}
    times = time_rounds(steppers, batches, args.rounds, args.steps, args.warmup, device)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, device {device}, torch {torch.__version__}")
    print(f"TopK step, D {D}, F {F}, B {B}, k {k}; {args.rounds} rounds of {args.steps} steps after "
          f"{args.warmup} warm-up steps each:")
    for name, t in times.items():
        print(f"  {name:6s} decoder: {t * 1e3:8.1f} ms a step")
    print(f"  dense / sparse = {times['dense'] / times['sparse']:.2f}x")
    dense_flops, sparse_flops = 6 * B * F * D, 6 * B * k * D
    print(f"  decoder forward + backward: dense 6 B F D = {dense_flops / 1e9:.2f} GFLOP, sparse 6 B k D = "
          f"{sparse_flops / 1e9:.3f} GFLOP ({dense_flops / sparse_flops:.0f}x fewer); the encoder's 4 B D F "
          f"= {4 * B * D * F / 1e9:.2f} GFLOP is unchanged")


if __name__ == "__main__":
    main()
