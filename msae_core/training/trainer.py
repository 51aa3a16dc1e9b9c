"""The trainer: `msae train`, an SAE trained from an activation store, surviving faults.

    msae train --acts DIR --arch momentum --base topk --beta 0.95 --tau 0.4 --lam 0.3 \
        --d-sae 4096 --steps N --out RUN
    msae train --config run.json --out RUN        # flags given as well override the file
    msae train --out RUN                          # resume RUN with its own config.json

Loop, step s = 0 .. steps-1 ("completed" = s + 1 is what the logs call `step`):
    x = store.batch(s, batch_size, seed)          # deterministic in (seed, s): resume can skip
    losses = sae.training_loss(x, s); Adam step at the warm-up lr; sae.post_step_(s)

Faults:
- killed at any moment: re-running `msae train --out RUN` resumes from `checkpoint/` (weights and
  buffers, Adam state, RNG states) and drops whatever metrics/events/traces were written after the
  checkpoint step, so the finished run's files and weights equal an uninterrupted run's;
- a NaN/inf loss: state `diverged`, the last good checkpoint kept, no step taken with it;
- SIGTERM (or SIGINT): the current step finishes, a checkpoint is written, state `cancelled`;
- any other exception: state `failed` with its text.
A checkpoint is written into a temporary folder and renamed into place, so `checkpoint/` is always
whole (a kill between the two renames leaves `.checkpoint.old`, which resume picks up).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import errno
import io
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from msae_core.artifacts import (
    OPTIMIZER_STATE,
    RUN_CHECKPOINT_DIR,
    RUN_CONFIG,
    RUN_EVENTS,
    RUN_METRICS,
    RUN_OLD_CHECKPOINT_DIR,
    RUN_TMP_CHECKPOINT_DIR,
    RUN_TMP_CHECKPOINT_GLOB,
    RUN_TRACE,
    RUN_TRACE_GLOB,
    RUN_TRACES_DIR,
    SAE_CONFIG,
    SAE_WEIGHTS,
    TRAINER_STATE,
    append_jsonl,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    trace_step,
)
from msae_core.configutil import add_dataclass_args, overrides_from_args
from msae_core.errors import MsaeError
from msae_core.procs import FolderLock, StopFlag, msae_command, spawn
from msae_core.sae import SAEConfig
from msae_core.training.config import (
    DataConfig,
    RunConfig,
    TrainConfig,
    config_mismatch,
)
from msae_core.training.run_folder import checkpoint_step, read_status, refuse_foreign_out, write_status

log = logging.getLogger(__name__)



@dataclass
class RunResult:
    """How a call to train() ended."""

    state: str                      # done | cancelled | diverged | failed
    step: int                       # completed optimizer steps
    out_dir: Path
    metrics: dict = field(default_factory=dict)  # the last metrics line
    error: str | None = None
    resumed_from: int = 0           # checkpoint step the run started from (0 = fresh)


# ------------------------------------------------------------------------------------ small pieces
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over the first min(warmup_steps, steps) steps, then constant."""
    w = cfg.effective_warmup
    return cfg.lr * min(1.0, (step + 1) / w) if w > 0 else cfg.lr


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MsaeError(f"device {name} asked for but CUDA is not available: use --device cpu or auto")
    return dev


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _rng_state() -> dict:
    out = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _sae_io():
    from msae_core import sae_io

    return sae_io


def _build_sae(cfg: SAEConfig):
    from msae_core.sae import build_sae

    return build_sae(cfg)


# ----------------------------------------------------------------------------------- checkpoints
def find_checkpoint(out_dir: Path) -> Path | None:
    """The latest whole checkpoint folder (trainer_state.json is written last), or None."""
    for name in (RUN_CHECKPOINT_DIR, RUN_OLD_CHECKPOINT_DIR):
        p = out_dir / name
        if (p / TRAINER_STATE).is_file():
            return p
    return None


def write_checkpoint(out_dir: Path, sae: Any, opt: torch.optim.Optimizer, state: dict) -> Path:
    """Write checkpoint/ atomically: fill a temporary folder, then swap it in by renames."""
    tmp = out_dir / RUN_TMP_CHECKPOINT_DIR.format(pid=os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _sae_io().save_sae(sae, tmp)
        buf = io.BytesIO()  # serialised in memory: a full disk is then a plain OSError on write
        torch.save(opt.state_dict(), buf)
        with open(tmp / OPTIMIZER_STATE, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write_json(tmp / TRAINER_STATE, state)  # last: marks the folder whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full) leaves nothing behind
        raise
    ck, old = out_dir / RUN_CHECKPOINT_DIR, out_dir / RUN_OLD_CHECKPOINT_DIR
    if ck.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(ck, old)
    os.rename(tmp, ck)
    _fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return ck


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _truncate_logs(out_dir: Path, step: int) -> None:
    """Drop what was logged after checkpoint `step` (the resumed run writes it again)."""
    m = out_dir / RUN_METRICS
    if m.exists():
        rows = [r for r in read_jsonl(m) if int(r.get("step", 0)) <= step]
        atomic_write_text(m, "".join(json.dumps(r) + "\n" for r in rows))
    e = out_dir / RUN_EVENTS
    if e.exists():  # an event's step is the 0-based index of the step that raised it
        rows = [r for r in read_jsonl(e) if int(r.get("step", 0)) < step]
        atomic_write_text(e, "".join(json.dumps(r) + "\n" for r in rows))
    t = out_dir / RUN_TRACES_DIR
    if t.is_dir():
        for f in t.glob(RUN_TRACE_GLOB):
            trace = trace_step(f)
            if trace is not None and trace > step:
                f.unlink()
    for p in out_dir.glob(RUN_TMP_CHECKPOINT_GLOB):
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------- signals
# ------------------------------------------------------------------------------------- observables
def _step_loss(sae: Any, x_BD: torch.Tensor, step: int) -> tuple[dict, Any]:
    """The loss dict and, when the SAE gives it (`loss_terms`), the step's forward output."""
    if hasattr(sae, "loss_terms"):
        return sae.loss_terms(x_BD, step)
    return sae.training_loss(x_BD, step), None


def _batch_metrics(sae: Any, x_BD: torch.Tensor, out: Any) -> dict:
    """l0 and explained variance of the step's batch, from the step's own forward output (the one
    the loss saw) or, for an SAE that does not return it, a no-grad forward after the update."""
    from msae_core import metrics as M

    with torch.no_grad():
        if out is None:
            out = sae.forward(x_BD)
        x_hat_BD, f_BF = out.x_hat.detach().float(), out.f.detach().float()
        return {"l0": float(M.l0(f_BF)), "explained_variance": float(M.explained_variance(x_BD, x_hat_BD))}


def _write_snapshot(out_dir: Path, sae: Any, step: int) -> None:
    obs = sae.observables() if hasattr(sae, "observables") else None
    if not obs:
        return
    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).detach().cpu()
               for k, v in obs.items()}
    atomic_save_safetensors(out_dir / RUN_TRACES_DIR / RUN_TRACE.format(step=step), tensors,
                            metadata={"step": str(step)})


def _drain_events(out_dir: Path, sae: Any) -> None:
    if not hasattr(sae, "drain_events"):
        return
    events = sae.drain_events()
    if events:
        with open(out_dir / RUN_EVENTS, "a") as fh:
            for ev in events:
                fh.write(json.dumps({k: (v.item() if isinstance(v, torch.Tensor) else v)
                                     for k, v in ev.items()}) + "\n")


# ------------------------------------------------------------------------------------------ train
def train(config: RunConfig, out_dir: str | os.PathLike, progress: bool = True,
          stop: "StopFlag | None" = None, store: Any = None) -> RunResult:
    """Train (or resume) the run in `out_dir`. Returns how it ended; writes status.json throughout.

    Invalid settings, a folder of another kind (a store, a runs root) and a folder another process
    trains in raise MsaeError before anything is written. The folder is locked for as long as this
    runs (procs.FolderLock); SIGTERM/SIGINT are caught before the status says `running`, so a
    cancel at any moment ends the run `cancelled`. A NaN loss returns `diverged`, a full disk
    `failed` with the last whole checkpoint kept; an unexpected exception is recorded as `failed`
    and re-raised. `store`: the activation store an entry point already opened with
    `config.check()` (else it is checked and opened here)."""
    store = config.check(store)
    out_dir = Path(out_dir)
    refuse_foreign_out(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(out_dir, what="training"), (stop or StopFlag()) as stop:
        existing_cfg = out_dir / RUN_CONFIG
        ckpt = find_checkpoint(out_dir)
        if existing_cfg.exists() and (ckpt is not None or (out_dir / SAE_WEIGHTS).exists()):
            try:
                old = json.loads(existing_cfg.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                old = None
            if isinstance(old, dict):
                diff = config_mismatch(old, config.to_dict())
                if diff:
                    raise MsaeError(f"{out_dir} holds a run with other settings ({diff}): "
                                    "choose another --out or delete it")
        try:
            prev = read_status(out_dir)
        except MsaeError:
            prev = {}
        config.save(existing_cfg)
        write_status(out_dir, state="running", pid=os.getpid(), error=None, eta_s=None,
                     total_steps=config.train.steps, started=prev.get("started") or time.time())
        try:
            return _train(config, out_dir, ckpt, progress, stop, store)
        except MsaeError as exc:
            write_status(out_dir, state="failed", error=str(exc), pid=None, eta_s=None)
            raise
        except OSError as exc:
            err = _os_error_text(exc, out_dir)
            write_status(out_dir, state="failed", error=err, pid=None, eta_s=None)
            raise MsaeError(err) from exc
        except BaseException as exc:
            write_status(out_dir, state="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                         pid=None, eta_s=None)
            raise


def _os_error_text(exc: OSError, out_dir: Path) -> str:
    """One line for an OS error while training: what failed, and what the run folder still holds."""
    ck = find_checkpoint(out_dir)
    kept = (f"the last whole checkpoint (step {checkpoint_step(ck)}) is kept" if ck is not None
            else "no checkpoint had been written yet")
    where = exc.filename or out_dir
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full while writing {where}: {kept}; free some space and run the same "
                f"command again to resume")
    return f"cannot write {where} ({exc.strerror or exc}): {kept}; run the same command again to resume"


def _train(config: RunConfig, out_dir: Path, ckpt: Path | None, progress: bool,
           stop: "StopFlag", store: Any) -> RunResult:
    tc = config.train
    device = pick_device(tc.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast_on = bool(tc.bf16 and device.type == "cuda")

    start = 0
    state: dict = {}
    if ckpt is not None:
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        start = int(state["step"])
        if ckpt.name != RUN_CHECKPOINT_DIR:  # killed between the renames: take the old one back
            shutil.rmtree(out_dir / RUN_CHECKPOINT_DIR, ignore_errors=True)
            os.rename(ckpt, out_dir / RUN_CHECKPOINT_DIR)
            ckpt = out_dir / RUN_CHECKPOINT_DIR
        sae = _sae_io().load_sae(ckpt, device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=lr_at(start, tc))
        opt.load_state_dict(torch.load(ckpt / OPTIMIZER_STATE, map_location=device, weights_only=True))
        _set_rng_state(state.get("rng", {}))
        log.info("resuming %s from step %d", out_dir, start)
    else:
        torch.manual_seed(tc.seed)
        sae = _build_sae(config.sae).to(device)
        if hasattr(sae, "fit_input_scale_"):  # fixed input normalisation, from a sample of the store
            n = min(store.n_rows, max(tc.batch_size, 16_384))
            sample_ND = store.batch(0, n, tc.seed)
            if not bool(torch.isfinite(sample_ND).all()):
                raise MsaeError(store.nonfinite_problem() or "non-finite activations in the store")
            sae.fit_input_scale_(sample_ND.to(device))
        opt = torch.optim.Adam(sae.parameters(), lr=lr_at(0, tc))
        for name in (SAE_WEIGHTS, SAE_CONFIG):
            (out_dir / name).unlink(missing_ok=True)
    _truncate_logs(out_dir, start)
    sae.train()

    if start >= tc.steps:  # already trained this far: (re)write final weights only
        return _finish(out_dir, sae, start, start, {})

    # running sums of the losses since the last metrics line; the checkpoint keeps them (float32
    # values are exact in json), so a resumed run's metrics.jsonl equals an uninterrupted run's
    sums: dict[str, torch.Tensor] = {k: torch.tensor(v, dtype=torch.float32, device=device)
                                     for k, v in state.get("log_sums", {}).items()}
    n_sum = int(state.get("log_n", 0))

    def ckpt_state(step: int) -> dict:
        return {"step": step, "rng": _rng_state(), "time": time.time(), "config": config.to_dict(),
                "log_sums": {k: float(v) for k, v in sums.items()}, "log_n": n_sum}

    t_interval = time.perf_counter()
    last: dict = {}
    last_ckpt = start if ckpt is not None else None
    if stop.signum is not None:  # cancelled while starting up: nothing trained, nothing to save
        msg = f"cancelled by signal {signal.Signals(stop.signum).name} before step {start + 1}"
        write_status(out_dir, state="cancelled", step=start, error=msg, pid=None, eta_s=None)
        log.warning(msg)
        return RunResult("cancelled", start, out_dir, last, msg, start)
    bar = tqdm(total=tc.steps, initial=start, disable=None if progress else True,
               desc=out_dir.name, unit="step", dynamic_ncols=True)
    try:
        for s in range(start, tc.steps):
            done = s + 1
            x_BD = store.batch(s, tc.batch_size, tc.seed).to(device, non_blocking=True)
            lr = lr_at(s, tc)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_on):
                losses, out = _step_loss(sae, x_BD, s)
            loss = losses["loss"]
            if not bool(torch.isfinite(loss.detach())):
                if not bool(torch.isfinite(x_BD).all()):  # the data, not the optimisation
                    err = store.nonfinite_problem() or f"non-finite activations at step {done}"
                    write_status(out_dir, state="failed", step=s, error=err, pid=None, eta_s=None)
                    log.error(err)
                    return RunResult("failed", s, out_dir, last, err, start)
                kept = (f"last good checkpoint at step {last_ckpt} kept" if last_ckpt is not None
                        else "no checkpoint was written before it")
                err = f"loss became {float(loss.detach())} at step {done} (lr {lr:.3g}): diverged; {kept}"
                write_status(out_dir, state="diverged", step=s, error=err, pid=None, eta_s=None)
                log.error(err)
                return RunResult("diverged", s, out_dir, last, err, start)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sae.post_step_(s)
            if not (done % tc.log_every == 0 or done == tc.steps):
                out = None  # keep the forward output only where it is logged
            _drain_events(out_dir, sae)
            for k, v in losses.items():
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    v = v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v
            n_sum += 1
            if device.type == "cuda" and (done % tc.log_every == 0 or done == tc.steps):
                torch.cuda.synchronize()

            if done % tc.log_every == 0 or done == tc.steps:
                now = time.perf_counter()
                step_time = (now - t_interval) / max(n_sum, 1)
                row: dict[str, Any] = {"step": done}
                row.update({k: float(v) / n_sum for k, v in sums.items()})
                row.update(_batch_metrics(sae, x_BD, out))
                if hasattr(sae, "step_counts"):
                    row.update({k: float(v) for k, v in sae.step_counts().items()})
                row.update({"lr": lr, "step_time_s": step_time,
                            "tokens_per_s": tc.batch_size / step_time if step_time > 0 else None,
                            "time": time.time()})
                append_jsonl(out_dir / RUN_METRICS, row)
                last = row
                sums, n_sum, t_interval = {}, 0, now
                eta = step_time * (tc.steps - done)
                write_status(out_dir, step=done, eta_s=eta)
                bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}",
                                l0=f"{row.get('l0', float('nan')):.1f}", refresh=False)
            if tc.snapshot_every and done % tc.snapshot_every == 0:
                _write_snapshot(out_dir, sae, done)
            bar.update(1)
            if done % tc.checkpoint_every == 0 or done == tc.steps or stop.signum is not None:
                write_checkpoint(out_dir, sae, opt, ckpt_state(done))
                last_ckpt = done
            if stop.signum is not None and done < tc.steps:
                msg = f"cancelled by signal {signal.Signals(stop.signum).name} at step {done}; checkpoint written"
                write_status(out_dir, state="cancelled", step=done, error=msg, pid=None, eta_s=None)
                log.warning(msg)
                return RunResult("cancelled", done, out_dir, last, msg, start)
    finally:
        bar.close()
    return _finish(out_dir, sae, tc.steps, start, last)


def _finish(out_dir: Path, sae: Any, step: int, start: int, last: dict) -> RunResult:
    _sae_io().save_sae(sae, out_dir)
    write_status(out_dir, state="done", step=step, eta_s=0, pid=None, error=None, finished=time.time())
    return RunResult("done", step, out_dir, last, None, start)


# -------------------------------------------------------------------------------------------- CLI
def _dataclass_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


_TRAIN_NAMES = _dataclass_names(TrainConfig) | _dataclass_names(DataConfig)


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train an SAE from an activation store (resumes an unfinished --out)",
        description="Train an SAE. Settings come from --config (a run.json with sae/train/data "
                    "sections), else from OUT/config.json when resuming; flags override both.")
    p.add_argument("--config", help="run config json (sections sae, train, data)")
    p.add_argument("--out", required=True, help="run folder (created; resumed when unfinished)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="stay queued until fewer than this many runs under --queue-root are running")
    p.add_argument("--queue-root", default=None, help="folder of runs counted by --max-parallel "
                                                      "(default: the parent of --out)")
    g = p.add_argument_group("data")
    add_dataclass_args(g, DataConfig)
    g = p.add_argument_group("training")
    add_dataclass_args(g, TrainConfig)
    g = p.add_argument_group("SAE")
    add_dataclass_args(g, SAEConfig, skip=tuple(_TRAIN_NAMES))
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """--config (or OUT/config.json), then flags on top."""
    if args.config:
        cfg = RunConfig.load(args.config)
    elif args.out and (Path(args.out) / RUN_CONFIG).exists():
        cfg = RunConfig.load(Path(args.out) / RUN_CONFIG)
    else:
        cfg = RunConfig()
    sae_over = {k: v for k, v in overrides_from_args(args, SAEConfig).items() if k not in _TRAIN_NAMES}
    train_over = overrides_from_args(args, TrainConfig)
    data_over = overrides_from_args(args, DataConfig)
    if "evals" in train_over:  # --evals core,absorption or --evals core absorption
        train_over["evals"] = [e for item in train_over["evals"] for e in str(item).split(",") if e]
    if "seed" in train_over and "seed" in _dataclass_names(SAEConfig):
        sae_over["seed"] = train_over["seed"]
    try:
        cfg = RunConfig(sae=dataclasses.replace(cfg.sae, **sae_over),
                        train=dataclasses.replace(cfg.train, **train_over),
                        data=dataclasses.replace(cfg.data, **data_over))
    except TypeError as exc:
        raise MsaeError(str(exc)) from exc
    return cfg


def run_evals(out_dir: Path, evals: list[str]) -> int:
    """`msae eval RUN --evals a,b` in a child process; its outcome goes into status.json `eval`."""
    write_status(out_dir, eval="running")
    rc = spawn(msae_command("eval", out_dir, "--evals", ",".join(evals)), detach=False).wait()
    write_status(out_dir, eval="done" if rc == 0 else f"failed (exit {rc}, see train.log)")
    return rc


def run_cli(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_foreign_out(out)
    cfg = store = None
    if args.config or not out.exists():  # settings from outside the folder: checked before creating it
        cfg = config_from_args(args)
        store = cfg.check()
    out.mkdir(parents=True, exist_ok=True)
    # the folder lock and the signal handler first: one trainer per folder, cancellable at once
    with FolderLock(out, what="training"), StopFlag() as stop:
        if cfg is None:  # resuming from the folder's own config.json, read under the lock
            cfg = config_from_args(args)
            store = cfg.check()
        if args.max_parallel:
            from msae_core.training.jobs import wait_for_slot

            root = Path(args.queue_root) if args.queue_root else out.resolve().parent
            if not wait_for_slot(out, root, args.max_parallel, stop=stop):
                return 130
        result = train(cfg, out, progress=not args.no_progress, stop=stop, store=store)
        if result.state in ("diverged", "failed"):
            raise MsaeError(result.error or result.state)
        if result.state == "cancelled":
            return 130  # the cause is logged by train()
        if cfg.train.evals:  # still under the lock: no trainer rewrites the weights being evaluated
            return run_evals(out, list(cfg.train.evals))
    return 0
