"""Activation-store loader: batches per second against what a training step consumes.

    .venv/bin/python bench/loader.py                    # B 4096, D 2304, float16 store of 2^18 rows
    .venv/bin/python bench/loader.py --rows 131072 --batches 40

Every figure is measured in this one run on one synthetic float16 store (shards of 16,384 rows, as
a harvest writes them at D 2304):

- base: the trainer's read before the loader, a per-row numpy gather of the batch's rows then
  float16 -> float32 (`store.rows`, still the path for rows in any order);
- sync: `store.batch` on the training thread (gather + float16 -> float32 on the CPU, a fresh tensor
  each batch);
- gather: `store.batch_raw`, the float16 gather alone: the loader thread's work on a CUDA machine,
  where the conversion happens on the GPU;
- prefetched: BatchLoader delivering float32 CPU batches (reused buffers) to a consumer that does
  nothing else;
- overlap: a fixed CPU stand-in step (a matmul of about the sync batch's time) fed sync and then
  prefetched; the prefetched loop hides the loader's time behind the step as far as 2 cores allow;
- warm: the store in the page cache (read once before); cold: its pages dropped first
  (posix_fadvise DONTNEED per shard, which needs no privileges), full shuffle and block shuffle
  (FULL_SHUFFLE_ROWS lowered so the block order of a 500M-row store is used).

The H100 step rate is derived, not measured (no GPU here): FLOPs and bytes of a TopK step, with
the arithmetic printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import cpu_name  # noqa: E402
from msae_core.data import store as S  # noqa: E402
from msae_core.data.loader import BatchLoader  # noqa: E402

H100_BF16_FLOPS = 989e12     # dense bf16 tensor-core peak, H100 SXM
H100_HBM_BYTES = 3.35e12     # HBM3 bandwidth
MFU = 0.5                    # the fraction of peak a well-tuned SAE step reaches (assumed)


def make_store(path: Path, rows: int, d: int, shard_rows: int = 16_384) -> None:
    """A store of random float16 rows written directly (shards + manifest; no model)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shards = []
    for i, lo in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - lo)
        name = f"shard_{i:05d}.safetensors"
        acts = torch.randn(n, d, generator=g).to(torch.float16)
        save_file({"acts": acts, "token_ids": torch.zeros(n, dtype=torch.int32),
                   "window_ids": torch.arange(lo, lo + n), "positions": torch.zeros(n, dtype=torch.int32),
                   "windows": torch.zeros(1, 2, dtype=torch.int32), "window_index": torch.tensor([i]),
                   "doc_ids": torch.tensor([i])}, str(path / name))
        shards.append({"file": name, "rows": n, "windows": 1, "first_window": i})
    settings = S.StoreSettings(model="bench", layer=0, target_tokens=rows, context_size=2)
    import dataclasses
    manifest = {"format": S.STORE_FORMAT, "msae_version": "bench", **dataclasses.asdict(settings),
                "d_model": d, "tokenizer": "bench", "bos_token_id": 0, "settings_hash": settings.settings_hash(),
                "n_rows": rows, "n_windows": len(shards), "complete": True, "shards": shards}
    (path / "manifest.json").write_text(json.dumps(manifest))


def drop_cache(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def rate(fn, n: int) -> float:
    """Batches per second of n calls of fn(i)."""
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t)


def h100_steps_per_s(B: int, D: int, F: int, k: int) -> tuple[float, float, list[str]]:
    """Derived H100 step rate of a TopK SAE step (dense and sparse decoder), with the arithmetic."""
    lines = []
    dense = 12 * B * D * F                       # enc + dec forward 4BDF, backward 2x that
    sparse = 4 * B * D * F + 12 * B * k * D      # encoder fwd + W_enc grad; decoder on k rows
    adam_bytes = 2 * F * D * 4 * 7               # W_enc, W_dec: param, grad, m, v (read) + param, m, v (write)
    t_mem = adam_bytes / H100_HBM_BYTES
    out = []
    for name, flops in (("dense decoder", dense), ("sparse decoder", sparse)):
        t = flops / (MFU * H100_BF16_FLOPS) + t_mem
        lines.append(f"  {name}: {flops / 1e12:.2f} TFLOP / ({MFU:.0%} x {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s) "
                     f"+ Adam {adam_bytes / 1e9:.2f} GB / {H100_HBM_BYTES / 1e12:.2f} TB/s = {t * 1e3:.2f} ms "
                     f"-> {1 / t:.0f} steps/s")
        out.append(1 / t)
    return out[0], out[1], lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1 << 18)
    ap.add_argument("--d", type=int, default=2304)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--dir", default=None, help="where to write the synthetic store (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    B, D, n = args.batch, args.d, args.batches
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    path = Path(tmp.name) / "store"
    t0 = time.perf_counter()
    make_store(path, args.rows, D)
    gb = args.rows * D * 2 / 1e9
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, no GPU: H100 figures derived")
    print(f"store: {args.rows} rows x D {D} float16 = {gb:.2f} GB in {len(list(path.glob('*.safetensors')))} shards "
          f"(written in {time.perf_counter() - t0:.0f} s); batch {B} = {B * D * 2 / 1e6:.1f} MB float16")

    results: dict[str, float] = {}
    for order in ("full shuffle", "block shuffle"):
        if order == "block shuffle":
            S.FULL_SHUFFLE_ROWS = 0
        st = S.ActivationStore(path)
        warm(path)
        st.batch(0, B, seed=1)  # tables and first mappings: warm-up
        t_w = time.perf_counter()
        results[f"base warm, {order}"] = rate(
            lambda i: st.rows(st.batch_indices(i + 1, B, seed=1)), n)
        results[f"sync warm, {order}"] = rate(lambda i: st.batch(i + 1, B, seed=1), n)
        results[f"gather warm, {order}"] = rate(lambda i: st.batch_raw(i + 1, B, seed=1), n)
        with BatchLoader(st, B, seed=1, start_step=1) as loader:
            loader.next(1)
            results[f"prefetched warm, {order}"] = rate(lambda i: loader.next(i + 2), n)
        drop_cache(path)
        st = S.ActivationStore(path)
        results[f"sync cold, {order}"] = rate(lambda i: st.batch(i + 1, B, seed=2), max(4, n // 3))
        drop_cache(path)
        st = S.ActivationStore(path)
        with BatchLoader(st, B, seed=2, start_step=1) as loader:
            results[f"prefetched cold, {order}"] = rate(lambda i: loader.next(i + 1), max(4, n // 3))
        print(f"  ({order}: warm-up 1 batch, measured over {n} warm batches in {time.perf_counter() - t_w:.0f} s)")

    # overlap: a stand-in step of about one sync batch's time, fed both ways
    S.FULL_SHUFFLE_ROWS = 1 << 23
    st = S.ActivationStore(path)
    warm(path)
    x = st.batch(0, B, seed=3)
    W = torch.randn(D, 64)
    target = 1 / results["sync warm, full shuffle"]
    reps = max(1, round(target / _time(lambda: x @ W)))

    def step(xb: torch.Tensor) -> None:
        for _ in range(reps):
            xb @ W

    step_rate = rate(lambda i: step(x), n)
    sync_loop = rate(lambda i: step(st.batch(i + 1, B, seed=3)), n)
    with BatchLoader(st, B, seed=3, start_step=1) as loader:
        pre_loop = rate(lambda i: step(loader.next(i + 1)), n)

    print("\nbatches/s on this CPU (B %d, D %d):" % (B, D))
    for k, v in results.items():
        print(f"  {k:32s} {v:7.1f}")
    for order in ("full shuffle", "block shuffle"):
        base = results[f"base warm, {order}"]
        print(f"  {order}: prefetched / base {results[f'prefetched warm, {order}'] / base:.2f}x, "
              f"float16 gather / base {results[f'gather warm, {order}'] / base:.2f}x (warm)")
    print(f"\noverlap, a stand-in step alone {step_rate:.1f}/s: sync loop {sync_loop:.1f}/s, "
          f"prefetched loop {pre_loop:.1f}/s -> prefetched / sync = {pre_loop / sync_loop:.2f}x")
    for F in (16384, 65536):
        dense, sparse, lines = h100_steps_per_s(B, D, F, 64)
        print(f"\nderived H100 TopK step, F {F}, D {D}, B {B}, k 64 (no GPU here: arithmetic):")
        print("\n".join(lines))
        for name, need in (("dense", dense), ("sparse", sparse)):
            best = max(results["gather warm, block shuffle"], results["prefetched warm, block shuffle"])
            print(f"  loader (float16 gather, warm, block shuffle) / {name} step rate: {best:.1f} / {need:.0f} "
                  f"= {best / need:.3f}x (goal 5x)")
    tmp.cleanup()


def _time(fn, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


if __name__ == "__main__":
    main()
