"""Training seeds as replicates. Runs whose configs differ only in the training seed (sae.seed and
train.seed, which `msae sweep --grid seeds=0,1,2` sets together) and in settings that do not
change what is trained (device, logging and checkpoint cadence, the evals asked for) form a group
of replicates; their data must be the same store or the same stream.

- A group's score: the mean over its seeds with a Student t interval over the seeds' scores (n
  >= 2; with one seed, that run's own eval interval where its eval gives one, said as n = 1).
- A difference between two groups, `paired_difference`: the seeds both groups have are pairs, and
  with two or more pairs the interval is the t interval of the same-seed differences (what a seed
  changes in both runs alike cancels). A difference is "resolved" only when that seed-level
  interval excludes zero. With one shared seed there is no seed-level interval: the verdict is
  "one seed: not a comparison", and the paired bootstrap over the eval items both runs were
  scored on (parents of the synthetic eval, letters of the absorption eval) is given beside it.
  Groups with fewer than two seeds in common but two or more seeds each get Welch's unpaired
  interval.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from msae_core.evals.stats import paired_bootstrap_ci, t_interval, welch_interval

# settings that do not make two runs different experiments
_NOT_THE_EXPERIMENT = {"sae": {"seed"}, "train": {"seed", "device", "log_every", "checkpoint_every",
                                                 "checkpoint_minutes", "snapshot_every", "evals"},
                       "data": {"acts", "cache"}}  # the data is compared through data_key
_SEED_TOKEN = re.compile(r"(^|[-_])seeds?\d+(?=$|[-_])")

# verdicts of a difference
RESOLVED, WITHIN_NOISE, ONE_SEED, NO_INTERVAL = "resolved", "within noise", "one seed: not a comparison", "no interval"


def group_key(config: dict, data_key: str, origin: str = "") -> str:
    """A short hash of what the run is, its training seed left out: equal for replicates.
    `origin`: where an imported SAE came from (two imported SAEs of one shape are not replicates)."""
    parts = {"data_key": data_key, "origin": origin}
    for section, drop in _NOT_THE_EXPERIMENT.items():
        sec = config.get(section) if isinstance(config.get(section), dict) else {}
        parts[section] = {k: v for k, v in sorted(sec.items()) if k not in drop}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def seed_of(config: dict) -> int | None:
    """The run's training seed (train.seed; the batch order's, and the init's when both are set)."""
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    v = train.get("seed", 0)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def label_groups(df: pd.DataFrame) -> pd.DataFrame:
    """`df` (rows with name, group) with `group_label`: the members' name without its seed
    (`sweep-lam0.3-seed1` -> `sweep-lam0.3`), the first member's when they differ; unique per
    group (a clash gets the group's hash). Runs of one group with the same seed (the same config
    trained twice) are split into groups of their own first: they are not replicates."""
    out = df.copy()
    if out.empty or "group" not in out:
        out["group_label"] = out.get("name", pd.Series(dtype=object))
        return out
    if "seed" in out:  # one seed twice in a group (a rerun of one config): not replicates, each alone
        seeds = out["seed"].astype(object).where(out["seed"].notna(), None)
        twice = out.assign(_s=seeds).duplicated(["group", "_s"], keep=False)
        out.loc[twice, "group"] = out.loc[twice, "group"] + ":" + out.loc[twice, "name"].astype(str)
    labels: dict[str, str] = {}
    for g, sub in out.groupby("group", sort=False):
        names = sorted(sub["name"].astype(str))
        labels[g] = _SEED_TOKEN.sub("", names[0]) or names[0]
    seen: dict[str, int] = {}
    for lab in labels.values():
        seen[lab] = seen.get(lab, 0) + 1
    labels = {g: (lab if seen[lab] == 1 else f"{lab} [{g[:6]}]") for g, lab in labels.items()}
    out["group_label"] = out["group"].map(labels)
    return out


def finite_or_none(v: Any) -> float | None:
    """`v` as a finite float, or None (missing, not a number, NaN or infinite)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def group_score(rows: pd.DataFrame, key: str, ci_keys: tuple[str, str] | None = None) -> dict:
    """One group's `key`: mean over its seeds, interval (t over seeds; one run's own eval interval
    when n = 1), n, and the seeds' values by seed."""
    by_seed = {int(s) if finite_or_none(s) is not None else i: v for i, (s, v) in
               enumerate(zip(rows.get("seed", pd.Series([None] * len(rows))), rows[key]))
               if finite_or_none(v) is not None} if key in rows else {}
    vals = list(by_seed.values())
    out = {"n": len(vals), "mean": None, "ci_low": None, "ci_high": None, "by_seed": by_seed}
    if not vals:
        return out
    out["mean"] = float(sum(vals) / len(vals))
    if len(vals) >= 2:
        out["ci_low"], out["ci_high"] = t_interval(vals)
    elif ci_keys is not None:
        one = rows[rows[key].map(lambda v: finite_or_none(v) is not None)].iloc[0]
        out["ci_low"], out["ci_high"] = finite_or_none(one.get(ci_keys[0])), finite_or_none(one.get(ci_keys[1]))
    return out


def paired_difference(a: dict, b: dict, items_a: dict | None = None, items_b: dict | None = None) -> dict:
    """The difference a - b of two groups' scores (group_score dicts) and its verdict (module
    docstring). `items_a` / `items_b`: for the one-seed case, each run's per-item scores {item:
    value} on the seed they share, for the paired bootstrap over shared items."""
    out = {"diff": None, "diff_ci_low": None, "diff_ci_high": None, "n_pairs": 0, "pairing": "",
           "verdict": NO_INTERVAL, "item_ci_low": None, "item_ci_high": None, "n_items": 0}
    if a["mean"] is None or b["mean"] is None:
        return out
    shared = sorted(set(a["by_seed"]) & set(b["by_seed"]))
    out["n_pairs"] = len(shared)
    if len(shared) >= 2:
        d = [a["by_seed"][s] - b["by_seed"][s] for s in shared]
        out["diff"] = float(sum(d) / len(d))
        out["diff_ci_low"], out["diff_ci_high"] = t_interval(d)
        out["pairing"] = f"{len(shared)} same-seed pairs"
    elif a["n"] >= 2 and b["n"] >= 2:  # fewer than two shared seeds, two or more each: unpaired
        av, bv = list(a["by_seed"].values()), list(b["by_seed"].values())
        out["diff"] = a["mean"] - b["mean"]
        out["diff_ci_low"], out["diff_ci_high"] = welch_interval(av, bv)
        out["pairing"] = f"unpaired ({len(shared)} shared seed(s); {a['n']} and {b['n']} seeds)"
    else:
        out["diff"] = a["mean"] - b["mean"]
        if len(shared) == 1:
            out["diff"] = a["by_seed"][shared[0]] - b["by_seed"][shared[0]]
            out["verdict"] = ONE_SEED
            common = sorted(set(items_a or {}) & set(items_b or {}))
            out["n_items"] = len(common)
            if len(common) >= 2:
                out["item_ci_low"], out["item_ci_high"] = paired_bootstrap_ci(
                    [items_a[i] for i in common], [items_b[i] for i in common])
        elif a["n"] == 1 or b["n"] == 1:
            out["verdict"] = ONE_SEED
        return out
    lo, hi = out["diff_ci_low"], out["diff_ci_high"]
    out["verdict"] = RESOLVED if (lo > 0 or hi < 0) else WITHIN_NOISE
    return out


# the eval items a paired bootstrap resamples, per workbench metric: (eval, detail key of the item,
# detail key of its score)
ITEM_SCORES = {"synth_absorption": ("synthetic", "feature", "absorption"),
               "synth_lost": ("synthetic", "feature", "lost"),
               "absorption": ("absorption", "first_letter", "mean_absorption_fraction")}


def item_scores(run_path: str | Path, key: str) -> dict | None:
    """{item: score} of the eval items behind metric `key` in the run's eval.json (None when the
    metric has no items or the eval is missing)."""
    from msae_core.artifacts import RUN_EVAL, read_json_object

    spec = ITEM_SCORES.get(key)
    if spec is None:
        return None
    ev = read_json_object(Path(run_path) / RUN_EVAL) or {}
    details = (ev.get(spec[0]) or {}).get("eval_result_details") if isinstance(ev.get(spec[0]), dict) else None
    if not isinstance(details, list):
        return None
    out = {}
    for d in details:
        if isinstance(d, dict) and finite_or_none(d.get(spec[2])) is not None and d.get(spec[1]) is not None:
            out[d[spec[1]]] = float(d[spec[2]])
    return out or None


def _score_columns(df: pd.DataFrame) -> list[str]:
    """The eval scores in `df` a group averages over its seeds (evals.summary's keys without the
    intervals, which a group computes anew)."""
    from msae_core.evals.summary import PATHS

    return [c for c in PATHS if c in df and not c.endswith(("_ci_low", "_ci_high"))]


def groups_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per group of `df` (a runs table with group and group_label): `name` the group's
    label, `n_seeds`, `seeds`, `runs`, its first member's settings, and per score its mean over the
    seeds with `{score}_ci_low` / `{score}_ci_high` (group_score: the t interval over seeds, a lone
    run's own interval). The Trade-off page plots these with their seed error bars."""
    from msae_core.evals.summary import INTERVALS

    if df.empty or "group" not in df:
        return df.copy()
    scores = _score_columns(df)
    rows = []
    for g, sub in df.groupby("group", sort=False):
        sub = sub.sort_values("seed", kind="stable") if "seed" in sub else sub
        row = sub.iloc[0].to_dict()
        row.update(name=row.get("group_label") or row["name"], n_seeds=len(sub), runs=",".join(sub["name"]),
                   seeds=",".join(str(int(s)) for s in sub["seed"].dropna()) if "seed" in sub else "",
                   member=sub["name"].iloc[0])
        for key in scores:
            sc = group_score(sub, key, INTERVALS.get(key))
            row[key] = sc["mean"]
            row[f"{key}_ci_low"], row[f"{key}_ci_high"] = sc["ci_low"], sc["ci_high"]
        rows.append(row)
    return pd.DataFrame(rows)


def format_interval(mean: Any, lo: Any, hi: Any) -> str:
    """'0.8123 [0.8011, 0.8235]', or the mean alone, or '-'."""
    m, a, b = finite_or_none(mean), finite_or_none(lo), finite_or_none(hi)
    if m is None:
        return "-"
    return f"{m:.4f}" + (f" [{a:.4f}, {b:.4f}]" if a is not None and b is not None else "")
