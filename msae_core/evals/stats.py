"""Confidence intervals for eval scores that are means of means, pure numpy (scipy for t).

A score such as SAEBench's mean absorption fraction is, for one seed, the mean over letters of the
mean over each letter's words; with several seeds, the mean of the seeds' scores.

- One seed: a hierarchical percentile bootstrap. A replicate resamples the groups (letters) with
  replacement and, within each, the items (words), and recomputes the score; the interval is the
  (1 - conf) / 2 and (1 + conf) / 2 quantiles of the replicates. It carries the spread of the word
  sample and of the letters, not what a seed changes besides (probe training, prompts).
- Two or more seeds: each seed is an independent repeat of the whole eval (its own word sample,
  split, prompts and probes), so the seeds' scores are the replicates: a Student t interval,
  mean +- t(conf, n - 1) sd / sqrt(n). With 2 or 3 seeds it always holds every seed's score (t is
  12.7 and 4.3); a bootstrap over 3 seeds would be narrower than the seeds' own spread.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_BOOTSTRAP = 2000
DEFAULT_CONFIDENCE = 0.95


def nested_mean(per_seed: Sequence[Sequence[Sequence[float]]]) -> float:
    """Mean over seeds of the mean over groups of the mean over items (empty groups left out)."""
    seed_means = [float(np.mean([np.mean(g) for g in groups if len(g)])) for groups in per_seed]
    return float(np.mean(seed_means))


def _replicates(groups: Sequence[Sequence[float]], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) bootstrap replicates of the mean over groups of the mean over each group's items."""
    arrays = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not arrays:
        raise ValueError("no values to bootstrap")
    # (n_boot, G): a bootstrap mean of each group per replicate, then the groups resampled
    means_BG = np.stack([a[rng.integers(0, len(a), (n_boot, len(a)))].mean(1) for a in arrays], 1)
    pick_BG = rng.integers(0, len(arrays), means_BG.shape)
    return np.take_along_axis(means_BG, pick_BG, 1).mean(1)


def bootstrap_ci(groups: Sequence[Sequence[float]], *, n_boot: int = DEFAULT_BOOTSTRAP,
                 conf: float = DEFAULT_CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """(low, high) of the hierarchical percentile bootstrap of the mean over groups of the mean
    over each group's items (groups[g]: the item values of group g; empty groups left out)."""
    return stratified_bootstrap_ci([groups], n_boot=n_boot, conf=conf, seed=seed)


def stratified_bootstrap_ci(strata: Sequence[Sequence[Sequence[float]]], *, n_boot: int = DEFAULT_BOOTSTRAP,
                            conf: float = DEFAULT_CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """The same for the mean over fixed strata (e.g. probing datasets, each a list of classes of
    per-example values): groups and items are resampled within each stratum, the strata kept."""
    rng = np.random.default_rng(seed)
    reps = np.mean([_replicates(groups, n_boot, rng) for groups in strata], axis=0)
    lo, hi = np.quantile(reps, [(1 - conf) / 2, (1 + conf) / 2])
    return float(lo), float(hi)


def bootstrap_ci_counts(successes: Sequence[int], trials: Sequence[int], *, n_boot: int = DEFAULT_BOOTSTRAP,
                        conf: float = DEFAULT_CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """`bootstrap_ci` for groups of 0/1 items given as counts (group g: successes[g] ones among
    trials[g]): resampling a group's items is a binomial draw, so no item list is built."""
    rng = np.random.default_rng(seed)
    k = np.asarray(successes, dtype=np.int64)
    n = np.asarray(trials, dtype=np.int64)
    keep = n > 0
    k, n = k[keep], n[keep]
    if not len(n):
        raise ValueError("no values to bootstrap")
    means_BG = rng.binomial(n, k / n, size=(n_boot, len(n))) / n
    pick_BG = rng.integers(0, len(n), means_BG.shape)
    reps = np.take_along_axis(means_BG, pick_BG, 1).mean(1)
    lo, hi = np.quantile(reps, [(1 - conf) / 2, (1 + conf) / 2])
    return float(lo), float(hi)


def t_interval(values: Sequence[float], conf: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """(low, high) of the Student t interval of the mean of two or more independent values."""
    from scipy.stats import t

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        raise ValueError("a t interval needs two or more values")
    half = float(t.ppf((1 + conf) / 2, len(v) - 1)) * float(v.std(ddof=1)) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def score_interval(per_seed: Sequence[Sequence[Sequence[float]]], *, n_boot: int = DEFAULT_BOOTSTRAP,
                   conf: float = DEFAULT_CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """The interval of `nested_mean(per_seed)` (per_seed[s][g]: item values of group g under seed
    s): the bootstrap for one seed, the t interval over the seeds' scores for more."""
    if len(per_seed) == 1:
        return bootstrap_ci(per_seed[0], n_boot=n_boot, conf=conf, seed=seed)
    return t_interval([nested_mean([s]) for s in per_seed], conf)


def intervals_overlap(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool | None:
    """Whether two intervals share a point; None when either is unknown."""
    if a is None or b is None or None in a or None in b:
        return None
    return not (a[1] < b[0] or b[1] < a[0])


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], *, n_boot: int = DEFAULT_BOOTSTRAP,
                        conf: float = DEFAULT_CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """(low, high) of the percentile bootstrap of mean(a - b) over items both were scored on
    (a[i], b[i]: the same item, e.g. a parent feature or a letter, under two SAEs): the items are
    resampled together, so what the items share cancels."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        raise ValueError("a paired bootstrap needs two or more shared items")
    rng = np.random.default_rng(seed)
    reps = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(reps, [(1 - conf) / 2, (1 + conf) / 2])
    return float(lo), float(hi)


def welch_interval(a: Sequence[float], b: Sequence[float], conf: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """(low, high) of the Welch t interval of mean(a) - mean(b), two independent samples of two
    or more values each (replicates without a shared seed to pair them)."""
    from scipy.stats import t

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("a Welch interval needs two or more values on each side")
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = float(np.sqrt(vx + vy))
    if se == 0:
        d = float(x.mean() - y.mean())
        return d, d
    dof = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = float(t.ppf((1 + conf) / 2, dof)) * se
    d = float(x.mean() - y.mean())
    return d - half, d + half
