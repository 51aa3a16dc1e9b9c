"""The trainer: `msae train`, an SAE trained from an activation store, surviving faults.

    msae train --acts DIR --arch momentum --base topk --beta 0.95 --tau 0.4 --lam 0.3 \
        --d-sae 4096 --steps N --out RUN
    msae train --config run.json --out RUN        # flags given as well override the file
    msae train --out RUN                          # resume RUN with its own config.json

Loop, step s = 0 .. steps-1 ("completed" = s + 1 is what the logs call `step`), in `_Fit.run`:
    x = store.batch(s, batch_size, seed)          # deterministic in (seed, s): resume can skip;
                                                  # read ahead by a thread (data.loader)
    losses, out = sae.loss_terms(x, s); Adam step at the warm-up lr; sae.post_step_(s)
    then, on their schedules, a metrics line, a trace snapshot, a checkpoint (checkpoint.py)

Faults:
- killed at any moment: re-running `msae train --out RUN` resumes from `checkpoint/` (weights and
  buffers, Adam state, RNG states) and drops whatever metrics/events/traces were written after the
  checkpoint step, so the finished run's files and weights equal an uninterrupted run's;
- a NaN/inf loss: state `diverged`, the last good checkpoint kept, no step taken with it;
- SIGTERM (or SIGINT): the current step finishes, a checkpoint is written, state `cancelled`;
- any other exception: state `failed` with its text.
A checkpoint is always whole (msae_core.runs.checkpoint); the run's logs are written through
msae_core.runs.folder, their one owner.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from msae_core import dist
from msae_core import metrics as M
from msae_core import sae_io
from msae_core.artifacts import RUN_CONFIG, SAE_CONFIG, SAE_WEIGHTS
from msae_core.configutil import add_dataclass_args, overrides_from_args
from msae_core.data.loader import BatchLoader, limit_outliers
from msae_core.devices import resolve_device
from msae_core.errors import MsaeError
from msae_core.procs import FolderLock, StopFlag, msae_command, spawn
from msae_core.sae import SAE, SAEConfig, SAEOutput, build_sae
from msae_core.runs.checkpoint import (checkpoint_step, cpu_copy, find_checkpoint, load_checkpoint,
                                           promote_checkpoint, remove_temporaries, rng_state, set_rng_state,
                                           write_checkpoint)
from msae_core.runs.config import DataConfig, RunConfig, TrainConfig, config_mismatch
from msae_core.runs.folder import (append_events, append_metrics, read_status, refuse_foreign_out,
                                           truncate_logs, write_status, write_trace)

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


def _batch_metrics(x_BD: torch.Tensor, out: SAEOutput) -> dict:
    """l0 and explained variance of the step's batch, from the step's own forward output."""
    with torch.no_grad():
        x_hat_BD, f_BF = out.x_hat.detach().float(), out.f.detach().float()
        return {"l0": float(M.l0(f_BF)), "explained_variance": float(M.explained_variance(x_BD, x_hat_BD))}


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
    if dist.world_size() > 1 and not dist.is_main():
        return _follow(config, out_dir, progress, stop, store)
    gate = {"open": False}  # data-parallel: the other ranks wait until rank 0 accepts the folder
    try:
        refuse_foreign_out(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with FolderLock(out_dir, what="training"), (stop or StopFlag()) as stop:
            return _lead(config, out_dir, progress, stop, store, gate)
    except BaseException:
        if not gate["open"]:
            dist.all_max(1)  # refused: the other ranks stop too (_follow)
        raise


def _absolute_paths(config: RunConfig) -> RunConfig:
    """`config` with its store and cache folders absolute (a relative one means the folder the
    command ran in, which a page served from elsewhere would not find)."""
    d = config.data
    fix = {k: str(Path(v).expanduser().resolve()) for k, v in (("acts", d.acts), ("cache", d.cache)) if v}
    return dataclasses.replace(config, data=dataclasses.replace(d, **fix)) if fix else config


def _lead(config: RunConfig, out_dir: Path, progress: bool, stop: StopFlag, store: Any, gate: dict) -> RunResult:
    """train() under the folder lock: the folder's checks, then the run. Rank 0 of a data-parallel
    run opens `gate` (and tells the other ranks to go on) once the folder is accepted."""
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
    dist.all_max(0)
    gate["open"] = True
    try:
        prev = read_status(out_dir)
    except MsaeError:
        prev = {}
    config = _absolute_paths(config)  # readers of the run (the workbench, evals) start from other folders
    config.save(existing_cfg)
    write_status(out_dir, state="running", pid=os.getpid(), error=None, eta_s=None,
                 total_steps=config.train.steps, started=prev.get("started") or time.time())
    try:
        return _Fit(config, out_dir, store, stop, ckpt).run(progress)
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


def _follow(config: RunConfig, out_dir: Path, progress: bool, stop: "StopFlag | None", store: Any) -> RunResult:
    """A rank other than 0 of a data-parallel run: it waits for rank 0 to accept the run folder,
    then trains its share of every batch and writes nothing."""
    if dist.all_max(0):
        raise MsaeError(f"rank 0 refused the run folder {out_dir} (its error says why)")
    with (stop or StopFlag()) as stop:
        return _Fit(config, out_dir, store, stop, find_checkpoint(out_dir)).run(progress=False)


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


class _Fit:
    """One call of train() past its checks: the SAE, its optimizer, the running loss sums, and the
    loop `run` over `_step`, `_log`, `_snapshot` and `_checkpoint`. `done` (= s + 1) counts
    completed steps, as the logs and checkpoints do."""

    def __init__(self, config: RunConfig, out_dir: Path, store: Any, stop: StopFlag, ckpt: Path | None):
        self.config, self.tc, self.out_dir, self.store, self.stop = config, config.train, out_dir, store, stop
        self.device = resolve_device(self.tc.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.autocast = bool(self.tc.bf16 and self.device.type == "cuda")
        self.writes = dist.is_main()  # data-parallel: rank 0 alone writes the run folder
        self.world = dist.world_size()
        if self.world > 1:  # rank 0 promotes a `.checkpoint.old` before anyone reads it
            if self.writes and ckpt is not None:
                promote_checkpoint(out_dir, ckpt)
            dist.barrier()
            ckpt = find_checkpoint(out_dir)
        state: dict = {}
        if ckpt is not None:
            sae, opt_state, state, stream_tensors = load_checkpoint(out_dir, ckpt, self.device)
            if "stream" in state:  # a streamed run: its mixing buffer as it stood at the checkpoint
                store.restore(state["stream"], stream_tensors)
            self.start = int(state["step"])
            self.opt = torch.optim.Adam(sae.parameters(), lr=lr_at(self.start, self.tc))
            self.opt.load_state_dict(opt_state)
            set_rng_state(state.get("rng", {}))
            self.outlier_norm = state.get("outlier_norm")
            log.info("resuming %s from step %d", out_dir, self.start)
        else:
            self.start = 0
            torch.manual_seed(self.tc.seed)
            sae = build_sae(config.sae).to(self.device)
            self._fit_input_scale(sae)
            self.opt = torch.optim.Adam(sae.parameters(), lr=lr_at(0, self.tc))
            if self.writes:
                for name in (SAE_WEIGHTS, SAE_CONFIG):
                    (out_dir / name).unlink(missing_ok=True)
        self.sae: SAE = sae
        self.sae.train()
        if self.writes:
            truncate_logs(out_dir, self.start)
            remove_temporaries(out_dir)
        self.last_ckpt: int | None = self.start if ckpt is not None else None  # the last one written
        self._ckpt_thread: threading.Thread | None = None  # the checkpoint being written, if any
        self._ckpt_error: BaseException | None = None
        self.t_ckpt = time.monotonic()
        self.last_row: dict = {}
        # running sums of the losses since the last metrics line; the checkpoint keeps them (float32
        # values are exact in json), so a resumed run's metrics.jsonl equals an uninterrupted run's
        self.sums: dict[str, torch.Tensor] = {
            k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in state.get("log_sums", {}).items()}
        self.n_sum = int(state.get("log_n", 0))
        self.t_interval = time.perf_counter()
        # the first step whose loss was not finite (-1: none yet), its loss, and whether its batch
        # held NaN/inf: kept on the device so that a step never waits for it
        self.bad_at = torch.full((), -1, dtype=torch.long, device=self.device)
        self.bad_loss = torch.zeros((), device=self.device)
        self.bad_data = torch.zeros((), dtype=torch.bool, device=self.device)

    def _fit_input_scale(self, sae: SAE) -> None:
        """The fixed input normalisation, from a sample of the store, and on that sample the
        outlier norm (data.outliers: outlier_factor x the median row norm; kept in the checkpoint)."""
        sample_ND = self.store.input_sample(max(self.tc.batch_size, 16_384), self.tc.seed)
        if not bool(torch.isfinite(sample_ND).all()):
            raise MsaeError(self.store.nonfinite_problem() or "non-finite activations in the store")
        if self.world > 1 and getattr(self.store, "streamed", False):  # each rank streamed its own
            # rows: every rank fits the same scale on all of them (as many rows from each)
            n = -int(dist.all_max(-len(sample_ND)))
            sample_ND = dist.gather_rows(sample_ND[:n].contiguous())
        sae.fit_input_scale_(sample_ND.to(self.device))
        data = self.config.data
        self.outlier_norm = None
        if data.outliers != "keep":
            median = float(sample_ND.float().norm(dim=1).median())
            self.outlier_norm = data.outlier_factor * median
            log.info("%s rows above %.4g (%gx the median norm %.4g)", data.outliers, self.outlier_norm,
                     data.outlier_factor, median)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, progress: bool) -> RunResult:
        tc = self.tc
        if self.start >= tc.steps:  # already trained this far: (re)write final weights only
            return self._finish()
        if self.stop.signum is not None:  # cancelled while starting up: nothing trained, nothing to save
            return self._end("cancelled", self.start, f"cancelled by signal "
                             f"{signal.Signals(self.stop.signum).name} before step {self.start + 1}")
        bar = tqdm(total=tc.steps, initial=self.start, disable=None if progress else True,
                   desc=self.out_dir.name, unit="step", dynamic_ncols=True)
        self.loader = BatchLoader(self.store, tc.batch_size, tc.seed, self.start, self.device,
                                  part=(dist.rank(), self.world))
        try:
            for s in range(self.start, tc.steps):
                done = s + 1
                x_BD, out = self._step(s)
                log_due = done % tc.log_every == 0 or done == tc.steps
                snap_due = bool(tc.snapshot_interval) and done % tc.snapshot_interval == 0
                stopping = self._stopping(log_due)  # read once: the checkpoint and the end agree
                ckpt_due = (done % tc.checkpoint_every == 0 or done == tc.steps or stopping
                            or (log_due and self._checkpoint_time_due()))
                if log_due or snap_due or ckpt_due:  # the one host sync: read the bad-loss flag
                    if dist.all_max(int(self.bad_at)) >= 0:
                        return self._bad_loss()
                    events = self.sae.drain_events()
                    if self.writes:
                        append_events(self.out_dir, events)
                if log_due:
                    self._log(done, x_BD, out, bar)
                if snap_due:
                    self._snapshot(done)
                bar.update(1)
                if ckpt_due:
                    self._checkpoint(done)
                if stopping and done < tc.steps:
                    return self._end("cancelled", done, f"cancelled by signal "
                                     f"{signal.Signals(self.stop.signum or signal.SIGTERM).name} at step "
                                     f"{done}; checkpoint written")
            self._join_checkpoint()
        finally:
            self.loader.close()
            bar.close()
            if self._ckpt_thread is not None:  # leaving on an error: the write still ends whole
                self._ckpt_thread.join()
        return self._finish()

    def _checkpoint_time_due(self) -> bool:
        """checkpoint_minutes have passed since the last checkpoint (rank 0's clock decides)."""
        if not self.tc.checkpoint_minutes:
            return False
        due = time.monotonic() - self.t_ckpt >= 60 * self.tc.checkpoint_minutes
        return bool(dist.all_max(due if self.writes else 0))

    def _stopping(self, check_step: bool) -> bool:
        """Whether to stop after this step: the signal flag; data-parallel, any rank's flag,
        compared at log steps only (all ranks must stop at the same step)."""
        if self.world == 1:
            return self.stop.signum is not None
        return check_step and bool(dist.all_max(self.stop.signum is not None))

    def _step(self, s: int) -> tuple[torch.Tensor, SAEOutput]:
        """One optimizer step on batch s: (the batch, the step's forward output). Nothing here
        waits for the device: a non-finite loss is recorded on the device (`bad_at`, the loss,
        whether the batch itself was not finite) and read by `run` at its next log, snapshot or
        checkpoint step, before anything of the bad step is written."""
        x_BD = self.loader.next(s)
        if self.outlier_norm is not None:  # --outliers exclude|clip; metrics: the rows it touched a step
            x_BD, n_over = limit_outliers(x_BD, self.outlier_norm, self.config.data.outliers)
            self.sums["outlier_rows"] = self.sums["outlier_rows"] + n_over if "outlier_rows" in self.sums else n_over
        lr = lr_at(s, self.tc)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            step_out = self.sae.loss_terms(x_BD, s)
        loss = step_out.losses["loss"]
        with torch.no_grad():
            first = (self.bad_at < 0) & ~torch.isfinite(loss.detach())
            self.bad_at = torch.where(first, s, self.bad_at)
            self.bad_loss = torch.where(first, loss.detach().float(), self.bad_loss)
            self.bad_data = self.bad_data | (first & ~torch.isfinite(x_BD).all())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients_(self.sae.parameters())
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.tc.grad_clip)
        self.opt.step()
        self.sae.post_step_(s)
        for k, v in step_out.losses.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.detach().float()
                self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n_sum += 1
        return x_BD, step_out.out

    def _log(self, done: int, x_BD: torch.Tensor, out: SAEOutput, bar: Any) -> None:
        """One metrics line: the mean losses since the last line, the batch's l0 and explained
        variance, the SAE's counters, speed; then the status's step and eta."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_time = (now - self.t_interval) / max(self.n_sum, 1)
        row: dict[str, Any] = {"step": done}
        row.update({k: float(dist.all_mean_(v.clone())) / self.n_sum for k, v in sorted(self.sums.items())})
        row.update(_batch_metrics(x_BD, out))
        row.update({k: float(v) for k, v in self.sae.step_counts().items()})
        row.update({"lr": lr_at(done - 1, self.tc), "step_time_s": step_time,
                    "tokens_per_s": self.tc.batch_size / step_time if step_time > 0 else None,
                    "time": time.time()})
        self.last_row = row
        self.sums, self.n_sum, self.t_interval = {}, 0, now
        if not self.writes:
            return
        append_metrics(self.out_dir, row)
        write_status(self.out_dir, step=done, eta_s=step_time * (self.tc.steps - done))
        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", l0=f"{row.get('l0', float('nan')):.1f}",
                        refresh=False)

    def _snapshot(self, done: int) -> None:
        obs = self.sae.observables()
        if obs and self.writes:
            write_trace(self.out_dir, done, {k: torch.as_tensor(v).detach().cpu() for k, v in obs.items()})

    def _checkpoint(self, done: int) -> None:
        state = {"step": done, "rng": rng_state(), "time": time.time(), "config": self.config.to_dict(),
                 "log_sums": {k: float(v) for k, v in self.sums.items()}, "log_n": self.n_sum,
                 "outlier_norm": self.outlier_norm}
        stream = None
        if getattr(self.store, "streamed", False):  # data-parallel: every rank's buffer, to rank 0
            ranks = dist.gather_objects(self.store.state(done))
            if ranks is not None:
                from msae_core.data.stream import merge_rank_states

                state["stream"], stream = merge_rank_states(ranks)
        self.t_ckpt = time.monotonic()
        if not self.writes:
            self.last_ckpt = done
            return
        self._join_checkpoint()  # one write at a time; a failed one raises here
        sae_cpu = copy.deepcopy(self.sae).to("cpu")  # copies: training goes on while they are written
        opt_cpu = cpu_copy(self.opt.state_dict())
        self._ckpt_thread = threading.Thread(target=self._write_checkpoint, name="msae-checkpoint",
                                             args=(sae_cpu, opt_cpu, state, stream, done))
        self._ckpt_thread.start()

    def _write_checkpoint(self, sae_cpu: SAE, opt_cpu: dict, state: dict, stream: Any, done: int) -> None:
        try:
            write_checkpoint(self.out_dir, sae_cpu, opt_cpu, state, stream)
            self.last_ckpt = done
        except BaseException as exc:  # noqa: BLE001 - raised by the training thread (_join_checkpoint)
            self._ckpt_error = exc

    def _join_checkpoint(self) -> None:
        """Wait for the checkpoint being written; raise its error (a full disk) in this thread."""
        if self._ckpt_thread is not None:
            self._ckpt_thread.join()
            self._ckpt_thread = None
        if self._ckpt_error is not None:
            exc, self._ckpt_error = self._ckpt_error, None
            raise exc

    # -- endings -----------------------------------------------------------------------------------
    def _bad_loss(self) -> RunResult:
        """The loss was not finite at step `bad_at`: `failed` naming the rows when that batch itself
        was not finite (the data), else `diverged` (the optimisation). The weights in memory are
        dropped; the last checkpoint, written before that step, is what the folder keeps."""
        s = int(dist.all_max(int(self.bad_at)))
        self._join_checkpoint()  # "last good checkpoint": the last one written
        if self.writes:
            append_events(self.out_dir, [e for e in self.sae.drain_events() if e["step"] < s])
        if bool(self.bad_data):
            return self._end("failed", s, self.store.nonfinite_problem() or f"non-finite activations at step {s + 1}")
        kept = (f"last good checkpoint at step {self.last_ckpt} kept" if self.last_ckpt is not None
                else "no checkpoint was written before it")
        return self._end("diverged", s, f"loss became {float(self.bad_loss)} at step {s + 1} "
                                        f"(lr {lr_at(s, self.tc):.3g}): diverged; {kept}")

    def _end(self, state: str, step: int, msg: str) -> RunResult:
        self._join_checkpoint()
        if self.writes:
            write_status(self.out_dir, state=state, step=step, error=msg, pid=None, eta_s=None)
        (log.warning if state == "cancelled" else log.error)(msg)
        return RunResult(state, step, self.out_dir, self.last_row, msg, self.start)

    def _finish(self) -> RunResult:
        step = max(self.start, self.tc.steps)
        streamed = getattr(self.store, "streamed", False)
        windows = int(dist.all_max(self.store.windows_used)) if streamed else 0  # on every rank
        if not self.writes:
            return RunResult("done", step, self.out_dir, self.last_row, None, self.start)
        sae_io.save_sae(self.sae, self.out_dir)
        extra = {}
        if streamed:  # the evals hold out the windows trained on
            extra["stream_windows"] = windows
            extra["stream_outliers"] = self.store.outlier_summary()  # rank 0's rows: their norm outliers
            self.store.finish_cache()
        write_status(self.out_dir, state="done", step=step, eta_s=0, pid=None, error=None,
                     finished=time.time(), **extra)
        return RunResult("done", step, self.out_dir, self.last_row, None, self.start)


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
    write_status(out_dir, eval="starting")  # the child writes which eval it runs (evals.run_evals)
    rc = spawn(msae_command("eval", out_dir, "--evals", ",".join(evals)), detach=False).wait()
    if rc != 0:
        from msae_core.runs.folder import read_status

        said = str(read_status(out_dir).get("eval") or "")
        write_status(out_dir, eval=said if said.startswith("failed") else f"failed (exit {rc}, see train.log)")
    return rc


def _ended_early(result: RunResult) -> bool:
    """For the command line: MsaeError (one line) when the run diverged or failed, True when it
    was cancelled (exit 130; train() logged the cause), False when it is done."""
    if result.state in ("diverged", "failed"):
        raise MsaeError(result.error or result.state)
    return result.state == "cancelled"


def _run_data_parallel(args: argparse.Namespace) -> int:
    """`msae train` as one of the processes `torchrun --nproc_per_node N -m msae_core.cli train`
    starts: join the group, train this rank's share of every batch (train() makes rank 0 the one
    that locks and writes the folder), evals by rank 0 once done."""
    if args.max_parallel:
        raise MsaeError("--max-parallel queues separate runs; under torchrun the ranks form one run: drop it")
    out = Path(args.out)
    cfg = config_from_args(args)
    device = dist.init_from_env(cfg.train.device)
    try:
        n = dist.world_size()
        if cfg.train.batch_size % n:
            raise MsaeError(f"batch_size {cfg.train.batch_size} must divide evenly over the {n} ranks")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
        store = cfg.check()
        with StopFlag() as stop:
            result = train(cfg, out, progress=not args.no_progress and dist.is_main(), stop=stop, store=store)
        if _ended_early(result):
            return 130
        dist.barrier()
        if cfg.train.evals and dist.is_main():
            return run_evals(out, list(cfg.train.evals))
        return 0
    finally:
        dist.close()


def run_cli(args: argparse.Namespace) -> int:
    if dist.launched_by_torchrun():
        return _run_data_parallel(args)
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
            from msae_core.runs.jobs import wait_for_slot

            root = Path(args.queue_root) if args.queue_root else out.resolve().parent
            if not wait_for_slot(out, root, args.max_parallel, stop=stop):
                return 130
        result = train(cfg, out, progress=not args.no_progress, stop=stop, store=store)
        if _ended_early(result):
            return 130
        if cfg.train.evals:  # still under the lock: no trainer rewrites the weights being evaluated
            return run_evals(out, list(cfg.train.evals))
    return 0
