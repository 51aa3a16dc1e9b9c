"""`msae compare RUN ... [--baseline RUN]`: runs side by side as in a paper's table, training seeds
as replicates. The runs given are gathered into groups that differ only in their training seed
(inspect.groups); each group's metric is its mean over seeds with a Student t interval (n
seeds said), and each group's difference to the baseline's group is paired by seed: with two or
more same-seed pairs, the t interval of the pairs' differences, "resolved" when it excludes zero,
"within noise" when not; with one seed, "one seed: not a comparison", with the paired bootstrap
over the eval items both runs share beside it (parents, letters) for what it is worth. Also the
Trade-off page's comparison section, and markdown + CSV for the write-up bundle.

Runs are compared at matched L0: a group whose mean L0 differs from the baseline's by more than
`l0_tolerance` (10 %) is marked, since reconstruction and absorption both move with L0.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from msae_core.artifacts import EXPORT_COMPARE_CSV, EXPORT_COMPARE_MD, atomic_write_text
from msae_core.errors import MsaeError
from msae_core.evals.summary import INTERVALS
from msae_core.inspect.groups import finite_or_none as _num

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




def read_runs(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The runs-table rows (inspect.runs_table.run_row) of the run folders `paths`; a folder that
    is not a run, or a run with no eval yet, is refused in one line."""
    from msae_core.inspect.runs_table import run_row
    from msae_core.runs.folder import read_run

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
    """Long table, one row per (group, metric) with a value: run (the group's label), metric,
    label, direction, value (mean over seeds), ci_low, ci_high, n_seeds, runs, diff (to the
    baseline group, paired by seed), diff_ci_low, diff_ci_high, n_pairs, pairing, verdict
    (inspect.groups), resolved (True / False, None without a seed-level interval), item_ci_low,
    item_ci_high (one seed: the paired bootstrap over shared eval items), better, l0_matched.
    `baseline`: a run's name or a group's label."""
    from msae_core.inspect.groups import item_scores, label_groups, group_score, paired_difference

    if df.empty:
        raise MsaeError("no runs to compare")
    df = df.copy()
    if "group" not in df:
        df["group"] = df["name"]
    if "group_label" not in df or df["group_label"].isna().any():  # the caller's labels are kept
        df = label_groups(df)
    if baseline in set(df["name"]):
        base_group = df[df["name"] == baseline]["group"].iloc[0]
    elif baseline in set(df["group_label"]):
        base_group = df[df["group_label"] == baseline]["group"].iloc[0]
    else:
        raise MsaeError(f"baseline {baseline!r} is not among the runs ({', '.join(df['name'])})")
    groups = {g: sub for g, sub in df.groupby("group", sort=False)}
    order = [base_group] + [g for g in groups if g != base_group]

    def score(g: str, key: str) -> dict:
        lo_key, hi_key = INTERVALS.get(key, (None, None))
        return group_score(groups[g], key, (lo_key, hi_key) if lo_key else None)

    def l0(g: str) -> float | None:
        return next((v for k in ("l0", "synth_l0") if (v := score(g, k)["mean"]) is not None), None)

    base_l0 = l0(base_group)
    out = []
    for g in order:
        sub = groups[g]
        g_l0 = l0(g)
        matched = None if g_l0 is None or base_l0 is None else abs(g_l0 - base_l0) <= l0_tolerance * max(abs(base_l0), 1e-9)
        for key, label, direction in METRICS:
            a = score(g, key)
            if a["mean"] is None:
                continue
            calibrated = "l0_target" in sub and sub["l0_target"].notna().any()
            row = {"run": sub["group_label"].iloc[0], "metric": key, "label": label, "direction": direction,
                   "value": a["mean"], "ci_low": a["ci_low"], "ci_high": a["ci_high"], "n_seeds": a["n"],
                   "runs": ",".join(sorted(sub["name"])), "l0_matched": matched, "l0_calibrated": calibrated}
            diff = {"diff": None, "diff_ci_low": None, "diff_ci_high": None, "n_pairs": None, "pairing": "",
                    "verdict": "", "item_ci_low": None, "item_ci_high": None}
            if g != base_group:
                b = score(base_group, key)
                items_a = items_b = None
                shared = sorted(set(a["by_seed"]) & set(b["by_seed"]))
                if len(shared) == 1 and "path" in sub:
                    seed = shared[0]
                    pa = sub[sub["seed"] == seed]["path"] if "seed" in sub else sub["path"]
                    pb = groups[base_group]
                    pb = pb[pb["seed"] == seed]["path"] if "seed" in pb else pb["path"]
                    if len(pa) and len(pb):
                        items_a, items_b = item_scores(pa.iloc[0], key), item_scores(pb.iloc[0], key)
                diff.update({k: v for k, v in paired_difference(a, b, items_a, items_b).items() if k in diff})
            d = diff["diff"]
            better = None
            if d is not None and direction and d != 0:
                better = (d > 0) == (direction == "higher")
            resolved = {"resolved": True, "within noise": False}.get(diff["verdict"])
            out.append({**row, **diff, "resolved": resolved, "better": better})
    return pd.DataFrame(out)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}" if abs(v) >= 1 else f"{v:.4f}"


def cell(r: dict, baseline: str) -> str:
    """One cell of the wide table: mean [interval] (n seeds), and for a group other than the
    baseline its paired difference, its interval and the verdict."""
    text = _fmt(_num(r["value"]))
    lo, hi = _num(r["ci_low"]), _num(r["ci_high"])  # a long table read back holds NaN for "none"
    if lo is not None and hi is not None:
        text += f" [{_fmt(lo)}, {_fmt(hi)}]"
    n = _num(r.get("n_seeds"))
    if n is not None:
        text += f" n={int(n)}"
    d = _num(r.get("diff"))
    if r["run"] != baseline and d is not None:
        dlo, dhi = _num(r.get("diff_ci_low")), _num(r.get("diff_ci_high"))
        ilo, ihi = _num(r.get("item_ci_low")), _num(r.get("item_ci_high"))
        sign = lambda v: ("+" if v >= 0 else "") + _fmt(v)  # noqa: E731
        interval = f" [{sign(dlo)}, {sign(dhi)}]" if dlo is not None and dhi is not None else ""
        items = f"; items {sign(ilo)}..{sign(ihi)}" if ilo is not None and ihi is not None else ""
        text += f" ({sign(d)}{interval}, {r.get('verdict') or 'no interval'}{items})"
    return text


def wide_table(long: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Runs as rows (baseline first), metrics as columns (their labels, with the good direction),
    cells as `cell` writes them; an `L0 matched` column when the runs have an L0. `baseline`: its
    group's label, or a member's name (the long table's first group is the baseline's)."""
    if baseline not in set(long["run"]):
        baseline = long["run"].iloc[0]
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
        first = next(iter(sub.values())) if sub else {}
        matched = first.get("l0_matched")
        row["L0 matched"] = "-" if matched is None else ("yes" if matched else "NO") + (
            " (threshold set)" if first.get("l0_calibrated") is True else "")
        table.append(row)
    return pd.DataFrame(table)


def l0_hint(long: pd.DataFrame, df: pd.DataFrame) -> str:
    """'' when every group's L0 matches the baseline's; else one line naming the unmatched groups
    and how to evaluate the thresholded ones at the baseline's L0."""
    if long.empty or "l0_matched" not in long:
        return ""
    off = long[(long["l0_matched"] == False) & long["metric"].isin(["l0", "synth_l0"])]  # noqa: E712
    if off.empty:
        return ""
    base = long[long["metric"].isin(["l0", "synth_l0"])].iloc[0]
    archs = dict(zip(df.get("group_label", df["name"]), df["arch"])) if "arch" in df else {}
    bases = dict(zip(df.get("group_label", df["name"]), df.get("base", df["arch"]))) if "arch" in df else {}
    from msae_core.evals.calibrate import THRESHOLDED

    threshold = [r for r in off["run"] if bases.get(r, archs.get(r)) in THRESHOLDED]
    line = (f"L0 not matched: {', '.join(off['run'])} (the baseline's L0 is {base['value']:.2f}); their "
            "differences mix the method with the sparsity.")
    if threshold:
        line += (f" The thresholded ones ({', '.join(threshold)}) can be evaluated at it: msae eval RUN "
                 f"--target-l0 {base['value']:.2f}.")
    return line


def to_markdown(wide: pd.DataFrame, baseline: str, note: str = "") -> str:
    """The wide table as markdown, its reading below it and `note` (data_note) above it."""
    cols = list(wide.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in wide.itertuples(index=False)]
    notes = [f"Rows are groups of runs that differ only in their training seed: mean [95 % t interval over "
             f"the seeds] n=seeds (one seed: that run's own eval interval, if any). Differences are to "
             f"{baseline}, paired by seed: resolved when the 95 % t interval of the same-seed differences "
             "excludes zero, within noise when it does not; one seed: not a comparison (items: the paired "
             "bootstrap over the eval items both runs share, which carries no seed-to-seed variance); "
             "unpaired: Welch's interval where no seed is shared. "
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
    baseline = long["run"].iloc[0]  # the baseline's group
    wide = wide_table(long, baseline)
    from msae_core.inspect.groups import label_groups

    note = "\n\n".join(n for n in (data_note(df), l0_hint(long, label_groups(df))) if n)
    print(to_markdown(wide, baseline, note), end="")
    if args.out:
        print(f"written: {write_comparison(long, wide, baseline, args.out, note)}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="runs side by side: metrics with intervals, differences to a baseline",
        description="Print evaluated runs as a paper's table. Runs that differ only in their training "
                    "seed are one group: each metric is the group's mean with a 95 % t interval over its "
                    "seeds, and each group's difference to the baseline's is paired by seed (resolved "
                    "when the interval of the same-seed differences excludes zero; one seed: not a "
                    "comparison). L0 matching is checked.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders with eval results")
    p.add_argument("--baseline", default="", help="the run the others are compared to (default: the first)")
    p.add_argument("--out", default="", help="also write compare.md and compare.csv into this folder")
    p.set_defaults(func=_run)
