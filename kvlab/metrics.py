"""Error metrics, from tensors to perplexity, and paired (block) bootstraps and tests for perplexity deltas.

Tensor metrics take x and x_hat of equal shape; vectors run along the last dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["block_means", "cosine", "kl_div", "logits_kl", "mean_ci", "mse", "nmse", "paired_delta_ci",
           "paired_nll_test"]


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements."""
    return ((x.double() - x_hat.double()) ** 2).mean()


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """||x - x_hat||^2 / ||x||^2 (0 when both are zero)."""
    num = ((x.double() - x_hat.double()) ** 2).sum()
    den = (x.double() ** 2).sum()
    return num / den if den > 0 else num * 0


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each vector along the last dim (1 where both are zero). (...) -> (...)."""
    a, b = x.double(), x_hat.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(1e-300)
    return torch.where((na == 0) & (nb == 0), torch.ones_like(cos), cos)


def kl_div(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of probability vectors along the last dim, in nats. (..., N) -> (...)."""
    if p.dtype != torch.float64:  # attention maps are large: float32 with xlogy (0 log 0 = 0) is plenty
        p, q = p.float(), q.float()
    tiny = torch.finfo(p.dtype).tiny
    return (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(tiny))).sum(-1).clamp_min(0)


def logits_kl(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)) per position, nats. (..., V) -> (...)."""
    lp = torch.log_softmax(logits_ref.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)


def paired_delta_ci(nll_a, nll_b, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
                    block: int = 1):
    """PPL(b) - PPL(a) with a paired bootstrap CI over windows (percentile).

    nll_a, nll_b: per-window mean NLL of two schemes on the same windows, in corpus order. Returns
    (delta, lo, hi); lo = hi = delta when there is a single window (or a single block).

    ``block``: the resampling unit, in windows. Neighbouring windows of one article are not independent
    (same topic, same rare words), so resampling single windows makes the CI too tight. With ``block > 1``
    the windows are cut into consecutive non-overlapping blocks of ``block`` windows (the last one may be
    shorter) and whole blocks are resampled, pairs kept together (a block bootstrap). ``block=1`` is the
    plain paired percentile bootstrap (scipy.stats.bootstrap), unchanged.
    """
    a = np.asarray(nll_a, dtype=np.float64)
    b = np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length 1-D per-window NLL lists, got shapes {a.shape} and {b.shape}")
    if not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block={block!r} is not allowed; allowed: an integer >= 1 (windows per resampled block)")
    delta = math.exp(b.mean()) - math.exp(a.mean())
    if a.size < 2 or np.allclose(a, b, rtol=0, atol=0):
        return delta, delta, delta
    if block == 1:
        from scipy.stats import bootstrap

        def stat(x, y, axis=-1):
            return np.exp(y.mean(axis=axis)) - np.exp(x.mean(axis=axis))

        res = bootstrap((a, b), stat, paired=True, vectorized=True, n_resamples=n_resamples,
                        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
        return delta, float(res.confidence_interval.low), float(res.confidence_interval.high)
    starts = np.arange(0, a.size, block)
    if starts.size < 2:
        return delta, delta, delta
    size = np.diff(np.append(starts, a.size)).astype(np.float64)  # (n_blocks,)
    sum_a, sum_b = np.add.reduceat(a, starts), np.add.reduceat(b, starts)  # (n_blocks,)
    pick = np.random.default_rng(seed).integers(0, starts.size, size=(n_resamples, starts.size))
    n = size[pick].sum(axis=1)
    boot = np.exp(sum_b[pick].sum(axis=1) / n) - np.exp(sum_a[pick].sum(axis=1) / n)  # (n_resamples,)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return delta, float(lo), float(hi)


def block_means(x, block: int = 1) -> np.ndarray:
    """Means of consecutive non-overlapping blocks of ``block`` values (the last one may be shorter)."""
    x = np.asarray(x, dtype=np.float64)
    starts = np.arange(0, x.size, block)
    return np.add.reduceat(x, starts) / np.diff(np.append(starts, x.size))


def mean_ci(x, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0, block: int = 1):
    """The mean of per-window values ``x`` (in corpus order) with a percentile bootstrap CI over windows,
    resampling blocks of ``block`` consecutive windows as :func:`paired_delta_ci` does. Returns
    (mean, lo, hi); lo = hi = mean with a single block or no spread."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"need a non-empty 1-D list of per-window values, got shape {x.shape}")
    if not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block={block!r} is not allowed; allowed: an integer >= 1 (windows per resampled block)")
    mean = float(x.mean())
    b = block_means(x, block)
    if b.size < 2 or np.all(x == x[0]):
        return mean, mean, mean
    starts = np.arange(0, x.size, block)
    size = np.diff(np.append(starts, x.size)).astype(np.float64)  # (n_blocks,)
    sums = np.add.reduceat(x, starts)  # (n_blocks,)
    pick = np.random.default_rng(seed).integers(0, starts.size, size=(n_resamples, starts.size))
    boot = sums[pick].sum(axis=1) / size[pick].sum(axis=1)  # (n_resamples,)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return mean, float(lo), float(hi)


def paired_nll_test(nll_a, nll_b, block: int = 1) -> float:
    """Two-sided p-value that schemes a and b have the same mean NLL on these windows: a paired t-test
    on the per-block mean NLL differences (blocks of ``block`` consecutive windows, as in
    :func:`paired_delta_ci`). PPL is monotone in mean NLL, so this tests the sign of the PPL delta.
    1.0 when the differences are all equal to zero; NaN with fewer than 2 blocks."""
    from scipy.stats import ttest_1samp

    d = block_means(np.asarray(nll_b, dtype=np.float64) - np.asarray(nll_a, dtype=np.float64), block)
    if d.size < 2:
        return math.nan
    if np.all(d == 0):
        return 1.0
    if np.all(d == d[0]):  # no spread: the t statistic is infinite
        return 0.0
    return float(ttest_1samp(d, 0.0).pvalue)
