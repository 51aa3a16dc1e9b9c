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

`list_runs` reads whatever is there and never raises: a folder that is half written, corrupt or from
another version comes back with `RunInfo.problem` saying what is wrong. `launch_run` starts a
training process detached from the caller (the workbench), which polls the folder.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from msae_core import __version__
from msae_core.artifacts import (EVAL_NAMES, RUN_QUEUE_LOCK, STORE_MANIFEST, SWEEPS_DIR, RUN_CHECKPOINT_DIR, RUN_CONFIG, RUN_EVAL, RUN_LOG, RUN_METRICS,
                                 RUN_STATUS, SAE_CONFIG, SAE_WEIGHTS, TRAINER_STATE,
                                 atomic_write_json)
from msae_core.configutil import collect_problems, from_dict, to_dict, type_problem
from msae_core.errors import MsaeError
from msae_core.procs import msae_command, pid_alive, spawn
from msae_core.sae import SAEConfig

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


# ----------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, logging and checkpoint cadence."""

    steps: int = field(default=10_000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4096, metadata={"help": "activation rows per step"})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate"})
    warmup_steps: int = field(default=1000, metadata={
        "help": "linear learning-rate warm-up steps (capped at --steps)"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order (and of the SAE init "
                                                   "when given on the command line)"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present, else CPU), cpu, cuda, cuda:N"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast on CUDA (TF32 matmuls are always on)"})
    log_every: int = field(default=50, metadata={"help": "steps between lines of metrics.jsonl"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between resumable checkpoints"})
    snapshot_every: int = field(default=500, metadata={
        "help": "steps between momentum trace snapshots (traces/); 0 = none"})
    evals: list[str] = field(default_factory=list, metadata={
        "help": "evals to run when training is done (core, absorption, sparse_probing)"})

    @property
    def effective_warmup(self) -> int:
        return max(0, min(self.warmup_steps, self.steps))

    def problems(self) -> list[str]:
        out = []
        if self.steps < 1:
            out.append(f"steps must be >= 1 (got {self.steps})")
        if self.batch_size < 1:
            out.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if not self.lr > 0:
            out.append(f"lr must be > 0 (got {self.lr})")
        if self.warmup_steps < 0:
            out.append(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        for name in ("log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.snapshot_every < 0:
            out.append(f"snapshot_every must be >= 0 (got {self.snapshot_every})")
        unknown = [e for e in self.evals if e not in EVAL_NAMES]
        if unknown:
            out.append(f"evals: unknown eval(s) {', '.join(map(str, unknown))} (known: {', '.join(EVAL_NAMES)})")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(self.device)):
            out.append(f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        return out


@dataclass
class DataConfig:
    """Where the training activations come from."""

    acts: str = field(default="", metadata={"help": "activation store folder (written by msae harvest)"})

    def problems(self) -> list[str]:
        return [] if self.acts else ["acts: no activation store given (--acts DIR)"]


def _sae_problems(cfg: Any) -> list[str]:
    """The knob checks of the issue, for an SAEConfig that does not check them itself."""
    out = []
    g = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    d_sae, k = g("d_sae"), g("k")
    if d_sae is None or d_sae < 1:
        out.append(f"d_sae must be >= 1 (got {d_sae})")
    if g("arch") == "topk" or (g("arch") == "momentum" and g("base") == "topk"):
        if k is None or k < 1 or (d_sae is not None and k > d_sae):
            out.append(f"k must be in [1, d_sae={d_sae}] (got {k})")
    beta, tau, lam = g("beta"), g("tau"), g("lam")
    if beta is not None and not 0 <= beta < 1:
        out.append(f"beta must be in [0, 1) (got {beta})")
    if tau is not None and not 0 <= tau <= 1:
        out.append(f"tau must be in [0, 1] (got {tau})")
    if lam is not None and not lam >= 0:
        out.append(f"lam must be >= 0 (got {lam})")
    return out


@dataclass
class RunConfig:
    """One training run: the SAE to build, how to train it, and on which activations."""

    sae: SAEConfig = field(default_factory=lambda: SAEConfig(d_in=0, d_sae=4096),
                           metadata={"help": "the SAE (msae_core.sae.SAEConfig)"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training settings"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "activations"})

    def problems(self) -> list[str]:
        """Problems of the fields alone (no IO); `check` adds the store's."""
        return [] if hasattr(self.sae, "problems") else ["sae." + p for p in _sae_problems(self.sae)]

    def _check(self, store: Any = None) -> tuple[Any, list[str]]:
        """(the opened store or None, every problem): the store is opened once (unless given),
        sae.d_in is filled from it when 0, and the settings are checked against it."""
        from msae_core.store import ActivationStore

        typed = [p for p in collect_problems(self) if ": expected " in p]
        if typed:  # wrong types first: nothing else can be checked on them
            return None, typed
        if store is None and self.data.acts:
            try:
                store = ActivationStore(self.data.acts)
            except MsaeError as exc:
                return None, collect_problems(self) + [f"data.acts: {exc}"]
        if store is None:
            return None, collect_problems(self)
        if not self.sae.d_in:
            self.sae = dataclasses.replace(self.sae, d_in=store.d_in)
        out = collect_problems(self)
        if self.sae.d_in != store.d_in:
            out.append(f"sae.d_in {self.sae.d_in} does not match the store's activation width "
                       f"{store.d_in} ({self.data.acts})")
        if self.train.batch_size > store.n_rows:
            out.append(f"train.batch_size {self.train.batch_size} exceeds the store's {store.n_rows} rows")
        return store, out

    def check(self, store: Any = None) -> Any:
        """Validate once, at an entry point: MsaeError listing every problem, else the opened
        activation store (pass it down instead of opening it again)."""
        store, problems = self._check(store)
        if problems:
            raise MsaeError("invalid settings: " + "; ".join(problems))
        return store

    def validate(self) -> "RunConfig":
        self.check()
        return self

    def problem_list(self) -> list[str]:
        """Every problem, the store's included; never raises for bad settings (the Launch page)."""
        return self._check()[1]

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """Build from json; a missing section gets its defaults."""
        if not isinstance(data, dict):
            raise MsaeError(f"run config must be a json object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"sae", "train", "data"})
        if unknown:
            raise MsaeError(f"run config: unknown section(s) {', '.join(unknown)} (sae, train, data)")
        try:
            sections = {name: data.get(name, {}) for name in ("sae", "train", "data")}
            for name, v in sections.items():
                if not isinstance(v, dict):
                    raise MsaeError(f"run config: section {name} must be an object, got {json.dumps(v)}")
            built, problems = {}, []
            for name, section_cls in (("sae", SAEConfig), ("train", TrainConfig), ("data", DataConfig)):
                given = {"d_in": 0, "d_sae": 4096, **sections[name]} if name == "sae" else sections[name]
                try:
                    built[name] = from_dict(section_cls, given, prefix=f"{name}.")
                except MsaeError as exc:
                    problems.append(str(exc))
            if problems:
                raise MsaeError("; ".join(problems))
            sae, train, dcfg = built["sae"], built["train"], built["data"]
        except TypeError as exc:
            raise MsaeError(f"run config: {exc}") from exc
        return cls(sae=sae, train=train, data=dcfg)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunConfig":
        try:
            with open(path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise MsaeError(f"no run config at {path}") from None
        except (json.JSONDecodeError, OSError) as exc:
            raise MsaeError(f"run config {path} is not valid json: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())


# settings that may change when a run is resumed (they do not change the trajectory)
_RESUMABLE_CHANGES = {"steps", "device", "log_every", "checkpoint_every", "snapshot_every", "evals"}


def config_mismatch(old: dict, new: dict) -> str:
    """'' when a run with config `old` can be resumed under `new`, else what differs (first few)."""
    diffs = []
    for section in ("sae", "train", "data"):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in _RESUMABLE_CHANGES:
                continue
            va, vb = a.get(key), b.get(key)
            if section == "data" and key == "acts" and va and vb:
                va, vb = str(Path(va).resolve()), str(Path(vb).resolve())
            if section == "sae" and key == "d_in" and (not va or not vb):
                continue  # filled from the store
            if va != vb:
                diffs.append(f"{section}.{key} {va!r} -> {vb!r}")
    return ", ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")



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
        if isinstance(cfg, dict):
            info.config = cfg
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


# ------------------------------------------------------------------------------------ names, launch
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def safe_run_name(text: str, max_len: int = 120) -> str:
    """A folder name from free text: [A-Za-z0-9._-] only, no '..', not starting with '.', '_' or
    '-', not empty. Raises MsaeError when nothing usable is left."""
    name = _NAME_BAD.sub("-", str(text).strip())
    name = re.sub(r"\.{2,}", ".", name)
    name = re.sub(r"-{2,}", "-", name)
    name = name.lstrip("._-").rstrip(".-")[:max_len].rstrip(".-")
    if not name:
        raise MsaeError(f"{text!r} is not a usable run name: use letters, digits, '.', '_' or '-'")
    return name


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
    name = safe_run_name(name)
    run_dir = Path(root) / name
    if evals:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, evals=list(evals)))
    config.check(store)  # `store`: the caller's opened store for config.data.acts, if it has one
    if run_dir.exists() and any(run_dir.iterdir()):
        info = read_run(run_dir)
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
    write_status(run_dir, state="queued", step=_checkpoint_step(run_dir),
                 total_steps=config.train.steps, error=None, pid=None, queued=time.time())
    cmd = train_command(run_dir)
    if max_parallel:
        cmd += ["--max-parallel", str(int(max_parallel)), "--queue-root", str(Path(root))]
    proc = spawn(cmd, log=run_dir / RUN_LOG)
    write_status(run_dir, pid=proc.pid)
    log.info("launched run %s (pid %d)", run_dir, proc.pid)
    return run_dir


def _checkpoint_step(run_dir: Path) -> int:
    try:
        with open(run_dir / RUN_CHECKPOINT_DIR / TRAINER_STATE) as fh:
            return int(json.load(fh).get("step", 0))
    except (OSError, ValueError, json.JSONDecodeError, AttributeError):
        return 0


def cancel_run(path: str | os.PathLike) -> bool:
    """Ask a run to stop: SIGTERM to its process (it finishes the step, checkpoints, and ends as
    `cancelled`). A queued run whose process is gone is marked cancelled at once. Returns whether
    there was something to cancel."""
    run_dir = Path(path)
    try:
        s = read_status(run_dir)
    except MsaeError:
        return False
    pid = s.get("pid")
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


def running_runs(root: str | os.PathLike, exclude: Path | None = None) -> list[Path]:
    """Run folders under `root` whose state is running and whose process is alive."""
    out = []
    for info in list_runs(root, metrics_tail=0):
        if exclude is not None and info.path.resolve() == exclude.resolve():
            continue
        if info.state == "running" and pid_alive(info.status.get("pid")):
            out.append(info.path)
    return out


def wait_for_slot(run_dir: str | os.PathLike, root: str | os.PathLike, max_parallel: int,
                  poll_s: float = 1.0, timeout_s: float | None = None, stop: Any = None) -> bool:
    """Stay `queued` until fewer than `max_parallel` runs under `root` are running, then mark this
    run running (checked and marked under a lock file, so two waiting runs never take one slot).
    SIGTERM while waiting ends the run as `cancelled` (returns False); so does the timeout.
    `stop`: the caller's signal flag (an object with `.signum`), already catching SIGTERM."""
    import fcntl
    import threading

    run_dir, root = Path(run_dir), Path(root)
    caught: list[int] = []
    old = None
    if stop is None and threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))

    def cancelled() -> bool:
        return bool(caught) or (stop is not None and stop.signum is not None)

    try:
        write_status(run_dir, state="queued", pid=os.getpid())
        end = None if timeout_s is None else time.monotonic() + timeout_s
        root.mkdir(parents=True, exist_ok=True)
        while not cancelled():
            with open(root / RUN_QUEUE_LOCK, "a") as lockf:
                fcntl.flock(lockf, fcntl.LOCK_EX)
                try:
                    if len(running_runs(root, exclude=run_dir)) < max_parallel:
                        write_status(run_dir, state="running", pid=os.getpid())
                        return True
                finally:
                    fcntl.flock(lockf, fcntl.LOCK_UN)
            if end is not None and time.monotonic() > end:
                break
            time.sleep(poll_s)
        write_status(run_dir, state="cancelled", pid=None,
                     error="cancelled while queued" if cancelled() else "gave up waiting for a free slot")
        return False
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
