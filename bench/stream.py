"""Streaming training against the model's forward alone and against harvest-then-train.

    .venv/bin/python bench/stream.py                      # embedded model, layer 6, 32 steps of 1024
    .venv/bin/python bench/stream.py --steps 32 --batch 2048

All on this machine's device, in one run, on the same model, layer, corpus and tokens:

- forward: the model up to block `layer` (early stop) over the windows the run consumes, rows kept
  as the stream keeps them: the ceiling of any streaming trainer;
- stream: `msae train --source stream` in-process (`train()`), timed from its first step to the end
  (model load and the input-scale sample excluded, said below);
- harvest + train: `harvest` of the same number of tokens into a store, then `train()` from it.

Printed: tokens/s of each and the ratios stream / forward (goal: at least 0.8 where the SAE step
costs less than the forward) and stream / (harvest + train). The stream's steady rate is taken
between its first and last metrics lines: before the first, the buffer's first fill (with the
input-scale sample, 16,384 rows) is forwarded, a cost paid once per run.
"""

from __future__ import annotations

import argparse
import itertools
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
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--corpus", default="embedded")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--buffer-batches", type=int, default=4)
    args = ap.parse_args()

    from msae_core.data.harvest import harvest, window_rows
    from msae_core.data.lm import load_lm
    from msae_core.data.store import StoreSettings
    from msae_core.data.text import context_windows, load_corpus
    from msae_core.devices import resolve_device
    from msae_core.sae import SAEConfig
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
    from msae_core.training.trainer import train

    dev = resolve_device("auto")
    t0 = time.perf_counter()
    lm = load_lm(args.model, device=dev, dtype="bfloat16" if dev.type == "cuda" else "float32")
    corpus = load_corpus(args.corpus)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, device {dev}, torch {torch.__version__}; "
          f"model {args.model} ({lm.d_model} wide, {lm.dtype}) loaded in {time.perf_counter() - t0:.0f} s")
    T, lm_batch = 128, 8
    special = torch.tensor(sorted(lm.special_ids), dtype=torch.long)
    tokens = 8 * args.batch  # enough forwards for a steady rate

    # forward alone, over the windows the stream reads (one warm-up forward first)
    windows = context_windows(corpus, lm.tokenizer, T, True)
    warm = list(itertools.islice(windows, lm_batch))
    window_rows(lm, torch.tensor([w for _, w in warm]), args.layer, 0, special)
    rows, t = 0, time.perf_counter()
    windows = context_windows(corpus, lm.tokenizer, T, True)
    while rows < tokens:
        batch = list(itertools.islice(windows, lm_batch))
        if not batch:
            break
        rows += len(window_rows(lm, torch.tensor([w for _, w in batch]), args.layer, 0, special).acts)
    fwd_s = time.perf_counter() - t
    fwd_tps = rows / fwd_s

    sae = SAEConfig(arch="topk", d_sae=args.d_sae, k=args.k)
    tc = dict(steps=args.steps, batch_size=args.batch, lr=3e-4, warmup_steps=10, seed=0, device=str(dev),
              log_every=max(1, args.steps // 4), checkpoint_every=10 ** 9, snapshot_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        # streaming, in-process with the model already loaded
        from msae_core.data.stream import ActivationStream, StreamSettings

        cfg = RunConfig(sae=sae, train=TrainConfig(**tc),
                        data=DataConfig(source="stream", model=args.model, corpus=args.corpus,
                                        layer=args.layer, buffer_batches=args.buffer_batches))
        st = ActivationStream(StreamSettings(model=args.model, layer=args.layer, corpus=args.corpus,
                                             buffer_batches=args.buffer_batches),
                              args.batch, 0, device=dev, lm=lm, corpus=corpus)
        t = time.perf_counter()
        res = train(cfg, Path(tmp) / "stream", progress=False, store=st)
        stream_s = time.perf_counter() - t
        assert res.state == "done", res.error
        stream_rows = args.steps * args.batch
        # steady state: between the first and the last metrics line (the buffer's first fill, which
        # holds the input-scale sample, comes before the first)
        from msae_core.runs.folder import metrics_rows

        m = metrics_rows(Path(tmp) / "stream")
        steady_tps = (m[-1]["step"] - m[0]["step"]) * args.batch / (m[-1]["time"] - m[0]["time"])
        warm_steps = m[0]["step"]

        # harvest the same number of rows, then train from the store
        t = time.perf_counter()
        store = harvest(StoreSettings(model=args.model, layer=args.layer, corpus=args.corpus,
                                      target_tokens=stream_rows, context_size=T),
                        Path(tmp) / "store", batch_size=lm_batch, progress=False, lm=lm, corpus=corpus)
        harvest_s = time.perf_counter() - t
        cfg = RunConfig(sae=sae, train=TrainConfig(**tc), data=DataConfig(acts=str(Path(tmp) / "store")))
        t = time.perf_counter()
        res = train(cfg, Path(tmp) / "stored", progress=False, store=store)
        train_s = time.perf_counter() - t
        assert res.state == "done", res.error

    print(f"\n{args.steps} steps of {args.batch} rows, TopK d_sae {args.d_sae}, k {args.k}, layer {args.layer}, "
          f"buffer {args.buffer_batches} batches:")
    print(f"  forward alone        {rows:7d} rows in {fwd_s:6.1f} s = {fwd_tps:8.1f} tokens/s")
    print(f"  stream (train)       {stream_rows:7d} rows in {stream_s:6.1f} s = {stream_rows / stream_s:8.1f} tokens/s "
          f"(includes the buffer's first fill of {args.buffer_batches} batches and the input-scale sample)")
    print(f"  harvest + train      {stream_rows:7d} rows in {harvest_s + train_s:6.1f} s "
          f"(harvest {harvest_s:.1f} s, train {train_s:.1f} s) = {stream_rows / (harvest_s + train_s):8.1f} tokens/s")
    print(f"  stream, steady      after step {warm_steps}: {steady_tps:8.1f} tokens/s")
    print(f"  stream steady / forward = {steady_tps / fwd_tps:.2f}x (goal >= 0.8); whole stream run / forward "
          f"= {stream_rows / stream_s / fwd_tps:.2f}x; stream / (harvest + train), whole runs = "
          f"{(harvest_s + train_s) / stream_s:.2f}x")


if __name__ == "__main__":
    main()
