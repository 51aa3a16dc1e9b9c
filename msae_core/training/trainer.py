"""The run's life: `train()` takes a config and a run folder, checks the folder (another run's
settings, another kind of folder), locks it, resumes from its checkpoint, runs the loop
(msae_core.training.loop), survives faults, and starts the evals after training; under torchrun
rank 0 leads and writes, the others follow. `msae train` is msae_core.training.cli.

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

import contextlib
import dataclasses
import errno
import json
import logging
import os
import time
from pathlib import Path

from msae_core import dist
from msae_core.artifacts import RUN_CONFIG, SAE_WEIGHTS
from msae_core.data.source import ActivationSource
from msae_core.errors import MsaeError
from msae_core.procs import FolderLock, StopFlag, msae_command, spawn
from msae_core.runs.checkpoint import checkpoint_step, find_checkpoint
from msae_core.runs.config import RunConfig, config_mismatch
from msae_core.runs.folder import read_status, refuse_foreign_out, write_status
from msae_core.training.loop import RunResult, _Fit

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------ train
def train(config: RunConfig, out_dir: str | os.PathLike, progress: bool = True,
          stop: "StopFlag | None" = None, store: "ActivationSource | None" = None) -> RunResult:
    """Train (or resume) the run in `out_dir`. Returns how it ended; writes status.json throughout.

    Invalid settings, a folder of another kind (a store, a runs root) and a folder another process
    trains in raise MsaeError before anything is written. The folder is locked for as long as this
    runs (procs.FolderLock); SIGTERM/SIGINT are caught before the status says `running`, so a
    cancel at any moment ends the run `cancelled`. A NaN loss returns `diverged`, a full disk
    `failed` with the last whole checkpoint kept; an unexpected exception is recorded as `failed`
    and re-raised. `store`: the activation source an entry point opened with `config.check()`,
    which validated the settings then: they are not validated again, only resolved against it
    (sae.d_in, the dead window); without one they are checked and the source opened here."""
    config, store = config.check() if store is None else (config.resolved(store), store)
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


def absolute_paths(config: RunConfig) -> RunConfig:
    """`config` with its store and cache folders absolute (a relative one means the folder the
    command ran in, which a page served from elsewhere would not find)."""
    d = config.data
    fix = {k: str(Path(v).expanduser().resolve()) for k, v in (("acts", d.acts), ("cache", d.cache)) if v}
    return dataclasses.replace(config, data=dataclasses.replace(d, **fix)) if fix else config


def _lead(config: RunConfig, out_dir: Path, progress: bool, stop: StopFlag, store: ActivationSource, gate: dict) -> RunResult:
    """train() under the folder lock: the folder's checks, then the run. Rank 0 of a data-parallel
    run opens `gate` (and tells the other ranks to go on) once the folder is accepted."""
    config, ckpt = accept_folder(config, out_dir, gate)
    try:
        return _Fit(config, out_dir, store, stop, ckpt).run(progress)
    except BaseException as exc:
        err = failure_text(exc, out_dir)
        write_status(out_dir, state="failed", error=err, pid=None, eta_s=None)
        if isinstance(exc, OSError):
            raise MsaeError(err) from exc
        raise


def accept_folder(config: RunConfig, out_dir: Path, gate: dict | None = None,
                  group: int | None = None) -> tuple[RunConfig, Path | None]:
    """The run folder's checks (a run with other settings is refused), its config.json and status
    `running` written: (the config as the folder records it, the checkpoint to resume from).
    Called under the folder's lock. `group`: the run trains in a one-pass group of that many
    (training.group; its status says so: a cancel then stops this run alone, runs.jobs.cancel_run)."""
    ckpt = refuse_other_settings(config, out_dir)
    if gate is not None:
        dist.all_max(0)
        gate["open"] = True
    try:
        prev = read_status(out_dir)
    except MsaeError:
        prev = {}
    config = absolute_paths(config)  # readers of the run (the workbench, evals) start from other folders
    config.save(out_dir / RUN_CONFIG)
    write_status(out_dir, state="running", pid=os.getpid(), error=None, eta_s=None, group=group,
                 total_steps=config.train.steps, started=prev.get("started") or time.time())
    return config, ckpt


def refuse_other_settings(config: RunConfig, out_dir: Path) -> Path | None:
    """MsaeError when `out_dir` holds a run (a checkpoint or final weights) with other settings;
    else the checkpoint to resume from, if any."""
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
    return ckpt


def failure_text(exc: BaseException, out_dir: Path) -> str:
    """The status line of a run that failed with `exc`."""
    if isinstance(exc, MsaeError):
        return str(exc)
    if isinstance(exc, OSError):
        return _os_error_text(exc, out_dir)
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _follow(config: RunConfig, out_dir: Path, progress: bool, stop: "StopFlag | None", store: ActivationSource) -> RunResult:
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


def eval_command(out_dir: Path, evals: list[str], config: RunConfig) -> list[str]:
    """`msae eval` of a run just trained, on the device it trained on (a sweep spread over GPUs
    evaluates each point on its own) with the model in the dtype its activations came in."""
    from msae_core.devices import resolve_device

    dtype = config.data.model_dtype if config.data.source == "stream" else "auto"
    return msae_command("eval", out_dir, "--evals", ",".join(evals),
                        "--device", str(resolve_device(config.train.device)), "--model-dtype", dtype)


def run_evals(out_dir: Path, evals: list[str], config: RunConfig) -> int:
    """`msae eval RUN --evals a,b` in a child process (eval_command); its outcome goes into
    status.json `eval`."""
    write_status(out_dir, eval="starting")  # the child writes which eval it runs (evals.run_evals)
    rc = spawn(eval_command(out_dir, evals, config), detach=False).wait()
    if rc != 0:
        from msae_core.runs.folder import read_status

        said = str(read_status(out_dir).get("eval") or "")
        write_status(out_dir, eval=said if said.startswith("failed") else f"failed (exit {rc}, see train.log)")
    return rc


def ended_early(result: RunResult) -> bool:
    """For the command line: MsaeError (one line) when the run diverged or failed, True when it
    was cancelled (exit 130; train() logged the cause), False when it is done."""
    if result.state in ("diverged", "failed"):
        raise MsaeError(result.error or result.state)
    return result.state == "cancelled"


@contextlib.contextmanager
def ranks_joined(configs: list[RunConfig]):
    """As one of the processes torchrun starts: join the group for the time of the block, and give
    it `configs` on this rank's device (MsaeError when a batch does not divide over the ranks)."""
    device = dist.init_from_env(configs[0].train.device)
    try:
        n = dist.world_size()
        for c in configs:
            if c.train.batch_size % n:
                raise MsaeError(f"batch_size {c.train.batch_size} must divide evenly over the {n} ranks")
        yield [dataclasses.replace(c, train=dataclasses.replace(c.train, device=device)) for c in configs]
    finally:
        dist.close()


def train_data_parallel(cfg: RunConfig, out: Path, progress: bool) -> int:
    """`msae train` as one of the processes `torchrun --nproc_per_node N -m msae_core.cli train`
    starts: join the group, train this rank's share of every batch (train() makes rank 0 the one
    that locks and writes the folder), evals by rank 0 once done. Returns the exit code."""
    with ranks_joined([cfg]) as (cfg,):
        cfg, store = cfg.check()
        with StopFlag() as stop:
            result = train(cfg, out, progress=progress and dist.is_main(), stop=stop, store=store)
        if ended_early(result):
            return 130
        dist.barrier()
        if cfg.train.evals and dist.is_main():
            return run_evals(out, list(cfg.train.evals), cfg)
        return 0
