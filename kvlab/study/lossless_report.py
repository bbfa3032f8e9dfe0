"""The findings of notebook 06 (lossless KV coding) as text and numbers, from the tables of
:mod:`kvlab.lossless` (:func:`~kvlab.evaluation.lossless.ratio_table`, :func:`~kvlab.evaluation.lossless.summarize`,
:func:`~kvlab.evaluation.lossless.plane_table`, :func:`~kvlab.evaluation.lossless.evaluate_policies`)."""

from __future__ import annotations

import pandas as pd

from kvlab import quant
from kvlab.evaluation.lossless import mixed_bits_per_value

__all__ = ["TENSORS", "best_codecs", "findings_markdown", "metrics", "mixed_markdown", "mixed_policies"]

TENSORS = ("k_pre", "k_post", "v")


def best_codecs(summary: pd.DataFrame) -> dict[str, pd.Series]:
    """{tensor: the :func:`~kvlab.evaluation.lossless.summarize` row of its highest pooled ratio}."""
    return {t: summary[summary.tensor == t].sort_values("ratio").iloc[-1] for t in TENSORS}


def findings_markdown(table: pd.DataFrame, summary: pd.DataFrame, summary_deep: pd.DataFrame,
                      planes: pd.DataFrame) -> str:
    """The bullet list of findings: plain zstd, best codec, V vs K, byte planes, deltas, entropy bounds and
    layer 0. ``summary`` pools every layer, ``summary_deep`` layers 1+; ``planes`` is a plane table of
    ``bytes+zstd`` and ``fields+zstd``."""
    pooled = summary.set_index(["tensor", "codec"])
    deep = summary_deep.set_index(["tensor", "codec"])
    best = best_codecs(summary)
    layer0 = table[(table.layer == 0) & (table.codec == "bytes+zstd")].set_index("tensor")
    k_post_by_layer = table[table.tensor == "k_post"].pivot(index="layer", columns="codec", values="ratio")
    sub_wins = int((k_post_by_layer["sub+bytes+zstd"] > k_post_by_layer["bytes+zstd"]).sum())
    n_dumped = len(k_post_by_layer)

    def r(t, c, src=pooled):
        return f"{src.loc[(t, c), 'ratio']:.3f}x"

    def better(t, a, b, src=pooled):  # "helps" / "does not help": codec a vs codec b on tensor t
        return "helps" if src.loc[(t, a), "ratio"] > src.loc[(t, b), "ratio"] else "does not help"

    def plane_mean(codec, plane, col):
        return planes[(planes.codec == codec) & (planes.plane == plane)][col].mean()

    return f'''
* **Plain zstd** on the raw fp16 bytes: K (post-RoPE) {r("k_post", "zstd")}, V {r("v", "zstd")}
  (layers 1+ only: K {r("k_post", "zstd", deep)}, V {r("v", "zstd", deep)}).
* **Best codec**: K post-RoPE `{best["k_post"].codec}` {best["k_post"].ratio:.3f}x, V `{best["v"].codec}`
  {best["v"].ratio:.3f}x, K pre-RoPE `{best["k_pre"].codec}` {best["k_pre"].ratio:.3f}x. Layers 1+ with
  `bytes+zstd`: K post {r("k_post", "bytes+zstd", deep)}, K pre {r("k_pre", "bytes+zstd", deep)},
  V {r("v", "bytes+zstd", deep)}.
* **V vs K**: with `bytes+zstd`, V {r("v", "bytes+zstd")} vs K post {r("k_post", "bytes+zstd")} over all
  layers; {r("v", "bytes+zstd", deep)} vs {r("k_post", "bytes+zstd", deep)} over layers 1+.
* **Byte planes**: splitting {better("k_post", "bytes+zstd", "zstd")} K post and {better("v", "bytes+zstd", "zstd")}
  V: `bytes+zstd` vs `zstd` for K post
  {r("k_post", "bytes+zstd")} vs {r("k_post", "zstd")}, V {r("v", "bytes+zstd")} vs {r("v", "zstd")}.
  The sign+exponent / mantissa split (`fields+zstd`) gives K post {r("k_post", "fields+zstd")}, V
  {r("v", "fields+zstd")}; zstd spends
  {plane_mean("fields+zstd", "mant_hi", "zstd_bits"):.2f} bits per symbol
  on its 2-bit `mant_hi` plane, whose entropy is
  {plane_mean("fields+zstd", "mant_hi", "entropy_bits"):.2f} bits.
* **Delta along tokens**, against `bytes+zstd` without delta ({r("k_post", "bytes+zstd")} K post,
  {r("v", "bytes+zstd")} V): the xor delta {better("k_post", "xor+bytes+zstd", "bytes+zstd")} K post
  ({r("k_post", "xor+bytes+zstd")}) and {better("v", "xor+bytes+zstd", "bytes+zstd")} V
  ({r("v", "xor+bytes+zstd")}); the integer difference {better("k_post", "sub+bytes+zstd", "bytes+zstd")} K post
  ({r("k_post", "sub+bytes+zstd")}; better in {sub_wins} of {n_dumped} layers) and
  {better("v", "sub+bytes+zstd", "bytes+zstd")} V ({r("v", "sub+bytes+zstd")}). The byte-plane order-0 bound
  with the difference: K post {pooled.loc[("k_post", "sub+bytes+zstd"), "entropy_ratio"]:.3f}x, V
  {pooled.loc[("v", "sub+bytes+zstd"), "entropy_ratio"]:.3f}x.
* **Entropy bound** (order-0, byte planes): K post {pooled.loc[("k_post", "bytes+zstd"), "entropy_ratio"]:.3f}x,
  V {pooled.loc[("v", "bytes+zstd"), "entropy_ratio"]:.3f}x; over 16-bit symbols: K post
  {pooled.loc[("k_post", "zstd"), "entropy_ratio"]:.3f}x, V {pooled.loc[("v", "zstd"), "entropy_ratio"]:.3f}x.
  The low byte is {plane_mean("bytes+zstd", "lo", "entropy_bits"):.3f}
  bits of entropy per 8 bits: the mantissa's low bits are incompressible, which caps any lossless coder of the
  values near {pooled.loc[("k_post", "bytes+zstd"), "entropy_ratio"]:.2f}x unless values repeat.
* **Layer 0 repeats itself**: its K before RoPE and its V are functions of the token alone (embedding, norm,
  projection), so a repeated token repeats its vectors and zstd finds the copies: layer 0 `bytes+zstd`
  K pre {layer0.loc["k_pre", "ratio"]:.2f}x and V {layer0.loc["v", "ratio"]:.2f}x (order-0 bounds
  {layer0.loc["k_pre", "entropy_ratio"]:.2f}x and {layer0.loc["v", "entropy_ratio"]:.2f}x), but K post
  {layer0.loc["k_post", "ratio"]:.2f}x, since RoPE rotates each copy by its position. Over layers 1+, inverting RoPE changes the `bytes+zstd` ratio by
  {100 * (deep.loc[("k_pre", "bytes+zstd"), "ratio"] / deep.loc[("k_post", "bytes+zstd"), "ratio"] - 1):+.1f}%
  (K pre {r("k_pre", "bytes+zstd", deep)} vs K post {r("k_post", "bytes+zstd", deep)}), and the best codec's
  by {100 * (best["k_pre"].ratio / best["k_post"].ratio - 1):+.1f}% over all layers.
'''


def mixed_policies(summary: pd.DataFrame, policies, lossless: dict[tuple[int, str], float], n_layers: int,
                   n_kv_heads: int, n_tokens: int, head_dim: int, baseline: str = "fp16",
                   unmeasured: float | None = None) -> pd.DataFrame:
    """The mixed lossless/lossy ``policies`` priced at the measured lossless ratios: one row per policy (the
    ``baseline``, the all-lossless cache, first) with its storage (:func:`~kvlab.evaluation.lossless.
    mixed_bits_per_value` at ``n_tokens``, and the ratio 16 / bits) beside the perplexity, delta PPL and paired
    95% CI of ``summary`` (:func:`kvlab.study.analysis.summarize` of the sweep's per-window rows), the same
    columns as :func:`~kvlab.evaluation.lossless.evaluate_policies` gives without its ``window_nll``."""
    s = summary.set_index("config")
    order = [baseline] + [p for p in policies if p != baseline]
    missing = [p for p in order if p not in s.index]
    if missing:
        raise ValueError(f"policies {missing} have no row in the summary; it has {sorted(s.index)}")
    rows = []
    for p in order:
        bpv = mixed_bits_per_value(p, lossless, n_layers, n_kv_heads, n_tokens, head_dim, unmeasured)
        rows.append({"policy": p, "bits_per_value": bpv, "ratio": 16 / bpv, "ppl": float(s.at[p, "ppl"]),
                     "delta_ppl": float(s.at[p, "delta_ppl"]), "ci_lo": float(s.at[p, "ci_lo"]),
                     "ci_hi": float(s.at[p, "ci_hi"]), "windows": int(s.at[p, "windows"])})
    return pd.DataFrame(rows)


def mixed_markdown(res: pd.DataFrame, n_windows: int, n_tokens: int, head_dim: int) -> str:
    """The mixed lossless/lossy policies of :func:`~kvlab.evaluation.lossless.evaluate_policies` (first row: the
    all-lossless ``fp16`` baseline) in prose: ratio, bits per value, delta PPL with its CI."""
    base = res.iloc[0]
    lines = "\n".join(
        f"* `{p.policy}`: {p.ratio:.3f}x ({p.bits_per_value:.2f} bits/value), delta PPL {p.delta_ppl:+.4f} "
        f"[{p.ci_lo:+.4f}, {p.ci_hi:+.4f}]" for p in res.iloc[1:].itertuples())
    within = ", ".join(f"`{p}`" for p in res.policy[(res.ci_lo <= 0) & (res.ci_hi >= 0)][1:]) or "none"
    fpmant_bits = quant.get("fpmant:mantissa=4").bits_per_value(n_tokens, head_dim)
    ci_note = (f"The CIs are paired bootstraps over {n_windows} windows of {n_tokens} tokens, each drawn from its own "
               "stratum of the split (the resampling unit of notebooks 03 and 04), against `fp16` on the same "
               "windows." if n_windows >= 8 else
               f"The CIs come from {n_windows} window(s) of {n_tokens} tokens: a percentile bootstrap over so few "
               "windows under-covers (one window gives no interval), so read small deltas of either sign as "
               "unresolved rather than as gains.")
    return f'''
The all-lossless cache (`fp16` policy, best codec per tensor) stores {base.bits_per_value:.2f} bits per value:
{base.ratio:.3f}x, at fp16 perplexity {base.ppl:.4f}. The mixed policies:

{lines}

Policies whose 95% CI includes 0: {within}.
{ci_note} A losslessly held layer costs {base.bits_per_value:.1f} bits per value on average against
{fpmant_bits:g} for `fpmant:mantissa=4`, so each layer moved to the lossless side costs ratio and buys exactness. The lossy
layers are priced as stored, without entropy coding on top.
'''


def metrics(table: pd.DataFrame, summary: pd.DataFrame, summary_deep: pd.DataFrame, res: pd.DataFrame) -> dict:
    """The notebook's recorded numbers: pooled ratios and entropy bounds per tensor and codec (all layers and
    layers 1+), the best codec per tensor, the fp16 baseline and every mixed policy."""
    best, base, pol = best_codecs(summary), res.iloc[0], res.set_index("policy")

    def per_tensor(df, col):
        return {t: df[df.tensor == t].set_index("codec")[col].to_dict() for t in TENSORS}

    return {
        "layers": sorted(table.layer.unique().tolist()),
        "ratio": per_tensor(summary, "ratio"),
        "entropy_ratio": per_tensor(summary, "entropy_ratio"),
        "ratio_layers_1plus": per_tensor(summary_deep, "ratio"),
        "best_codec": {t: {"codec": best[t].codec, "ratio": best[t].ratio} for t in best},
        "fp16_ppl": float(base.ppl), "lossless_ratio_all_layers": float(base.ratio),
        "mixed": {p: {k: pol.loc[p, k] for k in ("ratio", "bits_per_value", "delta_ppl", "ci_lo", "ci_hi")}
                  for p in pol.index},
    }
