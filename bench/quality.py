"""Reconstruction quality at equal settings: msae's TopK against SAELens's TopK on the same store.

    .venv/bin/msae harvest --tokens 300000 --out results/stores/gemma3-L6-300k
    .venv/bin/python bench/quality.py --acts results/stores/gemma3-L6-300k --held-out-shards 2 --peer-python /path/to/sae-lens-venv/bin/python
    .venv/bin/python bench/quality.py --acts STORE --shape research --device cuda   # gemma-2-2b's shape, on a GPU

Both train on the same rows in the same order (the store's own batch order, seed 0) with the same
d_sae, k, batch, lr and steps, and are scored on the same held-out rows: the store's last
`--held-out-shards` shards (whole context windows the training never sees). Printed side by side
with the ratio ours / SAELens:

- explained variance: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the held-out rows;
- MSE: mean over rows of ||x - x_hat||^2, in the store's units;
- L0: mean active latents per row;
- dead fraction: latents that fire on none of the held-out rows (the core eval's `frac_dead_features`
  on these rows), and rarely-firing ones (density below 1e-4) apart.

The SAELens variants are its own trainer (`SAETrainer`, SAELens 6) on its `TopKTrainingSAE`, fed the
same batches: "tuned" as the issue that asked for this benchmark set it up (input normalised to its
expected average norm, b_dec at the normalised data mean, `--warmup` lr warm-up steps), and "plain"
with SAELens's defaults (no normalisation, b_dec 0, no warm-up). Everything else (AuxK coefficient
1, its dead-feature window of 1,000 steps, gradient clipping at 1) is SAELens's default. SAELens
runs in this process when `sae_lens` imports, else in `--peer-python` (an interpreter with sae-lens;
it reads the store itself). `--variants` picks which rows to run.

Wall time per variant is printed too; it is not the point (bench/train_step.py compares step cost).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name -> (d_sae, k, batch, lr, steps)
    "cpu": (2048, 32, 1024, 3e-4, 2000),          # the setting on the embedded model
    "research": (16384, 64, 4096, 3e-4, 30_000),  # gemma-2-2b's research shape (GPU)
}
RARE_DENSITY = 1e-4
VARIANTS = ("msae", "saelens-tuned", "saelens-plain")


# ------------------------------------------------------------------------------------ the data
def split_store(src: str, n_held_shards: int, tmp: str) -> tuple[str, int, int]:
    """A training view of store `src` without its last `n_held_shards` shards: a folder in `tmp`
    whose manifest lists the other shards (the shard files are linked, not copied). Returns (its
    path, the first held-out row, the store's rows)."""
    from msae_core.artifacts import STORE_MANIFEST
    from msae_core.data.store import read_manifest

    m = read_manifest(src)
    if m is None:
        raise SystemExit(f"{src} holds no activation store")
    shards = m["shards"]
    if not 0 < n_held_shards < len(shards):
        raise SystemExit(f"the store has {len(shards)} shards: hold out between 1 and {len(shards) - 1}")
    keep = shards[:-n_held_shards]
    out = Path(tmp) / "train-view"
    out.mkdir()
    for s in keep:
        os.symlink(Path(src).resolve() / s["file"], out / s["file"])
    n_train = sum(s["rows"] for s in keep)
    view = {**m, "shards": keep, "n_rows": n_train, "n_windows": sum(s["windows"] for s in keep),
            "outliers": None, "complete": True}
    (out / STORE_MANIFEST).write_text(json.dumps(view))
    return str(out), n_train, int(m["n_rows"])


def held_out_rows(src: str, first: int, n_rows: int) -> torch.Tensor:
    from msae_core.data.store import ActivationStore

    return ActivationStore(src).rows(torch.arange(first, n_rows)).float()


@torch.no_grad()
def score(encode, decode, x_ND: torch.Tensor, chunk: int = 4096) -> dict:
    """Explained variance, MSE, L0 and dead / rare fractions of an SAE on rows x (raw units)."""
    sq_err = 0.0
    fired = None
    l0 = 0.0
    for i in range(0, len(x_ND), chunk):
        x = x_ND[i:i + chunk]
        f = encode(x)
        sq_err += float((x - decode(f)).pow(2).sum())
        active = f > 0
        l0 += float(active.sum())
        counts = active.sum(0).double()
        fired = counts if fired is None else fired + counts
    total = float((x_ND - x_ND.mean(0)).pow(2).sum())
    density = fired / len(x_ND)
    return {"explained_variance": 1 - sq_err / total, "mse": sq_err / len(x_ND), "l0": l0 / len(x_ND),
            "dead_fraction": float((density == 0).double().mean()),
            "rare_fraction": float(((density > 0) & (density < RARE_DENSITY)).double().mean()),
            "held_out_rows": len(x_ND)}


# ------------------------------------------------------------------------------------ msae
def run_msae(train_path: str, held: torch.Tensor, d_sae: int, k: int, batch: int, lr: float, steps: int,
             warmup: int | None, device: str, tmp: str, sae_set: dict | None = None, keep: str = "") -> dict:
    from msae_core.sae import SAEConfig
    from msae_core.sae_io import load_sae
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
    from msae_core.training.trainer import train

    tc = TrainConfig(steps=steps, batch_size=batch, lr=lr, seed=0, device=device, log_every=max(steps // 20, 1),
                     checkpoint_every=steps, snapshot_every=0)
    if warmup is not None:
        tc.warmup_steps = warmup
    sae_set = dict(sae_set or {})
    data = DataConfig(acts=train_path)
    for key in [k for k in sae_set if k.startswith(("train.", "data."))]:
        setattr(tc if key.startswith("train.") else data, key.split(".", 1)[1], sae_set.pop(key))
    cfg = RunConfig(sae=SAEConfig(arch="topk", d_sae=d_sae, k=k, seed=0, **sae_set), train=tc, data=data)
    out = Path(keep) if keep else Path(tmp) / "msae-run"
    t0 = time.perf_counter()
    res = train(cfg, out, progress=True)
    wall = time.perf_counter() - t0
    if res.state != "done":
        raise SystemExit(f"msae's run ended {res.state}")
    sae = load_sae(out).eval()
    row = score(sae.encode, sae.decode, held)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
    row.update(wall_s=wall, train_dead_latents=last.get("dead_features"),
               dead_window_tokens=sae.cfg.dead_tokens_threshold, warmup=tc.effective_warmup)
    return row


# ------------------------------------------------------------------------------------ SAELens
def run_saelens(train_view: str, held: torch.Tensor, d_sae: int, k: int, batch: int, lr: float,
                steps: int, warmup: int, tuned: bool, device: str) -> dict:
    """SAELens's own trainer on its TopK training SAE, fed the training view's batches in the order
    msae's trainer reads them (store.batch_raw(step, batch, seed 0))."""
    import sae_lens
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from msae_core.data.store import ActivationStore

    store = ActivationStore(train_view)
    n_norm = max(16_384 // batch, 1)  # msae fits its input scale on 16,384 rows: SAELens on as many

    def provider():
        s = 0
        while True:
            yield store.batch_raw(s, batch, 0).to(device).float()
            s += 1

    torch.manual_seed(0)  # SAELens initialises from the global RNG
    cfg = TopKTrainingSAEConfig(d_in=store.d_in, d_sae=d_sae, k=k, device=device, dtype="float32",
                                normalize_activations="expected_average_only_in" if tuned else "none")
    sae = TopKTrainingSAE(cfg)
    tcfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr,
                            lr_warm_up_steps=warmup if tuned else 0, device=device,
                            n_batches_for_norm_estimate=n_norm)
    if tuned:  # b_dec at the mean of the normalised inputs, as msae initialises its own
        sample = store.input_sample(16_384, 0).float()
        scale = store.d_in ** 0.5 / float(sample.norm(dim=1).mean())
        with torch.no_grad():
            sae.b_dec.copy_((sample * scale).mean(0).to(device))
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider())
    t0 = time.perf_counter()
    sae = trainer.fit()  # folds its input scaling into the weights: encode/decode take raw rows
    wall = time.perf_counter() - t0
    sae.eval()
    row = score(sae.encode, sae.decode, held.to(device))
    row.update(wall_s=wall, train_dead_latents=int(trainer.dead_neurons.sum()),
               dead_window_tokens=tcfg.dead_feature_window * batch, warmup=tcfg.lr_warm_up_steps,
               sae_lens_version=sae_lens.__version__)
    return row


def peer_worker(args: argparse.Namespace) -> None:
    held = torch.load(args.held_file, weights_only=True)
    out = {v: run_saelens(args.train_view, held, args.d_sae, args.k, args.batch, args.lr, args.steps,
                          args.warmup, v == "saelens-tuned", args.device)
           for v in args.variants.split(",")}
    print(json.dumps(out))


def saelens_rows(variants: list[str], args, train_view: str, held: torch.Tensor, shape: tuple, tmp: str) -> dict:
    if not variants:
        return {}
    d_sae, k, batch, lr, steps = shape
    try:
        import sae_lens  # noqa: F401

        return {v: run_saelens(train_view, held, d_sae, k, batch, lr, steps, args.warmup, v == "saelens-tuned",
                               args.device) for v in variants}
    except ImportError:
        if not args.peer_python:
            print("SAELens: not installed here (pip install -e .[bench], or --peer-python PY)")
            return {}
    held_file = os.path.join(tmp, "held.pt")
    torch.save(held, held_file)
    cmd = [args.peer_python, __file__, "--acts", args.acts, "--worker", "peer", "--train-view", train_view,
           "--held-file", held_file, "--d-sae", str(d_sae), "--k", str(k), "--batch", str(batch), "--lr", str(lr),
           "--steps", str(steps), "--warmup", str(args.warmup), "--variants", ",".join(variants),
           "--device", args.device]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # its progress bars show
    if res.returncode != 0:
        raise SystemExit("the SAELens worker failed (its error is above)")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ main
def print_table(rows: dict) -> None:
    keys = [("explained_variance", "held-out explained variance", "{:.4f}"), ("mse", "held-out MSE", "{:.4g}"),
            ("l0", "held-out L0", "{:.2f}"), ("dead_fraction", "dead on the held-out rows", "{:.3f}"),
            ("rare_fraction", f"firing on < {RARE_DENSITY:g} of them", "{:.3f}"),
            ("train_dead_latents", "dead in training at the end", "{}"),
            ("dead_window_tokens", "(silent this many tokens)", "{:,}"), ("warmup", "lr warm-up steps", "{}"),
            ("wall_s", "wall time, s", "{:.0f}")]
    names = list(rows)
    others = [n for n in names if n != "msae"]
    head = "| metric | " + " | ".join(names) + "".join(f" | msae / {n}" for n in others if "msae" in rows) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for key, label, fmt in keys:
        cells = [fmt.format(rows[n][key]) if rows[n].get(key) is not None else "-" for n in names]
        if "msae" in rows:
            for n in others:
                a, b = rows["msae"].get(key), rows[n].get(key)
                ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
                cells.append(f"{a / b:.3f}" if ok and key not in ("dead_window_tokens", "warmup") else "")
        print(f"| {label} | " + " | ".join(cells) + " |")
    v = next((r.get("sae_lens_version") for r in rows.values() if r.get("sae_lens_version")), None)
    if v:
        print(f"SAELens {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--acts", required=True, help="an activation store (msae harvest)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="override the shape's steps")
    ap.add_argument("--warmup", type=int, default=1000, help="lr warm-up steps of the tuned SAELens set-up")
    ap.add_argument("--held-out-shards", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--msae-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="an SAE config field of msae's run other than its default, e.g. auxk_coeff=0.1")
    ap.add_argument("--keep-run", default="", metavar="DIR", help="train msae's run into DIR and keep it")
    ap.add_argument("--peer-python", default=os.environ.get("MSAE_PEER_PYTHON", ""))
    ap.add_argument("--worker", choices=["peer"], help=argparse.SUPPRESS)
    ap.add_argument("--train-view", help=argparse.SUPPRESS)
    ap.add_argument("--held-file", help=argparse.SUPPRESS)
    ap.add_argument("--d-sae", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "peer":
        return peer_worker(args)
    shape = SHAPES[args.shape]
    if args.steps:
        shape = (*shape[:4], args.steps)
    d_sae, k, batch, lr, steps = shape
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant {bad[0]}: choose from {', '.join(VARIANTS)}")
    from _machine import cpu_name

    with tempfile.TemporaryDirectory(prefix="msae-quality-") as tmp:
        train_view, first, n_rows = split_store(args.acts, args.held_out_shards, tmp)
        held = held_out_rows(args.acts, first, n_rows)
        where = cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device))
        print(f"store {args.acts}: {first:,} training rows, {len(held):,} held-out rows (its last "
              f"{args.held_out_shards} shard(s)); d_sae {d_sae}, k {k}, batch {batch}, lr {lr}, {steps} steps "
              f"({steps * batch / first:.1f} epochs); {args.device}: {where}")
        rows = {}
        if "msae" in variants:
            rows["msae"] = run_msae(train_view, held, d_sae, k, batch, lr, steps, None, args.device, tmp,
                                    {kv.split("=", 1)[0]: json.loads(kv.split("=", 1)[1]) for kv in args.msae_set},
                                    args.keep_run)
        rows.update(saelens_rows([v for v in variants if v != "msae"], args, train_view, held, shape, tmp))
    print_table(rows)


if __name__ == "__main__":
    main()
