"""Eval speed on the embedded Gemma 3 270M: tokens/s of the core eval, wall time of absorption.

Without --run it makes its own small run in a temporary folder: harvests `--tokens` rows of layer
`--layer` of the embedded corpus and trains a TopK SAE (`--d-sae`, `--k`) for `--steps` steps with
msae_core.training.trainer.train. With --run it evaluates that finished run. Nothing is written into a run:
the evals' results are computed and dropped.

Rows, all from this one run:
  forward          one plain LM forward with logits (tokens/s), the unit the KL/CE part pays 3 times
  core: KL/CE      the reconstruction batches: clean, SAE-spliced and zero-ablated forwards
  core: sparsity   the remaining sparsity/variance batches (forwards stop after the layer)
  core: total      the whole core eval with its defaults (or --core-set), LM already loaded
  absorption       msae_core.evals.absorption.run wall time with its defaults (or --absorption-set)

    .venv/bin/python bench/eval.py [--run RUN] [--layer 6] [--tokens 20000] [--steps 200]
        [--core-set FIELD=VALUE ...] [--absorption-set FIELD=VALUE ...] [--no-absorption]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402


def _sets(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def make_run(root: Path, args: argparse.Namespace, lm) -> tuple[Path, dict]:
    """Harvest a small store and train a small TopK run under `root`; returns (run, timings)."""
    from msae_core.data.harvest import harvest
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
    from msae_core.sae import SAEConfig
    from msae_core.data.store import StoreSettings
    from msae_core.training.trainer import train

    t0 = time.perf_counter()
    dtype = "float32" if args.layer >= 9 else "float16"  # Gemma 3 270M exceeds fp16 from layer ~9
    harvest(StoreSettings(layer=args.layer, target_tokens=args.tokens, dtype=dtype), root / "store",
            lm=lm, progress=False)
    t1 = time.perf_counter()
    cfg = RunConfig(sae=SAEConfig(arch="topk", d_in=0, d_sae=args.d_sae, k=args.k),
                    train=TrainConfig(steps=args.steps, batch_size=1024, lr=1e-3, warmup_steps=20,
                                      device="cpu", log_every=50, checkpoint_every=10_000, snapshot_every=0),
                    data=DataConfig(acts=str(root / "store")))
    result = train(cfg, root / "run", progress=False)
    if result.state != "done":
        raise SystemExit(f"training the benchmark run ended {result.state}")
    return root / "run", {"harvest_s": t1 - t0, "train_s": time.perf_counter() - t1}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a finished run folder (default: make a small one in a temp folder)")
    p.add_argument("--layer", type=int, default=6, help="layer of the self-made run (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=20_000, help="rows harvested for it (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="its training steps (default: %(default)s)")
    p.add_argument("--d-sae", type=int, default=2048, help="its dictionary size (default: %(default)s)")
    p.add_argument("--k", type=int, default=32, help="its TopK k (default: %(default)s)")
    p.add_argument("--core-set", action="append", metavar="FIELD=VALUE", help="core Config override")
    p.add_argument("--absorption-set", action="append", metavar="FIELD=VALUE",
                   help="absorption Config override")
    p.add_argument("--no-absorption", action="store_true", help="skip the absorption timing")
    args = p.parse_args()

    import torch

    from msae_core.evals import core
    from msae_core.evals.context import open_run
    from msae_core.data.lm import load_lm

    load_avg = os.getloadavg()
    tmp = None
    made: dict = {}
    t0 = time.perf_counter()
    if args.run:
        run = Path(args.run)
        ctx = open_run(run, device="cpu", progress=False)
        lm = load_lm(ctx.model_name, device="cpu")
    else:
        lm = load_lm("embedded", device="cpu")
    load_s = time.perf_counter() - t0
    if not args.run:
        tmp = tempfile.TemporaryDirectory(prefix="msae-bench-eval-")
        run, made = make_run(Path(tmp.name), args, lm)
        ctx = open_run(run, device="cpu", progress=False)
    ctx.lm = lm

    # one plain forward with logits, on a window of the corpus
    from msae_core.data.text import context_windows, load_corpus

    cfg = core.Config(**_sets(args.core_set))
    ctx_size = cfg.context_size or ctx.context_size
    wins = context_windows(load_corpus(ctx.corpus_name), lm.tokenizer, ctx_size)
    ids = torch.tensor([next(wins)[1] for _ in range(cfg.batch_size_prompts)])
    lm.logits_with_hook(ids[:1, :8], ctx.layer)  # warm-up
    t = time.perf_counter()
    lm.logits_with_hook(ids, ctx.layer)
    fwd_s = time.perf_counter() - t

    res = core.run(ctx, cfg)
    sec = res["eval_result_unstructured"]["seconds"]
    tok = res["eval_result_metrics"]["token_stats"]
    n_rec, n_sv = tok["total_tokens_eval_reconstruction"], tok["total_tokens_eval_sparsity_variance"]
    n_sv_only = n_sv - min(n_sv, n_rec)  # the first batches reuse the KL/CE forwards' activations
    un = res["eval_result_unstructured"]
    # the density window's own forwards (kept tokens: BOS and EOS positions are not counted)
    n_density_only = un.get("kept_tokens_feature_density", 0) - un["kept_tokens_sparsity_variance"]

    rows = [("forward (logits)", ids.numel(), fwd_s),
            ("core: KL/CE", n_rec, sec["reconstruction"]),
            ("core: sparsity", n_sv_only, sec["sparsity_variance"]),
            ("core: density", n_density_only, sec.get("feature_density", 0.0)),
            ("core: total", n_rec + n_sv_only + n_density_only, sec["total"])]
    absorption_row = None
    if not args.no_absorption:
        try:
            from msae_core.evals import absorption
        except ImportError as exc:
            absorption_row = f"not available ({exc})"
        else:
            t = time.perf_counter()
            try:
                ares = absorption.run(ctx, absorption.Config(**_sets(args.absorption_set)))
                m = ares["eval_result_metrics"].get("mean", {})
                absorption_row = (f"{time.perf_counter() - t:.1f} s, mean_absorption_fraction_score "
                                  f"{m.get('mean_absorption_fraction_score')}")
            except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not stop
                absorption_row = f"failed after {time.perf_counter() - t:.1f} s: {exc}"

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load average at start {load_avg[0]:.2f} (other processes share these cores)")
    print(f"run: {'given ' + str(run) if args.run else 'self-made'} ({ctx.model_name}, layer {ctx.layer}, "
          f"{ctx.sae.cfg.arch} d_sae {ctx.sae.cfg.d_sae}), context {ctx_size}, "
          f"batch_size_prompts {cfg.batch_size_prompts}")
    print(f"LM load {load_s:.1f} s" + "".join(f", {k.removesuffix('_s')} {v:.1f} s" for k, v in made.items())
          + f", core setup (corpus, windows) {sec['setup']:.1f} s")
    print(f"{'':18s} {'tokens':>8s} {'seconds':>8s} {'tokens/s':>9s}")
    for name, n, s in rows:
        print(f"{name:18s} {n:8d} {s:8.2f} {n / s if s > 0 else float('nan'):9.1f}")
    if n_rec and sec["reconstruction"] > 0:
        print(f"KL/CE tokens/s over plain-forward tokens/s: {(n_rec / sec['reconstruction']) / (ids.numel() / fwd_s):.2f}"
              " (3 forwards per token: about 0.33 expected)")
    if absorption_row is not None:
        print(f"absorption: {absorption_row}")
    m = res["eval_result_metrics"]
    print(f"core numbers: kl_div_score {m['model_behavior_preservation']['kl_div_score']:.4f}, "
          f"ce_loss_score {m['model_performance_preservation']['ce_loss_score']:.4f}, "
          f"explained_variance {m['reconstruction_quality']['explained_variance']:.4f}, "
          f"l0 {m['sparsity']['l0']:.1f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
