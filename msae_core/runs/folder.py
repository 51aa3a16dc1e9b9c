"""Run folders: the config of a training run, its status, its logs, and listing them.

A run lives in `results/runs/<name>/` (file names from msae_core.artifacts):

    config.json        RunConfig: {"sae": SAEConfig, "train": TrainConfig, "data": DataConfig}
    status.json        {state, step, total_steps, started, updated, eta_s, error, pid, version}
    metrics.jsonl      one object per logged step
    checkpoint/        the latest resumable state (sae.safetensors, sae_config.json,
                       optimizer.pt, trainer_state.json)
    sae.safetensors    final weights (+ sae_config.json), written when the run is done
    traces/            momentum snapshots, step_XXXXXXXXX.safetensors
    events.jsonl       competition events of the momentum SAE
    eval.json          written by `msae eval`
    train.log          stdout/stderr of a launched run

This module is the only reader and writer of a run's status, metrics, events and trace snapshots
(with the competing-pair table they carry): the trainer appends through `append_metrics`,
`append_events` and `write_trace`, resume cuts them back with `truncate_logs`, and the workbench
(msae_core.inspect.run_files) reads them through `metrics_rows`, `event_rows`, `trace_files`,
`read_trace` and `pair_columns`. Readers never raise on a torn or missing file (a torn jsonl line is
skipped); `read_trace` raises, and its callers decide what an unreadable snapshot means.

`list_runs` reads whatever is there and never raises: a folder that is half written, corrupt or from
another version comes back with `RunInfo.problem` saying what is wrong.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from msae_core import __version__
from msae_core.artifacts import (
    RUN_CONFIG,
    RUN_EVAL,
    RUN_EVENTS,
    RUN_METRICS,
    RUN_STATUS,
    RUN_TRACE,
    RUN_TRACE_GLOB,
    RUN_TRACES_DIR,
    SAE_CONFIG,
    SAE_WEIGHTS,
    STORE_MANIFEST,
    SWEEPS_DIR,
    append_jsonl,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    trace_step,
)
from msae_core.configutil import type_problem
from msae_core.errors import MsaeError
from msae_core.procs import pid_alive
from msae_core.runs.config import RunConfig
from msae_core.sae.base import nest_momentum

log = logging.getLogger(__name__)

STATUS_VERSION = 1
# the status fields readers rely on, with their types (others are kept as they are)
STATUS_FIELDS: dict[str, Any] = {
    "state": str, "step": Optional[int], "total_steps": Optional[int], "pid": Optional[int],
    "error": Optional[str], "eta_s": Optional[float], "started": Optional[float],
    "updated": Optional[float], "version": Optional[int],
}
STATES = ("queued", "running", "done", "failed", "diverged", "cancelled")
FINAL_STATES = ("done", "failed", "diverged", "cancelled")


# ----------------------------------------------------------------------------------------- status
def read_status(run_dir: str | os.PathLike) -> dict:
    """status.json of a run, {} when missing; raises MsaeError when it is not json."""
    p = Path(run_dir) / RUN_STATUS
    try:
        with open(p) as fh:
            s = json.load(fh)
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
        raise MsaeError(f"{p} is unreadable: {exc}") from exc
    if not isinstance(s, dict):
        raise MsaeError(f"{p} is not a json object")
    return _process_gone(s, Path(run_dir))


def _process_gone(s: dict, run_dir: Path) -> dict:
    """A status that says `running` (or `queued` by a process that was started) while its process
    is dead is read as `failed (process gone)`, so that no reader (listing, eval, cancel, a sweep
    waiting for its points, the pages) ever takes a killed run for a live one."""
    state, pid = s.get("state"), s.get("pid")
    if (state == "running" or (state == "queued" and pid is not None)) and not pid_alive(pid):
        s = {**s, "state": "failed", "pid": None,
             "error": f"process gone (pid {s.get('pid')} died without ending the run: killed?); "
                      f"resume with `msae train --out {run_dir}`"}
    return s


def refuse_foreign_out(out_dir: Path) -> None:
    """MsaeError when `out_dir` is a folder of another kind than a run folder: an activation store
    (or a folder inside one), a folder of run folders (a runs or sweep root), or a folder that holds
    other files but no run (an eval output, an export). An empty or new folder, and a run folder
    (its config.json or status.json there), are fine."""
    if (out_dir / STORE_MANIFEST).is_file() or (out_dir.parent / STORE_MANIFEST).is_file():
        raise MsaeError(f"{out_dir} is an activation store (or lies inside one), not a run folder: "
                        "choose another --out")
    if not out_dir.is_dir():
        return
    try:
        entries = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
    except OSError:
        return  # the write that follows reports it
    names = {p.name for p in entries}
    if RUN_CONFIG in names or RUN_STATUS in names or not entries:
        return
    if any(p.is_dir() and (p / RUN_CONFIG).is_file() for p in entries) or SWEEPS_DIR in names:
        raise MsaeError(f"{out_dir} holds run folders (a runs or sweep root): give the run a folder of "
                        f"its own, e.g. --out {out_dir / 'NAME'}")
    raise MsaeError(f"{out_dir} is not empty and holds no run ({', '.join(sorted(names)[:3])}"
                    f"{' ...' if len(names) > 3 else ''}): choose an empty or new --out folder")


def _write_in_place(path: Path, obj: Any) -> None:
    """Overwrite an existing small json file in place: no new file, so it needs no free block when
    the new text fits the old file's blocks (how a status is still written on a full disk)."""
    data = (json.dumps(obj, indent=2) + "\n").encode()
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())


def write_status(run_dir: str | os.PathLike, **fields: Any) -> dict:
    """Merge `fields` into status.json (atomically) and stamp `updated` and `version`. On a full
    disk the file is overwritten in place instead, so a run never stays `running` for want of a
    block."""
    try:
        s = read_status(run_dir)
    except MsaeError:
        s = {}
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"unknown run state {fields['state']!r}")
    s.update(fields)
    s["updated"] = time.time()
    s["version"] = STATUS_VERSION
    s.setdefault("msae_version", __version__)
    path = Path(run_dir) / RUN_STATUS
    try:
        atomic_write_json(path, s)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.is_file():
            raise
        _write_in_place(path, s)
    return s


# ------------------------------------------------------------------------- metrics, events, traces
# a snapshot's competing-pair table: one column per key, all of one length (competition.Observables)
PAIR_KEYS = ("pair_i", "pair_j", "pair_kappa", "pair_dec_cos", "pair_first", "pair_last")


def append_metrics(run_dir: str | os.PathLike, row: dict) -> None:
    """One metrics line (its "step" is the number of completed steps)."""
    append_jsonl(Path(run_dir) / RUN_METRICS, row)


def append_events(run_dir: str | os.PathLike, events: list) -> None:
    """Competition events, NamedTuples of step, i, j, kappa, direction (msae_core.sae.competition.
    CompetitionEvent; "step" is the 0-based index of the step that raised them), one json line each."""
    if not events:
        return
    lines = "".join(json.dumps(ev._asdict()) + "\n" for ev in events)
    with open(Path(run_dir) / RUN_EVENTS, "a") as fh:
        fh.write(lines)
        fh.flush()


def write_trace(run_dir: str | os.PathLike, step: int, tensors: dict) -> None:
    """The trace snapshot of completed step `step` (CPU tensors), atomically."""
    atomic_save_safetensors(Path(run_dir) / RUN_TRACES_DIR / RUN_TRACE.format(step=step), tensors,
                            metadata={"step": str(step)})


def truncate_logs(run_dir: str | os.PathLike, step: int) -> None:
    """Drop what was logged after completed step `step` (a resumed run writes it again)."""
    run_dir = Path(run_dir)
    m = run_dir / RUN_METRICS
    if m.exists():
        rows = [r for r in read_jsonl(m) if int(r.get("step", 0)) <= step]
        atomic_write_text(m, "".join(json.dumps(r) + "\n" for r in rows))
    e = run_dir / RUN_EVENTS
    if e.exists():
        rows = [r for r in read_jsonl(e) if int(r.get("step", 0)) < step]
        atomic_write_text(e, "".join(json.dumps(r) + "\n" for r in rows))
    t = run_dir / RUN_TRACES_DIR
    if t.is_dir():
        for f in t.glob(RUN_TRACE_GLOB):
            trace = trace_step(f)
            if trace is not None and trace > step:
                f.unlink()


def _jsonl_rows(path: Path) -> list[dict]:
    """The object lines of a jsonl file; [] when it cannot be read (a torn line is skipped)."""
    try:
        return [r for r in read_jsonl(path) if isinstance(r, dict)]
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s unreadable: %s", path, exc)
        return []


def metrics_rows(run_dir: str | os.PathLike) -> list[dict]:
    """Every readable metrics line, as written; never raises."""
    return _jsonl_rows(Path(run_dir) / RUN_METRICS)


def event_rows(run_dir: str | os.PathLike) -> list[dict]:
    """Every readable competition event, as written; never raises."""
    return _jsonl_rows(Path(run_dir) / RUN_EVENTS)


def trace_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every trace snapshot, by step; never raises."""
    out = []
    try:
        for e in os.scandir(Path(run_dir) / RUN_TRACES_DIR):
            step = trace_step(e.name)
            if step is not None:
                out.append((step, Path(e.path)))
    except OSError:
        return []
    return sorted(out)


def read_trace(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict:
    """The arrays (numpy) of one trace snapshot, only `keys` when given (safetensors only, never a
    pickle). Raises on an unreadable file."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="np") as fh:
        for k in fh.keys():
            if keys is None or k in keys:
                out[k] = fh.get_tensor(k)
    return out


def pair_columns(arrays: dict) -> dict | None:
    """The competing-pair table of a snapshot's arrays, {i, j, kappa, dec_cos, first, last}, or
    None when it lacks a column or its columns are not 1-d arrays of one length."""
    if not all(k in arrays for k in PAIR_KEYS):
        return None
    lengths = {getattr(arrays[k], "shape", ())[:1] for k in PAIR_KEYS}
    if len(lengths) != 1 or lengths == {()}:
        return None
    return {k[len("pair_"):]: arrays[k] for k in PAIR_KEYS}


# ---------------------------------------------------------------------------------------- listing
@dataclass
class RunInfo:
    """What list_runs found in one run folder; `problem` is None when the folder is sound."""

    name: str
    path: Path
    status: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)  # the last few lines of metrics.jsonl
    problem: str | None = None

    @property
    def state(self) -> str:
        return str(self.status.get("state", "unknown"))

    @property
    def has_weights(self) -> bool:
        return (self.path / SAE_WEIGHTS).is_file() and (self.path / SAE_CONFIG).is_file()

    @property
    def has_eval(self) -> bool:
        return (self.path / RUN_EVAL).is_file()


def _tail_jsonl(path: Path, n: int, max_bytes: int = 1 << 20) -> list[dict]:
    """The last `n` parseable lines of a jsonl file, reading at most `max_bytes` from its end."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines()[-(n + 1):]:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out[-n:]


def read_run(path: str | os.PathLike, metrics_tail: int = 20) -> RunInfo:
    """Read one run folder; never raises (the problem is in RunInfo.problem)."""
    path = Path(path)
    info = RunInfo(name=path.name, path=path)
    problems: list[str] = []
    try:
        entries = [p.name for p in path.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        info.problem = f"unreadable folder: {exc}"
        return info
    if not entries:
        info.problem = "empty folder"
        return info
    try:
        with open(path / RUN_CONFIG) as fh:
            cfg = json.load(fh)
        if isinstance(cfg, dict):  # momentum knobs written flat by an older msae: as today's, nested
            info.config = {**cfg, "sae": nest_momentum(cfg["sae"])} if isinstance(cfg.get("sae"), dict) else cfg
        else:
            problems.append(f"{RUN_CONFIG} is not a json object")
    except FileNotFoundError:
        problems.append(f"no {RUN_CONFIG}")
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
        problems.append(f"{RUN_CONFIG} is not valid json ({exc.__class__.__name__})")
    if info.config:
        try:
            RunConfig.from_dict(info.config)
        except MsaeError as exc:  # wrong types, unknown sections or fields: named, never raised
            problems.append(f"{RUN_CONFIG}: {exc}")
    try:
        info.status = read_status(path)
        if not info.status:
            problems.append(f"no {RUN_STATUS}")
    except MsaeError:
        problems.append(f"{RUN_STATUS} is not valid json")
    typed = [q for k, t in STATUS_FIELDS.items() if k in info.status
             for q in [type_problem(info.status[k], t, k)] if q]
    if typed:  # readers get only well-typed fields; the folder says what was wrong
        problems.append(f"{RUN_STATUS}: " + "; ".join(typed))
        info.status = {k: v for k, v in info.status.items()
                       if k not in STATUS_FIELDS or type_problem(v, STATUS_FIELDS[k], k) is None}
    s = info.status
    version = s.get("version")
    if s and version != STATUS_VERSION:
        problems.append(f"written by another msae version (status version {version!r}, "
                        f"this msae reads {STATUS_VERSION})")
    state = s.get("state")
    if s and state not in STATES:
        problems.append(f"unknown state {state!r}")
    if state == "done" and not info.has_weights:
        problems.append(f"state done but the final weights ({SAE_WEIGHTS}, {SAE_CONFIG}) are missing")
    if state == "failed" and str(s.get("error", "")).startswith("process gone"):
        problems.append(s["error"])  # read_status turned a dead `running` into this
    info.metrics = _tail_jsonl(path / RUN_METRICS, metrics_tail)
    info.problem = "; ".join(problems) or None
    return info


def list_runs(root: str | os.PathLike, metrics_tail: int = 20) -> list[RunInfo]:
    """Every run folder under `root` (sorted by name); never raises. Folders whose name starts
    with '.' or '_' (temporary and sweep bookkeeping folders) are skipped."""
    root = Path(root)
    try:
        dirs = sorted(p for p in root.iterdir()
                      if p.is_dir() and not p.name.startswith((".", "_")))
    except OSError:
        return []
    out = []
    for p in dirs:
        try:
            out.append(read_run(p, metrics_tail))
        except Exception as exc:  # noqa: BLE001 - a listing must survive any folder
            out.append(RunInfo(name=p.name, path=p, problem=f"unreadable: {exc}"))
    return out
