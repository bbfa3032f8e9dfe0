"""Paired (block) bootstrap CIs and paired tests of perplexity deltas, on synthetic per-window NLLs."""

from __future__ import annotations

import numpy as np
import pytest

from kvlab.metrics import block_means, mean_ci, paired_delta_ci, paired_nll_test


def _articles(n_articles=8, per_article=4, seed=0):
    """Per-window NLL of a baseline: windows of one article share a level (dependence), plus noise."""
    rng = np.random.default_rng(seed)
    level = np.repeat(rng.normal(3.0, 0.3, n_articles), per_article)
    return level + rng.normal(0, 0.02, level.size)


def test_block_1_is_the_plain_percentile_bootstrap():
    from scipy.stats import bootstrap

    a = _articles()
    b = a + np.random.default_rng(1).normal(0.01, 0.05, a.size)
    res = bootstrap((a, b), lambda x, y, axis=-1: np.exp(y.mean(axis)) - np.exp(x.mean(axis)), paired=True,
                    vectorized=True, n_resamples=2000, method="percentile", rng=np.random.default_rng(0))
    d, lo, hi = paired_delta_ci(a, b)
    assert (lo, hi) == (res.confidence_interval.low, res.confidence_interval.high)
    assert paired_delta_ci(a, b, block=1) == (d, lo, hi)
    assert np.isclose(d, np.exp(b.mean()) - np.exp(a.mean()))


def test_identical_up_to_rounding_is_not_significant_a_real_shift_is():
    a = _articles()
    rng = np.random.default_rng(2)
    for block in (1, 4):
        noise = a + rng.normal(0, 1e-4, a.size)  # fp16-like: rounding noise, no shift
        d, lo, hi = paired_delta_ci(a, noise, block=block)
        assert lo <= 0 <= hi and abs(d) < 0.01
        assert paired_nll_test(a, noise, block=block) > 0.05
        shift = a + 0.02 + rng.normal(0, 1e-3, a.size)  # a real, uniform cost
        d, lo, hi = paired_delta_ci(a, shift, block=block)
        assert 0 < lo <= d <= hi
        assert paired_nll_test(a, shift, block=block) < 1e-6


def test_blocks_widen_the_ci_when_windows_of_an_article_move_together():
    # the cost differs by article (all windows of an article alike): 32 windows, only 8 independent units
    rng = np.random.default_rng(3)
    a = _articles()
    cost = np.repeat(rng.normal(0.01, 0.03, 8), 4) + rng.normal(0, 1e-3, 32)
    _, lo1, hi1 = paired_delta_ci(a, a + cost, block=1)
    _, lo4, hi4 = paired_delta_ci(a, a + cost, block=4)
    assert hi4 - lo4 > 1.5 * (hi1 - lo1)


def test_block_bootstrap_is_seeded_and_checks_its_arguments():
    a = _articles()
    b = a + 0.01
    assert paired_delta_ci(a, b, block=3, seed=5) == paired_delta_ci(a, b, block=3, seed=5)
    d, lo, hi = paired_delta_ci(a[:4], b[:4], block=4)  # one block: no resampling possible
    assert lo == d == hi
    with pytest.raises(ValueError, match="block=0"):
        paired_delta_ci(a, b, block=0)
    assert np.allclose(block_means([1, 3, 5, 7, 9], 2), [2, 6, 9])
    assert paired_nll_test(a, a) == 1.0


def test_mean_ci_brackets_the_mean_is_seeded_and_checks_its_arguments():
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 0.1, 24)
    m, lo, hi = mean_ci(x, seed=3)
    assert m == pytest.approx(x.mean()) and lo < m < hi
    assert (m, lo, hi) == mean_ci(x, seed=3)  # the same inputs give the same numbers
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)  # the normal-theory half-width, for scale
    assert 0.6 * half < (hi - lo) / 2 < 1.4 * half
    assert mean_ci(np.full(5, 0.25)) == (0.25, 0.25, 0.25)  # no spread: no interval
    assert mean_ci([0.1, 0.9], block=2) == (0.5, 0.5, 0.5)  # one block: nothing to resample
    for bad in ([], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="1-D"):
            mean_ci(bad)
    with pytest.raises(ValueError, match="block=0"):
        mean_ci(x, block=0)


def test_mean_ci_blocks_widen_it_when_neighbours_move_together():
    rng = np.random.default_rng(2)
    x = np.repeat(rng.normal(0, 1, 8), 4) + rng.normal(0, 0.05, 32)  # 8 articles of 4 alike windows
    _, lo1, hi1 = mean_ci(x)
    _, lo4, hi4 = mean_ci(x, block=4)
    assert hi4 - lo4 > 1.5 * (hi1 - lo1)
