"""Every on-disk name in one place, and atomic writers so that a killed process never leaves a
half-written file where a reader would find it."""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

# activation store
STORE_MANIFEST = "manifest.json"
STORE_SHARD = "shard_{index:05d}.safetensors"
STORE_SHARD_GLOB = "shard_*.safetensors"
# a synthetic store's ground truth, beside its shards (msae_core.data.synth)
SYNTH_FEATURES = "synth_features.safetensors"
SYNTH_ROWS = "synth_rows_{index:05d}.safetensors"  # which features fire in shard {index}'s rows

# run folder
RUN_CONFIG = "config.json"
RUN_STATUS = "status.json"
RUN_METRICS = "metrics.jsonl"
RUN_CHECKPOINT_DIR = "checkpoint"
RUN_TRACES_DIR = "traces"
RUN_TRACE = "step_{step:09d}.safetensors"
RUN_TRACE_GLOB = "step_*.safetensors"
RUN_TRACE_RE = re.compile(r"^step_(\d+)\.safetensors$")
RUN_EVENTS = "events.jsonl"
RUN_EVAL = "eval.json"
RUN_LOG = "train.log"
# a member of a one-pass group (msae train-group) stops, after a checkpoint, when this file appears
RUN_CANCEL = "cancel"
RUN_OLD_CHECKPOINT_DIR = ".checkpoint.old"        # the previous checkpoint while the new one is renamed in
RUN_TMP_CHECKPOINT_DIR = ".checkpoint.tmp-{pid}"  # a checkpoint being written by process pid
RUN_TMP_CHECKPOINT_GLOB = ".checkpoint.tmp-*"
# an OS file lock held by the one process that trains (or waits to train) in a run folder
FOLDER_LOCK = ".lock"
EVAL_LOCK = ".eval.lock"  # held by the one `msae eval` of a run folder at a time

# a folder of run folders (results/runs): its sweeps' records and the lock of its run queue
SWEEPS_DIR = "_sweeps"                  # _sweeps/NAME/sweep.json + one config json per point
SWEEP_RECORD = "sweep.json"
RUN_QUEUE_LOCK = ".queue.lock"

# the evals a run can have: the top-level keys of eval.json (msae_core.evals maps them to modules)
EVAL_NAMES = ("core", "absorption", "sparse_probing", "synthetic")

# a run's derived caches for the workbench (msae_core.inspect), recomputed when the weights change
RUN_INSPECT_CACHE_DIR = "workbench"
FEATURE_SAMPLE = "feature_sample.safetensors"
UMAP_COORDS = "umap.safetensors"
DIFF_CACHE = "diff-{other}.safetensors"  # in run A's cache folder: its diff against run {other}

# results folder ($MSAE_RESULTS, else ./results)
RESULTS_DIR = "results"
RESULTS_RUNS = "runs"
RESULTS_STORES = "stores"
RESULTS_EXPORTS = "exports"
HARVEST_LOG = "{name}.harvest.log"  # next to the store folder <name> under stores/
DEMO_STATUS = "demo.json"  # the demo's phases and progress (msae_core.demo), polled by Home
DEMO_LOG = "demo.log"      # output of a demo started from the workbench

# a write-up bundle under exports/<name>/
EXPORT_FIGURES_DIR = "figures"
EXPORT_README = "README.md"
EXPORT_RUNS_MD = "runs.md"
EXPORT_RUNS_CSV = "runs.csv"
EXPORT_COMPARE_MD = "compare.md"    # msae compare --out, and the Trade-off page's comparison
EXPORT_COMPARE_CSV = "compare.csv"
DASHBOARDS_DIR = "dashboards"       # msae dashboard: default folder inside the run
DASHBOARD_PLOTLY_JS = "plotly.min.js"  # shared by the dashboard pages beside it

# SAE weights (a run's final weights, a checkpoint's, an export's)
SAE_WEIGHTS = "sae.safetensors"
SAE_CONFIG = "sae_config.json"
OPTIMIZER_STATE = "optimizer.pt"
STREAM_BUFFER = "stream_buffer.safetensors"  # a streamed run's mixing buffer, in checkpoint/
# a streamed one-pass group's stream, checkpointed once for the group (in its first run's folder):
# the buffer before batch {step}, for every step a member's latest checkpoint was written at
GROUP_STREAM_DIR = ".group-stream"
GROUP_STREAM_STATE = "stream-{step:09d}.json"
GROUP_STREAM_BUFFER = "stream-{step:09d}.safetensors"
TRAINER_STATE = "trainer_state.json"

# SAELens on-disk format
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"


def check_can_create(folder: str | os.PathLike) -> None:
    """Raise the OSError that creating or writing into `folder` would meet (it is a file, it lies
    below a file, its name is too long, the file system is read-only, no write permission), without
    creating anything: for commands that load a model before their first write."""
    folder = Path(folder)
    p = folder
    while not p.exists():  # raises for a name the file system refuses (too long)
        p = p.parent
    if not p.is_dir():
        if p == folder:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(folder))
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    if os.statvfs(p).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
    if not os.access(p, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def trace_step(path: str | os.PathLike) -> int | None:
    """The step of a trace snapshot file (`RUN_TRACE`), None when the name is not one."""
    m = RUN_TRACE_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a temporary file `.NAME.PID.XXXX.tmp` beside `path`, fsync, rename it into place; then
    remove the temporary files of this name that writers killed mid-write left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno:  # a write's error names no file
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    _remove_orphan_tmp(path)


def _remove_orphan_tmp(path: Path) -> None:
    """Temporary files of `path` whose writer process is gone (a live writer's are left alone).
    The liveness test is a bare `os.kill(pid, 0)`, not procs.pid_alive: procs imports this module
    (its lock file's name), and the one case pid_alive adds, a zombie writer, only keeps a stray
    temporary until the next write after the zombie is reaped."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            pid = int(tmp.name[len(path.name) + 2:].split(".", 1)[0])
            os.kill(pid, 0)
        except ValueError:  # named the older way, without a pid: removed once it is old
            try:
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink(missing_ok=True)
            except OSError:
                pass
            continue
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (PermissionError, OSError):
            continue


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write json to `path` so that readers see either the old file or the whole new one."""
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write_bytes(Path(path), text.encode())


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                            metadata: Mapping[str, str] | None = None) -> None:
    """safetensors.torch.save, made atomic (tensors are made contiguous first)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in tensors.items()},
                metadata=dict(metadata) if metadata else None)
    _atomic_write_bytes(Path(path), data)


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one json line and flush it; a reader skips a torn last line."""
    with open(path, "a") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a jsonl file, skipping a torn (half-written) line rather than failing."""
    out: list[dict] = []
    try:
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        return []
    return out


def read_json_object(path: str | os.PathLike) -> dict | None:
    """A json object from `path`, or None when it is missing, unreadable, not json or not an object
    (for readers that must not raise: a page polling a file another process writes)."""
    try:
        with open(path, "rb") as fh:
            obj = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
