"""The training loop: `_Fit` trains one run from its first (or checkpointed) step to its last,
one optimizer step at a time, and decides at each step, through one named tuple (`Due`), whether
to log, snapshot, checkpoint or stop. Its parts: `_step` (the batch, the loss, Adam), `_log`
(metrics.jsonl), `_snapshot` (momentum traces), `_checkpoint` (written by a thread beside the next
steps), `_finish` (final weights). The run's life around it (the folder's checks, the lock,
data-parallel ranks, the evals after training) is msae_core.training.trainer's.

Loop, step s = 0 .. steps-1 ("completed" = s + 1 is what the logs call `step`):
    x = store.batch(s, batch_size, seed)          # deterministic in (seed, s): resume can skip;
                                                  # read ahead by a thread (data.loader)
    losses, out = sae.loss_terms(x, s); sae.take_in_(out, s, every rank's rows when data-parallel)
    Adam step at the warm-up lr; sae.post_step_(s)
    then, on their schedules, a metrics line, a trace snapshot, a checkpoint (runs.checkpoint)
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from msae_core import dist
from msae_core import metrics as M
from msae_core import sae_io
from msae_core.artifacts import SAE_CONFIG, SAE_WEIGHTS
from msae_core.data.loader import BatchLoader, limit_outliers
from msae_core.data.source import ActivationSource
from msae_core.devices import resolve_device
from msae_core.errors import MsaeError
from msae_core.procs import StopFlag
from msae_core.runs.checkpoint import (SAESnapshot, cpu_copy, find_checkpoint, load_checkpoint, promote_checkpoint,
                                      remove_temporaries, rng_state, set_rng_state, write_checkpoint)
from msae_core.runs.config import RunConfig, TrainConfig
from msae_core.runs.folder import append_events, append_metrics, truncate_logs, write_status, write_trace
from msae_core.runs.tracking import open_mirrors
from msae_core.sae import SAE, SAEOutput, build_sae

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


def input_sample_rows(tc: TrainConfig) -> int:
    """Rows of the sample a fresh run fits its input scale on (and a stream's first fill holds)."""
    return max(tc.batch_size, 16_384)


def _batch_metrics(x_BD: torch.Tensor, out: SAEOutput) -> dict:
    """l0 and explained variance of the step's batch, from the step's own forward output."""
    with torch.no_grad():
        x_hat_BD, f_BF = out.x_hat.detach().float(), out.f.detach().float()
        return {"l0": float(M.l0(f_BF)), "explained_variance": float(M.explained_variance(x_BD, x_hat_BD))}


class Due(NamedTuple):
    """The loop's decisions after a step, each on its own schedule (`_Fit._due`)."""

    log: bool          # a metrics line (every log_every steps and the last)
    snapshot: bool     # a momentum trace snapshot (every snapshot_interval steps)
    checkpoint: bool   # a checkpoint (checkpoint_every, the last step, a stop, checkpoint_minutes)
    stop: bool         # a signal arrived: end after this step's checkpoint


class _Fit:
    """One call of train() past its checks: the SAE, its optimizer, the running loss sums, and the
    loop `run` over `_step`, `_log`, `_snapshot` and `_checkpoint`. `done` (= s + 1) counts
    completed steps, as the logs and checkpoints do."""

    def __init__(self, config: RunConfig, out_dir: Path, store: ActivationSource, stop: StopFlag,
                 ckpt: Path | None, owns_source: bool = True):
        self.config, self.tc, self.out_dir, self.store, self.stop = config, config.train, out_dir, store, stop
        self.device = resolve_device(self.tc.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.autocast = bool(self.tc.bf16 and self.device.type == "cuda")
        self.writes = dist.is_main()  # data-parallel: rank 0 alone writes the run folder
        # a member of a streamed one-pass group shares the stream: the group restores and
        # checkpoints it (training.group), this run records at which steps it checkpointed
        self.owns_source = owns_source
        self.checkpointed_at: int | None = None
        self.world = dist.world_size()
        if self.world > 1:  # rank 0 promotes a `.checkpoint.old` before anyone reads it
            if self.writes and ckpt is not None:
                promote_checkpoint(out_dir, ckpt)
            dist.barrier()
            ckpt = find_checkpoint(out_dir)
        state: dict = {}
        if ckpt is not None:
            sae, opt_state, state, stream_tensors = load_checkpoint(out_dir, ckpt, self.device)
            if "stream" in state and owns_source:  # a streamed run: its mixing buffer at the checkpoint
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
        if self.world > 1:  # its statistics over every rank's rows: the ranks' collectives
            self.sae.set_collectives(dist.RankCollectives())
        self.sae.train()
        if self.writes:
            truncate_logs(out_dir, self.start)
            remove_temporaries(out_dir)
        # experiment trackers, rewritten from metrics.jsonl as the checkpoint left it (runs.tracking)
        self.mirrors = open_mirrors(self.tc.log_to, out_dir, config.to_dict()) if self.writes else []
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
        sample_ND = self.store.input_sample(input_sample_rows(self.tc), self.tc.seed)
        if not bool(torch.isfinite(sample_ND).all()):
            raise MsaeError(self.store.nonfinite_problem() or "non-finite activations in the store")
        if self.world > 1 and self.store.streamed:  # each rank streamed its own
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
        """Train from `start` to the last step, reading batches from the source (one run alone;
        training.group feeds several runs from one loader through begin/advance/complete)."""
        ended = self.begin(progress)
        if ended is not None:
            self.close()
            return ended
        loader = BatchLoader(self.store, self.tc.batch_size, self.tc.seed, self.start, self.device,
                             part=(dist.rank(), self.world))
        try:
            for s in range(self.start, self.tc.steps):
                ended = self.advance(s, loader.next(s))
                if ended is not None:
                    return ended
            return self.complete()
        finally:
            loader.close()
            self.close()

    def begin(self, progress: bool) -> RunResult | None:
        """Before the first step: how the run ends already (trained this far: its final weights
        written; cancelled while starting up), else None and the progress bar is up."""
        if self.start >= self.tc.steps:  # already trained this far: (re)write final weights only
            return self._finish()
        if self.stop.signum is not None:  # cancelled while starting up: nothing trained, nothing to save
            return self._end("cancelled", self.start, f"cancelled by signal "
                             f"{signal.Signals(self.stop.signum).name} before step {self.start + 1}")
        self.bar = tqdm(total=self.tc.steps, initial=self.start, disable=None if progress else True,
                        desc=self.out_dir.name, unit="step", dynamic_ncols=True)
        return None

    def advance(self, s: int, x_BD: torch.Tensor) -> RunResult | None:
        """Step s on batch `x_BD` (batch s of the run's order), then what is due after it: a
        metrics line, a snapshot, a checkpoint. None while the run goes on; how it ended when the
        loss stopped being finite or a stop was asked for."""
        done = s + 1
        x_BD, out = self._step(s, x_BD)
        due = self._due(done)
        if due.log or due.snapshot or due.checkpoint:  # the one host sync: read the bad-loss flag
            if dist.all_max(int(self.bad_at)) >= 0:
                return self._bad_loss()
            events = self.sae.drain_events()
            if self.writes:
                append_events(self.out_dir, events)
        if due.log:
            self._log(done, x_BD, out, self.bar)
        if due.snapshot:
            self._snapshot(done)
        self.bar.update(1)
        del x_BD, out  # the step's (B, F) tensors go before the next step makes its own
        if due.checkpoint:
            self._checkpoint(done)
        if due.stop and done < self.tc.steps:
            return self._end("cancelled", done, f"cancelled by signal "
                             f"{signal.Signals(self.stop.signum or signal.SIGTERM).name} at step "
                             f"{done}; checkpoint written")
        return None

    def complete(self) -> RunResult:
        """After the last step: the checkpoint being written, then the final weights and status."""
        self._join_checkpoint()
        return self._finish()

    def close(self) -> None:
        """The progress bar closed and a checkpoint being written finished (also when leaving on an
        error: the write still ends whole)."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()
            self.bar = None
        for m in self.mirrors:
            m.close()
        self.mirrors = []
        if self._ckpt_thread is not None:
            self._ckpt_thread.join()

    def _due(self, done: int) -> "Due":
        """What follows step `done` (completed steps). The stop flag is read once, so the
        checkpoint and the end agree; data-parallel, the collectives run in this order on every
        rank (the stop flag at log steps, then the clock)."""
        tc = self.tc
        log_due = done % tc.log_every == 0 or done == tc.steps
        snapshot = bool(tc.snapshot_interval) and done % tc.snapshot_interval == 0
        stop = self._stopping(log_due)
        checkpoint = (done % tc.checkpoint_every == 0 or done == tc.steps or stop
                      or (log_due and self._checkpoint_time_due()))
        return Due(log_due, snapshot, checkpoint, stop)

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

    def _step(self, s: int, x_BD: torch.Tensor) -> tuple[torch.Tensor, SAEOutput]:
        """One optimizer step on batch s, `x_BD`: (the batch, the step's forward output). Nothing
        here waits for the device: a non-finite loss is recorded on the device (`bad_at`, the loss,
        whether the batch itself was not finite) and read by `advance` at its next log, snapshot or
        checkpoint step, before anything of the bad step is written."""
        if self.outlier_norm is not None:  # --outliers exclude|clip; metrics: the rows it touched a step
            x_BD, n_over = limit_outliers(x_BD, self.outlier_norm, self.config.data.outliers)
            self.sums["outlier_rows"] = self.sums["outlier_rows"] + n_over if "outlier_rows" in self.sums else n_over
        lr = lr_at(s, self.tc)
        for g in self.opt.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            step_out = self.sae.loss_terms(x_BD, s)
            # statistics of the whole batch (the momentum tracker): data-parallel, every rank's rows
            whole = (dist.gather_sparse_rows(step_out.out.f.detach())
                     if self.world > 1 and self.sae.takes_whole_batch else None)
            self.sae.take_in_(step_out.out, s, whole)
        loss = step_out.losses["loss"]
        with torch.no_grad():
            first = (self.bad_at < 0) & ~torch.isfinite(loss.detach())
            self.bad_at = torch.where(first, s, self.bad_at)
            self.bad_loss = torch.where(first, loss.detach().float(), self.bad_loss)
            self.bad_data = self.bad_data | (first & ~torch.isfinite(x_BD).all())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # rows differ by rank when outliers are excluded: weigh each rank by its rows
        dist.average_gradients_(self.sae.parameters(),
                                x_BD.shape[0] if self.config.data.outliers == "exclude" else None)
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
        for m in self.mirrors:
            m.add(row)
        write_status(self.out_dir, step=done, eta_s=step_time * (self.tc.steps - done))
        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", l0=f"{row.get('l0', float('nan')):.1f}",
                        refresh=False)

    def _snapshot(self, done: int) -> None:
        obs = self.sae.observables()
        if obs is not None and self.writes:
            write_trace(self.out_dir, done, {k: v.detach().cpu() for k, v in obs._asdict().items()})

    def _checkpoint(self, done: int) -> None:
        state = {"step": done, "rng": rng_state(), "time": time.time(), "config": self.config.to_dict(),
                 "log_sums": {k: float(v) for k, v in self.sums.items()}, "log_n": self.n_sum,
                 "outlier_norm": self.outlier_norm}
        stream = None
        self.checkpointed_at = done
        if self.store.streamed and self.owns_source:  # data-parallel: every rank's buffer, to rank 0
            ranks = dist.gather_objects(self.store.state(done))
            if ranks is not None:
                from msae_core.data.stream import merge_rank_states

                state["stream"], stream = merge_rank_states(ranks)
        self.t_ckpt = time.monotonic()
        if not self.writes:
            self.last_ckpt = done
            return
        self._join_checkpoint()  # one write at a time; a failed one raises here
        sae_cpu = SAESnapshot(self.sae)  # CPU copies, no second one on the device: training goes on meanwhile
        opt_cpu = cpu_copy(self.opt.state_dict())
        self._ckpt_thread = threading.Thread(target=self._write_checkpoint, name="msae-checkpoint",
                                             args=(sae_cpu, opt_cpu, state, stream, done))
        self._ckpt_thread.start()

    def _write_checkpoint(self, sae_cpu: SAESnapshot, opt_cpu: dict, state: dict, stream: Any, done: int) -> None:
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
            append_events(self.out_dir, [e for e in self.sae.drain_events() if e.step < s])
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
        # a group's member done before this process (owns_source False) keeps the stream's figures
        # of its own end: the group's stream now stands elsewhere
        streamed = self.store.streamed and (self.owns_source or self.start < self.tc.steps)
        windows = int(dist.all_max(self.store.windows_used)) if streamed else 0  # on every rank
        if not self.writes:
            return RunResult("done", step, self.out_dir, self.last_row, None, self.start)
        sae_io.save_sae(self.sae, self.out_dir)
        extra = {}
        if streamed:  # the evals hold out the windows trained on
            extra["stream_windows"] = windows
            if self.world == 1:  # where the packed stream stands after them: the evals start there
                extra["stream_cursor"] = self.store.cursor()
            extra["stream_outliers"] = self.store.outlier_summary()  # rank 0's rows: their norm outliers
            self.store.finish_cache()
        write_status(self.out_dir, state="done", step=step, eta_s=0, pid=None, error=None,
                     finished=time.time(), **extra)
        return RunResult("done", step, self.out_dir, self.last_row, None, self.start)
