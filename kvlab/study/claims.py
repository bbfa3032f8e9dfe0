"""The seeds' claims, each given a verdict from this study's measurements (notebook 04's claims table).

One function per kind of claim returns one row: ``seed``, ``claim``, ``measured`` (the figures, with CIs),
``verdict`` (one of :data:`VERDICTS`), ``why`` (the rule that turned the figures into the verdict) and
``cell`` (the section of notebook 04 holding the evidence). Every rule is stated in the row, every figure
comes from the tables passed in, and a comparison of two configs is a paired test on the same windows
(:func:`kvlab.metrics.paired_nll_test`), so "better" always means significantly better at ``alpha``.
:func:`claims_table` stacks the rows. Oracle configs are refused: a verdict rests on causal schemes only.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kvlab.metrics import paired_delta_ci, paired_nll_test
from kvlab.study.analysis import error_share, head_means, is_oracle

__all__ = ["VERDICTS", "claims_table", "end_metrics_text", "head_concentration", "kv_split", "lossless_ratio", "matched_bits_claim",
           "markdown", "outlier_heads", "paired", "recency_allocation", "small_loss"]

VERDICTS = ("confirmed", "refuted", "not reproduced here", "untestable here")
COLUMNS = ["seed", "claim", "measured", "verdict", "why", "cell"]


def _row(seed, claim, measured, verdict, why, cell) -> dict:
    if verdict not in VERDICTS:
        raise ValueError(f"verdict={verdict!r} is not allowed; allowed: {', '.join(VERDICTS)}")
    return dict(zip(COLUMNS, (seed, claim, measured, verdict, why, cell)))


def _nll(ppl: pd.DataFrame, config: str) -> np.ndarray:
    if is_oracle(config):
        raise ValueError(f"config {config!r} is an oracle scheme (it sees future tokens); a claim's verdict "
                         "rests on causal configs only")
    g = ppl[ppl["config"] == config]
    if g.empty:
        raise ValueError(f"config {config!r} has no perplexity rows; it has {sorted(ppl['config'].unique())}")
    return g.sort_values("window")["nll"].to_numpy()


def _at(summary: pd.DataFrame, config: str, col: str) -> float:
    s = summary.loc[summary["config"] == config, col]
    if s.empty:
        raise ValueError(f"config {config!r} is not in the summary; it has {sorted(summary['config'])}")
    return float(s.iloc[0])


def _dppl(summary: pd.DataFrame, config: str) -> str:
    return (f"{_at(summary, config, 'delta_ppl'):+.3f} [{_at(summary, config, 'ci_lo'):+.3f}, "
            f"{_at(summary, config, 'ci_hi'):+.3f}]")


def paired(ppl: pd.DataFrame, a: str, b: str, seed: int = 0, block: int = 1) -> dict:
    """PPL(b) - PPL(a) on the same windows with its paired bootstrap CI (``lo``, ``hi``) and the paired
    test's two-sided ``p``."""
    na, nb = _nll(ppl, a), _nll(ppl, b)
    if na.size != nb.size:
        raise ValueError(f"{a!r} has {na.size} windows and {b!r} {nb.size}; a paired test needs the same windows")
    d, lo, hi = paired_delta_ci(na, nb, seed=seed, block=block)
    return {"delta": d, "lo": lo, "hi": hi, "p": paired_nll_test(na, nb, block=block)}


def kv_split(summary, ppl, errors, k_only: str, v_only: str, base: str, claimed: float = 50.0,
             alpha: float = 0.05, seed: int = 0, block: int = 1) -> dict:
    """kvmix: "V is ~``claimed``x more compressible than K". ``k_only`` quantizes K with ``base``'s scheme
    and keeps V in fp16, ``v_only`` the reverse, so both store the same bits. Confirmed when K-only costs
    significantly more perplexity than V-only by at least ``claimed``x; the tensor-error ratios of ``base``
    are reported beside it because they answer differently by metric (NMSE vs MSE)."""
    pr = paired(ppl, v_only, k_only, seed=seed, block=block)
    dk, dv = _at(summary, k_only, "delta_ppl"), _at(summary, v_only, "delta_ppl")
    ratio = dk / dv if dv > 0 else math.inf
    e = head_means(errors, base)
    if e.empty:
        raise ValueError(f"config {base!r} is not in the errors table; it has {sorted(errors['config'].unique())}")
    nmse, mse = e["k_nmse"].mean() / e["v_nmse"].mean(), e["k_mse"].mean() / e["v_mse"].mean()
    bits = (_at(summary, k_only, "bits_per_value"), _at(summary, v_only, "bits_per_value"))
    measured = (f"dPPL K-only `{k_only}` {_dppl(summary, k_only)} vs V-only `{v_only}` {_dppl(summary, v_only)} "
                f"({bits[0]:.3g} / {bits[1]:.3g} bits); paired p = {pr['p']:.2g}; dPPL ratio "
                f"{'inf' if math.isinf(ratio) else f'{ratio:.1f}'}x; `{base}` K/V NMSE ratio {nmse:.2f}, "
                f"MSE ratio {mse:.1f}")
    sig = pr["p"] < alpha
    if sig and dk > dv and ratio >= claimed:
        verdict, why = "confirmed", f"K-only significantly worse (p < {alpha}) by >= {claimed:g}x"
    elif sig and dk > dv:
        verdict, why = "refuted", (f"K is the more sensitive (p < {alpha}) but by {ratio:.1f}x in dPPL, not "
                                   f"{claimed:g}x; the tensor errors answer by metric (K/V NMSE {nmse:.2f}x, MSE "
                                   f"{mse:.1f}x)")
    elif sig:
        verdict, why = "refuted", f"V-only costs significantly more than K-only (p < {alpha})"
    else:
        verdict, why = "refuted", f"no significant difference between K-only and V-only (p = {pr['p']:.2g})"
    return _row("kvmix", f"V is ~{claimed:g}x more compressible than K (`{base}`)", measured, verdict, why,
                "K-only vs V-only at equal bits")


def head_concentration(errors: pd.DataFrame, scheme: str, n: int, reference: str = "fp16", metric: str = "k_mse",
                       most: float = 0.5, margin: float = 0.05) -> dict:
    """kvmix: "a few heads carry most of the K error". The share of ``metric`` held by the worst ``n`` heads
    under ``scheme`` against the same share under ``reference`` (plain fp16 casting, whose error only
    follows each head's magnitude). Confirmed when the share is at least ``most`` and exceeds the
    reference's by more than ``margin``."""
    share, ref = error_share(errors, scheme, n, metric), error_share(errors, reference, n, metric)
    n_heads = len(head_means(errors, scheme))
    measured = (f"worst {n} of {n_heads} heads hold {share:.1%} of {metric} under `{scheme}`, {ref:.1%} under "
                f"`{reference}` casting")
    if share >= most and share - ref > margin:
        verdict, why = "confirmed", f"share >= {most:.0%} and above the fp16 cast's by > {margin:.0%}"
    else:
        verdict = "refuted"
        why = (f"{'not most of the error' if share < most else 'as concentrated as'} (rule: >= {most:.0%}, and "
               f"> {margin:.0%} above fp16 casting); the few large heads are large under any rounding")
    return _row("kvmix", f"a few heads carry most of the K error (`{scheme}`)", measured, verdict, why,
                "Head outliers relative to fp16 casting")


def outlier_heads(summary, ppl, base: str, policy: str, alpha: float = 0.05, seed: int = 0, block: int = 1,
                  recover: float = 0.5) -> dict:
    """kvmix: "keeping the outlier K heads in fp16 recovers the quality". ``policy`` is ``base`` with the
    worst heads' K in fp16. Confirmed when ``policy`` is significantly better than ``base`` and takes back at
    least ``recover`` of its delta PPL; untestable when ``base`` costs no significant perplexity (nothing to
    recover)."""
    pr = paired(ppl, base, policy, seed=seed, block=block)
    bb, bp = _at(summary, base, "bits_per_value"), _at(summary, policy, "bits_per_value")
    measured = (f"`{base}` {_dppl(summary, base)} at {bb:.3g} bits -> with fp16 K heads {_dppl(summary, policy)} at "
                f"{bp:.3g} bits; paired change {pr['delta']:+.3f} [{pr['lo']:+.3f}, {pr['hi']:+.3f}], p = {pr['p']:.2g}")
    base_lo, base_hi = _at(summary, base, "ci_lo"), _at(summary, base, "ci_hi")
    base_d = _at(summary, base, "delta_ppl")
    if base_lo <= 0 <= base_hi:
        verdict, why = "untestable here", f"`{base}` already costs no significant perplexity: nothing to recover"
    elif pr["p"] < alpha and pr["delta"] < 0:
        share = -pr["delta"] / base_d
        verdict = "confirmed" if share >= recover else "refuted"
        why = (f"significantly better (p < {alpha}) but recovers {share:.0%} of the loss (rule: >= {recover:.0%})"
               if share < recover else f"significantly better (p < {alpha}), recovering {share:.0%} of the loss") + \
            f" for {bp - bb:+.3g} bits"
    else:
        verdict = "refuted"
        why = (f"no significant gain (p = {pr['p']:.2g})" if pr["p"] >= alpha else "significantly worse") + \
            f" for {bp - bb:+.3g} bits"
    return _row("kvmix", f"fp16 outlier K heads recover `{base}`", measured, verdict, why,
                "fp16 outlier-head policies")


def end_metrics_text(passkey: pd.DataFrame, greedy: pd.DataFrame, config: str) -> str:
    """``config``'s passkey counts per length and greedy agreement, from
    :func:`kvlab.evaluation.retrieval.passkey_summary` / ``greedy_summary``, as ``small_loss``'s ``extra``."""
    parts = [f"passkey {int(r.correct)}/{int(r.trials)} at {int(r.length)}"
             for r in passkey[passkey["policy"] == config].itertuples()]
    parts += [f"greedy agreement {r.mean_agree:.1f} [{r.ci_lo:.1f}, {r.ci_hi:.1f}] of {int(r.new_tokens)} tokens"
              for r in greedy[greedy["policy"] == config].itertuples()]
    return "; ".join(parts)


def small_loss(summary, config: str, small: float = 0.02, seed_name: str = "KIVI",
               extra: str = "") -> dict:
    """"``config`` compresses with small loss": confirmed when the delta PPL's upper CI bound is at most
    ``small`` of fp16's PPL, refuted when its lower bound is above it. ``extra``: further measured
    figures for the row (e.g. passkey and greedy agreement), appended as they are."""
    fp = _at(summary, "fp16", "ppl")
    d, lo, hi = (_at(summary, config, c) for c in ("delta_ppl", "ci_lo", "ci_hi"))
    measured = (f"`{config}` ({_at(summary, config, 'bits_per_value'):.3g} bits) dPPL {_dppl(summary, config)} on "
                f"fp16 PPL {fp:.2f}: {d / fp:+.1%} [{lo / fp:+.1%}, {hi / fp:+.1%}]" + (f"; {extra}" if extra else ""))
    rule = f"small = at most {small:.0%} of fp16's PPL"
    verdict = "confirmed" if hi / fp <= small else "refuted" if lo / fp > small else "untestable here"
    why = rule + ("" if verdict != "untestable here" else "; the CI straddles the bound")
    return _row(seed_name, f"`{config}` with small loss", measured, verdict, why, "Perplexity and end metrics")


def lossless_ratio(ratios: dict[str, float], claimed: tuple[float, float], seed_name: str = "lossless work",
                   what: str = "byte-plane split + zstd") -> dict:
    """A lossless coder's ratio: ``ratios`` measured per tensor kind (e.g. notebook 06's best codec for K
    before and after RoPE and V) against the ``claimed`` range. Reproduced when a measured ratio reaches the
    claimed range's lower end."""
    lo, hi = claimed
    measured = ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items())
    best = max(ratios.values())
    if best >= lo:
        verdict, why = "confirmed", f"a measured ratio reaches the claimed {lo:.2f}-{hi:.2f}x"
    else:
        verdict, why = "not reproduced here", (f"best {best:.3f}x, below the claimed {lo:.2f}-{hi:.2f}x (on this "
                                               "model's fp16 KV; the claim's model and data are not available here)")
    return _row(seed_name, f"{what}: {lo:.2f}-{hi:.2f}x lossless", measured, verdict, why, "notebook 06")


def recency_allocation(summary, ppl, policy: str, uniform: str, alpha: float = 0.05, seed: int = 0,
                       block: int = 1, tolerance: float = 1e-9) -> dict:
    """KVQuant: "more bits for recent tokens" against a uniform scheme of the same average bits (``policy``
    must not store more bits than ``uniform``). Confirmed when significantly better, refuted when
    significantly worse, else not reproduced."""
    bp, bu = _at(summary, policy, "bits_per_value"), _at(summary, uniform, "bits_per_value")
    if bp > bu + tolerance:
        raise ValueError(f"policy {policy!r} stores {bp:.4g} bits per value, more than uniform {uniform!r} "
                         f"({bu:.4g}); allowed: at most the uniform scheme's bits")
    pr = paired(ppl, uniform, policy, seed=seed, block=block)
    measured = (f"`{policy}` {_dppl(summary, policy)} vs uniform `{uniform}` {_dppl(summary, uniform)} at "
                f"{bp:.3g} / {bu:.3g} bits; paired {pr['delta']:+.3f} [{pr['lo']:+.3f}, {pr['hi']:+.3f}], p = {pr['p']:.2g}")
    if pr["p"] < alpha:
        verdict = "confirmed" if pr["delta"] < 0 else "refuted"
        why = f"significantly {'better' if pr['delta'] < 0 else 'worse'} than uniform at equal bits (p < {alpha})"
    else:
        verdict, why = "not reproduced here", f"no significant difference at equal bits (p = {pr['p']:.2g})"
    return _row("KVQuant", "recent tokens at more bits beat uniform bits", measured, verdict, why,
                "Recency allocation at equal bits")


def matched_bits_claim(matched: pd.DataFrame, seed_name: str = "kv-compressor",
                       claim: str = "sign+magnitude is a competitive KV compressor at its bits") -> dict:
    """A family's claim against the matched-bits comparison (:func:`kvlab.study.analysis.matched_bits`,
    rivals with at most the challenger's bits): refuted when rivals are significantly better in more than half
    of the comparisons, confirmed when the challenger is, else not reproduced."""
    n = len(matched)
    if n == 0:
        return _row(seed_name, claim, "no matched-bits comparison", "untestable here", "no rival at matched bits",
                    "Matched bits")
    rb = int((matched["verdict"] == "rival better").sum())
    cb = int((matched["verdict"] == "challenger better").sum())
    won = ", ".join(f"`{r.rival}`" for r in matched[matched["verdict"] == "challenger better"].itertuples()) \
        if "rival" in matched else ""
    measured = (f"rival better in {rb} of {n} matched-bits comparisons, sign+magnitude better in {cb}"
                + (f" (against {won})" if won else "") + f", CIs overlap in {n - rb - cb}")
    if rb > n / 2:
        verdict, why = "refuted", "rivals with at most its bits are significantly better in most comparisons"
    elif cb > n / 2:
        verdict, why = "confirmed", "significantly better than most rivals with at most its bits"
    else:
        verdict, why = "not reproduced here", "neither side better in most comparisons"
    return _row(seed_name, claim, measured, verdict, why, "Matched bits")


def claims_table(rows) -> pd.DataFrame:
    """The rows of the functions above as one table, in the order given."""
    return pd.DataFrame(list(rows), columns=COLUMNS)


def markdown(table: pd.DataFrame) -> str:
    """``table`` as a Markdown pipe table (cells' ``|`` escaped, newlines flattened), for notebooks."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
