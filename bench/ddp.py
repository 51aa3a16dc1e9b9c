"""Two-rank data-parallel training (torchrun, gloo on the CPU) against one process.

    .venv/bin/python bench/ddp.py                     # D 640, F 4096, global batch 2048, 24 steps

Both train the same TopK SAE on the same synthetic store with the same global batch and seed, each
as a `msae train` command line (`torchrun --standalone --nproc_per_node 2 -m msae_core.cli train`
for the two ranks); the step time is read from each run's metrics.jsonl (steps after the first
metrics line, so start-up and the first batches are left out). On this 2-core CPU the two ranks
share the cores a single process already uses, so this is a correctness run more than a speed
figure: it shows what the gradient all-reduce and the tracker's gather cost here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._machine import cpu_name  # noqa: E402


def make_store(path: Path, rows: int, d: int) -> None:
    from msae_core.data.store import StoreSettings, StoreWriter

    g = torch.Generator().manual_seed(0)
    w = StoreWriter(path, StoreSettings(model="bench", layer=0, target_tokens=rows, dtype="float32", context_size=8),
                    {"d_model": d, "tokenizer": "bench", "bos_token_id": 1})
    dirs = torch.randn(256, d, generator=g)
    codes = torch.rand(rows, 256, generator=g) * (torch.rand(rows, 256, generator=g) < 0.05)
    acts = codes @ dirs + 0.05 * torch.randn(rows, d, generator=g)
    n_win = rows // 8
    w.write_shard(acts, torch.zeros(rows, dtype=torch.int32), torch.arange(n_win).repeat_interleave(8),
                  torch.arange(8).repeat(n_win), torch.zeros(n_win, 8, dtype=torch.int32),
                  torch.arange(n_win), torch.arange(n_win))
    w.finish()


def step_time(run: Path) -> float:
    from msae_core.runs.folder import metrics_rows

    m = metrics_rows(run)
    return (m[-1]["time"] - m[0]["time"]) / (m[-1]["step"] - m[0]["step"])


def main() -> None:
    from msae_core.sae import SAEConfig
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig

    D, F, B, steps = 640, 4096, 2048, 24
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_store(tmp / "store", 65_536, D)
        results = {}
        for arch in ("topk", "momentum"):
            cfg = RunConfig(sae=SAEConfig(arch=arch, base="topk", d_sae=F, k=32, lam=0.3),
                            train=TrainConfig(steps=steps, batch_size=B, seed=0, device="cpu", log_every=6,
                                              checkpoint_every=10 ** 6, snapshot_every=0, warmup_steps=5),
                            data=DataConfig(acts=str(tmp / "store")))
            cfg.save(tmp / f"{arch}.json")
            env = {**os.environ}
            one = [sys.executable, "-m", "msae_core.cli", "train", "--config", str(tmp / f"{arch}.json"),
                   "--out", str(tmp / f"{arch}-1"), "--no-progress"]
            two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "msae_core.cli", "train", "--config", str(tmp / f"{arch}.json"),
                   "--out", str(tmp / f"{arch}-2"), "--no-progress"]
            subprocess.run(one, cwd=REPO, env=env, check=True, capture_output=True)
            subprocess.run(two, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
            results[arch] = (step_time(tmp / f"{arch}-1"), step_time(tmp / f"{arch}-2"))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}; gloo")
    print(f"D {D}, F {F}, k 32, global batch {B}, {steps} steps; step time after the first metrics line:")
    for arch, (t1, t2) in results.items():
        print(f"  {arch:8s} one process {t1 * 1e3:7.1f} ms, two ranks (1 thread each) {t2 * 1e3:7.1f} ms: "
              f"two / one = {t2 / t1:.2f}x")


if __name__ == "__main__":
    main()
