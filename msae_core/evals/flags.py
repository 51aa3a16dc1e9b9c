"""Suspicious results, flagged rather than just shown: what the research log this project grew
from reported without a word (a baseline with L0 8,896 of 16,384 latents, runs with negative
explained variance, two runs with the same KL score to four digits) and what a diverging run can
end with (`--lr 1e6` ended `done` at explained variance -8e12).

    a metric that is NaN or null    the weights or outputs are not finite (a diverged or damaged SAE)
    explained variance < 0          the reconstruction is worse than predicting the mean
    L0 > d_sae / 4                  not a sparse code
    dead fraction > 1/2             most of the dictionary is unused
    a metric equal to another run's to 4 significant digits (not 0 or 1: saturated scores and a
    TopK run's L0 = k are not suspicious)
    a score's confidence interval wider than its spread over the runs (the eval cannot tell them apart)

Each rule reads the flat numbers of `summary.summarize` (eval.json) and, before any eval, the
last training metrics. Pure functions: eval.json, the runs table, Home and the Trade-off page all
call these.
"""

from __future__ import annotations

import math
from typing import Any

# metrics compared between runs (l0 and scores that saturate at 0 or 1 are left out by the rule)
SHARED_METRICS = ("explained_variance", "kl_div_score", "ce_loss_score", "mse", "absorption",
                  "absorption_full", "sae_probe_acc", "synth_absorption", "synth_f1",
                  "synth_explained_variance")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def run_flags(metrics: dict, d_sae: Any = None, not_numbers: list[str] | tuple = ()) -> list[str]:
    """One line per suspicious value of one run. `metrics`: summarize()'s keys, and `train_`
    keys (train_explained_variance, train_l0) for a run not evaluated yet; `not_numbers`: the
    keys its evals reported as null or NaN (summary.not_numbers)."""
    out = []
    if not_numbers:
        out.append(f"{', '.join(not_numbers[:4])}{' ...' if len(not_numbers) > 4 else ''} came out as no "
                   "number (NaN or infinite): the SAE's weights or outputs are not finite")
    ev = next((v for k in ("explained_variance", "synth_explained_variance", "train_explained_variance")
               if (v := _num(metrics.get(k))) is not None), None)
    if ev is not None and ev < 0:
        out.append(f"explained variance {ev:.3g} < 0: the reconstruction is worse than predicting the mean")
    l0 = next((v for k in ("l0", "synth_l0", "train_l0") if (v := _num(metrics.get(k))) is not None), None)
    F = _num(d_sae)
    if l0 is not None and F and l0 > F / 4:
        out.append(f"L0 {l0:.1f} is over a quarter of d_sae {F:.0f}: not a sparse code")
    dead = _num(metrics.get("dead_fraction"))
    if dead is not None and dead > 0.5:
        out.append(f"{dead:.0%} of the latents are dead")
    return out


def interval_flags(runs: dict[str, dict]) -> dict[str, list[str]]:
    """Per run name, a line for each score whose confidence interval (summary.INTERVALS) is wider
    than the spread of that score over all runs that have it (two or more): on that score the
    eval's noise is larger than the differences it is asked to show."""
    from msae_core.evals.summary import INTERVALS

    out: dict[str, list[str]] = {name: [] for name in runs}
    for key, (lo_key, hi_key) in INTERVALS.items():
        if key.startswith("llm_"):  # the language model's own probe: the same for every SAE on it
            continue
        vals = {n: v for n, m in runs.items() if (v := _num(m.get(key))) is not None}
        if len(vals) < 2:
            continue
        spread = max(vals.values()) - min(vals.values())
        for name in vals:
            lo, hi = _num(runs[name].get(lo_key)), _num(runs[name].get(hi_key))
            if lo is not None and hi is not None and hi - lo > spread:
                out[name].append(f"{key}'s interval [{lo:.3g}, {hi:.3g}] is wider than its spread over "
                                 f"{len(vals)} runs ({spread:.3g}): the eval's noise exceeds the differences "
                                 "(more seeds or words narrow it)")
    return out


def interval_notes(runs: dict[str, dict]) -> list[str]:
    """interval_flags said once per score: which runs' intervals are wider than the spread of the
    score over these runs, and what would tell them apart."""
    from msae_core.evals.summary import INTERVALS

    per_run = interval_flags(runs)
    out = []
    for key in INTERVALS:
        names = [n for n, lines in per_run.items() if any(line.startswith(f"{key}'s interval") for line in lines)]
        if not names:
            continue
        vals = [v for m in runs.values() if (v := _num(m.get(key))) is not None]
        spread = max(vals) - min(vals)
        who = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        out.append(f"{key}: the intervals of {who} are wider than its spread over {len(vals)} runs "
                   f"({spread:.3g}); the eval cannot tell these runs apart: train seeds (seeds=0,1,2) and "
                   "compare the groups")
    return out


def shared_value_flags(runs: dict[str, dict]) -> dict[str, list[str]]:
    """Per run name, a line for each metric equal to another run's to 4 significant digits."""
    out: dict[str, list[str]] = {name: [] for name in runs}
    for key in SHARED_METRICS:
        seen: dict[str, list[str]] = {}
        for name, m in runs.items():
            v = _num(m.get(key))
            if v is None or v in (0.0, 1.0):
                continue
            seen.setdefault(f"{v:.4g}", []).append(name)
        for value, names in seen.items():
            if len(names) > 1:
                for name in names:
                    others = ", ".join(n for n in names if n != name)
                    out[name].append(f"{key} {value} equals {others}'s to 4 digits: the same result twice?")
    return out
