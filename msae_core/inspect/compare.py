"""`msae compare RUN ... [--baseline RUN]`: runs side by side as in a paper's table: every metric
with its interval where the eval gives one, the difference to a baseline, and whether the
difference is resolved by the noise (the two intervals do not overlap). Also the Trade-off page's
comparison section, and markdown + CSV for the write-up bundle.

A difference is "resolved" only when both runs have an interval for that metric and the intervals
are disjoint; "not resolved" when they overlap; "no interval" when either has none (explained
variance, L0: single numbers from one eval sample). Runs are compared at matched L0: a run whose L0
differs from the baseline's by more than `l0_tolerance` (10 %) is marked, since reconstruction and
absorption both move with L0.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from msae_core.artifacts import EXPORT_COMPARE_CSV, EXPORT_COMPARE_MD, atomic_write_text
from msae_core.errors import MsaeError
from msae_core.evals.stats import intervals_overlap
from msae_core.evals.summary import INTERVALS

# (key, label, direction): the metrics of the table, in order; direction "higher" / "lower" / None
METRICS: list[tuple[str, str, str | None]] = [
    ("l0", "L0", None),
    ("explained_variance", "explained variance", "higher"),
    ("kl_div_score", "KL score", "higher"),
    ("ce_loss_score", "CE-loss score", "higher"),
    ("dead_fraction", "dead fraction", "lower"),
    ("absorption", "mean absorption fraction", "lower"),
    ("absorption_full", "mean full absorption", "lower"),
    ("sae_probe_acc", "SAE probe accuracy", "higher"),
    ("sae_top1_acc", "SAE top-1 probe accuracy", "higher"),
    ("synth_l0", "L0 (synthetic rows)", None),
    ("synth_explained_variance", "explained variance (synthetic)", "higher"),
    ("synth_absorption", "absorption, exact (synthetic)", "lower"),
    ("synth_lost", "parent firings lost (synthetic)", "lower"),
    ("synth_f1", "F1 (synthetic)", "higher"),
    ("synth_mcc", "MCC (synthetic)", "higher"),
]
L0_TOLERANCE = 0.1


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_runs(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The runs-table rows (inspect.runs_table.run_row) of the run folders `paths`; a folder that
    is not a run, or a run with no eval yet, is refused in one line."""
    from msae_core.inspect.runs_table import run_row
    from msae_core.training.run_folder import read_run

    rows, seen = [], {}
    for p in paths:
        path = Path(p)
        if path.resolve() in seen:
            raise MsaeError(f"{path} is given twice (as {seen[path.resolve()]}): give each run once")
        seen[path.resolve()] = str(p)
        if not path.is_dir():
            raise MsaeError(f"no run folder at {path}")
        info = read_run(path, metrics_tail=1)
        row = run_row(info)
        if info.problem and not info.config:
            raise MsaeError(f"{path} is not a run folder: {info.problem}")
        if not any(_num(row.get(k)) is not None for k, _, _ in METRICS if k != "l0"):
            raise MsaeError(f"run {path.name} has no eval results yet: run `msae eval {path}` first")
        rows.append(row)
    names = [r["name"] for r in rows]
    for name in {n for n in names if names.count(n) > 1}:  # namesakes in different folders: named by
        same = [r for r in rows if r["name"] == name]       # as much of their paths as tells them apart
        parts = [Path(r["path"]).resolve().parts for r in same]
        k = next(k for k in range(2, max(map(len, parts)) + 1)
                 if len({p[-k:] for p in parts}) == len(parts))
        for r, p in zip(same, parts):
            r["name"] = "/".join(p[-k:]).lstrip("/")
    return pd.DataFrame(rows)


def data_note(df: pd.DataFrame) -> str:
    """'' when every run trained on the same data (model, layer and store, or the same stream);
    else one line naming what each trained on: their differences mix the data with the method."""
    if df.empty or "data_key" not in df:
        return ""
    keys = df["data_key"].fillna("?")
    if keys.nunique() <= 1:
        return ""
    parts = [f"{r['name']}: {r.get('data') or '?'}" for r in df.to_dict("records")]
    return ("WARNING: these runs trained on different data (" + "; ".join(parts)
            + "): a difference between them is not the method's alone")


def _l0(row: dict) -> float | None:
    return next((v for k in ("l0", "synth_l0") if (v := _num(row.get(k))) is not None), None)


def comparison(df: pd.DataFrame, baseline: str, l0_tolerance: float = L0_TOLERANCE) -> pd.DataFrame:
    """Long table, one row per (run, metric) with a value: run, metric, label, value, ci_low,
    ci_high, diff (to the baseline's value), resolved (True, False, or None: no interval), better
    (True when the difference goes the metric's good way, None for no direction or no difference),
    l0_matched (the run's L0 within l0_tolerance of the baseline's; None without L0)."""
    if df.empty:
        raise MsaeError("no runs to compare")
    if baseline not in set(df["name"]):
        raise MsaeError(f"baseline {baseline!r} is not among the runs ({', '.join(df['name'])})")
    rows = {r["name"]: r for r in df.to_dict("records")}
    base = rows[baseline]
    base_l0 = _l0(base)
    out = []
    for name, r in rows.items():
        l0 = _l0(r)
        matched = None if l0 is None or base_l0 is None else abs(l0 - base_l0) <= l0_tolerance * max(abs(base_l0), 1e-9)
        for key, label, direction in METRICS:
            v = _num(r.get(key))
            if v is None:
                continue
            lo_key, hi_key = INTERVALS.get(key, (None, None))
            lo, hi = (_num(r.get(lo_key)), _num(r.get(hi_key))) if lo_key else (None, None)
            bv = _num(base.get(key))
            diff = None if bv is None or name == baseline else v - bv
            resolved = better = None
            if diff is not None:
                blo, bhi = (_num(base.get(lo_key)), _num(base.get(hi_key))) if lo_key else (None, None)
                overlap = intervals_overlap((lo, hi), (blo, bhi))
                resolved = None if overlap is None else not overlap
                if direction and diff != 0:
                    better = (diff > 0) == (direction == "higher")
            out.append({"run": name, "metric": key, "label": label, "direction": direction, "value": v,
                        "ci_low": lo, "ci_high": hi, "diff": diff, "resolved": resolved, "better": better,
                        "l0_matched": matched})
    return pd.DataFrame(out)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}" if abs(v) >= 1 else f"{v:.4f}"


def cell(r: dict, baseline: str) -> str:
    """One cell of the wide table: value [interval], and for a run other than the baseline its
    difference with the verdict: "resolved" (intervals disjoint), "within noise", "no interval"."""
    text = _fmt(_num(r["value"]))
    lo, hi = _num(r["ci_low"]), _num(r["ci_high"])  # a long table read back holds NaN for "none"
    if lo is not None and hi is not None:
        text += f" [{_fmt(lo)}, {_fmt(hi)}]"
    if r["run"] != baseline and _num(r["diff"]) is not None:
        verdict = {True: "resolved", False: "within noise", None: "no interval"}[r["resolved"]]
        text += f" ({'+' if r['diff'] >= 0 else ''}{_fmt(r['diff'])}, {verdict})"
    return text


def wide_table(long: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Runs as rows (baseline first), metrics as columns (their labels, with the good direction),
    cells as `cell` writes them; an `L0 matched` column when the runs have an L0."""
    runs = [baseline] + [r for r in dict.fromkeys(long["run"]) if r != baseline]
    labels = {key: f"{label} ({'↑' if d == 'higher' else '↓'})" if d else label
              for key, label, d in METRICS}
    keys = [k for k, _, _ in METRICS if k in set(long["metric"])]
    table = []
    for run in runs:
        sub = {r["metric"]: r for r in long[long["run"] == run].to_dict("records")}
        row: dict[str, str] = {"run": run + (" (baseline)" if run == baseline else "")}
        for k in keys:
            row[labels[k]] = cell(sub[k], baseline) if k in sub else "-"
        matched = next(iter(sub.values()))["l0_matched"] if sub else None
        row["L0 matched"] = "-" if matched is None else ("yes" if matched else "NO")
        table.append(row)
    return pd.DataFrame(table)


def to_markdown(wide: pd.DataFrame, baseline: str, note: str = "") -> str:
    """The wide table as markdown, its reading below it and `note` (data_note) above it."""
    cols = list(wide.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in wide.itertuples(index=False)]
    notes = [f"Differences are to {baseline}. resolved: the two 95 % intervals do not overlap; within noise: "
             "they overlap; no interval: the eval gives none for that metric (one sample). "
             f"L0 matched: within {L0_TOLERANCE:.0%} of the baseline's L0; reconstruction and absorption "
             "both move with L0, so compare matched runs."]
    return "\n".join(([note, ""] if note else []) + lines + [""] + notes) + "\n"


def write_comparison(long: pd.DataFrame, wide: pd.DataFrame, baseline: str, out: str | os.PathLike,
                     note: str = "") -> Path:
    """compare.md (the wide table and its reading) and compare.csv (the long table) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / EXPORT_COMPARE_MD, to_markdown(wide, baseline, note))
    atomic_write_text(out / EXPORT_COMPARE_CSV, long.to_csv(index=False))
    return out


def _run(args: argparse.Namespace) -> int:
    runs = list(args.runs)
    if args.baseline and Path(args.baseline).resolve() not in {Path(r).resolve() for r in runs}:
        runs = [args.baseline] + runs
    df = read_runs(runs)
    by_path = {str(Path(p).resolve()): n for p, n in zip(df["path"], df["name"])}
    baseline = by_path[str(Path(args.baseline).resolve())] if args.baseline else df["name"].iloc[0]
    long = comparison(df, baseline)
    wide = wide_table(long, baseline)
    note = data_note(df)
    print(to_markdown(wide, baseline, note), end="")
    if args.out:
        print(f"written: {write_comparison(long, wide, baseline, args.out, note)}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="runs side by side: metrics with intervals, differences to a baseline",
        description="Print evaluated runs as a paper's table: each metric with its 95 % interval where "
                    "the eval gives one, the difference to the baseline and whether the intervals "
                    "resolve it; L0 matching is checked.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders with eval results")
    p.add_argument("--baseline", default="", help="the run the others are compared to (default: the first)")
    p.add_argument("--out", default="", help="also write compare.md and compare.csv into this folder")
    p.set_defaults(func=_run)
