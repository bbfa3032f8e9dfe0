"""Error metrics, from tensors to perplexity, and a paired bootstrap for perplexity deltas.

Tensor metrics take x and x_hat of equal shape; vectors run along the last dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["cosine", "kl_div", "logits_kl", "mse", "nmse", "paired_delta_ci"]


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


def paired_delta_ci(nll_a, nll_b, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0):
    """PPL(b) - PPL(a) with a paired bootstrap CI over windows (scipy.stats.bootstrap, percentile).

    nll_a, nll_b: per-window mean NLL of two schemes on the same windows. Returns (delta, lo, hi);
    lo = hi = delta when there is a single window.
    """
    from scipy.stats import bootstrap

    a = np.asarray(nll_a, dtype=np.float64)
    b = np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length 1-D per-window NLL lists, got shapes {a.shape} and {b.shape}")
    delta = math.exp(b.mean()) - math.exp(a.mean())
    if a.size < 2 or np.allclose(a, b, rtol=0, atol=0):
        return delta, delta, delta

    def stat(x, y, axis=-1):
        return np.exp(y.mean(axis=axis)) - np.exp(x.mean(axis=axis))

    res = bootstrap((a, b), stat, paired=True, vectorized=True, n_resamples=n_resamples,
                    confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return delta, float(res.confidence_interval.low), float(res.confidence_interval.high)
