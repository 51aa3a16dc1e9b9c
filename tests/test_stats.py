"""The intervals behind the evals' scores: a hierarchical bootstrap for one seed, a t interval
over seeds."""

import numpy as np
import pytest

from msae_core.evals.stats import bootstrap_ci, bootstrap_ci_counts, intervals_overlap, nested_mean, score_interval, t_interval


def test_nested_mean_is_the_mean_of_means():
    per_seed = [[[1.0, 0.0], [1.0]], [[0.0], [0.0, 0.0, 1.0]]]
    assert nested_mean(per_seed) == pytest.approx(((0.5 + 1.0) / 2 + (0.0 + 1 / 3) / 2) / 2)


def test_bootstrap_covers_the_truth_about_as_often_as_it_says():
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(100):  # 20 groups of 30 Bernoulli(0.3) items; the true nested mean is 0.3
        groups = [list(rng.random(30) < 0.3) for _ in range(20)]
        lo, hi = bootstrap_ci(groups, n_boot=400, seed=rep)
        hits += lo <= 0.3 <= hi
    assert 85 <= hits <= 100


def test_bootstrap_narrows_with_more_items_and_is_deterministic():
    rng = np.random.default_rng(0)
    few = [list(rng.random(5)) for _ in range(10)]
    many = [list(rng.random(500)) for _ in range(10)]
    assert np.subtract(*bootstrap_ci(many)[::-1]) < np.subtract(*bootstrap_ci(few)[::-1])
    assert bootstrap_ci(few, seed=3) == bootstrap_ci(few, seed=3)
    with pytest.raises(ValueError):
        bootstrap_ci([[]])


def test_seeds_give_a_t_interval_holding_each_seed():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 4))
        per_seed = [[list(rng.random(20) + rng.normal(0, 0.2)) for _ in range(5)] for _ in range(n)]
        lo, hi = score_interval(per_seed)
        scores = [nested_mean([s]) for s in per_seed]
        assert lo <= min(scores) and max(scores) <= hi
        assert (lo + hi) / 2 == pytest.approx(nested_mean(per_seed))
    assert t_interval([1.0, 2.0, 3.0], 0.95) == pytest.approx((2 - 4.3027 / 3 ** 0.5, 2 + 4.3027 / 3 ** 0.5), abs=1e-3)


def test_overlap():
    assert intervals_overlap((0, 1), (0.5, 2)) is True
    assert intervals_overlap((0, 1), (1.5, 2)) is False
    assert intervals_overlap(None, (0, 1)) is None


def test_counts_bootstrap_equals_the_item_bootstrap_in_distribution():
    groups = [[1] * 30 + [0] * 70, [1] * 5 + [0] * 15, [1] * 60 + [0] * 40]
    items = bootstrap_ci(groups, n_boot=4000, seed=0)
    counts = bootstrap_ci_counts([30, 5, 60], [100, 20, 100], n_boot=4000, seed=1)
    assert counts == pytest.approx(items, abs=0.02)
    assert bootstrap_ci_counts([0, 3], [0, 3]) == (1.0, 1.0)  # an empty group is left out
