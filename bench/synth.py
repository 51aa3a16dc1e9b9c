"""Every architecture against a synthetic ground truth: exact absorption, F1, MCC and explained
variance at matched L0, on one `msae synth` store (msae_core.data.synth, evals.synthetic).

Writes the store (default generator: 256 features in d 64, 8 hierarchies of depth 2 and branching
3, 32 correlated, the rest independent; 200k rows) into a temporary folder, or uses --store. Trains
TopK, BatchTopK, Matryoshka BatchTopK, JumpReLU (target L0), L1 (ReLU) and momentum over TopK at
two lambdas, each at d_sae `--d-sae` for `--steps` steps of `--batch-size` rows, with the same
seed, lr and schedule; k (and JumpReLU's target) is the store's true L0 rounded, L1's coefficient
is `--l1-coeff` (its L0 is printed: it is matched by choice of the coefficient, not by
construction). Each run is scored by the `synthetic` eval on 20,000 fresh rows.

Prints one row per run, and with --seeds N > 1 the mean and standard deviation over seeds (a
difference smaller than the spread is not resolved). Wall time is the training alone.

    .venv/bin/python bench/synth.py [--store DIR] [--steps 3000] [--seeds 1] [--only topk,matryoshka]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402

COLUMNS = [("absorption", ("absorption", "mean_absorption")), ("parent silent", ("absorption", "mean_parent_silent")),
           ("F1", ("classification", "f1")), ("matched F1", ("classification", "matched_f1")),
           ("MCC", ("recovery", "mcc")), ("recovered", ("recovery", "frac_recovered")),
           ("EV", ("reconstruction", "explained_variance")), ("L0", ("sparsity", "l0")),
           ("dead", ("sparsity", "frac_dead"))]


def variants(k: int, d_sae: int, l1: float) -> dict[str, dict]:
    widths = [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
    return {
        "topk": {"arch": "topk", "k": k},
        "batchtopk": {"arch": "batchtopk", "k": k},
        "matryoshka": {"arch": "matryoshka", "k": k, "matryoshka_widths": widths},
        "jumprelu": {"arch": "jumprelu", "target_l0": float(k)},
        "relu (L1)": {"arch": "relu", "l1_coeff": l1},
        "momentum lam 0.1": {"arch": "momentum", "base": "topk", "k": k, "lam": 0.1},
        "momentum lam 1.0": {"arch": "momentum", "base": "topk", "k": k, "lam": 1.0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="", help="a store written by msae synth (default: generate one)")
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the generated store")
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--l1-coeff", type=float, default=5.0)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of variant names (default: all)")
    args = ap.parse_args()

    import torch

    from msae_core.data import synth as S
    from msae_core.evals import run_evals
    from msae_core.sae import SAEConfig
    from msae_core.training.config import DataConfig, RunConfig, TrainConfig
    from msae_core.training.trainer import train

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp(prefix="msae-bench-synth-"))
    store = Path(args.store) if args.store else tmp / "store"
    if not args.store:
        S.synth(dataclasses.replace(S.SynthConfig(), rows=args.rows), store, progress=False)
    feats = S.load_features(store)
    true_l0 = float((S.load_row_truth(store, 0, feats.n_features) > 0).sum(1).float().mean())
    k = max(1, round(true_l0))
    chosen = variants(k, args.d_sae, args.l1_coeff)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        chosen = {n: v for n, v in chosen.items() if any(n.startswith(m) for m in names)}
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, no GPU used")
    print(f"store {store}: {feats.n_features} true features, true L0 {true_l0:.2f} -> k {k}; d_sae {args.d_sae}, "
          f"{args.steps} steps x {args.batch_size} rows, lr {args.lr}, seeds {args.seeds}")
    results: dict[str, list[dict]] = {}
    t0 = time.perf_counter()  # warm-up: the first run of a process pays for imports and kernels
    train(RunConfig(sae=SAEConfig(arch="topk", d_in=0, d_sae=args.d_sae, k=k),
                    train=TrainConfig(steps=50, batch_size=args.batch_size, device="cpu", checkpoint_every=10 ** 9),
                    data=DataConfig(acts=str(store))), tmp / "warm-up", progress=False)
    print(f"warm-up: 50 untimed TopK steps, {time.perf_counter() - t0:.1f} s")
    for seed in range(args.seeds):
        for name, sae_kw in chosen.items():
            cfg = RunConfig(sae=SAEConfig(d_in=0, d_sae=args.d_sae, seed=seed, **sae_kw),
                            train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                              warmup_steps=min(1000, args.steps // 10), seed=seed, device="cpu",
                                              log_every=max(1, args.steps // 10), checkpoint_every=10 ** 9,
                                              snapshot_every=0),
                            data=DataConfig(acts=str(store)))
            run = tmp / f"{name.replace(' ', '_')}-s{seed}"
            t0 = time.perf_counter()
            train(cfg, run, progress=False)
            wall = time.perf_counter() - t0
            m = run_evals(run, "synthetic", progress=False)["synthetic"]["eval_result_metrics"]
            row = {label: m[g][key] for label, (g, key) in COLUMNS}
            row["train s"] = wall
            results.setdefault(name, []).append(row)
            print(f"  done {name} seed {seed}: " + ", ".join(f"{c} {row[c]:.3f}" for c in ("absorption", "F1", "EV", "L0")),
                  flush=True)
    labels = [c for c, _ in COLUMNS] + ["train s"]
    print()
    print("| run | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for name, rows in results.items():
        cells = []
        for c in labels:
            vals = [r[c] for r in rows if r[c] is not None]
            if not vals:
                cells.append("-")
            elif len(vals) > 1:
                cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}")
            else:
                cells.append(f"{vals[0]:.1f}" if c == "train s" else f"{vals[0]:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    base = results.get("topk")
    if base:
        t = statistics.mean(r["train s"] for r in base)
        print("\ntraining time relative to topk: " + ", ".join(
            f"{n} {statistics.mean(r['train s'] for r in rows) / t:.2f}x" for n, rows in results.items()))
    print("absorption: exact, lower is better (fraction of a parent's co-firings with a child where the "
          "parent's latent is silent and the child's latents carry it); F1, MCC, EV: higher is better")


if __name__ == "__main__":
    main()
