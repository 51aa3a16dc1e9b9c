"""A sweep in one pass (msae train-group) against the same runs trained one after another.

    .venv/bin/python bench/sweep.py --acts results/stores/gemma3-L6        # from a store, N = 1, 4, 8
    .venv/bin/python bench/sweep.py --source stream                        # streamed, embedded model L6

The runs: N SAEs at d_sae 4,096 (k 32), TopK and momentum over TopK in turn, each with its own
initialisation seed, on one data order, `--steps` steps of `--batch` rows. Both ways run in this
process, one after the other, on the same configs:

- separate: each run trained alone (`train()`), reading (or streaming) its data itself;
- one pass: all N through `train_group()`, each batch read (or streamed) once.

Printed per N: wall time of each way and their ratio, beside the arithmetic limit from times
measured here: the data's cost per batch `r` (the loader alone over the same batches, or the
model's forward to the layer for the batch's windows) and each SAE's step `s_i` (timed alone on a
batch of the same rows: loss, backward, Adam):

    limit = sum_i (r + s_i) / (r + sum_i s_i)

and the fraction of that limit the one pass reaches (goal: at least 90 % at N = 4 and 8). Both
ways also pay per-run costs the limit leaves out (the input-scale sample, start-up), the same in
both. A warm-up run of one SAE goes first so that caches are full (its time is printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._machine import cpu_name  # noqa: E402


def configs(args, n: int, source):
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
    from msae_core.sae import MomentumConfig, SAEConfig

    if args.source == "stream":
        data = DataConfig(source="stream", model=args.model, layer=args.layer, corpus=args.corpus,
                          context_size=args.context, buffer_batches=args.buffer_batches)
    else:
        data = DataConfig(acts=args.acts)
    train = TrainConfig(steps=args.steps, batch_size=args.batch, lr=3e-4, warmup_steps=10, seed=0, device=args.device,
                        log_every=max(args.steps // 4, 1), checkpoint_every=args.steps, snapshot_every=0)
    out = []
    for i in range(n):
        arch = "topk" if i % 2 == 0 else "momentum"
        sae = SAEConfig(arch=arch, base="topk", d_in=0, d_sae=args.d_sae, k=args.k, seed=i,
                        momentum=MomentumConfig(lam=0.3))
        out.append(RunConfig(sae=sae, train=train, data=data))
    return out


def step_seconds(cfg, x_BD: torch.Tensor, reps: int = 6) -> float:
    """Seconds of one training step of `cfg`'s SAE on the batch `x_BD` (loss, backward, Adam), the
    median of `reps` after two untimed ones (momentum's table is not full here: its steady step
    costs a little more, bench/train_step.py)."""
    from msae_core.sae import build_sae

    sae = build_sae(dataclasses.replace(cfg.sae, d_in=x_BD.shape[1]))
    sae.fit_input_scale_(x_BD)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.train.lr)
    times = []
    for t in range(reps + 2):
        t0 = time.perf_counter()
        loss = sae.training_loss(x_BD, t)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.post_step_(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def data_seconds(args, cfg) -> tuple[float, torch.Tensor]:
    """Seconds per batch of the data alone: the loader over the run's batches (a store), or the
    model's forward to the layer over the windows one batch takes (a stream); and the first batch."""
    from msae_core.data.loader import BatchLoader

    _, source = cfg.check()
    loader = BatchLoader(source, cfg.train.batch_size, cfg.train.seed, 0, source.device if args.source == "stream"
                         else torch.device(args.device))
    try:
        first = loader.next(0).clone()  # the first batch: a stream's first fill (twice the buffer), not steady
        t0 = time.perf_counter()
        for s in range(1, args.steps):
            loader.next(s)
        return (time.perf_counter() - t0) / (args.steps - 1), first
    finally:
        loader.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", choices=["store", "stream"], default="store")
    ap.add_argument("--acts", default=str(REPO / "results" / "stores" / "gemma3-L6"))
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--corpus", default="embedded")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--buffer-batches", type=int, default=4)
    ap.add_argument("--n", default="1,4,8", help="group sizes")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", default="", help="streamed: also two runs at these two layers (e.g. 3,6), one "
                    "forward for both against a stream each")
    args = ap.parse_args()
    if args.source == "store" and not Path(args.acts, "manifest.json").is_file():
        sys.exit(f"no activation store at {args.acts}: harvest one (msae harvest --layer 6 --out {args.acts}) "
                 "or give --acts")

    import logging

    logging.disable(logging.WARNING)
    from msae_core.training.group import train_group
    from msae_core.training.trainer import train

    print(f"# sweep in one pass: {args.source} ({args.acts if args.source == 'store' else f'{args.model} L{args.layer}'}), "
          f"d_sae {args.d_sae}, k {args.k}, batch {args.batch}, {args.steps} steps; {cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="msae-bench-sweep-"))
    t0 = time.perf_counter()
    warm = configs(args, 1, None)[0]
    train(dataclasses.replace(warm, train=dataclasses.replace(warm.train, steps=4)), tmp / "warm", progress=False)
    print(f"# warm-up: one run of 4 steps, {time.perf_counter() - t0:.1f} s (model load, page cache)")
    r, x_BD = data_seconds(args, warm)
    step_of = {}
    print(f"# data alone: {r * 1e3:.0f} ms per batch ({'the loader' if args.source == 'store' else 'the stream: forward and buffer'})")
    print(f"{'N':>3} {'separate s':>11} {'one pass s':>11} {'ratio':>7} {'limit':>7} {'of limit':>9}   limit = sum(r + s_i) / (r + sum s_i)")
    for n in [int(v) for v in args.n.split(",")]:
        cfgs = configs(args, n, None)
        t0 = time.perf_counter()
        for i, c in enumerate(cfgs):
            assert train(c, tmp / f"sep{n}-{i}", progress=False).state == "done"
        separate = time.perf_counter() - t0
        for c in cfgs:
            if c.sae.arch not in step_of:
                step_of[c.sae.arch] = step_seconds(c, x_BD)
        steps = [step_of[c.sae.arch] for c in cfgs]
        t0 = time.perf_counter()
        results = train_group(cfgs, [tmp / f"one{n}-{i}" for i in range(n)], progress=False)
        one = time.perf_counter() - t0
        assert all(res.state == "done" for res in results)
        limit = sum(r + s for s in steps) / (r + sum(steps))
        ratio = separate / one
        print(f"{n:>3} {separate:>11.1f} {one:>11.1f} {ratio:>6.2f}x {limit:>6.2f}x {ratio / limit:>8.0%}   "
              f"r {r * 1e3:.0f} ms, s_i {', '.join(f'{s * 1e3:.0f}' for s in steps)} ms")
    if args.layers and args.source == "stream":
        two_layers(args, tmp, step_of.get("topk") or step_seconds(configs(args, 1, None)[0], x_BD))
    os.system(f"rm -rf {tmp}")


def two_layers(args, tmp: Path, s: float) -> None:
    """Two TopK runs at two layers: separate streams against one forward for both."""
    from msae_core.training.group import train_group
    from msae_core.training.trainer import train

    la, lb = (int(v) for v in args.layers.split(","))
    base = configs(args, 1, None)[0]
    at = {layer: dataclasses.replace(base, data=dataclasses.replace(base.data, layer=layer),
                                     sae=dataclasses.replace(base.sae, seed=i))
          for i, layer in enumerate((la, lb))}
    r = {layer: data_seconds(args, cfg)[0] for layer, cfg in at.items()}
    t0 = time.perf_counter()
    for layer, cfg in at.items():
        assert train(cfg, tmp / f"layer{layer}", progress=False).state == "done"
    separate = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert all(res.state == "done" for res in train_group(list(at.values()), [tmp / f"both{layer}" for layer in at],
                                                           progress=False))
    one = time.perf_counter() - t0
    limit = (sum(r.values()) + 2 * s) / (max(r.values()) + 2 * s)
    print(f"layers {la} and {lb}: separate {separate:.1f} s, one forward {one:.1f} s, {separate / one:.2f}x; "
          f"limit {limit:.2f}x = (r{la} + r{lb} + 2 s) / (r{max(la, lb)} + 2 s) with r{la} {r[la] * 1e3:.0f} ms, "
          f"r{lb} {r[lb] * 1e3:.0f} ms, s {s * 1e3:.0f} ms: {separate / one / limit:.0%} of the limit")


if __name__ == "__main__":
    main()
