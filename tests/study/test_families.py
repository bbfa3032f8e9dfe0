"""Two models side by side (kvlab.study.families) on hand-made per-window tables: the side-by-side table, the
cross-model ranking, the per-proxy agreement and each finding's per-model rule and its across-models label."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kvlab.study import analysis as study
from kvlab.study import families

N = 24
BITS = {"fp16": 16.0, "q4_0": 4.5, "kivi:bits=2": 3.4, "signmag:v=2": 2.75, "int:bits=2,group=32": 2.5,
        "signmag:v=3": 3.5, "k=q4_0;v=fp16": 10.25, "k=fp16;v=q4_0": 10.25, "q8_0": 8.5}


def _ppl(shifts: dict[str, float], seed: int) -> pd.DataFrame:
    """Per-window NLL rows: fp16 at log(10) plus shared window noise; each config shifted by its mean."""
    rng = np.random.default_rng(seed)
    base = np.log(10) + 0.05 * rng.standard_normal(N)
    rows = []
    for c, mean in {"fp16": 0.0, **shifts}.items():
        nll = base + mean + (0.002 if c != "fp16" else 0.0) * rng.standard_normal(N)
        rows += [{"key": c, "config": c, "window": i, "nll": float(x), "kl": mean, "bits_per_value": BITS[c],
                  "bytes_per_token_4096": BITS[c], "tokens_sha256": "t"} for i, x in enumerate(nll)]
    return pd.DataFrame(rows)


def _table(summary: pd.DataFrame, proxy: dict[str, float]) -> pd.DataFrame:
    t = summary.copy()
    t["1 - K cosine"] = t.config.map(proxy).fillna(0.0)
    t["logits KL"] = t["kl"]
    return t


A = {"q8_0": 0.001, "q4_0": 0.02, "kivi:bits=2": 0.2, "signmag:v=2": 0.9, "int:bits=2,group=32": 0.8,
     "signmag:v=3": 0.5, "k=q4_0;v=fp16": 0.03, "k=fp16;v=q4_0": 0.004}


@pytest.fixture
def two():
    b = dict(A, **{"k=q4_0;v=fp16": 0.004, "k=fp16;v=q4_0": 0.03})  # the second model: V the more sensitive
    ppls = {"one": _ppl(A, 0), "two": _ppl(b, 1)}
    summaries = {m: study.summarize(p) for m, p in ppls.items()}
    cos = {"q8_0": 1e-4, "q4_0": 1e-3, "kivi:bits=2": 1e-2, "signmag:v=2": 0.2, "int:bits=2,group=32": 0.3,
           "signmag:v=3": 0.1, "k=q4_0;v=fp16": 1e-3, "k=fp16;v=q4_0": 1e-5}
    tables = {m: _table(s, cos) for m, s in summaries.items()}
    return summaries, ppls, tables


def test_side_by_side_ranks_common_configs(two):
    summaries, _, _ = two
    s2 = summaries["two"][summaries["two"].config != "q8_0"]
    side = families.side_by_side({"one": summaries["one"], "two": s2})
    assert "q8_0" not in set(side.config) and side.config.iloc[0] == "int:bits=2,group=32"  # by bits
    r = side.set_index("config")
    assert np.isnan(r.at["fp16", "one rank"]) and r.at["signmag:v=2", "one rank"] == len(side) - 1
    fp = summaries["one"].set_index("config").at["fp16", "ppl"]
    assert r.at["q4_0", "one relative"] == pytest.approx(r.at["q4_0", "one delta_ppl"] / fp)
    with pytest.raises(ValueError, match="at least two models"):
        families.side_by_side({"one": summaries["one"]})


def test_ranking_agreement_and_proxy_agreement(two):
    summaries, _, tables = two
    side = families.side_by_side(summaries)
    agree = families.ranking_agreement(side, ["one", "two"])
    assert agree["n_configs"] == 8 and 0.5 < agree["spearman"] < 1 and agree["p"] < 0.05
    pa = families.proxy_agreement(tables, n_resamples=100)
    row = pa.set_index("proxy").loc["logits KL"]
    assert row["one spearman"] == pytest.approx(1.0) and pa["n_configs"].iloc[0] == 8


def test_discordance_by_model_counts_each_models_pairs(two):
    summaries, ppls, tables = two
    d = families.discordance_by_model(tables, ppls, proxies=["1 - K cosine", "logits KL"]).set_index(["model", "proxy"])
    assert d.at[("one", "logits KL"), "pairs"] == 36  # 9 configs (fp16 included): 36 pairs
    assert d.at[("one", "logits KL"), "discordant"] == 0  # logits KL is each config's own mean shift
    for m in ("one", "two"):
        r = d.loc[(m, "1 - K cosine")]
        assert r.discordant <= r.compared <= r.significant <= r.pairs and r.compared + r.tied == r.significant


def test_finding_rows_decide_per_model_and_across(two):
    summaries, ppls, tables = two
    f = families.finding_rows(summaries, ppls, tables).set_index("finding")
    kv = f.loc["K costs more perplexity than V at equal bits"]
    assert kv["across models"] == "holds on one only" and "p = " in kv["one"]
    sm = f.loc["sign+magnitude falls short of rivals at no more bits"]
    assert sm["across models"] == "holds on both" and "rival better in 2 of 3" in sm["one"]
    small = f.loc["`kivi:bits=2` costs little"]  # +0.2 nats: about +22% of fp16's PPL
    assert small["across models"] == "holds on neither"
    best = f.loc["the same proxy ranks schemes best"]  # ties share the top; the shared ones are named
    assert best["across models"].startswith("holds on both (") and "logits KL" in best["across models"]
    assert "tied" not in best["one"] and best["one"].startswith("logits KL (Spearman 1.000")
    tied = {m: t.assign(**{"V MSE": t["logits KL"] * 2}) for m, t in tables.items()}  # a second proxy, same order
    tied["two"]["logits KL"] = tied["two"]["logits KL"].sample(frac=1, random_state=0).to_numpy()  # not top on two
    best = families.finding_rows(summaries, ppls, tied).set_index("finding").loc["the same proxy ranks schemes best"]
    assert best["one"].startswith("2 of 3 proxies tied: V MSE, logits KL (Spearman 1.000")
    assert best["across models"] == "holds on both (V MSE)"
    order = f.loc["the models order the schemes alike"]
    assert order["across models"] == "holds on both" and order["one"].startswith("Spearman 0.9")
    text = families.findings_verdict(f.reset_index())
    assert "**Hold on both models:**" in text and "K costs more perplexity than V" in text.split("Do not")[1]
    f = families.finding_rows(summaries, ppls, tables, recency="kv=q4_0;recent=8;old=q8_0", uniform="q4_0")
    assert f.set_index("finding").loc["recent tokens at more bits beat uniform bits (equal average bits)",
                                      "across models"] == "untestable on one, two"


def test_families_plot_draws_both_panels(two):
    import matplotlib

    matplotlib.use("Agg")
    from kvlab.study import plots

    summaries, _, _ = two
    side = families.side_by_side(summaries)
    fig = plots.families_plot(side, ["one", "two"])
    ax, ax2 = fig.axes
    assert "one" in ax.get_xlabel() and "two" in ax.get_ylabel() and len(ax2.lines) + len(ax2.collections) > 0
    with pytest.raises(ValueError, match="fp16 row"):
        plots.families_plot(side[side.config != "fp16"], ["one", "two"])


def _head_errors(configs: dict[str, list[float]]) -> pd.DataFrame:
    """Per-window head errors (2 windows, 3 kv heads a layer): config -> K MSE per head; V a tenth of it."""
    return pd.DataFrame([{"config": c, "window": w, "layer": h // 3, "head": h % 3, "k_mse": k, "v_mse": k / 10,
                          "k_nmse": k, "v_nmse": k / 2} for c, ks in configs.items() for w in range(2)
                         for h, k in enumerate(ks)])


def test_model_claims_decide_each_claim_that_ran(two):
    summaries, ppls, _ = two
    s, p = summaries["one"], ppls["one"]
    peaked = [10.0] + [0.1] * 14  # under q4_0 one head of 15 holds most of the K error
    e = _head_errors({"fp16": [1.0] * 15, "q4_0": peaked})
    rows = families.model_claims(s, p, e, worst_share=0.1)  # 10% of 15 heads: the worst 2
    got = {r["claim"]: r for r in rows}
    assert [r["seed"] for r in rows] == ["kvmix", "kvmix", "KIVI", "kv-compressor"]  # no recency: not run
    kv = got["V is ~50x more compressible than K (`q4_0`)"]
    assert kv["verdict"] == "refuted" and "paired p = " in kv["measured"]  # K worse, but ~7x, not 50x
    heads = got["a few heads carry most of the K error (`q4_0`)"]
    assert heads["verdict"] == "confirmed" and heads["measured"].startswith("worst 2 of 15 heads")
    assert got["`kivi:bits=2` with small loss"]["verdict"] == "refuted"
    assert got["sign+magnitude is a competitive KV compressor at its bits"]["measured"].startswith("rival better in 2 of 3")
    flat = families.model_claims(s, p, _head_errors({"fp16": peaked, "q4_0": peaked}), worst_share=0.1)
    assert [r["verdict"] for r in flat if r["claim"].startswith("a few heads")] == ["refuted"]  # as fp16 casting
    with pytest.raises(ValueError, match="worst_share=0"):
        families.model_claims(s, p, e, worst_share=0)
    no_errors = families.model_claims(s, p, e[e.config == "fp16"])
    assert [r["seed"] for r in no_errors] == ["KIVI", "kv-compressor"]


def test_claims_by_model_labels_agreement_and_missing(two):
    summaries, ppls, _ = two
    e = _head_errors({"fp16": [1.0] * 6, "q4_0": [1.0] * 6})
    rows = {m: families.model_claims(summaries[m], ppls[m], e) for m in ("one", "two")}
    rows["two"] = [r for r in rows["two"] if r["seed"] != "KIVI"]
    t = families.claims_by_model(rows).set_index("claim")
    assert list(t.columns[:2]) == ["seed", "one verdict"]
    assert t.at["a few heads carry most of the K error (`q4_0`)", "across models"] == "refuted on both"
    assert t.at["`kivi:bits=2` with small loss", "across models"] == "not run on two"
    assert t.at["`kivi:bits=2` with small loss", "two verdict"] == "not run"
    kv = t.loc["V is ~50x more compressible than K (`q4_0`)"]  # model two: V the more sensitive; both refuted
    assert kv["across models"] == "refuted on both" and kv["one measured"] != kv["two measured"]


def test_end_metrics_side_by_side():
    pk = {"one": pd.DataFrame({"policy": ["fp16", "fp16", "q4_0"], "length": [1024, 2048, 1024],
                               "correct": [20, 19, 12], "trials": [20] * 3, "accuracy": [1.0, 0.95, 0.6],
                               "ci_lo": [0.8, 0.7, 0.4], "ci_hi": [1.0, 1.0, 0.8]}),
          "two": pd.DataFrame({"policy": ["fp16", "q4_0"], "length": [1024, 1024], "correct": [18, 3],
                               "trials": [20, 20], "accuracy": [0.9, 0.15], "ci_lo": [0.7, 0.03],
                               "ci_hi": [1.0, 0.4]})}
    side = families.passkey_side(pk)
    assert list(zip(side.policy, side.length)) == [("fp16", 1024), ("fp16", 2048), ("q4_0", 1024)]
    assert side["two correct"].tolist()[0] == 18 and np.isnan(side["two correct"].iloc[1])
    gr = {m: pd.DataFrame({"policy": ["fp16", "q4_0"], "mean_agree": [64.0, a], "ci_lo": [64.0, a - 1],
                           "ci_hi": [64.0, a + 1], "prompts": [4, 4], "new_tokens": [64, 64]})
          for m, a in (("one", 5.0), ("two", 9.0))}
    g = families.greedy_side(gr).set_index("policy")
    assert g.at["q4_0", "one mean_agree"] == 5.0 and g.at["q4_0", "two mean_agree"] == 9.0
    with pytest.raises(ValueError, match="at least one model"):
        families.passkey_side({})

    import matplotlib

    matplotlib.use("Agg")
    from kvlab.study import plots

    fig = plots.families_end_metrics_plot(pk, gr)
    assert len(fig.axes) == 4 and fig.axes[2].get_title().startswith("two: passkey")


def test_shared_names_line_up_per_model_calibrations():
    a, b = "kvquantc:bits=3,calib=afbc119959918a8e", "kvquantc:bits=3,calib=5329f3585f95ec39,outlier_frac=0.02"
    assert families.shared_name(a) == "kvquantc:bits=3" and families.shared_name(b) == "kvquantc:bits=3,outlier_frac=0.02"
    assert families.shared_name("kv=q4_0;recent=8;old=q8_0") == "kv=q4_0;recent=8;old=q8_0"
    rows = pd.DataFrame({"config": [a, "q4_0"], "policy": [a, "q4_0"]})
    out = families.shared_names(rows)
    assert out.config.tolist() == ["kvquantc:bits=3", "q4_0"] and out.policy.iloc[0] == a and rows.config.iloc[0] == a
    assert not study.is_oracle("kvquantc:bits=3")  # the shared name still parses as the causal scheme


def test_findings_verdict_keeps_a_single_miss_out_of_the_hold_list():
    f = pd.DataFrame({"finding": ["a", "b", "c"], "across models": ["holds on both", "holds on neither",
                                                                   "holds on both (logits KL)"]})
    text = families.findings_verdict(f)
    held, rest = text.split("\n\n")
    assert held == "**Hold on both models:** a; c (logits KL)." and "nan" not in text
    assert rest == "**Do not hold on both (or are not decided):** b (holds on neither)."
