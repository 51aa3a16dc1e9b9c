"""One command for a GPU machine: every GPU path of msae, measured, in one table.

    python bench/gpu.py                        # a GPU machine: gemma-2-2b's shape, layer 12
    python bench/gpu.py --tiny --device cpu    # every path at a tiny shape in under a minute (CI)

What it needs: PyTorch, transformers (with its tokenizers), safetensors, numpy and tqdm, what a bare
GPU machine holds. Nothing is downloaded and no model weights are read: run it from a checkout (it
puts the repository on sys.path; no `pip install`). It builds gemma-2-2b's architecture from its
config (GEMMA2_2B below, the published config.json's fields) with random weights in bfloat16 on
the device, saves it with a byte-level tokenizer of 300 tokens into a temporary folder (ids under
300 are valid ids of the model's vocabulary), and writes a corpus of random words: the model reads
tokenised text, its activations are those of random weights.

Rows, each `ok` or `FAILED` with its figures (exit code 1 when one failed):
  device             the device; on CUDA its dense bf16 peak, derived: SMs x max SM clock x dense
                     bf16 FLOP per clock per SM of its architecture, the arithmetic printed
  step ARCH F        the SAE training step (forward, loss, backward, Adam, post-step) at D 2304,
                     B 4096, k 64, F 16,384 and 65,536, under bf16 autocast on CUDA: ms, TFLOP/s
                     (FLOPs counted as in `step_flops`), fraction of the bf16 peak; peak memory
                     against the derived training state (parameters, gradients, Adam moments)
  momentum/topk F    momentum over TopK after its candidate table filled, against TopK
  loader disk        BatchLoader from a store on local disk (pinned buffers, a thread), batches/s
  loader resident    the same store resident on the device, batches/s
  forward L12        the model's forward to block 12 alone (early stop), tokens/s
  stream train       msae's streaming trainer (TopK F 16,384) with the model loaded, its steady
                     tokens/s between the first and the last metrics line, against forward L12
  sweep x4 one pass  four TopK SAEs streamed in one pass (msae train-group) against the stream run
                     alone: 4 x its step time over the group's, beside the limit from the forward's
                     time and the SAE's (issue 25: at least 90 % of it)
  core eval          `msae eval --evals core` on the stream's run, the model in bf16 (the whole
                     command, its model load included)
  torchrun           `torchrun --nproc_per_node 1 -m msae_core.cli train` with momentum over TopK
                     from the stream's cache (nccl on CUDA, gloo on the CPU)
  resume             `msae train` killed with SIGKILL past its first checkpoint and run again:
                     done, every metrics step logged once

Goals (issue 24): the step at F 16,384 >= 30 % of the bf16 peak, momentum <= 1.10x its base,
stream >= 0.8x the forward alone, the whole script under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ddp import step_time  # noqa: E402
from train_step import _sync  # noqa: E402

from msae_core.runs.folder import read_status  # noqa: E402

# google/gemma-2-2b's config.json (the fields that define the architecture)
GEMMA2_2B = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                 hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
                 rope_theta=10000.0, bos_token_id=2, eos_token_id=1, pad_token_id=0)


@dataclass(frozen=True)
class Shape:
    model: dict  # Gemma2Config fields
    layer: int
    context: int
    lm_batch: int  # windows per forward
    d_sae: tuple[int, ...]
    batch: int
    k: int
    stream_steps: int
    train_steps: int  # the torchrun run
    resume_steps: int  # the run killed and resumed: long enough to be killed between checkpoints
    checkpoint_every: int
    buffer_rows: int = 0  # the stream's mixing buffer (0: SAELens's 20 x 32 windows)


RESEARCH = Shape(GEMMA2_2B, layer=12, context=1024, lm_batch=8, d_sae=(16384, 65536), batch=4096, k=64,
                 stream_steps=60, train_steps=40, resume_steps=600, checkpoint_every=100)
TINY = Shape(dict(GEMMA2_2B, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                  sliding_window=16, max_position_embeddings=512),
             layer=2, context=32, lm_batch=8, d_sae=(256, 512), batch=128, k=8, stream_steps=24, train_steps=12,
             resume_steps=1500, checkpoint_every=100, buffer_rows=1024)

ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu", "relu")

# dense bf16 tensor-core FLOP per clock per SM, by compute capability (NVIDIA's architecture
# whitepapers: A100 312 TFLOPS = 108 SMs x 1.41 GHz x 2048; H100 SXM 989 = 132 x 1.83 x 4096)
BF16_FLOP_PER_CLOCK_SM = {(8, 0): 2048, (8, 6): 1024, (8, 7): 1024, (8, 9): 1024, (9, 0): 4096, (10, 0): 8192}


@dataclass
class Table:
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, ok: bool, figures: str) -> None:
        self.rows.append((name, "ok" if ok else "FAILED", figures))
        print(f"{name:26} {'ok' if ok else 'FAILED':6} {figures}", flush=True)

    @property
    def failed(self) -> bool:
        return any(r[1] != "ok" for r in self.rows)


def bf16_peak(device: torch.device) -> tuple[float | None, str]:
    """The device's dense bf16 peak FLOP/s and its derivation (None where there is no table entry)."""
    if device.type != "cuda":
        return None, "no peak on the CPU (fractions of a peak are for GPUs)"
    p = torch.cuda.get_device_properties(device)
    per = BF16_FLOP_PER_CLOCK_SM.get((p.major, p.minor))
    clock_hz = _max_sm_clock_hz(device)
    if per is None or clock_hz is None:
        return None, f"compute capability {p.major}.{p.minor}, SM clock {clock_hz}: no derivation"
    peak = p.multi_processor_count * clock_hz * per
    return peak, (f"{p.multi_processor_count} SMs x {clock_hz / 1e9:.3f} GHz (max SM clock) x {per} bf16 "
                  f"FLOP/clock/SM (sm_{p.major}{p.minor}) = {peak / 1e12:.0f} TFLOP/s dense")


def _max_sm_clock_hz(device: torch.device) -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--id={device.index or 0}", "--query-gpu=clocks.max.sm",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        return float(out.stdout.strip().splitlines()[0]) * 1e6
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def step_flops(arch: str, B: int, D: int, F: int, k: int, n_dead: int = 0) -> float:
    """FLOPs of one training step: the encoder's product forward (2 B D F) and its weight gradient
    (2 B D F; the input needs none); a dense decoder (relu, jumprelu) adds 6 B F D (forward, weight
    and latent gradients), a sparse one (embedding_bag over the k kept latents) 6 B k D, and AuxK
    over min(D / 2, dead) latents 6 B min(D / 2, dead) D. Matryoshka's prefix decodes (subsets of
    the same entries) and elementwise work are not counted."""
    enc = 4 * B * D * F
    dec = 6 * B * F * D if arch in ("relu", "jumprelu") else 6 * B * k * D
    aux = 6 * B * min(D // 2, n_dead) * D if arch in ("topk", "batchtopk", "matryoshka") and n_dead else 0
    return float(enc + dec + aux)


# ------------------------------------------------------------------------------------------ SAE steps
def sae_steps(table: Table, shape: Shape, D: int, device: torch.device, peak: float | None,
              bf16: bool, seconds: float) -> None:
    import train_step as ts

    for F in shape.d_sae:
        g = torch.Generator().manual_seed(0)
        xs = [(torch.randn(shape.batch, 64, generator=g).pow(3) @ torch.randn(64, D, generator=g) / 8
               + torch.randn(shape.batch, D, generator=g)).to(device) for _ in range(4)]
        times: dict[str, float] = {}
        for arch in ARCHS + ("momentum",):
            try:
                built = ts._ours(arch, "topk" if arch == "momentum" else arch, D, F, shape.k,
                                 0.3 if arch == "momentum" else 0.0, device)
                sae, opt, step = built
                step = _autocast(step, device, bf16)
                _reset_peak(device)
                if arch == "momentum":
                    warm = ts.warm_until_full(sae, step, xs, patience=10, max_steps=120, device=device)
                    note = f"table {warm['fill'] * 100:.0f}% full after {warm['steps']} steps, "
                else:
                    for x in xs[:3]:
                        step(x)
                    note = ""
                n = _timed_steps(step, xs, device, seconds)
                times[arch] = n
                peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                state = sum(p.numel() for p in sae.parameters()) * 4 * 4  # params, grads, Adam m and v
                n_dead = int(sae.dead_mask.sum())
                flops = step_flops("topk" if arch == "momentum" else arch, shape.batch, D, F, shape.k, n_dead)
                rate = flops / n
                figures = f"{n * 1e3:8.2f} ms  {rate / 1e12:7.2f} TFLOP/s"
                if peak:
                    figures += f"  {rate / peak * 100:5.1f}% of peak"
                if peak_mem is not None:
                    bf = shape.batch * F * (2 if bf16 else 4)
                    figures += (f"  mem {peak_mem / 2**30:.2f} GiB = state {state / 2**30:.2f} GiB + "
                                f"{(peak_mem - state) / bf:.1f} x (B, F) {'bf16' if bf16 else 'fp32'}")
                if arch == "momentum":
                    figures = note + figures + f"  ({n / times['topk']:.3f}x topk; goal at the research shape <= 1.10x)"
                table.add(f"step {arch if arch != 'momentum' else 'momentum/topk'} F={F}", True, figures)
                del sae, opt, step, built
            except Exception as exc:  # a failed arch is a row, not the end of the table
                table.add(f"step {arch} F={F}", False, _short(exc))
            _free(device)
        del xs


def _autocast(step, device: torch.device, bf16: bool):
    if not bf16:
        return step

    def run(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            step(x)
    return run


def _timed_steps(step, xs: list[torch.Tensor], device: torch.device, seconds: float) -> float:
    """Seconds per step: steps for about `seconds` after the warm-up (at least 3)."""
    _sync(device)
    t0, n = time.perf_counter(), 0
    while n < 3 or time.perf_counter() - t0 < seconds:
        step(xs[n % len(xs)])
        n += 1
        if n % 5 == 0:
            _sync(device)
    _sync(device)
    return (time.perf_counter() - t0) / n


# ---------------------------------------------------------------------------------- model and data
def build_model(shape: Shape, folder: Path, device: torch.device) -> tuple[float, int]:
    """Random weights of the shape's Gemma 2 in bfloat16 (float32 on the CPU), built on the device,
    saved with the tiny tokenizer. (seconds, parameters)"""
    import transformers as tf

    from msae_core.data.lm import save_tiny_tokenizer

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(tf.Gemma2Config(**shape.model), dtype=dtype)
    model.save_pretrained(str(folder))
    save_tiny_tokenizer(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    _free(device)
    return time.perf_counter() - t0, n


def write_corpus(path: Path, words: int) -> None:
    rng = random.Random(0)
    vocab = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "stitch", "time", "saves", "nine",
             "ask", "not", "what", "country", "can", "do", "for", "you", "to", "be", "or", "question"]
    with open(path, "w") as fh:
        for _ in range(words // 12):
            fh.write(" ".join(rng.choice(vocab) for _ in range(12)) + ".\n")


# ------------------------------------------------------------------------------------ the LM paths
def lm_paths(table: Table, shape: Shape, root: Path, device: torch.device, args: argparse.Namespace) -> Path | None:
    """forward L12, stream train, loader rows; returns the stream's run folder (None if it failed)."""
    from msae_core.data.harvest import window_rows
    from msae_core.data.lm import load_lm
    from msae_core.data.stream import ActivationStream, StreamSettings
    from msae_core.data.text import context_windows, load_corpus
    from msae_core.runs.config import DataConfig, RunConfig, TrainConfig
    from msae_core.runs.folder import metrics_rows
    from msae_core.sae import SAEConfig
    from msae_core.training.trainer import train

    model_dir, corpus_path = root / "model", root / "corpus.txt"
    build_s, n_params = build_model(shape, model_dir, device)
    capacity = StreamSettings(context_size=shape.context, buffer_rows=shape.buffer_rows).buffer_capacity(shape.batch)
    tokens_needed = capacity + (shape.stream_steps + 40) * shape.batch
    write_corpus(corpus_path, words=int(tokens_needed * 1.2))
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    t0 = time.perf_counter()
    lm = load_lm(str(model_dir), device=device, dtype=dtype)
    table.notes.append(f"model: Gemma 2 of {n_params / 1e9:.2f}B parameters ({shape.model['num_hidden_layers']} "
                       f"blocks, width {shape.model['hidden_size']}), random weights in {dtype}: built and "
                       f"saved in {build_s:.0f} s, loaded by msae in {time.perf_counter() - t0:.0f} s")
    corpus = load_corpus(str(corpus_path))
    special = torch.tensor(sorted(lm.special_ids), dtype=torch.long)
    fwd_tps = None
    try:
        windows = context_windows(corpus, lm.tokenizer, shape.context, True)
        batches = [torch.tensor([w for _, w in (next(windows) for _ in range(shape.lm_batch))]) for _ in range(6)]
        window_rows(lm, batches[0], shape.layer, 0, special)  # warm-up
        _sync(device)
        rows, t = 0, time.perf_counter()
        for ids in batches[1:]:
            rows += len(window_rows(lm, ids, shape.layer, 0, special).acts)
        _sync(device)
        fwd_tps = rows / (time.perf_counter() - t)
        table.add(f"forward L{shape.layer}", True, f"{fwd_tps:10.0f} tokens/s ({rows} rows, "
                  f"{shape.lm_batch} x {shape.context} tokens a forward, early stop after block {shape.layer})")
    except Exception as exc:
        table.add(f"forward L{shape.layer}", False, _short(exc))

    run = root / "stream-run"
    try:
        sae = SAEConfig(arch="topk", d_sae=shape.d_sae[0], k=shape.k)
        tc = TrainConfig(steps=shape.stream_steps, batch_size=shape.batch, warmup_steps=10, seed=0, device=str(device),
                         bf16=device.type == "cuda", log_every=max(1, shape.stream_steps // 6),
                         checkpoint_every=10 ** 9, snapshot_every=0)
        data = DataConfig(source="stream", model=str(model_dir), corpus=str(corpus_path), layer=shape.layer,
                          context_size=shape.context, lm_batch=shape.lm_batch, buffer_rows=shape.buffer_rows,
                          cache=str(root / "cache"))
        cfg = RunConfig(sae=sae, train=tc, data=data)
        st = ActivationStream(StreamSettings(model=str(model_dir), layer=shape.layer, corpus=str(corpus_path),
                                             context_size=shape.context, lm_batch=shape.lm_batch,
                                             buffer_rows=shape.buffer_rows),
                              shape.batch, 0, device=device, lm=lm, corpus=corpus, cache=str(root / "cache"))
        res = train(cfg, run, progress=False, store=st)
        if res.state != "done":
            raise RuntimeError(f"stream run ended {res.state}: {res.error}")
        m = metrics_rows(run)
        tps = (m[-1]["step"] - m[0]["step"]) * shape.batch / (m[-1]["time"] - m[0]["time"])
        ratio = f", {tps / fwd_tps:.2f}x forward (goal >= 0.8)" if fwd_tps else ""
        table.add("stream train", True, f"{tps:10.0f} tokens/s steady (steps {m[0]['step']}-{m[-1]['step']}){ratio}")
    except Exception as exc:
        table.add("stream train", False, _short(exc))
        run = None
    del lm
    _free(device)
    if run is not None:
        sweep_row(table, shape, root, cfg, run, fwd_tps)
    return run


def sweep_row(table: Table, shape: Shape, root: Path, cfg, single: Path, fwd_tps: float | None, n: int = 4) -> None:
    """n TopK SAEs (other init seeds) streamed in one pass (msae train-group) against the stream
    run alone: n x its steady step time over the group's, beside the limit n (r + s) / (r + n s)
    from the forward's time per batch r and the SAE's share s of the single run's step."""
    import dataclasses

    from msae_core.runs.folder import metrics_rows
    from msae_core.training.group import train_group

    try:
        cfgs = [dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, seed=i),
                                    data=dataclasses.replace(cfg.data, cache="")) for i in range(n)]
        results = train_group(cfgs, [root / f"group-{i}" for i in range(n)], progress=False, evals=False)
        if any(r.state != "done" for r in results):
            raise RuntimeError("; ".join(f"{r.out_dir.name} {r.state}: {r.error}" for r in results if r.state != "done"))

        def steady(run: Path) -> float:
            m = metrics_rows(run)
            return (m[-1]["time"] - m[0]["time"]) / (m[-1]["step"] - m[0]["step"])

        t1, tn = steady(single), steady(root / "group-0")
        figures = f"{n} x {t1 * 1e3:.1f} ms (one run's step) / {tn * 1e3:.1f} ms (the group's) = {n * t1 / tn:.2f}x"
        if fwd_tps:
            r = shape.batch / fwd_tps
            s = max(t1 - r, 1e-9)
            limit = n * (r + s) / (r + n * s)
            figures += f"; limit {limit:.2f}x (r {r * 1e3:.1f} ms, s {s * 1e3:.1f} ms): {n * t1 / tn / limit:.0%} (goal >= 90%)"
        table.add(f"sweep x{n} one pass", True, figures)
    except Exception as exc:
        table.add(f"sweep x{n} one pass", False, _short(exc))
    _free(torch.device(cfg.train.device))


def loader_rows(table: Table, store_dir: Path, shape: Shape, device: torch.device) -> None:
    from msae_core.data.loader import BatchLoader
    from msae_core.data.store import ActivationStore

    try:
        store = ActivationStore(str(store_dir))
        n = min(40, store.n_rows // shape.batch)
        for resident in (False, True):
            with BatchLoader(store, shape.batch, 0, device=device, resident=resident) as loader:
                loader.next(0)
                _sync(device)
                t = time.perf_counter()
                for s in range(1, n):
                    loader.next(s)
                _sync(device)
                rate = (n - 1) / (time.perf_counter() - t)
            table.add(f"loader {'resident' if resident else 'disk'}", True,
                      f"{rate:8.1f} batches/s of {shape.batch} x {store.d_in} ({store.dtype}, {store.n_rows} rows, "
                      f"{'on the device' if resident else 'local disk, page cache warm'})")
    except Exception as exc:
        table.add("loader", False, _short(exc))


# ---------------------------------------------------------------------------------- subprocesses
def _msae(*argv: str) -> list[str]:
    return [sys.executable, "-m", "msae_core.cli", *argv]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def core_eval(table: Table, run: Path, device: torch.device, shape: Shape) -> None:
    t = time.perf_counter()
    out = subprocess.run(_msae("eval", str(run), "--evals", "core", "--device", str(device), "--no-progress",
                               "--set", "core.n_eval_reconstruction_batches=2",
                               "--set", "core.n_eval_sparsity_variance_batches=4",
                               "--set", f"core.context_size={min(128, shape.context)}"),
                         capture_output=True, text=True, env=_env(), timeout=600)
    secs = time.perf_counter() - t
    try:
        core = json.loads((run / "eval.json").read_text())["core"]
        dtype = core["eval_config"]["llm_dtype"]
        inner = core["eval_result_unstructured"]["seconds"]["total"]
        windows = core["eval_result_unstructured"].get("kept_tokens_sparsity_variance")
        ok = out.returncode == 0 and dtype == ("bfloat16" if device.type == "cuda" else "float32")
        table.add("core eval", ok, f"{secs:6.1f} s the command, {inner:.1f} s the eval ({windows} tokens kept "
                                   f"for sparsity and variance), llm_dtype {dtype}")
    except (OSError, ValueError, KeyError, TypeError):
        table.add("core eval", False, _tail(out))


def torchrun_row(table: Table, store_dir: Path, root: Path, device: torch.device, shape: Shape) -> None:
    run = root / "torchrun-run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "msae_core.cli", "train", "--acts", str(store_dir), "--out", str(run), "--no-progress",
           "--arch", "momentum", "--base", "topk", "--d-sae", str(shape.d_sae[0]), "--k", str(shape.k),
           "--steps", str(shape.train_steps), "--batch-size", str(shape.batch), "--log-every", "5",
           "--device", "cuda" if device.type == "cuda" else "cpu", "--snapshot-every", "10"]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    secs = time.perf_counter() - t
    status = read_status(run)
    ok = out.returncode == 0 and status.get("state") == "done"
    backend = "nccl" if device.type == "cuda" else "gloo"
    table.add("torchrun", ok, f"{backend}, momentum/topk, {shape.train_steps} steps: {secs:5.1f} s, "
                              f"{step_time(run) * 1e3:.1f} ms/step" if ok else _tail(out))


def resume_row(table: Table, store_dir: Path, root: Path, device: torch.device, shape: Shape) -> None:
    """Kill (SIGKILL) a run once a checkpoint is on disk and the run has gone past it, run the same
    command again: it must end done with every metrics step logged once."""
    from msae_core.runs.folder import metrics_rows

    run, total, every = root / "resume-run", shape.resume_steps, shape.checkpoint_every
    cmd = _msae("train", "--acts", str(store_dir), "--out", str(run), "--no-progress", "--arch", "topk",
                "--d-sae", str(shape.d_sae[0]), "--k", str(shape.k), "--steps", str(total),
                "--batch-size", str(shape.batch), "--log-every", str(every // 10), "--checkpoint-every", str(every),
                "--device", str(device))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    killed_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        step = read_status(run).get("step") or 0
        if (run / "checkpoint").is_dir() and every < step < total:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = step
            break
        time.sleep(0.02)
    proc.wait()
    if killed_at is None:
        table.add("resume", False, f"the run was not caught between its first checkpoint and its end "
                                   f"(exit {proc.returncode}): {(proc.stderr.read() or '')[-300:]}")
        return
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    steps = [r["step"] for r in metrics_rows(run)]
    want = list(range(every // 10, total + 1, every // 10))
    resumed = [line for line in (out.stderr or "").splitlines() if "resuming" in line]
    ok = out.returncode == 0 and read_status(run).get("state") == "done" and steps == want and bool(resumed)
    table.add("resume", ok, f"killed (SIGKILL) at step {killed_at} of {total}, run again: resumed from "
                            f"{resumed[-1].split('resuming', 1)[1].split(' from ')[-1] if resumed else '?'}, "
                            f"done in {time.perf_counter() - t:.1f} s, metrics steps {steps[0]}..{steps[-1]} "
                            f"each once" if ok else
              f"metrics steps {steps[:3]}...{steps[-3:]} ({len(steps)}, want {len(want)}), "
              f"{'resumed' if resumed else 'not resumed'}; {_tail(out)}")


# ------------------------------------------------------------------------------------------ helpers
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def _tail(out: subprocess.CompletedProcess) -> str:
    lines = (out.stderr or out.stdout or "").strip().splitlines()
    return f"exit {out.returncode}: " + (lines[-1][:300] if lines else "no output")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny Gemma 2 and SAE: every path in under a minute")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds per SAE step row "
                    "(default 2 on a GPU, 0 on the CPU: three steps)")
    ap.add_argument("--keep", default="", help="write the model, corpus, store and runs here and keep them")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device here: run with --device cpu (and --tiny)")
            return 2
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shape = TINY if args.tiny else RESEARCH
    seconds = args.seconds if args.seconds is not None else (2.0 if device.type == "cuda" else 0.0)
    bf16 = device.type == "cuda"
    table = Table()
    peak, derivation = bf16_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench/gpu.py{' --tiny' if args.tiny else ''}: {name}; torch {torch.__version__}"
          f"{', CUDA ' + torch.version.cuda if device.type == 'cuda' else ''}; shape: D {shape.model['hidden_size']}, "
          f"layer {shape.layer}, context {shape.context}, B {shape.batch}, k {shape.k}, F {shape.d_sae}")
    table.add("device", True, f"{name}: {derivation}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="msae-gpu-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        sae_steps(table, shape, shape.model["hidden_size"], device, peak, bf16, seconds)
        run = lm_paths(table, shape, root, device, args)
        store_dir = root / "cache"
        if run is not None and (store_dir / "manifest.json").exists():
            loader_rows(table, store_dir, shape, device)
            core_eval(table, run, device, shape)
            torchrun_row(table, store_dir, root, device, shape)
            resume_row(table, store_dir, root, device, shape)
        else:
            table.add("loader/eval/torchrun/resume", False, "skipped: the stream run wrote no store")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - t_start
    for note in table.notes:
        print(f"# {note}")
    print(f"# whole script: {total:.0f} s (goal on one H100: under 480 s)")
    print("FAILED: " + ", ".join(r[0] for r in table.rows if r[1] != "ok") if table.failed else "all rows ok")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
