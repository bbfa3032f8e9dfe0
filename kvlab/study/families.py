"""Two model families side by side (notebook 07): the same configs on the same protocol, per model, and which
findings hold on both.

Every function takes per-model tables keyed by a model label (an insertion-ordered dict: the first model is the
reference): ``summaries`` from :func:`kvlab.study.analysis.summarize`, ``tables`` from
:func:`kvlab.study.analysis.proxy_table`, ``ppls`` the per-window perplexity rows. Configs are compared on the
configs every model ran (:func:`common_configs`), oracle configs left out of every verdict, and each finding is
decided per model by a stated rule on that model's paired tests, then compared across models
(:func:`finding_rows`): "holds on both", "holds on <model> only" or "holds on neither".
"""

from __future__ import annotations

import math
import re

import pandas as pd

from kvlab.study import claims
from kvlab.study.analysis import (
    PROXIES,
    causal_only_rows,
    discordance,
    head_means,
    matched_bits,
    rank_correlations,
)

__all__ = ["common_configs", "side_by_side", "ranking_agreement", "proxy_agreement", "discordance_by_model",
           "finding_rows", "findings_verdict", "holds_everywhere", "model_claims", "claims_by_model",
           "passkey_side", "greedy_side", "shared_name", "shared_names"]


_CALIB = re.compile(r",calib=[0-9a-f]{16}")


def shared_name(config: str) -> str:
    """The name a config shares across models: a scheme calibrated per model (``kvquantc:...,calib=<id>``, the
    id naming one model's calibration file) without its calibration id, so each model's own calibration of the
    same scheme lines up in the side-by-side tables; every other config as it is."""
    return _CALIB.sub("", config)


def shared_names(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (per-window perplexity or error rows) with ``config`` mapped by :func:`shared_name` (``policy``
    and ``key`` keep the full spec, so each row still names its calibration)."""
    return rows.assign(config=rows["config"].map(shared_name))


def common_configs(summaries: dict[str, pd.DataFrame]) -> list[str]:
    """The configs every model's summary holds, in the first model's order (by bits, then delta PPL)."""
    if len(summaries) < 2:
        raise ValueError(f"side by side needs at least two models; got {list(summaries)}")
    first, *rest = summaries.values()
    have = set.intersection(*(set(s["config"]) for s in rest))
    return [c for c in first["config"] if c in have]


def side_by_side(summaries: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per common config: its family and oracle flag, then per model the bits per value, PPL, delta
    PPL with its 95% CI, delta PPL relative to that model's fp16 PPL, and the config's rank by delta PPL among
    the common causal quantized configs (1 = least loss)."""
    configs = common_configs(summaries)
    first = next(iter(summaries.values())).set_index("config")
    out = pd.DataFrame({"config": configs, "family": first.loc[configs, "family"].to_numpy(),
                        "oracle": first.loc[configs, "oracle"].to_numpy()})
    for label, s in summaries.items():
        s = s.set_index("config")
        fp = float(s.at["fp16", "ppl"])
        for col in ("bits_per_value", "ppl", "delta_ppl", "ci_lo", "ci_hi"):
            out[f"{label} {col}"] = s.loc[configs, col].to_numpy()
        out[f"{label} relative"] = out[f"{label} delta_ppl"] / fp
        ranked = out[(out.config != "fp16") & ~out.oracle]
        out[f"{label} rank"] = ranked[f"{label} delta_ppl"].rank(method="average").reindex(out.index)
    return out


def ranking_agreement(side: pd.DataFrame, labels) -> dict:
    """Spearman (with its p-value) between two models' delta PPLs over the common causal quantized configs:
    do the models order the schemes alike?"""
    from scipy.stats import spearmanr

    a, b = labels
    t = side[(side.config != "fp16") & ~side.oracle]
    if len(t) < 3:
        return {"n_configs": len(t), "spearman": math.nan, "p": math.nan}
    r = spearmanr(t[f"{a} delta_ppl"], t[f"{b} delta_ppl"])
    return {"n_configs": len(t), "spearman": float(r.statistic), "p": float(r.pvalue)}


def proxy_agreement(tables: dict[str, pd.DataFrame], proxies=None, seed: int = 0,
                    n_resamples: int = 2000) -> pd.DataFrame:
    """Spearman of each proxy with delta PPL per model (bootstrap 95% CI over configs), on the configs every
    model has error tables for (causal, fp16 left out), so the two columns rank the same schemes."""
    keep = set.intersection(*(set(t["config"]) for t in tables.values())) - {"fp16"}
    rows = []
    for label, t in tables.items():
        t = t[t.config.isin(keep)]
        corr = rank_correlations(t, seed=seed, n_resamples=n_resamples)
        if proxies is not None:
            corr = corr[corr.proxy.isin(proxies)]
        rows.append(corr.assign(model=label))
    out = pd.concat(rows, ignore_index=True)
    wide = out.pivot(index="proxy", columns="model", values=["spearman", "spearman_lo", "spearman_hi"])
    wide.columns = [f"{m} {c}" for c, m in wide.columns]
    order = [f"{m} {c}" for m in tables for c in ("spearman", "spearman_lo", "spearman_hi")]
    first = next(iter(tables))
    return (wide[order].sort_values(f"{first} spearman", ascending=False).reset_index()
            .assign(n_configs=int(out["n_configs"].iloc[0]) if len(out) else 0))


def discordance_by_model(tables: dict[str, pd.DataFrame], ppls: dict[str, pd.DataFrame], proxies=None,
                         tolerance: float = 0.10, block: int = 1, method: str = "holm",
                         alpha: float = 0.05) -> pd.DataFrame:
    """:func:`kvlab.study.analysis.discordance` per model, on the causal configs every model has error tables
    for (fp16 included, as in notebook 03), so each model's denominators count the same pairs: one row per
    (model, proxy) with ``pairs``, ``significant``, ``tied``, ``compared``, ``discordant`` and ``rate``."""
    keep = set.intersection(*(set(t["config"]) for t in tables.values()))
    rows = []
    for label, t in tables.items():
        t = t[t.config.isin(keep)]
        names = [p for p in (proxies or PROXIES) if p in t]
        ppl = ppls[label][ppls[label].config.isin(keep)]
        rows.append(discordance(t, ppl, names, tolerance=tolerance, block=block, method=method,
                                alpha=alpha).assign(model=label))
    out = pd.concat(rows, ignore_index=True)
    return out[["model", *[c for c in out.columns if c != "model"]]]


def _holds(rows: dict[str, tuple[bool | None, str]]) -> str:
    labels = list(rows)
    yes = [m for m in labels if rows[m][0] is True]
    if any(rows[m][0] is None for m in labels):
        return "untestable on " + ", ".join(m for m in labels if rows[m][0] is None)
    if len(yes) == len(labels):
        return "holds on both" if len(labels) == 2 else "holds on all"
    if not yes:
        return "holds on neither"
    return "holds on " + ", ".join(yes) + " only"


def _matched(summary, challenger_family: str, excluded=("int (truncate)", "fp16")) -> tuple[bool | None, str]:
    rivals = [f for f in summary.family.unique() if f not in (challenger_family, *excluded)]
    m = matched_bits(summary, challenger_family, rivals)
    if m.empty:
        return None, "no rival at matched bits"
    rb, cb = int((m.verdict == "rival better").sum()), int((m.verdict == "challenger better").sum())
    return rb > len(m) / 2, f"rival better in {rb} of {len(m)}, sign+magnitude better in {cb}"


def _k_vs_v(summary, ppl, k_only: str, v_only: str, alpha: float, seed: int, block: int):
    if not {k_only, v_only} <= set(summary.config):
        return None, "not run"
    pr = claims.paired(ppl, v_only, k_only, seed=seed, block=block)
    s = summary.set_index("config")
    dk, dv = s.at[k_only, "delta_ppl"], s.at[v_only, "delta_ppl"]
    text = (f"K-only {dk:+.3f}, V-only {dv:+.3f} at {s.at[k_only, 'bits_per_value']:.3g} bits; "
            f"K - V {pr['delta']:+.3f} [{pr['lo']:+.3f}, {pr['hi']:+.3f}], p = {pr['p']:.2g}")
    return bool(pr["p"] < alpha and pr["delta"] > 0), text


def _recency(summary, ppl, policy: str, uniform: str, alpha: float, seed: int, block: int):
    if not {policy, uniform} <= set(summary.config):
        return None, "not run"
    r = claims.recency_allocation(summary, ppl, policy, uniform, alpha=alpha, seed=seed, block=block)
    return r["verdict"] == "confirmed", r["measured"].split("; ", 1)[-1]


def _small(summary, config: str, small: float):
    if config not in set(summary.config):
        return None, "not run"
    r = claims.small_loss(summary, config, small=small)
    verdict = {"confirmed": True, "refuted": False}.get(r["verdict"])
    return verdict, r["measured"].split(": ", 1)[-1] + " of fp16's PPL"


def _best_proxy(table, near_lossless: float | None = None):
    """(the proxies tied at the top Spearman with delta PPL, text): over few configs Spearman takes few values,
    so several proxies can share the top; all of them are returned."""
    t = table[table.config != "fp16"]
    corr = rank_correlations(causal_only_rows(t), n_resamples=200)
    if corr.empty:
        return None, "no proxies"
    best = corr.spearman.max()
    top = corr[corr.spearman >= best - 1e-9]
    names = frozenset(top.proxy.astype(str))
    tied = "" if len(names) == 1 else f"{len(names)} of {len(corr)} proxies tied: "
    return names, f"{tied}{', '.join(sorted(names))} (Spearman {best:.3f} over {int(top.n_configs.iloc[0])} configs)"


def finding_rows(summaries: dict, ppls: dict, tables: dict, k_only: str = "k=q4_0;v=fp16",
                 v_only: str = "k=fp16;v=q4_0", recency: str | None = None, uniform: str | None = None,
                 small_loss_config: str = "kivi:bits=2", small: float = 0.02, challenger: str = "signmag",
                 alpha: float = 0.05, seed: int = 0, block: int = 1) -> pd.DataFrame:
    """One row per finding: the finding, each model's measured figure, whether it holds per model (by the
    rule in the ``rule`` column) and across models. Findings: sign+magnitude falls short at matched bits (the
    thesis), K is the more sensitive tensor at equal bits, recency allocation beats uniform at equal bits,
    ``small_loss_config`` costs at most ``small`` of fp16's PPL, the best-ranking proxy is the same, and the
    models order the schemes alike."""
    labels = list(summaries)
    common = common_configs(summaries)
    sub = {m: summaries[m][summaries[m].config.isin(common)] for m in labels}
    rows = []

    def add(finding, rule, per):
        row = {"finding": finding, "rule": rule}
        for m in labels:
            row[m] = per[m][1]
        row["across models"] = _holds(per)
        rows.append(row)

    add("sign+magnitude falls short of rivals at no more bits",
        "per model: rivals with at most its bits better, CIs separated, in most comparisons (common configs)",
        {m: _matched(sub[m], challenger) for m in labels})
    add("K costs more perplexity than V at equal bits",
        f"per model: K-only minus V-only delta PPL > 0, paired test p < {alpha}",
        {m: _k_vs_v(summaries[m], ppls[m], k_only, v_only, alpha, seed, block) for m in labels})
    if recency and uniform:
        add("recent tokens at more bits beat uniform bits (equal average bits)",
            f"per model: paired test p < {alpha}, recency better",
            {m: _recency(summaries[m], ppls[m], recency, uniform, alpha, seed, block) for m in labels})
    add(f"`{small_loss_config}` costs little",
        f"per model: the delta PPL's upper CI bound at most {small:.0%} of fp16's PPL",
        {m: _small(summaries[m], small_loss_config, small) for m in labels})
    best = {m: _best_proxy(tables[m][tables[m].config.isin(common)]) for m in labels}
    tops = [b[0] for b in best.values()]
    shared = frozenset.intersection(*tops) if None not in tops else frozenset()
    rows.append({"finding": "the same proxy ranks schemes best", "rule": "a proxy at the top Spearman with delta "
                 "PPL on every model (ties share the top), causal common configs with error tables",
                 **{m: best[m][1] for m in labels},
                 "across models": f"holds on both ({', '.join(sorted(shared))})" if shared else "differs"})
    side = side_by_side(summaries)
    agree = ranking_agreement(side, labels[:2])
    figure = f"Spearman {agree['spearman']:.3f}, p = {agree['p']:.2g}"
    rows.append({"finding": "the models order the schemes alike", "rule": "Spearman of the two models' delta PPL "
                 f"over the {agree['n_configs']} common causal configs > 0 with p < {alpha}",
                 **{m: figure for m in labels},
                 "across models": "holds on both" if agree["p"] < alpha and agree["spearman"] > 0 else "not shown"})
    return pd.DataFrame(rows, columns=["finding", "rule", *labels, "across models"])


def holds_everywhere(verdict: str) -> str | None:
    """The note after a finding's across-models label when it holds on every model ("holds on both" / "holds
    on all"; "" without a note, e.g. " (logits KL)" for the proxies two models share at the top), else None."""
    m = re.match(r"holds on (both|all)\b(.*)$", verdict)
    return m.group(2) if m else None


def findings_verdict(findings: pd.DataFrame) -> str:
    """Markdown: which findings hold on both models and which do not, from :func:`finding_rows`."""
    notes = [holds_everywhere(v) for v in findings["across models"]]  # a list: pandas would turn None into NaN
    both = [f"{f}{n}" for f, n in zip(findings["finding"], notes) if n is not None]
    other = findings[[n is None for n in notes]]
    text = []
    if both:
        text.append("**Hold on both models:** " + "; ".join(both) + ".")
    if len(other):
        text.append("**Do not hold on both (or are not decided):** "
                    + "; ".join(f"{r['finding']} ({r['across models']})" for r in other.to_dict("records")) + ".")
    return "\n\n".join(text)


# ---- end metrics and the seeds' claims, per model -------------------------------------------------------------


def _per_model(frames: dict[str, pd.DataFrame], keys: list[str], cols, what: str) -> pd.DataFrame:
    """``frames`` (one per model label) outer-joined on ``keys``, each model's ``cols`` (those it has) prefixed
    with its label."""
    if not frames:
        raise ValueError(f"{what} needs at least one model's summary; got none")
    out = None
    for label, f in frames.items():
        t = f[[*keys, *[c for c in cols if c in f]]].rename(columns={c: f"{label} {c}" for c in cols})
        out = t if out is None else out.merge(t, on=keys, how="outer", sort=False)
    return out.reset_index(drop=True)


def passkey_side(passkeys: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (policy, length) that any model ran, from each model's
    :func:`kvlab.evaluation.retrieval.passkey_summary`: per model the keys retrieved, the trials, the accuracy
    with its binomial 95% CI and the share of answer tokens right (NaN where that model did not run the pair)."""
    out = _per_model(passkeys, ["policy", "length"],
                     ("correct", "trials", "accuracy", "ci_lo", "ci_hi", "token_accuracy"), "passkey_side")
    order = list(dict.fromkeys(pd.concat([p["policy"] for p in passkeys.values()])))
    out["_o"] = out["policy"].map(order.index)
    return out.sort_values(["_o", "length"]).drop(columns="_o").reset_index(drop=True)


def greedy_side(greedies: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per policy, from each model's :func:`kvlab.evaluation.retrieval.greedy_summary`: per model the
    mean number of greedy tokens equal to the reference before the first divergence, with its bootstrap 95% CI."""
    return _per_model(greedies, ["policy"], ("mean_agree", "ci_lo", "ci_hi"), "greedy_side")


def model_claims(summary: pd.DataFrame, ppl: pd.DataFrame, errors: pd.DataFrame, passkey=None, greedy=None, *,
                 k_only: str = "k=q4_0;v=fp16", v_only: str = "k=fp16;v=q4_0", base: str = "q4_0",
                 worst_share: float = 0.067, recency: str | None = None, uniform: str | None = None,
                 small_loss_config: str = "kivi:bits=2", small: float = 0.02, challenger: str = "signmag",
                 excluded=("int (truncate)", "fp16"), seed: int = 0, block: int = 1) -> list[dict]:
    """The seeds' claims that one model's runs of notebook 07 can decide (:mod:`kvlab.study.claims` rows, in
    notebook 04's order): kvmix's K/V split at ``base``'s bits and its head concentration relative to fp16
    casting (the worst ``worst_share`` of the model's (layer, kv head) pairs, at least one), KVQuant's recency
    allocation (when ``recency`` and ``uniform`` ran), KIVI's small loss (with ``passkey`` / ``greedy``
    summaries where given) and kv-compressor's matched-bits claim over the configs of ``summary`` (pass the
    common configs so every model is judged on the same rivals). A claim whose configs did not run is left out."""
    if not 0 < worst_share <= 1:
        raise ValueError(f"worst_share={worst_share!r} is not allowed; allowed: a fraction in (0, 1]")
    have = set(summary["config"])
    rows = []
    with_errors = base in set(errors["config"])
    if {k_only, v_only} <= have and with_errors:
        rows.append(claims.kv_split(summary, ppl, errors, k_only, v_only, base, seed=seed, block=block))
    if with_errors and "fp16" in set(errors["config"]):
        n = max(1, round(worst_share * len(head_means(errors, base))))
        rows.append(claims.head_concentration(errors, base, n))
    if recency and uniform and {recency, uniform} <= have:
        rows.append(claims.recency_allocation(summary, ppl, recency, uniform, seed=seed, block=block))
    if small_loss_config in have:
        extra = claims.end_metrics_text(passkey, greedy, small_loss_config) if passkey is not None and \
            greedy is not None else ""
        rows.append(claims.small_loss(summary, small_loss_config, small=small, extra=extra))
    rivals = [f for f in summary.family.unique() if f not in (challenger, *excluded)]
    rows.append(claims.matched_bits_claim(matched_bits(summary, challenger, rivals)))
    return rows


def claims_by_model(rows: dict[str, list[dict]]) -> pd.DataFrame:
    """:func:`model_claims` of each model side by side: one row per (seed, claim) any model decided, with each
    model's verdict and measured figures, and ``across models``: "<verdict> on both" (or "on all") when every
    model reached the same verdict, else "differs" (a claim one model did not run: "not run on <model>")."""
    labels = list(rows)
    keys = list(dict.fromkeys((r["seed"], r["claim"]) for rs in rows.values() for r in rs))
    by = {m: {(r["seed"], r["claim"]): r for r in rs} for m, rs in rows.items()}
    out = []
    for key in keys:
        row = {"seed": key[0], "claim": key[1]}
        for m in labels:
            r = by[m].get(key)
            row[f"{m} verdict"] = r["verdict"] if r else "not run"
            row[f"{m} measured"] = r["measured"] if r else ""
        verdicts = [row[f"{m} verdict"] for m in labels]
        missing = [m for m, v in zip(labels, verdicts) if v == "not run"]
        if missing:
            row["across models"] = "not run on " + ", ".join(missing)
        elif len(set(verdicts)) == 1:
            row["across models"] = f"{verdicts[0]} on {'both' if len(labels) == 2 else 'all'}"
        else:
            row["across models"] = "differs"
        out.append(row)
    cols = ["seed", "claim", *[f"{m} {c}" for m in labels for c in ("verdict", "measured")], "across models"]
    return pd.DataFrame(out, columns=cols)
