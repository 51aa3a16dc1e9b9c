"""Two-rank data-parallel training (torchrun, gloo on the CPU) against one process.

    .venv/bin/python bench/ddp.py                     # D 640, F 4096, global batch 2048, 24 steps

Both train the same TopK SAE on the same synthetic store with the same global batch and seed, each
as a `msae train` command line (`torchrun --standalone --nproc_per_node 2 -m msae_core.cli train`
for the two ranks); the step time is read from each run's metrics.jsonl (steps after the first
metrics line, so start-up and the first batches are left out). On this 2-core CPU the two ranks
share the cores a single process already uses, so this is a correctness run more than a speed
figure: it shows what the gradient all-reduce and the tracker's gather cost here.

    .venv/bin/python bench/ddp.py --gather            # the tracker's gather alone, sparse vs dense

The momentum tracker takes in every rank's latents each step. `--gather` times, under torchrun with
two gloo ranks, the gather the trainer uses (`dist.gather_sparse_rows`: each rank's k active
entries per row) against the dense all-gather of the (B, F) rows it replaced (`dist.gather_rows`),
on TopK-sparse latents, after warm-up, in interleaved rounds, and prints bytes sent per rank.
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
    from msae_core.sae import MomentumConfig, SAEConfig
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig

    D, F, B, steps = 640, 4096, 2048, 24
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_store(tmp / "store", 65_536, D)
        results = {}
        for arch in ("topk", "momentum"):
            cfg = RunConfig(sae=SAEConfig(arch=arch, base="topk", d_sae=F, k=32, momentum=MomentumConfig(lam=0.3)),
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


def gather_worker(B: int, F: int, k: int, rounds: int = 10, reps: int = 5) -> None:
    """Under torchrun: time the sparse and the dense gather of this rank's (B, F) TopK latents."""
    import statistics
    import time

    from msae_core import dist

    dist.init_from_env("cpu")
    g = torch.Generator().manual_seed(dist.rank())
    pre = torch.randn(B, F, generator=g)
    vals, idx = pre.topk(k, dim=1)
    f = torch.zeros(B, F).scatter_(1, idx, vals.relu())
    kinds = {"sparse": dist.gather_sparse_rows, "dense": dist.gather_rows}
    assert torch.equal(kinds["sparse"](f), kinds["dense"](f))  # the same global tensor
    for fn in kinds.values():  # warm-up
        fn(f)
    times: dict[str, list[float]] = {n: [] for n in kinds}
    for r in range(rounds):
        for name in (list(kinds) if r % 2 == 0 else list(reversed(kinds))):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                kinds[name](f)
            times[name].append((time.perf_counter() - t0) / reps)
    if dist.is_main():
        nnz = int((f != 0).sum())
        sent = {"sparse": nnz * (4 + 4 + 4), "dense": B * F * 4}
        for name, ts in times.items():
            print(f"  {name:6s} gather: {statistics.median(ts) * 1e3:8.2f} ms, {sent[name] / 2**20:8.2f} MB sent per rank")
        print(f"  sparse / dense = {statistics.median(times['sparse']) / statistics.median(times['dense']):.3f}x "
              f"(goal <= 1: the sparse gather no slower)")


def gather_main() -> None:
    B, F, k = 1024, 4096, 32  # each rank's half of the global batch 2048 of the training figure above
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}; gloo, 2 ranks")
    print(f"the tracker's gather of TopK latents: B {B} rows per rank, F {F}, k {k}, median of 10 rounds of 5:")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--gather-worker", str(B), str(F), str(k)]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    print(out.stdout.rstrip() or out.stderr[-2000:])


if __name__ == "__main__":
    if "--gather-worker" in sys.argv:
        i = sys.argv.index("--gather-worker")
        gather_worker(*(int(a) for a in sys.argv[i + 1:i + 4]))
    elif "--gather" in sys.argv:
        gather_main()
    else:
        main()
