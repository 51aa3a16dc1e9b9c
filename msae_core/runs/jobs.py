"""Jobs: long work in its own process, started through procs.spawn, which writes its own log and
results for the pages and the CLI to poll. One run queue: `launch_run` starts `msae train` detached
(`--max-parallel N`: it waits `queued` in `wait_for_slot` until fewer than N runs under the same
root are running); sweeps (CLI and UI) start their points here; `cancel_run` stops a run at any
moment; `start_harvest` starts `msae harvest`."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from msae_core.artifacts import (
    HARVEST_LOG,
    RUN_CANCEL,
    RUN_CHECKPOINT_DIR,
    RUN_CONFIG,
    RUN_LOG,
    RUN_QUEUE_LOCK,
)
from msae_core.errors import MsaeError
from msae_core.paths import safe_run_name, stores_root
from msae_core.procs import StopFlag, msae_command, pid_alive, spawn
from msae_core.runs.config import RunConfig, config_mismatch
from msae_core.runs.checkpoint import checkpoint_step
from msae_core.runs.folder import list_runs, read_run, read_status, write_status

log = logging.getLogger(__name__)


def train_command(run_dir: str | os.PathLike) -> list[str]:
    run_dir = Path(run_dir)
    return msae_command("train", "--config", run_dir / RUN_CONFIG, "--out", run_dir)


def launch_run(config: RunConfig, root: str | os.PathLike, name: str,
               evals: tuple[str, ...] | list[str] = (), max_parallel: int | None = None,
               store: Any = None) -> Path:
    """Validate `config`, write root/<name>/config.json and status `queued`, and start training in
    a detached process (its own session, output in train.log). With `evals`, the training process
    runs `msae eval RUN --evals ...` once it is done. With `max_parallel`, the process stays
    `queued` until fewer than that many runs under `root` are running. Returns the run folder.

    A folder that already holds a finished or running run is refused; an unfinished one (failed,
    cancelled, killed) with the same settings is resumed."""
    run_dir, config = _prepare(config, root, name, evals, store)
    proc = _start_queued([(run_dir, config)], train_command(run_dir), root, max_parallel, run_dir / RUN_LOG)
    log.info("launched run %s (pid %d)", run_dir, proc.pid)
    return run_dir


def launch_group(configs: list[RunConfig], root: str | os.PathLike, names: list[str], log_path: Path,
                 evals: tuple[str, ...] | list[str] = (), max_parallel: int | None = None,
                 store: Any = None) -> list[Path]:
    """`launch_run` for runs that train in one pass (training.group; runs.onepass says which can):
    each run folder gets its config.json and status `queued` as launch_run writes them, and one
    detached `msae train-group` process trains them all (output in `log_path`, which each run's
    train.log links to when it has none yet). With `max_parallel` the group takes one place in the
    run queue. Returns the run folders."""
    prepared = [_prepare(c, root, n, evals, store) for c, n in zip(configs, names)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for run_dir, _ in prepared:
        if not (run_dir / RUN_LOG).exists() and not (run_dir / RUN_LOG).is_symlink():
            (run_dir / RUN_LOG).symlink_to(log_path.resolve())
    cmd = msae_command("train-group", "--config", *[d / RUN_CONFIG for d, _ in prepared],
                       "--out", *[d for d, _ in prepared])
    proc = _start_queued(prepared, cmd, root, max_parallel, log_path)
    log.info("launched %d runs in one pass (pid %d): %s", len(prepared), proc.pid,
             ", ".join(d.name for d, _ in prepared))
    return [d for d, _ in prepared]


def _start_queued(runs: list[tuple[Path, RunConfig]], cmd: list[str], root: str | os.PathLike,
                  max_parallel: int | None, log_path: Path) -> Any:
    """Mark `runs` queued (a one-pass group's runs with their group's size), then start `cmd`
    detached (output in `log_path`; with `max_parallel`, it waits its place in the run queue) and
    record its pid in each run's status. Returns the process."""
    for run_dir, config in runs:
        write_status(run_dir, state="queued", step=checkpoint_step(run_dir / RUN_CHECKPOINT_DIR) or 0,
                     total_steps=config.train.steps, error=None, pid=None, queued=time.time(),
                     group=len(runs) if len(runs) > 1 else None)
    if max_parallel:
        cmd = [*cmd, "--max-parallel", str(int(max_parallel)), "--queue-root", str(Path(root))]
    proc = spawn(cmd, log=log_path)
    for run_dir, _ in runs:
        write_status(run_dir, pid=proc.pid)
    return proc


def _prepare(config: RunConfig, root: str | os.PathLike, name: str, evals: tuple[str, ...] | list[str],
             store: Any) -> tuple[Path, RunConfig]:
    """The run folder root/<name> checked and its config.json written (launch_run's rules)."""
    name = safe_run_name(name)
    run_dir = Path(root) / name
    if evals:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, evals=list(evals)))
    info = read_run(run_dir) if run_dir.exists() and any(run_dir.iterdir()) else None
    old_window = ((info.config or {}).get("sae") or {}).get("dead_tokens_threshold") if info else None
    if old_window and not config.sae.dead_tokens_threshold:
        # a relaunch keeps the dead window its run started with (0 means "from the run's length",
        # which a relaunch with other steps would change under the checkpoint)
        config = dataclasses.replace(config, sae=dataclasses.replace(config.sae, dead_tokens_threshold=int(old_window)))
    config, _ = config.check(store)  # `store`: the caller's opened store for config.data.acts, if it has one
    if info is not None:
        if info.state == "running" and info.problem is None:
            raise MsaeError(f"run {name} is already running (pid {info.status.get('pid')})")
        if info.state == "done":
            raise MsaeError(f"run {name} is done already: choose another name")
        if info.config:
            diff = config_mismatch(info.config, config.to_dict())
            if diff:
                raise MsaeError(f"run {name} exists with other settings ({diff}): choose another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / RUN_CONFIG)
    return run_dir, config


def cancel_run(path: str | os.PathLike) -> bool:
    """Ask a run to stop: SIGTERM to its process (it finishes the step, checkpoints, and ends as
    `cancelled`); a run training in a one-pass group (status `group`) gets a cancel file instead,
    which stops it alone (training.group). A queued run whose process is gone is marked cancelled at
    once. Returns whether there was something to cancel."""
    run_dir = Path(path)
    try:
        s = read_status(run_dir)
    except MsaeError:
        return False
    pid = s.get("pid")
    if s.get("state") == "running" and s.get("group") and pid_alive(pid):
        (run_dir / RUN_CANCEL).touch()
        return True
    if s.get("state") in ("queued", "running") and pid_alive(pid):
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
        else:
            return True
    if s.get("state") in ("queued", "running"):
        write_status(run_dir, state="cancelled", error="cancelled (its process was not running)")
        return True
    return False


def running_runs(root: str | os.PathLike, exclude: Path | list[Path] | None = None) -> list[Path]:
    """Run folders under `root` whose state is running and whose process is alive."""
    skip = {p.resolve() for p in ([exclude] if isinstance(exclude, Path) else exclude or [])}
    out = []
    for info in list_runs(root, metrics_tail=0):
        if info.path.resolve() in skip:
            continue
        if info.state == "running" and pid_alive(info.status.get("pid")):
            out.append(info.path)
    return out


def running_processes(root: str | os.PathLike, exclude: list[Path]) -> int:
    """Training processes under `root`: a one-pass group's runs share one process, one place."""
    return len({read_status(p).get("pid") for p in running_runs(root, exclude=exclude)})


def wait_for_slot(run_dir: str | os.PathLike | list, root: str | os.PathLike, max_parallel: int,
                  poll_s: float = 1.0, timeout_s: float | None = None, stop: Any = None) -> bool:
    """Stay `queued` until fewer than `max_parallel` training processes under `root` are running
    (a one-pass group's runs are one), then mark this run (or this list of a group's runs) running
    (checked and marked under a lock file, so two waiting runs never take one slot). SIGTERM or
    SIGINT while waiting ends the run as `cancelled` (returns False); so does the timeout. `stop`:
    the caller's procs.StopFlag when it has entered one (else one is entered here)."""
    import fcntl

    run_dirs = [Path(p) for p in (run_dir if isinstance(run_dir, list) else [run_dir])]
    root = Path(root)
    with (stop or StopFlag()) as stop:
        for d in run_dirs:
            write_status(d, state="queued", pid=os.getpid())
        end = None if timeout_s is None else time.monotonic() + timeout_s
        root.mkdir(parents=True, exist_ok=True)
        while stop.signum is None:
            with open(root / RUN_QUEUE_LOCK, "a") as lockf:
                fcntl.flock(lockf, fcntl.LOCK_EX)
                try:
                    if running_processes(root, exclude=run_dirs) < max_parallel:
                        for d in run_dirs:
                            write_status(d, state="running", pid=os.getpid())
                        return True
                finally:
                    fcntl.flock(lockf, fcntl.LOCK_UN)
            if end is not None and time.monotonic() > end:
                break
            time.sleep(poll_s)
        for d in run_dirs:
            write_status(d, state="cancelled", pid=None,
                         error="cancelled while queued" if stop.signum is not None else "gave up waiting for a free slot")
        return False


def start_harvest(root: str | os.PathLike | None, name: str, model: str = "embedded", layer: int = 6,
                  corpus: str = "embedded", tokens: int = 100_000) -> Path:
    """Start `msae harvest` into results/stores/<name> in its own process (output in
    <name>.harvest.log next to the store). Returns the store folder."""
    name = safe_run_name(name)
    if layer < 0 or tokens < 1:
        raise MsaeError(f"layer must be >= 0 and tokens >= 1 (got layer {layer}, tokens {tokens})")
    out = stores_root(root) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    spawn(msae_command("harvest", "--model", model, "--layer", int(layer), "--corpus", corpus,
                       "--tokens", int(tokens), "--out", out, "--no-progress"),
          log=out.parent / HARVEST_LOG.format(name=name))
    return out


def start_eval(run_dir: str | os.PathLike, evals: list[str], target_l0: float | None = None) -> Any:
    """Start `msae eval RUN --evals ...` (at `target_l0`: msae eval --target-l0) in its own process,
    its output appended to the run's train.log; the run's status says which eval runs."""
    from msae_core.artifacts import RUN_LOG

    run_dir = Path(run_dir)
    cmd = ["eval", run_dir, "--evals", ",".join(evals), "--no-progress"]
    if target_l0 is not None:
        cmd += ["--target-l0", f"{target_l0:.6g}"]
    return spawn(msae_command(*cmd), log=run_dir / RUN_LOG)
