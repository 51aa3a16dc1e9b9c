"""Readers of one run folder for the pages: its config, metrics, competition events, trace snapshots
(per-feature traces and the competing-pair table) and final weights as tables and arrays, and
fingerprints that change when they do. The files themselves are read through
msae_core.runs.folder, their one owner.

Every reader here except `load_run_sae` follows the package's no-raise convention (see
msae_core.inspect)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from msae_core.artifacts import RUN_CONFIG, RUN_EVENTS, RUN_METRICS, SAE_CONFIG, SAE_WEIGHTS
from msae_core.errors import MsaeError
from msae_core.runs.folder import (PAIR_KEYS, event_rows, metrics_rows, pair_columns, read_trace,
                                           trace_files)

log = logging.getLogger(__name__)

EVENT_COLUMNS = ["step", "i", "j", "kappa", "direction"]
PAIR_COLUMNS = ["i", "j", "kappa", "dec_cos", "first", "last"]


# ----------------------------------------------------------------------------------- plain files
def file_fingerprint(path: str | os.PathLike) -> tuple[int, int]:
    """(mtime_ns, size) of a file, (0, -1) when it cannot be read: a cheap cache key."""
    try:
        st = Path(path).stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return 0, -1


def read_json_file(path: Path) -> tuple[Any, str | None]:
    """(object, None) or (None, problem)."""
    try:
        with open(path) as fh:
            return json.load(fh), None
    except FileNotFoundError:
        return None, f"no {path.name}"
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return None, f"{path.name} is unreadable ({exc.__class__.__name__})"


# ------------------------------------------------------------------------------ config, weights
def run_config(run_dir: str | os.PathLike) -> dict:
    cfg, _ = read_json_file(Path(run_dir) / RUN_CONFIG)
    return cfg if isinstance(cfg, dict) else {}


def run_store_path(run_dir: str | os.PathLike) -> str | None:
    """The activation store the run's rows are read back from: its --acts, or a streamed run's
    --cache, as an absolute path (one run may have recorded it relative to the folder it was
    started from, another absolute); None when it has neither."""
    data = run_config(run_dir).get("data")
    if not isinstance(data, dict):
        return None
    path = data.get("cache") if data.get("source") == "stream" else data.get("acts")
    return str(Path(path).expanduser().resolve()) if isinstance(path, str) and path else None


def has_weights(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / SAE_WEIGHTS).is_file() and (Path(run_dir) / SAE_CONFIG).is_file()


def weights_key(run_dir: str | os.PathLike) -> str:
    """'mtime:size' of the run's final weights: the key of the caches derived from them."""
    mt, size = file_fingerprint(Path(run_dir) / SAE_WEIGHTS)
    return f"{mt}:{size}"


def load_run_sae(run_dir: str | os.PathLike):
    """The run's final SAE on CPU in eval mode (msae_core.sae_io.load_sae); MsaeError when absent
    or unreadable (the one reader here that raises: the pages show the cause)."""
    run_dir = Path(run_dir)
    if not has_weights(run_dir):
        raise MsaeError(f"run {run_dir.name} has no final weights yet ({SAE_WEIGHTS})")
    try:
        from msae_core.sae_io import load_sae

        sae = load_sae(run_dir)
    except MsaeError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt weights are a user-facing state
        raise MsaeError(f"weights of run {run_dir.name} are unreadable: {exc.__class__.__name__}: {exc}"
                        .splitlines()[0]) from exc
    sae = sae.to("cpu")
    sae.eval()
    return sae


# ---------------------------------------------------------------------------- metrics and events
def load_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    df = pd.DataFrame(metrics_rows(run_dir))
    if "step" in df:
        df = df.sort_values("step").reset_index(drop=True)
    return df


def events_by_pair(events: pd.DataFrame) -> pd.DataFrame:
    """One row per pair of the competition events: i, j, first and last crossing step, crossings,
    ups, downs, and whether it ends competing (its last crossing upward). A pair whose kappa
    hovers at tau crosses it again and again; this is that flapping counted, not drawn 6,000 times.
    Sorted by crossings, most first."""
    cols = ["i", "j", "first", "last", "crossings", "ups", "downs", "ends_competing"]
    if events.empty or not {"step", "i", "j"} <= set(events.columns):
        return pd.DataFrame(columns=cols)
    d = events.sort_values("step", kind="stable").copy()
    direction = d["direction"].astype(str).str.lower() if "direction" in d else pd.Series("up", index=d.index)
    d["up"] = direction.isin(["up", "1", "+1", "enter", "start", "true"])
    g = d.groupby(["i", "j"], sort=False)
    out = pd.DataFrame({"first": g["step"].min(), "last": g["step"].max(), "crossings": g.size(),
                        "ups": g["up"].sum(), "ends_competing": g["up"].last()}).reset_index()
    out["downs"] = out["crossings"] - out["ups"]
    out = out.astype({"i": int, "j": int, "first": int, "last": int, "crossings": int, "ups": int, "downs": int})
    return out.sort_values(["crossings", "first"], ascending=[False, True], kind="stable")[cols].reset_index(drop=True)


def load_events(run_dir: str | os.PathLike) -> pd.DataFrame:
    rows = event_rows(run_dir)
    df = pd.DataFrame(rows, columns=EVENT_COLUMNS) if not rows else pd.DataFrame(rows)
    for c in ("step", "i", "j", "kappa"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df.dropna(subset=[c for c in ("step", "i", "j") if c in df])


# ---------------------------------------------------------------------------------- trace files
def run_fingerprint(run_dir: str | os.PathLike) -> tuple:
    """A cheap key that changes when a run's weights, trace snapshots, events or metrics change."""
    run_dir = Path(run_dir)
    files = trace_files(run_dir)
    return (file_fingerprint(run_dir / SAE_WEIGHTS), len(files), files[-1][0] if files else -1,
            file_fingerprint(run_dir / RUN_EVENTS), file_fingerprint(run_dir / RUN_METRICS))


def latest_snapshots(run_dir: str | os.PathLike, keys: tuple[str, ...],
                     step: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(step, arrays) of each readable snapshot holding every one of `keys`, newest first (only
    the one at `step` when given); unreadable snapshots are skipped."""
    for s, path in reversed(trace_files(run_dir)):
        if step is not None and s != step:
            continue
        try:
            t = read_trace(path, keys)
        except Exception:  # noqa: BLE001 - half-written or foreign snapshot
            continue
        if all(k in t for k in keys):
            yield s, t


@dataclass
class Traces:
    """Per-feature traces over snapshot steps: each array is (n_features, n_steps)."""

    steps: np.ndarray
    features: np.ndarray
    rate: np.ndarray
    mag: np.ndarray
    pressure: np.ndarray
    d_sae: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return len(self.steps) == 0


def load_traces(run_dir: str | os.PathLike, features: list[int] | np.ndarray | None = None,
                max_snapshots: int = 400) -> Traces:
    """rate, mag and pressure of `features` (all when None) at every readable snapshot (at most
    `max_snapshots`, evenly thinned). Unreadable snapshots are skipped and named in `problems`."""
    files = trace_files(run_dir)
    if len(files) > max_snapshots:
        keep = np.unique(np.linspace(0, len(files) - 1, max_snapshots).round().astype(int))
        files = [files[i] for i in keep]
    steps, cols, problems = [], {"rate": [], "mag": [], "pressure": []}, []
    feats = None if features is None else np.asarray(features, dtype=np.int64)
    d_sae = 0
    for step, path in files:
        try:
            t = read_trace(path, ("rate", "mag", "pressure"))
            n = int(t["rate"].shape[0])
            if any(t[k].shape != (n,) for k in cols):
                raise ValueError("rate, mag, pressure shapes differ")
        except Exception as exc:  # noqa: BLE001 - half-written or foreign snapshot
            problems.append(f"{path.name}: unreadable ({exc.__class__.__name__})")
            continue
        if d_sae and n != d_sae:
            problems.append(f"{path.name}: {n} features, others have {d_sae}")
            continue
        d_sae = n
        sel = np.arange(n) if feats is None else feats[(feats >= 0) & (feats < n)]
        steps.append(step)
        for k in cols:
            cols[k].append(t[k].astype(np.float32)[sel])
    if feats is None:
        feats_out = np.arange(d_sae)
    else:
        feats_out = feats[(feats >= 0) & (feats < d_sae)] if d_sae else feats[:0]
    shape = (len(feats_out), len(steps))
    mk = lambda k: np.stack(cols[k], axis=1) if steps else np.zeros(shape, np.float32)  # noqa: E731
    return Traces(np.asarray(steps, dtype=np.int64), feats_out, mk("rate"), mk("mag"), mk("pressure"),
                  d_sae, problems)


def top_pressure_features(run_dir: str | os.PathLike, n: int = 10) -> list[int]:
    """At most `n` features, those with the highest pressure at the last readable snapshot; a
    feature under no pressure (0) is not among them, so there may be fewer than `n`."""
    for _, t in latest_snapshots(run_dir, ("pressure",)):
        p = t["pressure"].astype(np.float32)
        return [int(i) for i in np.argsort(-p, kind="stable")[:n] if p[i] > 0]
    return []


def load_pairs(run_dir: str | os.PathLike, step: int | None = None) -> tuple[pd.DataFrame, int | None]:
    """The competing-pair table of the snapshot at `step` (the last readable one when None), sorted
    by kappa: columns i, j, kappa, dec_cos, first, last (the first and last steps kappa crossed tau;
    empty (NA) for a pair that never did: the tracker writes -1). Returns (table, snapshot step)."""
    for s, t in latest_snapshots(run_dir, PAIR_KEYS, step):
        cols = pair_columns(t)
        if cols is None:
            continue  # pair table columns differ in length (or are not columns): try an older one
        df = pd.DataFrame({c: cols[c].astype(np.float32 if c in ("kappa", "dec_cos") else np.int64)
                           for c in PAIR_COLUMNS})
        for c in ("first", "last"):
            df[c] = df[c].astype("Int64").mask(df[c] < 0)
        return df.sort_values("kappa", ascending=False, kind="stable").reset_index(drop=True), s
    return pd.DataFrame(columns=PAIR_COLUMNS), None
