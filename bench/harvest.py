"""Harvest speed on the embedded Gemma 3 270M: early stop after block L versus the full forward.

Each mode runs in its own process (so its peak resident memory is its own), on the same windows of
the embedded corpus, after one warm-up batch:
  early    lm.resid_post(ids, L, stop_early=True)       blocks 0..L only
  body     lm.resid_post(ids, L, stop_early=False)      every block, no unembedding
  full     model(ids, output_hidden_states=True)        what a naive harvest does (with logits)
  harvest  msae_core.data.harvest.harvest end to end (tokenise, forward, drop special rows, write fp16)
Prints tokens/s, ratios against `full` from this one run, and peak RSS (ru_maxrss) per mode.

    python bench/harvest.py [--layer 6] [--batches 6] [--batch-size 8] [--context-size 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(mode: str, args: argparse.Namespace) -> dict:
    import itertools

    import torch

    from msae_core.data.lm import load_lm
    from msae_core.data.text import context_windows, load_corpus

    t0 = time.perf_counter()
    lm = load_lm("embedded", device="cpu")
    load_s = time.perf_counter() - t0
    rss_loaded = _peak_mb()
    if mode == "harvest":
        from msae_core.data.harvest import harvest
        from msae_core.data.store import StoreSettings

        n_tok = args.batches * args.batch_size * (args.context_size - 1)
        with tempfile.TemporaryDirectory() as d:
            s = StoreSettings(layer=args.layer, target_tokens=n_tok, context_size=args.context_size)
            t0 = time.perf_counter()
            store = harvest(s, d, batch_size=args.batch_size, lm=lm, progress=False)
            dt = time.perf_counter() - t0
            rows = store.n_rows
            max_abs = float(store.rows(torch.arange(rows)).abs().max())
        return {"mode": mode, "tokens": rows, "seconds": dt, "tok_s": rows / dt, "load_s": load_s,
                "peak_rss_mb": _peak_mb(), "rss_after_load_mb": rss_loaded, "max_abs_fp16": max_abs}
    wins = context_windows(load_corpus("embedded"), lm.tokenizer, args.context_size)
    batches = [torch.tensor([w for _, w in itertools.islice(wins, args.batch_size)])
               for _ in range(args.batches + 1)]

    def run(ids):
        if mode == "early":
            return lm.resid_post(ids, args.layer, stop_early=True)
        if mode == "body":
            return lm.resid_post(ids, args.layer, stop_early=False)
        return lm.model(ids, output_hidden_states=True, use_cache=False).hidden_states[args.layer + 1]

    max_abs = 0.0
    with torch.inference_mode():
        run(batches[0])  # warm-up
        t0 = time.perf_counter()
        for ids in batches[1:]:
            max_abs = max(max_abs, float(run(ids)[:, 1:].abs().max()))
        dt = time.perf_counter() - t0
    n = args.batches * args.batch_size * args.context_size
    return {"mode": mode, "tokens": n, "seconds": dt, "tok_s": n / dt, "load_s": load_s,
            "peak_rss_mb": _peak_mb(), "rss_after_load_mb": rss_loaded, "max_abs": max_abs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    import torch

    # make sure the embedded cache exists before timing anything
    subprocess.run([sys.executable, "-c", "from msae_core.data.lm import ensure_embedded as e; "
                    "e('model'); e('tokenizer')"], check=True)
    res = {}
    for mode in ("early", "body", "full", "harvest"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--layer", str(args.layer),
                              "--batches", str(args.batches), "--batch-size", str(args.batch_size),
                              "--context-size", str(args.context_size)],
                             check=True, capture_output=True, text=True).stdout
        res[mode] = json.loads(out.strip().splitlines()[-1])
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; embedded Gemma 3 270M float32 CPU, layer {args.layer}, "
          f"{args.batches} batches of {args.batch_size} x {args.context_size} tokens")
    print(f"cached model load: {res['early']['load_s']:.1f} s")
    print(f"{'mode':8s} {'tok/s':>9s} {'s/batch':>8s} {'vs full':>8s} {'peak RSS MB':>12s}")
    for mode in ("early", "body", "full", "harvest"):
        r = res[mode]
        n_batches = r["tokens"] / (args.batch_size * args.context_size)
        print(f"{mode:8s} {r['tok_s']:9.0f} {r['seconds'] / n_batches:8.2f} "
              f"{r['tok_s'] / res['full']['tok_s']:7.2f}x {r['peak_rss_mb']:12.0f}")
    print(f"early stop / full forward speed-up: {res['early']['tok_s'] / res['full']['tok_s']:.2f}x "
          f"(early / body without unembedding: {res['early']['tok_s'] / res['body']['tok_s']:.2f}x)")
    print(f"max |activation| at layer {args.layer}: {res['early']['max_abs']:.0f} "
          f"(float16 max 65504; stored fp16 max {res['harvest']['max_abs_fp16']:.0f})")


if __name__ == "__main__":
    main()
