"""Every architecture against a synthetic ground truth, with training seeds as replicates and the
momentum SAE's differences to its base paired by seed (msae_core.data.synth, evals.synthetic,
inspect.groups).

Stores (`--stores`, both by default; or --store DIR): `default`, the generator's defaults (256
features in d 64, 8 hierarchies of depth 2 and branching 3, 32 correlated, the rest independent;
200k rows), and `deep` (512 features in d 128, 5 hierarchies of depth 3 and branching 4, 32
correlated; 200k rows). Trains TopK, BatchTopK, Matryoshka BatchTopK, JumpReLU (target L0), L1
(ReLU), momentum over TopK at lam 0.1, 0.3 and 1.0 and momentum over Matryoshka at lam 0.3, each at
d_sae `--d-sae` (default 2 x the store's features) for `--steps` steps of `--batch-size` rows,
with `--seeds` training seeds (each seed its own init and batch order, the same seeds for every
method); k is the store's true L0 rounded. The thresholded ones (BatchTopK, Matryoshka, JumpReLU)
are evaluated at that L0 too (`@ L0 k`: msae eval --target-l0, their inference threshold set on
held-out rows), so that every method is also compared at matched L0; L1's L0 is what its
coefficient gives. Each run is scored by the `synthetic` eval on 20,000 fresh rows.

Prints, per store, each method's mean [95 % t interval over the seeds] and each momentum setting's
paired difference to its base (same-seed pairs, the t interval of the differences, the verdict).

    .venv/bin/python bench/synth.py [--stores default,deep] [--seeds 3] [--steps 3000] [--only topk,momentum]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402
from msae_core.sae import MomentumConfig  # noqa: E402

# (label, workbench key in the run's summary) of the table's columns
COLUMNS = [("absorbed", "synth_absorption"), ("lost", "synth_lost"), ("kept", "synth_kept"), ("F1", "synth_f1"),
           ("MCC", "synth_mcc"), ("EV", "synth_explained_variance"), ("L0", "synth_l0")]
STORES = {
    "default": {},
    "deep": {"n_features": 512, "d_model": 128, "n_trees": 5, "depth": 3, "branching": 4, "n_correlated": 32},
}
THRESHOLDED = ("batchtopk", "matryoshka", "jumprelu")


def variants(k: int, d_sae: int, l1: float) -> dict[str, dict]:
    widths = [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
    mom = {"arch": "momentum", "base": "topk", "k": k}
    return {
        "topk": {"arch": "topk", "k": k},
        "batchtopk": {"arch": "batchtopk", "k": k},
        "matryoshka": {"arch": "matryoshka", "k": k, "matryoshka_widths": widths},
        "jumprelu": {"arch": "jumprelu", "target_l0": float(k)},
        "relu (L1)": {"arch": "relu", "l1_coeff": l1},
        "momentum lam 0.1": {**mom, "momentum": MomentumConfig(lam=0.1)},
        "momentum lam 0.3": {**mom, "momentum": MomentumConfig(lam=0.3)},
        "momentum lam 1.0": {**mom, "momentum": MomentumConfig(lam=1.0)},
        "momentum/matryoshka lam 0.3": {"arch": "momentum", "base": "matryoshka", "k": k,
                                        "momentum": MomentumConfig(lam=0.3),
                                        "matryoshka_widths": widths},
    }


# each momentum setting and the base it is compared with, seed by seed
PAIRS = [("momentum lam 0.1", "topk"), ("momentum lam 0.3", "topk"), ("momentum lam 1.0", "topk"),
         ("momentum/matryoshka lam 0.3", "matryoshka")]


def fmt(g: dict) -> str:
    if g["mean"] is None:
        return "-"
    ci = f" [{g['ci_low']:.3f}, {g['ci_high']:.3f}]" if g["ci_low"] is not None else ""
    return f"{g['mean']:.3f}{ci}"


def run_store(name: str, store: Path, tmp: Path, args: argparse.Namespace) -> None:
    import pandas as pd
    import torch

    from msae_core.data import synth as S
    from msae_core.evals import run_evals
    from msae_core.evals.summary import summarize
    from msae_core.inspect.groups import group_score, paired_difference
    from msae_core.sae import SAEConfig
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
    from msae_core.training.trainer import train

    feats = S.load_features(store)
    true_l0 = float((S.load_row_truth(store, 0, feats.n_features) > 0).sum(1).float().mean())
    k = max(1, round(true_l0))
    d_sae = args.d_sae or 2 * feats.n_features
    cfg_s = S.synth_config(S.read_manifest(store))
    chosen = variants(k, d_sae, args.l1_coeff)
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        chosen = {n: v for n, v in chosen.items() if any(n.startswith(m) for m in names)}
    print(f"\n## store {name}: {store}")
    print(f"{feats.n_features} true features in d {cfg_s.d_model} ({cfg_s.n_trees} hierarchies of depth "
          f"{cfg_s.depth} and branching {cfg_s.branching}, {cfg_s.n_correlated} correlated), {cfg_s.rows} rows, "
          f"true L0 {true_l0:.2f} -> k {k}; d_sae {d_sae}, {args.steps} steps x {args.batch_size} rows, lr {args.lr}, "
          f"seeds {args.seeds}", flush=True)
    rows = []
    t_all = time.perf_counter()
    for seed in range(args.seeds):
        for vname, sae_kw in chosen.items():
            cfg = RunConfig(sae=SAEConfig(d_in=0, d_sae=d_sae, seed=seed, **sae_kw),
                            train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                              warmup_steps=min(1000, args.steps // 10), seed=seed, device="cpu",
                                              log_every=max(1, args.steps // 10), checkpoint_every=10 ** 9,
                                              snapshot_every=0),
                            data=DataConfig(acts=str(store)))
            run = tmp / f"{name}-{vname.replace(' ', '_').replace('/', '-')}-s{seed}"
            t0 = time.perf_counter()
            train(cfg, run, progress=False)
            wall = time.perf_counter() - t0
            m = summarize(run_evals(run, "synthetic", progress=False))
            rows.append({"method": vname, "seed": seed, "train_s": wall, **m})
            if sae_kw["arch"] in THRESHOLDED:  # the same run at the store's true L0
                mm = summarize(run_evals(run, "synthetic", progress=False, target_l0=float(k)))
                rows.append({"method": f"{vname} @ L0 {k}", "seed": seed, "train_s": wall, **mm})
            print(f"  done {vname} seed {seed} ({wall:.0f} s): absorbed {m.get('synth_absorption', float('nan')):.3f}, "
                  f"lost {m.get('synth_lost', float('nan')):.3f}, EV {m.get('synth_explained_variance', float('nan')):.3f}, "
                  f"L0 {m.get('synth_l0', float('nan')):.2f}", flush=True)
    df = pd.DataFrame(rows)
    print(f"\n{len(rows)} evaluated runs in {(time.perf_counter() - t_all) / 60:.1f} min "
          "(training and evals; the times are not a speed benchmark: bench/train_step.py is)\n")
    print("| method | n | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for method, sub in df.groupby("method", sort=False):
        cells = [fmt(group_score(sub, key)) for _, key in COLUMNS]
        print(f"| {method} | {len(sub)} | " + " | ".join(cells) + " |")
    print("\nPaired by seed (difference, 95 % t interval of the same-seed differences, verdict):\n")
    print("| momentum setting | against | " + " | ".join(c for c, _ in COLUMNS if c != "L0") + " |")
    print("|---|---|" + "---|" * (len(COLUMNS) - 1))
    for a, b in PAIRS:
        if a not in set(df["method"]) or b not in set(df["method"]):
            continue
        cells = []
        for _, key in COLUMNS:
            if key == "synth_l0":
                continue
            d = paired_difference(group_score(df[df["method"] == a], key), group_score(df[df["method"] == b], key))
            if d["diff"] is None:
                cells.append("-")
                continue
            ci = (f" [{d['diff_ci_low']:+.3f}, {d['diff_ci_high']:+.3f}]" if d["diff_ci_low"] is not None else "")
            cells.append(f"{d['diff']:+.3f}{ci} {d['verdict']}")
        print(f"| {a} | {b} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", default="default,deep", help=f"generated stores: {', '.join(STORES)}")
    ap.add_argument("--store", default="", help="a store written by msae synth instead")
    ap.add_argument("--rows", type=int, default=200_000, help="rows of a generated store")
    ap.add_argument("--d-sae", type=int, default=0, help="default: twice the store's true features")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--l1-coeff", type=float, default=5.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma list of method name prefixes (default: all)")
    args = ap.parse_args()

    import torch

    from msae_core.data import synth as S

    tmp = Path(tempfile.mkdtemp(prefix="msae-bench-synth-"))
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, no GPU used")
    if args.store:
        run_store("given", Path(args.store), tmp, args)
        return
    for name in [n.strip() for n in args.stores.split(",") if n.strip()]:
        if name not in STORES:
            raise SystemExit(f"unknown store {name!r}: {', '.join(STORES)}")
        store = tmp / f"store-{name}"
        S.synth(dataclasses.replace(S.SynthConfig(), rows=args.rows, **STORES[name]), store, progress=False)
        run_store(name, store, tmp, args)
    print("\nabsorbed: a parent's co-firings with a child where its own latent is silent (below a tenth of "
          "its magnitude) and the children's latents carry it; lost: neither carries it; kept: its own "
          "latent does (they sum to 1; lower absorbed and lost are better); F1, MCC, EV: higher is better")


if __name__ == "__main__":
    main()
