"""Analysis behind the notebooks: summaries, proxies vs perplexity, discordant pairs, KV statistics.

Every function takes the tidy tables written by :func:`kvlab.evaluation.sweep.sweep` (or a dump) and returns a
pandas DataFrame or a short Markdown string built from the numbers, so notebooks stay calls + prose.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import torch

from kvlab import quant
from kvlab.metrics import mean_ci, paired_delta_ci, paired_nll_test
from kvlab.quant.policy import parse_policy

__all__ = [
    "PROXIES", "adjust_pvalues", "bytes_table", "causal_only_rows", "ci_checks", "ci_checks_verdict", "compare_proxies", "discordance",
    "discordant_pairs", "end_metrics_verdict", "family", "head_means", "is_oracle", "kv_stats", "matched_bits",
    "pair_orderings", "pair_tests", "pareto_front", "passkey_vs_reference", "proxy_table", "rank_correlations",
    "spearman_ranges", "summarize", "worst_heads", "worst_heads_policy",
]

#: error-like proxies (larger = worse), with the column they are computed from
PROXIES = {
    "1 - K cosine": "k_cos", "1 - V cosine": "v_cos", "K NMSE": "k_nmse", "V NMSE": "v_nmse",
    "K MSE": "k_mse", "V MSE": "v_mse", "1 - attn-output cosine": "attn_cos", "attn-output NMSE": "attn_nmse",
    "attn-prob KL": "attn_kl", "logits KL": "kl",
}


def family(spec: str) -> str:
    """The scheme family of a config, for colours and grouping: 'kivi', 'q4_0', 'int', 'signmag'..."""
    p = parse_policy(spec)
    q = quant.get(p.k)
    name = q.family_label()
    if p.keep_first or p.keep_last or p.keep_k_heads or p.keep_v_heads or p.recent or p.k != p.v:
        name = "mixed policy"
    return name


def is_oracle(spec: str) -> bool:
    """True when any quantizer the policy uses (K, V, the kept heads' and the recency ``old`` one) is not
    causal: it looks at the whole window, so no cache could store it token by token. Oracle configs are a
    ceiling, never a deployable result (asked of the quantizer interface, ``Quantizer.oracle``)."""
    p = parse_policy(spec)
    specs = [("k", p.k), ("v", p.v), ("k", p.keep), ("v", p.keep)]
    if p.old is not None:
        specs += [("k", p.old), ("v", p.old)]
    return any(quant.get(s).for_tensor(w).oracle for w, s in specs)


def causal_only_rows(table: pd.DataFrame, causal_only: bool = True) -> pd.DataFrame:
    """The rows of ``table`` (one per config) whose config is causal; all rows when ``causal_only`` is
    False. Uses the ``oracle`` column where there is one, else asks :func:`is_oracle`."""
    if not causal_only:
        return table
    oracle = table["oracle"] if "oracle" in table else table["config"].map(is_oracle)
    return table[~oracle.astype(bool)]


def summarize(ppl: pd.DataFrame, seed: int = 0, n_resamples: int = 2000, block: int = 1) -> pd.DataFrame:
    """One row per config: PPL, delta PPL vs the fp16 config on the same windows with a paired bootstrap
    95% CI (``block``: windows per resampled block, see :func:`kvlab.metrics.paired_delta_ci`), mean logits
    KL with its CI over windows (``kl_lo``, ``kl_hi``), bits per value, bytes per token at 4096, and
    ``oracle`` (:func:`is_oracle`)."""
    rows = []
    for tokens, df in ppl.groupby("tokens_sha256", sort=False):
        fp = df[df["config"] == "fp16"].sort_values("window")
        if fp.empty:
            raise ValueError("the sweep has no 'fp16' config on these windows; delta PPL is measured against it")
        for key, g in df.groupby("key", sort=False):
            g = g.sort_values("window")
            d, lo, hi = paired_delta_ci(fp["nll"].to_numpy(), g["nll"].to_numpy(), seed=seed,
                                        n_resamples=n_resamples, block=block)
            kl = g["kl"].to_numpy(dtype=np.float64)
            kl_lo, kl_hi = mean_ci(kl, seed=seed, n_resamples=n_resamples, block=block)[1:] \
                if np.isfinite(kl).all() else (math.nan, math.nan)
            first = g.iloc[0]
            rows.append({
                "config": first["config"], "family": family(first["config"]), "oracle": is_oracle(first["config"]),
                "key": key,
                "bits_per_value": first["bits_per_value"], "bytes_per_token_4096": first["bytes_per_token_4096"],
                "ppl": math.exp(g["nll"].mean()), "delta_ppl": d, "ci_lo": lo, "ci_hi": hi,
                "kl": g["kl"].mean(), "kl_lo": kl_lo, "kl_hi": kl_hi, "windows": len(g), "tokens_sha256": tokens,
            })
    return pd.DataFrame(rows).sort_values(["bits_per_value", "delta_ppl"]).reset_index(drop=True)


def proxy_table(summary: pd.DataFrame, errors: pd.DataFrame, seed: int = 0, n_resamples: int = 2000,
                block: int = 1) -> pd.DataFrame:
    """summary joined with the layer/head-averaged tensor and attention errors of each config, and
    every proxy of :data:`PROXIES` as an error-like column, each with a 95% CI over the error windows
    (``<proxy>_lo``, ``<proxy>_hi``: the per-window layer/head means resampled in blocks of ``block``
    windows, :func:`kvlab.metrics.mean_ci`; a single error window gives lo = hi). ``error_windows``:
    how many windows the errors come from."""
    cols = ["k_mse", "k_nmse", "k_cos", "v_mse", "v_nmse", "v_cos", "attn_nmse", "attn_cos", "attn_kl"]
    if "window" not in errors:
        errors = errors.assign(window=0)
    per = errors.groupby(["config", "window"], as_index=False)[cols].mean()  # (config x window) rows
    rows = []
    for config, g in per.groupby("config", sort=False):
        g = g.sort_values("window")
        row = {"config": config, "error_windows": len(g)}
        for c in cols:
            row[c], row[f"{c}_lo"], row[f"{c}_hi"] = mean_ci(g[c].to_numpy(), seed=seed,
                                                               n_resamples=n_resamples, block=block)
        rows.append(row)
    t = summary.merge(pd.DataFrame(rows), on="config", how="inner")
    for name, col in PROXIES.items():
        if col not in t:
            continue
        lo, hi = (f"{col}_lo", f"{col}_hi") if f"{col}_lo" in t else (col, col)
        if name.startswith("1 -"):
            t[name], t[f"{name}_lo"], t[f"{name}_hi"] = 1 - t[col], 1 - t[hi], 1 - t[lo]
        else:
            t[name], t[f"{name}_lo"], t[f"{name}_hi"] = t[col], t[lo], t[hi]
    return t


def rank_correlations(table: pd.DataFrame, target: str = "delta_ppl", seed: int = 0,
                      n_resamples: int = 2000, causal_only: bool = True) -> pd.DataFrame:
    """Spearman and Kendall correlation of every proxy with ``target`` across configs, each with a
    bootstrap 95% CI (configs resampled; scipy.stats.bootstrap, percentile). ``causal_only``: oracle
    configs left out (:func:`causal_only_rows`)."""
    from scipy.stats import bootstrap, kendalltau, spearmanr

    table = causal_only_rows(table, causal_only)
    rows = []
    y = table[target].to_numpy()
    for name in PROXIES:
        if name not in table:
            continue
        x = table[name].to_numpy()
        row = {"proxy": name, "n_configs": len(x)}
        for label, fn in (("spearman", spearmanr), ("kendall", kendalltau)):
            row[label] = float(fn(x, y).statistic)
            res = bootstrap((x, y), lambda a, b, fn=fn: fn(a, b).statistic, paired=True, vectorized=False,
                            n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
            row[f"{label}_lo"], row[f"{label}_hi"] = (float(res.confidence_interval.low),
                                                      float(res.confidence_interval.high))
        rows.append(row)
    return pd.DataFrame(rows).sort_values("spearman", ascending=False).reset_index(drop=True)


def adjust_pvalues(p, method: str = "holm") -> np.ndarray:
    """Multiplicity-adjusted p-values: ``"holm"`` (family-wise error, Holm's step-down) or ``"bh"``
    (false discovery rate, Benjamini-Hochberg, scipy.stats.false_discovery_control). NaN counts as 1."""
    p = np.nan_to_num(np.asarray(p, dtype=np.float64), nan=1.0)
    if method == "bh":
        from scipy.stats import false_discovery_control

        return false_discovery_control(p, method="bh") if p.size else p
    if method != "holm":
        raise ValueError(f"method={method!r} is not allowed; allowed: holm, bh")
    order = np.argsort(p, kind="stable")
    m = p.size
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty_like(p)
    out[order] = adj
    return out


def pair_tests(ppl: pd.DataFrame, configs=None, block: int = 1, method: str = "holm",
               alpha: float = 0.05) -> pd.DataFrame:
    """Every pair of configs tested for a PPL difference on the same windows: one row per pair ``a``,
    ``b`` with ``delta_ppl`` (PPL(b) - PPL(a)), the paired p-value (:func:`kvlab.metrics.paired_nll_test`
    on blocks of ``block`` windows), ``p_adj`` adjusted over all the pairs (``method``: holm or bh) and
    ``significant`` (``p_adj < alpha``). ``configs``: the configs to pair (default: every config)."""
    nll = {c: g.sort_values("window")["nll"].to_numpy() for c, g in ppl.groupby("config")}
    names = [c for c in (configs if configs is not None else nll) if c in nll]
    rows = []
    for ca, cb in itertools.combinations(names, 2):
        a, b = nll[ca], nll[cb]
        rows.append({"a": ca, "b": cb, "delta_ppl": math.exp(b.mean()) - math.exp(a.mean()),
                     "p": paired_nll_test(a, b, block=block)})
    t = pd.DataFrame(rows, columns=["a", "b", "delta_ppl", "p"])
    t["p_adj"] = adjust_pvalues(t["p"], method)
    t["significant"] = t["p_adj"] < alpha
    return t


def pair_orderings(table: pd.DataFrame, ppl: pd.DataFrame, proxies, tolerance: float = 0.10, block: int = 1,
                   method: str = "holm", alpha: float = 0.05, causal_only: bool = True) -> pd.DataFrame:
    """For every pair whose PPL difference is significant (:func:`pair_tests`, adjusted over all pairs of
    the configs kept) and every proxy: ``status`` is ``"tied"`` when the two proxy values differ by less
    than ``tolerance`` relative (|x_a - x_b| / max(|x_a|, |x_b|)), else ``"concordant"`` (the proxy orders
    them as PPL does) or ``"discordant"``. Proxies are error-like (larger = worse), as in :data:`PROXIES`."""
    t = causal_only_rows(table, causal_only).set_index("config")
    tests = pair_tests(ppl, list(t.index), block=block, method=method, alpha=alpha)
    sig = tests[tests["significant"]]
    rows = []
    for proxy in proxies:
        for r in sig.itertuples():
            xa, xb = float(t.at[r.a, proxy]), float(t.at[r.b, proxy])
            scale = max(abs(xa), abs(xb))
            rel = abs(xa - xb) / scale if scale > 0 else 0.0
            status = ("tied" if rel < tolerance else
                      "concordant" if (xb > xa) == (r.delta_ppl > 0) else "discordant")
            rows.append({"proxy": proxy, "a": r.a, "b": r.b, "proxy a": xa, "proxy b": xb, "proxy rel diff": rel,
                         "delta_ppl": r.delta_ppl, "p_adj": r.p_adj, "status": status})
    cols = ["proxy", "a", "b", "proxy a", "proxy b", "proxy rel diff", "delta_ppl", "p_adj", "status"]
    out = pd.DataFrame(rows, columns=cols)
    out.attrs.update(n_pairs=len(tests), n_significant=len(sig), tolerance=tolerance, method=method, alpha=alpha,
                     block=block)
    return out


def discordance(table: pd.DataFrame, ppl: pd.DataFrame, proxies, tolerance: float = 0.10, block: int = 1,
                method: str = "holm", alpha: float = 0.05, causal_only: bool = True) -> pd.DataFrame:
    """Per proxy, with its denominators: ``pairs`` (all pairs of the configs kept), ``significant`` (PPL
    difference significant after ``method`` over those pairs), ``tied`` (proxy within ``tolerance``),
    ``compared`` (significant and not tied), ``discordant``, and ``rate`` = discordant / compared with a
    95% Clopper-Pearson CI (scipy.stats.binomtest). The rule is in the columns ``rule``."""
    from scipy.stats import binomtest

    o = pair_orderings(table, ppl, proxies, tolerance=tolerance, block=block, method=method, alpha=alpha,
                       causal_only=causal_only)
    rule = (f"{method} over {o.attrs['n_pairs']} pairs at alpha={alpha} (paired t-test on blocks of {block} "
            f"windows); tied when the proxies differ by < {tolerance:.0%} relative")
    rows = []
    for proxy in proxies:
        st = o.loc[o["proxy"] == proxy, "status"]
        disc, tied = int((st == "discordant").sum()), int((st == "tied").sum())
        compared = len(st) - tied
        lo, hi = (binomtest(disc, compared).proportion_ci(0.95, method="exact") if compared else (math.nan,) * 2)
        rows.append({"proxy": proxy, "pairs": o.attrs["n_pairs"], "significant": o.attrs["n_significant"],
                     "tied": tied, "compared": compared, "discordant": disc,
                     "rate": disc / compared if compared else math.nan, "rate_lo": float(lo), "rate_hi": float(hi),
                     "rule": rule})
    return pd.DataFrame(rows)


def discordant_pairs(table: pd.DataFrame, ppl: pd.DataFrame, proxy: str, seed: int = 0,
                     n_resamples: int = 1000, tolerance: float = 0.10, block: int = 1, method: str = "holm",
                     alpha: float = 0.05, causal_only: bool = True) -> pd.DataFrame:
    """The pairs of configs that ``proxy`` ranks opposite to perplexity (:func:`pair_orderings`: the PPL
    difference significant after ``method`` over all pairs, the proxies at least ``tolerance`` apart),
    with the paired block-bootstrap CI of the PPL difference. :func:`discordance` gives the denominators."""
    nll = {c: g.sort_values("window")["nll"].to_numpy() for c, g in ppl.groupby("config")}
    o = pair_orderings(table, ppl, [proxy], tolerance=tolerance, block=block, method=method, alpha=alpha,
                       causal_only=causal_only)
    rows = []
    for r in o[o["status"] == "discordant"].to_dict("records"):
        xa, xb = r["proxy a"], r["proxy b"]
        better, worse = (r["a"], r["b"]) if xa < xb else (r["b"], r["a"])
        _, lo, hi = paired_delta_ci(nll[better], nll[worse], seed=seed, n_resamples=n_resamples, block=block)
        rows.append({"proxy": proxy, "proxy prefers": better, "over": worse,
                     "proxy value (preferred)": min(xa, xb), "proxy value (other)": max(xa, xb),
                     "PPL (preferred)": math.exp(nll[better].mean()), "PPL (other)": math.exp(nll[worse].mean()),
                     "PPL diff CI": f"[{lo:+.3f}, {hi:+.3f}]", "p (adjusted)": r["p_adj"]})
    cols = ["proxy", "proxy prefers", "over", "proxy value (preferred)", "proxy value (other)",
            "PPL (preferred)", "PPL (other)", "PPL diff CI", "p (adjusted)"]
    return pd.DataFrame(rows, columns=cols)


def _boot_spearman(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Spearman of each resample: x, y (n,), idx (R, n) config indices -> (R,) (NaN where a resample is
    constant). Spearman is the Pearson correlation of average ranks, so ties are handled as spearmanr does."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x[idx], axis=1), rankdata(y[idx], axis=1)  # (R, n)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / den, np.nan)


def _percentile_ci(boot: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return float(lo), float(hi)


def spearman_ranges(table: pd.DataFrame, proxies=None, target: str = "delta_ppl", near_lossless: float = 3.0,
                    bands=((0, 3), (3, 5), (5, 9), (9, 17)), causal_only: bool = True, seed: int = 0,
                    n_resamples: int = 2000, min_configs: int = 4) -> pd.DataFrame:
    """Spearman of each proxy with ``target`` over all configs, over the near-lossless ones (``target <=
    near_lossless``) and inside each bit band [lo, hi) of bits per value, each with a percentile bootstrap
    95% CI over configs. A grid spanning delta PPL 0..1000s makes the overall figure near 1 by construction;
    the restricted ranges are where a proxy has to earn it. Ranges with fewer than ``min_configs`` configs
    get NaN."""
    t = causal_only_rows(table, causal_only)
    proxies = [p for p in (proxies or PROXIES) if p in t]
    ranges = [("all", np.ones(len(t), bool)), (f"{target} <= {near_lossless:g}", (t[target] <= near_lossless).to_numpy())]
    ranges += [(f"bits [{lo:g}, {hi:g})", t["bits_per_value"].between(lo, hi, inclusive="left").to_numpy())
               for lo, hi in bands]
    rng = np.random.default_rng(seed)
    rows = []
    for label, mask in ranges:
        sub = t[mask]
        n = len(sub)
        idx = rng.integers(0, n, size=(n_resamples, n)) if n >= min_configs else None
        for proxy in proxies:
            row = {"proxy": proxy, "range": label, "n_configs": n, "spearman": math.nan,
                   "spearman_lo": math.nan, "spearman_hi": math.nan}
            if idx is not None:
                x, y = sub[proxy].to_numpy(np.float64), sub[target].to_numpy(np.float64)
                row["spearman"] = float(_boot_spearman(x, y, np.arange(n)[None])[0])
                row["spearman_lo"], row["spearman_hi"] = _percentile_ci(_boot_spearman(x, y, idx))
            rows.append(row)
    return pd.DataFrame(rows)


def compare_proxies(table: pd.DataFrame, proxies, target: str = "delta_ppl", causal_only: bool = True,
                    seed: int = 0, n_resamples: int = 2000) -> pd.DataFrame:
    """Paired comparison of every two proxies: the difference of their Spearman correlations with
    ``target``, with a percentile bootstrap 95% CI over configs (the same resampled configs for both, so
    the comparison is paired). ``verdict`` names the better proxy only when the CI excludes 0; two
    overlapping per-proxy CIs do not decide it either way."""
    t = causal_only_rows(table, causal_only)
    y = t[target].to_numpy(np.float64)
    n = len(t)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    full = np.arange(n)[None]
    rho = {p: (float(_boot_spearman(t[p].to_numpy(np.float64), y, full)[0]),
               _boot_spearman(t[p].to_numpy(np.float64), y, idx)) for p in proxies}
    rows = []
    for a, b in itertools.combinations(proxies, 2):
        diff = rho[a][0] - rho[b][0]
        lo, hi = _percentile_ci(rho[a][1] - rho[b][1])
        verdict = f"{a} better" if lo > 0 else f"{b} better" if hi < 0 else "not separated"
        rows.append({"proxy a": a, "proxy b": b, "spearman a": rho[a][0], "spearman b": rho[b][0],
                     "difference": diff, "diff_lo": lo, "diff_hi": hi, "n_configs": n, "verdict": verdict})
    return pd.DataFrame(rows)


def pareto_front(summary: pd.DataFrame, x: str = "bits_per_value", y: str = "delta_ppl",
                 causal_only: bool = True) -> pd.DataFrame:
    """Configs that no other config dominates, where config j dominates i only when it has no more bits
    (``x_j <= x_i``) and its CI lies entirely below i's (``ci_hi_j < ci_lo_i``): a point inside another's
    noise is not dominated by it. Without ``ci_lo``/``ci_hi`` columns the point values are used.
    ``causal_only``: the front of the causal configs (oracles are a ceiling, not a competitor)."""
    s = causal_only_rows(summary, causal_only).sort_values([x, y]).reset_index(drop=True)
    lo = s["ci_lo"].to_numpy() if "ci_lo" in s else s[y].to_numpy()
    hi = s["ci_hi"].to_numpy() if "ci_hi" in s else s[y].to_numpy()
    bits = s[x].to_numpy()
    keep = [i for i in range(len(s)) if not np.any((bits <= bits[i]) & (hi < lo[i]))]
    return s.loc[keep].reset_index(drop=True)


def head_means(errors: pd.DataFrame, config: str) -> pd.DataFrame:
    """One row per (layer, kv head) of ``config``: its errors averaged over the error windows (the sweep
    stores a row per window x layer x head; a table without a ``window`` column is returned as it is)."""
    e = errors[errors["config"] == config]
    if "window" not in e or e.empty:
        return e
    cols = [c for c in e.columns if c not in ("window", "layer", "head") and pd.api.types.is_numeric_dtype(e[c])]
    return e.groupby(["layer", "head"], as_index=False)[cols].mean().assign(config=config)


def worst_heads(errors: pd.DataFrame, config: str, n: int, metric: str = "k_nmse") -> list[tuple[int, int]]:
    """The n (layer, kv head) pairs with the largest ``metric`` under ``config`` (averaged over windows)."""
    e = head_means(errors, config)
    if e.empty:
        raise ValueError(f"config {config!r} is not in the errors table; it has {sorted(errors['config'].unique())}")
    top = e.sort_values(metric, ascending=False).head(n)
    return [(int(r.layer), int(r.head)) for r in top.itertuples()]


def worst_heads_policy(scheme: str, heads: list[tuple[int, int]], which: str = "k", keep: str = "fp16") -> str:
    """kvmix strategy 3: ``scheme`` everywhere but the listed heads' K (or V, or both) kept at ``keep``."""
    key = {"k": "keep_k_heads", "v": "keep_v_heads", "kv": "keep_heads"}[which]
    return f"kv={scheme};{key}={'+'.join(f'{a}.{b}' for a, b in heads)};keep={keep}"


def bytes_table(specs, n_layers: int, n_heads: int, head_dim: int, T: int = 4096) -> pd.DataFrame:
    """Bytes per token of KV cache for the whole model at length T, every stored byte counted."""
    rows = []
    fp16 = parse_policy("fp16").bytes_per_token(n_layers, n_heads, T, head_dim)
    for s in specs:
        p = parse_policy(s)
        b = p.bytes_per_token(n_layers, n_heads, T, head_dim)
        rows.append({"config": s, "bits_per_value": p.bits_per_value(n_layers, n_heads, T, head_dim),
                     "bytes_per_token": b, "x smaller than fp16": fp16 / b,
                     "cache MiB at T": b * T / 2**20})
    return pd.DataFrame(rows)


def _kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    z = (x - x.mean()) / x.std().clamp_min(1e-12)
    return float((z**4).mean())


def kv_stats(tensors: dict[int, dict[str, torch.Tensor]]) -> pd.DataFrame:
    """Per layer and tensor (k_pre, k_post, v): std, max |x|, kurtosis, and channel outlier ratio
    (largest per-channel mean |x| over the median one) from a dump."""
    rows = []
    for layer, d in sorted(tensors.items()):
        for name in ("k_pre", "k_post", "v"):
            if name not in d:
                continue
            x = d[name].float()  # (B, H, T, D)
            ch = x.abs().mean(dim=(0, 2))  # (H, D)
            ratio = (ch.max(dim=-1).values / ch.median(dim=-1).values.clamp_min(1e-12)).mean()
            rows.append({"layer": layer, "tensor": name, "std": float(x.std()), "max_abs": float(x.abs().max()),
                         "kurtosis": _kurtosis(x), "channel_outlier_ratio": float(ratio)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------
# findings as text: every number below comes from the tables passed in
# ---------------------------------------------------------------------------------------------------
def _fmt_ci(r) -> str:
    return f"{r['delta_ppl']:+.3f} [{r['ci_lo']:+.3f}, {r['ci_hi']:+.3f}]"


def describe_kv(stats: pd.DataFrame) -> str:
    """Markdown: how K and V differ, and what RoPE does to K's channel outliers."""
    m = stats.groupby("tensor")[["kurtosis", "channel_outlier_ratio", "max_abs"]].mean()
    worst = stats[stats.tensor == "k_pre"].sort_values("channel_outlier_ratio").iloc[-1]
    lines = [
        f"- Mean channel-outlier ratio (largest / median per-channel mean |x|): K pre-RoPE "
        f"**{m.at['k_pre', 'channel_outlier_ratio']:.1f}**, K post-RoPE **{m.at['k_post', 'channel_outlier_ratio']:.1f}**, "
        f"V **{m.at['v', 'channel_outlier_ratio']:.1f}**.",
        f"- Mean kurtosis: K pre-RoPE {m.at['k_pre', 'kurtosis']:.1f}, K post-RoPE {m.at['k_post', 'kurtosis']:.1f}, "
        f"V {m.at['v', 'kurtosis']:.1f} (a Gaussian has 3).",
        f"- The strongest K channel outliers sit in layer {int(worst.layer)} (ratio {worst.channel_outlier_ratio:.1f}).",
    ]
    k_out = m.at["k_pre", "channel_outlier_ratio"] > m.at["v", "channel_outlier_ratio"]
    lines.append("- K has " + ("stronger" if k_out else "weaker") + " per-channel outliers than V: "
                 + ("per-channel grouping of K (KIVI) has something to exploit." if k_out else
                    "on this model the usual argument for per-channel K grouping is weak."))
    return "\n".join(lines)


def error_share(errors: pd.DataFrame, config: str, n: int, metric: str = "k_mse") -> float:
    """Fraction of the total ``metric`` (summed over layers x heads, each averaged over windows) held by the
    worst n heads."""
    e = head_means(errors, config)[metric].sort_values(ascending=False)
    return float(e.head(n).sum() / e.sum()) if e.sum() > 0 else 0.0


def kv_ratio(errors: pd.DataFrame) -> pd.DataFrame:
    """Per config: mean K NMSE, mean V NMSE and their ratio (K harder than V when > 1)."""
    g = errors.groupby("config")[["k_nmse", "v_nmse", "k_cos", "v_cos", "attn_nmse"]].mean()
    g["K/V NMSE ratio"] = g["k_nmse"] / g["v_nmse"]
    return g.reset_index()


def matched_bits(summary: pd.DataFrame, challengers: str, rivals, tolerance: float = 1.0,
                 causal_only: bool = True) -> pd.DataFrame:
    """For each config of the ``challengers`` family, the rival configs at matched bits: at most the
    challenger's bits per value and at most ``tolerance`` fewer (a rival never gets an extra bit), with
    both delta PPLs and whether their CIs separate them. ``causal_only``: oracle configs on neither side."""
    rows = []
    summary = causal_only_rows(summary, causal_only)
    ch = summary[summary["family"] == challengers]
    rv = summary[summary["family"].isin(rivals)]
    for c in ch.to_dict("records"):
        gap = c["bits_per_value"] - rv["bits_per_value"]
        near = rv[(gap >= 0) & (gap <= tolerance)]
        for r in near.to_dict("records"):
            verdict = ("rival better" if r["ci_hi"] < c["ci_lo"] else
                       "challenger better" if c["ci_hi"] < r["ci_lo"] else "CIs overlap")
            rows.append({"challenger": c["config"], "bits": c["bits_per_value"], "challenger dPPL": _fmt_ci(c),
                         "rival": r["config"], "rival bits": r["bits_per_value"], "rival dPPL": _fmt_ci(r),
                         "verdict": verdict})
    cols = ["challenger", "bits", "challenger dPPL", "rival", "rival bits", "rival dPPL", "verdict"]
    return pd.DataFrame(rows, columns=cols)


def thesis_verdict(summary: pd.DataFrame, matched: pd.DataFrame, front: pd.DataFrame) -> str:
    """Markdown verdict on 'sign+magnitude falls short of KIVI-style and block-scaled schemes at equal
    bits', from the matched-bits comparison and the Pareto front."""
    n = len(matched)
    if n == 0:
        return ("No sign+magnitude config has a rival at matched bits (at most its bits, within the tolerance): "
                "the thesis is not tested here.")
    rival = int((matched["verdict"] == "rival better").sum())
    chall = int((matched["verdict"] == "challenger better").sum())
    on_front = sorted(set(front["config"]) & set(summary[summary.family == "signmag"]["config"]))
    sm = summary[summary.family == "signmag"].sort_values("bits_per_value")
    best = sm.sort_values("delta_ppl").iloc[0]
    text = [f"Of {n} matched-bits comparisons (the rival at most the challenger's bits), the rival scheme is better with "
            f"non-overlapping 95% CIs in **{rival}**, sign+magnitude is better in **{chall}**, and "
            f"{n - rival - chall} are inconclusive."]
    text.append(f"The best sign+magnitude variant is `{best.config}` at {best.bits_per_value:.2f} bits/value "
                f"with delta PPL {_fmt_ci(best)} (PPL {best.ppl:.2f}).")
    base = summary.loc[summary["config"] == "fp16", "ppl"]
    fp16_ppl = float(base.iloc[0]) if len(base) else math.nan
    wins = matched[matched["verdict"] == "challenger better"]
    if len(wins):
        by_ppl = summary.set_index("config")["ppl"]
        losers = ", ".join(f"`{r}` (PPL {by_ppl[r]:.1f}, {by_ppl[r] / fp16_ppl:.1f}x fp16's)"
                           for r in dict.fromkeys(wins["rival"]))
        text.append(f"Sign+magnitude wins only against {losers}.")
    lowest = summary["bits_per_value"].min()
    text.append("Sign+magnitude configs on the bits-vs-PPL Pareto front: "
                + (", ".join(f"`{c}`" + (" (only as the lowest-bits point measured: nothing else was run at "
                                           f"{lowest:.2f} bits or fewer)" if
                                           summary.set_index("config").at[c, "bits_per_value"] == lowest else "")
                             for c in on_front) if on_front else "**none**") + ".")
    kivi = summary.loc[summary["family"] == "kivi", "config"]
    if len(kivi) and not matched["rival"].isin(kivi).any():
        text.append("No KIVI config had at most the bits of a sign+magnitude config at this context length (its "
                    "fp16 window counts in its bits): compare them on the Pareto plot.")
    degenerate = set(on_front) <= set(summary.loc[summary["bits_per_value"] == lowest, "config"])
    if rival and not chall and (not on_front or degenerate):
        text.append("**The data support the thesis**: at equal bits, sign+magnitude falls short of every rival "
                    "it could be compared with.")
    elif chall > rival:
        text.append("**The data contradict the thesis** on this model: sign+magnitude wins more matched "
                    "comparisons than it loses.")
    elif rival > chall and (not on_front or degenerate):
        text.append(f"**The data mostly support the thesis**: sign+magnitude loses {rival} of {n} matched "
                    f"comparisons; its {chall} wins are against the rivals named above.")
    else:
        text.append("**The data only partly support the thesis**: see the table for where it fails.")
    return "\n\n".join(text)


def cosine_twins(table: pd.DataFrame, family_name: str = "signmag", proxy: str = "k_cos",
                 causal_only: bool = True) -> pd.DataFrame:
    """For each config of ``family_name``, the config of another family (fp16/bf16 excluded) whose ``proxy``
    (a similarity: higher is better, e.g. ``k_cos``) is nearest, with both delta PPLs. ``over-rated``: the
    twin has the lower delta PPL (CIs apart) although the proxy rates it no better (its ``proxy`` is not
    higher): only then does the proxy over-rate this family. ``causal_only``: oracle twins left out."""
    table = causal_only_rows(table, causal_only)
    own = table[table["family"] == family_name]
    others = table[~table["family"].isin([family_name, "fp16", "bf16"])]
    rows = []
    for r in own.to_dict("records") if len(others) else []:
        t = others.loc[(others[proxy] - r[proxy]).abs().idxmin()]
        better = bool(t["ci_hi"] < r["ci_lo"])
        rows.append({"config": r["config"], proxy: r[proxy], "delta_ppl": r["delta_ppl"],
                     "twin": t["config"], f"twin {proxy}": t[proxy], "twin delta_ppl": t["delta_ppl"],
                     "twin worse": bool(t["ci_lo"] > r["ci_hi"]), "twin better": better,
                     "over-rated": better and bool(t[proxy] <= r[proxy])})
    return pd.DataFrame(rows)


def twins_verdict(twins: pd.DataFrame, proxy: str = "k_cos") -> str:
    """Markdown: in how many cosine-twin pairs the twin does better on perplexity, in how many of those the
    proxy ranked the pair correctly anyway, and where it over-rates the family."""
    if twins.empty:
        return "No config to compare."
    better, worse = int(twins["twin better"].sum()), int(twins["twin worse"].sum())
    over = twins[twins["over-rated"]]
    text = (f"Paired by nearest {proxy} with a config of another family, the other config has the lower delta "
            f"PPL (CIs apart) in **{better}** of {len(twins)} pairs and the higher in **{worse}**. In "
            f"**{better - len(over)}** of those {better} the twin also has the higher {proxy}, so the proxy ranked "
            f"the pair correctly; ")
    if len(over):
        text += ("it over-rates this family only in " + ", ".join(f"`{c}` (twin `{t}`)" for c, t in
                                                               zip(over["config"], over["twin"])) + ".")
    else:
        text += "it over-rates this family in none."
    return text + (" Each pair also differs in its V scheme (a config compresses K and V alike), so a pair "
                   "cannot attribute the perplexity gap to K alone.")


def correlation_verdict(corr: pd.DataFrame, discordant: pd.DataFrame, rates: pd.DataFrame | None = None) -> str:
    """Markdown: which proxy predicts delta PPL best, and how often the cheap ones disagree (with the
    denominators of :func:`discordance` when ``rates`` is given)."""
    best = corr.iloc[0]
    cheap = corr[corr.proxy.isin(["1 - K cosine", "1 - V cosine", "K MSE", "V MSE", "K NMSE", "V NMSE"])]
    c = cheap.sort_values("spearman", ascending=False).iloc[0] if len(cheap) else None
    lines = [f"- Best predictor of delta PPL across {int(best.n_configs)} configs: **{best.proxy}** "
             f"(Spearman {best.spearman:.2f} [{best.spearman_lo:.2f}, {best.spearman_hi:.2f}], "
             f"Kendall {best.kendall:.2f} [{best.kendall_lo:.2f}, {best.kendall_hi:.2f}])."]
    if c is not None:
        lines.append(f"- Best cheap tensor proxy: **{c.proxy}** (Spearman {c.spearman:.2f} "
                     f"[{c.spearman_lo:.2f}, {c.spearman_hi:.2f}]).")
    if rates is not None and len(rates):
        lines.append(f"- Discordance ({rates['rule'].iloc[0]}): " + ", ".join(
            f"{r.proxy}: {r.discordant} of {r.compared} ({r.rate:.1%} [{r.rate_lo:.1%}, {r.rate_hi:.1%}]; "
            f"{r.tied} tied)" if r.compared else f"{r.proxy}: no separated pair" for r in rates.itertuples())
            + f", of {int(rates['significant'].iloc[0])} significant pairs among {int(rates['pairs'].iloc[0])}.")
    elif len(discordant):
        counts = discordant.groupby("proxy").size().sort_values(ascending=False)
        lines.append("- Significant discordant pairs (proxy ranks two schemes opposite to PPL, PPL CI "
                     "excludes 0): " + ", ".join(f"{p}: {k}" for p, k in counts.items()) + ".")
    else:
        lines.append("- No significant discordant pair was found for the proxies examined.")
    return "\n".join(lines)


def passkey_vs_reference(passkey: pd.DataFrame, reference: str = "fp16") -> pd.DataFrame:
    """Per (policy, length): trials, correct, and the exact McNemar test against ``reference`` on the same
    haystacks (a two-sided binomial test on the trials where exactly one of the two is correct): ``lost``
    (reference right, policy wrong), ``gained`` and ``p``."""
    from scipy.stats import binomtest

    ref = passkey[passkey["policy"] == reference].set_index(["length", "trial"])["correct"]
    rows = []
    for (policy, length), g in passkey.groupby(["policy", "length"], sort=False):
        r = ref.reindex([(length, t) for t in g["trial"]]).to_numpy()
        if pd.isna(r).any():
            raise ValueError(f"{reference!r} has no passkey rows for every trial of {policy!r} at length {length}")
        c, r = g["correct"].to_numpy(bool), r.astype(bool)
        lost, gained = int((r & ~c).sum()), int((~r & c).sum())
        p = binomtest(lost, lost + gained).pvalue if lost + gained else 1.0
        rows.append({"policy": policy, "length": int(length), "trials": len(g), "correct": int(c.sum()),
                     "reference correct": int(r.sum()), "lost": lost, "gained": gained, "p": float(p)})
    return pd.DataFrame(rows)


def end_metrics_verdict(passkey: pd.DataFrame, greedy: pd.DataFrame, summary: pd.DataFrame,
                        reference: str = "fp16", alpha: float = 0.05, reliable: float = 0.8) -> str:
    """Markdown: where the reference retrieves (accuracy >= ``reliable``), which policies lose passkey trials
    against it (McNemar, :func:`passkey_vs_reference`, Holm-adjusted over the policies and lengths tested), and whether greedy agreement orders the policies as
    delta PPL does (Spearman over the policies in both)."""
    from scipy.stats import spearmanr

    vs = passkey_vs_reference(passkey, reference)
    parts = []
    ref = vs[vs["policy"] == reference]
    ok = [int(r.length) for r in ref.itertuples() if r.correct / r.trials >= reliable]
    bad = [int(r.length) for r in ref.itertuples() if r.correct / r.trials < reliable]
    parts.append(f"`{reference}` retrieves the key in " + ", ".join(
        f"{int(r.correct)}/{int(r.trials)} trials at {int(r.length)} tokens" for r in ref.itertuples()) + "" +
        (f"; below {reliable:.0%} at {', '.join(map(str, bad))} tokens, so those lengths test the model, not the cache"
         if bad else "") + ".")
    weak = vs[(vs["policy"] != reference) & vs["length"].isin(bad)]
    if len(weak):
        parts.append("At those lengths, for the record: " + ", ".join(
            f"`{r.policy}` {int(r.correct)}/{int(r.trials)} at {int(r.length)}" for r in weak.itertuples()) + ".")
    others = vs[(vs["policy"] != reference) & vs["length"].isin(ok)].copy()
    others["p_adj"] = adjust_pvalues(others["p"].to_numpy(), "holm") if len(others) else []
    sig = others[(others["p_adj"] < alpha) & (others["lost"] > others["gained"])]
    same = others[~others.index.isin(sig.index)]
    if len(sig):
        parts.append(f"Significantly fewer keys than the reference (exact McNemar, Holm-adjusted over the {len(others)} "
                     f"tests at these lengths, adjusted p < {alpha}): " + ", ".join(
            f"`{r.policy}` at {r.length} ({r.correct}/{r.trials}, p = {r.p:.2g}, adjusted {r.p_adj:.2g})"
            for r in sig.itertuples()) + ".")
    if len(same):
        parts.append("No significant loss: " + ", ".join(
            f"`{r.policy}` at {r.length} ({r.correct}/{r.trials})" for r in same.itertuples()) + ".")
    g = greedy[greedy["policy"] != reference].merge(summary[["config", "delta_ppl"]], left_on="policy",
                                                  right_on="config")
    if len(g) >= 4:
        rho = spearmanr(-g["mean_agree"], g["delta_ppl"]).statistic
        best, worst = g.loc[g["mean_agree"].idxmax()], g.loc[g["mean_agree"].idxmin()]
        parts.append(f"Greedy agreement with `{reference}` runs from {worst.mean_agree:.1f} tokens (`{worst.policy}`) to "
                     f"{best.mean_agree:.1f} (`{best.policy}`) of {int(g['new_tokens'].max())}; over these {len(g)} "
                     f"policies its order against delta PPL has Spearman {rho:.2f} (1: the same order).")
    return " ".join(parts)


def ci_checks(ppl: pd.DataFrame, controls=("bf16",), seed: int = 0, n_resamples: int = 2000, block: int = 1,
              alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Does the uncertainty behave? Two checks on the per-window rows of one set of windows.

    ``controls``: configs equal to fp16 up to rounding; their delta PPL should not be significant (paired
    test, p >= ``alpha``) and their CI should hold 0. Returns (controls table, halves table): the halves
    table has, per config, delta PPL with its CI on the even and on the odd windows (interleaved halves,
    so both span the split) and whether the two CIs overlap; with independent windows and 95% CIs about
    99% of configs should overlap, far fewer when the CIs are too narrow."""
    fp = ppl[ppl["config"] == "fp16"].sort_values("window")
    if fp.empty:
        raise ValueError("the rows have no 'fp16' config; both checks measure against it")
    nll = {c: g.sort_values("window")["nll"].to_numpy() for c, g in ppl.groupby("config")}
    f = nll["fp16"]
    crow = []
    for c in controls:
        if c not in nll:
            raise ValueError(f"control {c!r} is not in the rows; they have {sorted(nll)}")
        d, lo, hi = paired_delta_ci(f, nll[c], seed=seed, n_resamples=n_resamples, block=block)
        p = paired_nll_test(f, nll[c], block=block)
        crow.append({"config": c, "delta_ppl": d, "ci_lo": lo, "ci_hi": hi, "p": p,
                     "holds 0": lo <= 0 <= hi, "significant": bool(p < alpha)})
    hrow = []
    for c, x in nll.items():
        if c == "fp16" or len(x) < 4 * block:
            continue
        halves = []
        for h in (0, 1):
            idx = np.arange(h, len(x), 2)
            halves.append(paired_delta_ci(f[idx], x[idx], seed=seed, n_resamples=n_resamples, block=block))
        (d0, lo0, hi0), (d1, lo1, hi1) = halves
        hrow.append({"config": c, "even": d0, "even_lo": lo0, "even_hi": hi0, "odd": d1, "odd_lo": lo1,
                     "odd_hi": hi1, "overlap": bool(lo0 <= hi1 and lo1 <= hi0)})
    return pd.DataFrame(crow), pd.DataFrame(hrow)


def ci_checks_verdict(controls: pd.DataFrame, halves: pd.DataFrame, alpha: float = 0.05) -> str:
    """Markdown from :func:`ci_checks`: the controls' deltas and tests, and how many configs' half CIs overlap."""
    parts = [f"`{r.config}` (equal to fp16 up to rounding): delta PPL {r.delta_ppl:+.4f} [{r.ci_lo:+.4f}, "
             f"{r.ci_hi:+.4f}], p = {r.p:.2g}, " + ("**significant**: the CIs are too narrow" if r.significant
                                                  else f"not significant at {alpha}") for r in controls.itertuples()]
    if len(halves):
        n, k = len(halves), int(halves["overlap"].sum())
        miss = ", ".join(f"`{c}`" for c in halves.loc[~halves["overlap"], "config"])
        parts.append(f"split halves (even / odd windows): the two CIs overlap for {k} of {n} configs"
                     + (f" (not: {miss})" if miss else ""))
    return "; ".join(parts) + "."
