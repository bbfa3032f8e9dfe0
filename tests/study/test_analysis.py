"""The study's verdict functions on small hand-made summaries (no model)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kvlab.study import analysis as study


def _summary(rows):
    """rows: (config, bits, delta, ci half-width); fp16 PPL 10."""
    df = pd.DataFrame([{"config": c, "family": study.family(c), "oracle": study.is_oracle(c), "bits_per_value": b,
                        "delta_ppl": d, "ci_lo": d - w, "ci_hi": d + w, "ppl": 10 + d} for c, b, d, w in rows])
    return df


def _verdict(df):
    matched = study.matched_bits(df, "signmag", ["kivi", "q4_0", "int"])
    return study.thesis_verdict(df, matched, study.pareto_front(df)), matched


def test_pareto_front():
    df = _summary([("fp16", 16, 0, 0), ("q4_0", 4.5, 2, 0.5), ("signmag:v=4", 4, 20, 5), ("int:bits=8", 8.25, 0.1, 0.1),
                   ("kivi:bits=4", 7.75, 0.5, 0.2)])
    assert list(study.pareto_front(df)["config"]) == ["signmag:v=4", "q4_0", "kivi:bits=4", "int:bits=8", "fp16"]


def test_pareto_front_needs_separated_cis():
    # b has more bits and a higher delta than a, but inside a's noise: not dominated; c's CI is above a's
    df = _summary([("q4_0", 4, 1.0, 0.5), ("q5_0", 5, 1.1, 0.5), ("q8_0", 6, 3.0, 0.2)])
    assert list(study.pareto_front(df)["config"]) == ["q4_0", "q5_0"]
    # an oracle is no competitor unless asked for
    df = pd.concat([df, _summary([("kvquant:bits=2", 3, 0.1, 0.05)])], ignore_index=True)
    assert list(study.pareto_front(df)["config"]) == ["q4_0", "q5_0"]
    assert list(study.pareto_front(df, causal_only=False)["config"]) == ["kvquant:bits=2"]
    df = df[df.config != "kvquant:bits=2"]
    # no CI columns: the point values decide
    assert list(study.pareto_front(df.drop(columns=["ci_lo", "ci_hi"]))["config"]) == ["q4_0"]


def test_matched_bits_never_gives_the_rival_an_extra_bit():
    df = _summary([("signmag:v=4", 4.5, 20, 5), ("q4_0", 4.5, 2, 0.5), ("kivi:bits=2", 4.75, 1, 0.5),
                   ("int:bits=3,group=32", 3.5, 50, 5), ("int:bits=2,group=32", 3.0, 1000, 1),
                   ("kvquant:bits=4", 4.25, 0.1, 0.05)])
    m = study.matched_bits(df, "signmag", ["kivi", "q4_0", "int", "kvquant"])
    assert list(m["rival"]) == ["q4_0", "int:bits=3,group=32"]  # kivi: 0.25 bits more; int2: 1.5 fewer
    assert list(m["verdict"]) == ["rival better", "challenger better"]
    # the oracle kvquant only when asked for
    m = study.matched_bits(df, "signmag", ["kvquant"], causal_only=False)
    assert list(m["rival"]) == ["kvquant:bits=4"]
    assert study.matched_bits(df, "signmag", ["kivi"], tolerance=2).empty


def test_thesis_supported_when_signmag_loses_everywhere():
    df = _summary([("fp16", 16, 0, 0), ("q4_0", 4.5, 2, 0.5), ("signmag:v=4", 4.6, 20, 5), ("kivi:bits=2", 4.2, 1, 0.5)])
    text, matched = _verdict(df)
    assert (matched["verdict"] == "rival better").all() and len(matched) == 2
    assert "**The data support the thesis**" in text
    assert "Pareto front: **none**" in text


def test_thesis_mostly_supported_names_the_rivals_signmag_beats():
    df = _summary([("fp16", 16, 0, 0), ("q4_0", 4.5, 2, 0.5), ("signmag:v=4", 4.5, 20, 5),
                   ("int:bits=2,group=32", 3.5, 1000, 100), ("signmag:v=1", 1.25, 5000, 1000)])
    text, matched = _verdict(df)
    assert sorted(matched["verdict"]) == ["challenger better", "rival better"]
    assert "**The data only partly support the thesis**" in text  # one win, one loss
    assert "wins only against `int:bits=2,group=32` (PPL 1010.0, 101.0x fp16's)" in text
    # a third loss (the oracle kvquant is no rival: causal configs only), signmag:v=4 off the front
    df = pd.concat([df, _summary([("int:bits=4,group=32", 4.5, 3, 0.5), ("kvquant:bits=3", 3.6, 1.5, 0.5)])],
                   ignore_index=True)
    text, _ = _verdict(df)
    assert "**The data mostly support the thesis**: sign+magnitude loses 2 of 3" in text


def test_thesis_contradicted_and_untested():
    df = _summary([("fp16", 16, 0, 0), ("q4_0", 4.5, 20, 0.5), ("signmag:v=4", 4.5, 2, 0.5)])
    text, _ = _verdict(df)
    assert "**The data contradict the thesis**" in text
    df = _summary([("fp16", 16, 0, 0), ("q4_0", 4.5, 2, 0.5), ("signmag:v=1", 1.25, 5000, 1000),
                   ("kivi:bits=2", 6.25, 1, 0.5)])
    text, matched = _verdict(df)
    assert matched.empty and "not tested here" in text


def test_oracle_flag_comes_from_the_quantizers():
    assert not study.is_oracle("kivi:bits=2") and not study.is_oracle("q4_0") and not study.is_oracle("fp16")
    assert study.is_oracle("kvquant:bits=2") and study.is_oracle("int:bits=8,group=global")
    assert study.is_oracle("int:bits=4,axis=channel,group=32")
    assert study.is_oracle("k=kivi:bits=2;v=int:bits=8,group=global")  # V alone makes it an oracle
    assert study.is_oracle("kv=q4_0;recent=64;old=kvquant:bits=2")
    t = pd.DataFrame({"config": ["fp16", "kvquant:bits=2", "kivi:bits=2"]})
    assert list(study.causal_only_rows(t)["config"]) == ["fp16", "kivi:bits=2"]
    assert len(study.causal_only_rows(t, causal_only=False)) == 3


# ---- synthetic per-window results: known PPL shifts, known proxy orderings ---------------------------
SHIFTS = {"fp16": 0.0, "int:bits=8": 0.0, "q8_0": 0.02, "kvquant:bits=2": 0.05, "q4_0": 0.1,
          "int:bits=2,group=32": 0.5}
BITS = {"fp16": 16, "int:bits=8": 8.25, "q8_0": 8.5, "kvquant:bits=2": 2.3, "q4_0": 4.5, "int:bits=2,group=32": 3.0}
PROXY = {  # error-like proxies per config
    "good": {"fp16": 0, "int:bits=8": 1e-4, "q8_0": 1e-2, "kvquant:bits=2": 5e-2, "q4_0": 1e-1,
             "int:bits=2,group=32": 1.0},
    "swap": {"fp16": 0, "int:bits=8": 1e-4, "q8_0": 1e-2, "kvquant:bits=2": 5e-2, "q4_0": 1.0,
             "int:bits=2,group=32": 1e-1},
    "tie": {"fp16": 0, "int:bits=8": 1e-4, "q8_0": 1e-2, "kvquant:bits=2": 1e-3, "q4_0": 1e-1,
            "int:bits=2,group=32": 0.105},
}


def _ppl(n_windows=16, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(3.0, 0.3, n_windows)
    rows = []
    for c, shift in SHIFTS.items():
        noise = rng.normal(0, 1e-5 if shift == 0 else 1e-3, n_windows) * (c != "fp16")
        if shift == 0:
            noise -= noise.mean()  # rounding noise: no shift at all, so the pair is never significant
        rows += [{"config": c, "key": c, "window": w, "nll": base[w] + shift + noise[w], "bits_per_value": BITS[c],
                  "bytes_per_token_4096": BITS[c] * 90, "kl": shift, "tokens_sha256": "t"} for w in range(n_windows)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def synth():
    ppl = _ppl()
    table = study.summarize(ppl, n_resamples=200)
    for name, vals in PROXY.items():
        table[name] = table["config"].map(vals)
    return ppl, table


def test_summary_rows_carry_the_oracle_flag(synth):
    _, table = synth
    assert table.set_index("config")["oracle"].to_dict() == {c: c == "kvquant:bits=2" for c in SHIFTS}


def test_adjust_pvalues():
    p = [0.01, 0.04, 0.03, 0.005]
    assert np.allclose(study.adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    assert np.allclose(study.adjust_pvalues(p, "bh"), [0.02, 0.04, 0.04, 0.02])
    with pytest.raises(ValueError, match="method='bonf'"):
        study.adjust_pvalues(p, "bonf")


def test_discordance_with_denominators_tolerance_and_causal_only(synth):
    ppl, table = synth
    d = study.discordance(table, ppl, ["good", "swap", "tie"]).set_index("proxy")
    # 5 causal configs: 10 pairs; fp16 vs int:bits=8 differ by rounding noise only: 9 significant
    assert (d["pairs"] == 10).all() and (d["significant"] == 9).all()
    assert d.loc["good", ["tied", "compared", "discordant"]].tolist() == [0, 9, 0]
    assert d.loc["swap", ["tied", "compared", "discordant"]].tolist() == [0, 9, 1]
    assert d.loc["tie", ["tied", "compared", "discordant"]].tolist() == [1, 8, 0]  # 0.1 vs 0.105: tied
    assert d.at["swap", "rate"] == pytest.approx(1 / 9) and d.at["swap", "rate_lo"] < 1 / 9 < d.at["swap", "rate_hi"]
    assert "holm over 10 pairs" in d.at["good", "rule"]
    # the oracle kvquant only when asked for: 15 pairs, and under "tie" it is discordant with q8_0
    d = study.discordance(table, ppl, ["tie"], causal_only=False).set_index("proxy")
    assert d.at["tie", "pairs"] == 15 and d.at["tie", "discordant"] == 1
    rows = study.discordant_pairs(table, ppl, "swap")
    assert rows[["proxy prefers", "over"]].values.tolist() == [["int:bits=2,group=32", "q4_0"]]
    assert study.discordant_pairs(table, ppl, "swap", tolerance=0.95).empty  # 0.1 vs 1.0: 90% apart


def test_spearman_ranges_near_lossless_and_bands():
    # 10 near-lossless configs the proxy orders backwards, 6 broken ones it orders right
    delta = np.r_[np.linspace(0.1, 2.0, 10), [10, 30, 100, 300, 1000, 3000]]
    proxy = np.r_[np.linspace(1.0, 0.1, 10), [2, 3, 4, 5, 6, 7]]
    bits = np.r_[np.full(10, 8.0), np.full(6, 2.0)]
    t = pd.DataFrame({"config": [f"q4_0:rotate={'none'}"] * 16, "oracle": False, "delta_ppl": delta, "p": proxy,
                      "bits_per_value": bits})
    r = study.spearman_ranges(t, ["p"], near_lossless=3, bands=((0, 3), (3, 5), (5, 9)), n_resamples=300)
    r = r.set_index("range")
    assert r.at["all", "n_configs"] == 16 and 0 < r.at["all", "spearman"] < 1
    assert r.at["delta_ppl <= 3", "n_configs"] == 10
    assert r.loc["delta_ppl <= 3", ["spearman", "spearman_lo", "spearman_hi"]].tolist() == pytest.approx([-1, -1, -1])
    assert r.at["bits [0, 3)", "spearman"] == pytest.approx(1.0)
    assert r.at["bits [3, 5)", "n_configs"] == 0 and np.isnan(r.at["bits [3, 5)", "spearman"])
    lo, s, hi = r.loc["all", ["spearman_lo", "spearman", "spearman_hi"]]
    assert lo <= s <= hi


def test_compare_proxies_is_paired():
    rng = np.random.default_rng(0)
    y = np.exp(rng.normal(0, 2, 30))
    t = pd.DataFrame({"config": ["q4_0"] * 30, "oracle": False, "delta_ppl": y,
                      "close": y * np.exp(rng.normal(0, 0.05, 30)), "noise": rng.random(30)})
    t["same"] = t["close"]
    c = study.compare_proxies(t, ["close", "noise", "same"], n_resamples=500).set_index(["proxy a", "proxy b"])
    assert c.at[("close", "noise"), "verdict"] == "close better" and c.at[("close", "noise"), "diff_lo"] > 0
    assert c.at[("close", "same"), "verdict"] == "not separated" and c.at[("close", "same"), "difference"] == 0
    assert c.at[("noise", "same"), "verdict"] == "same better"


def test_rank_correlations_leave_oracles_out(synth):
    _, table = synth
    t = table[table.config != "fp16"].assign(**{"1 - K cosine": lambda d: d["good"]})
    assert study.rank_correlations(t, n_resamples=50)["n_configs"].iloc[0] == 4
    assert study.rank_correlations(t, n_resamples=50, causal_only=False)["n_configs"].iloc[0] == 5


def test_twins_over_rate_only_when_the_cosine_says_no_better():
    # q4_0: nearer cosine, higher (better) than signmag:v=3's, and lower PPL: the cosine ranked them right.
    # kivi: twin of signmag:v=2 with a *lower* cosine yet lower PPL: over-rated.
    df = _summary([("signmag:v=3", 3.3, 20, 1), ("q4_0", 4.5, 2, 0.5), ("signmag:v=2", 2.2, 50, 1),
                   ("kivi:bits=2", 4.6, 5, 1), ("kvquant:bits=2", 2.3, 1, 0.1)])
    df["k_cos"] = df["config"].map({"signmag:v=3": 0.95, "q4_0": 0.96, "signmag:v=2": 0.90, "kivi:bits=2": 0.89,
                                    "kvquant:bits=2": 0.9001})
    t = study.cosine_twins(df, "signmag", "k_cos").set_index("config")
    assert t.at["signmag:v=3", "twin"] == "q4_0" and not t.at["signmag:v=3", "over-rated"]
    assert t.at["signmag:v=2", "twin"] == "kivi:bits=2" and t.at["signmag:v=2", "over-rated"]  # oracle skipped
    text = study.twins_verdict(t.reset_index(), "k_cos")
    assert "lower delta PPL (CIs apart) in **2** of 2" in text and "In **1** of those 2" in text
    assert "only in `signmag:v=2` (twin `kivi:bits=2`)" in text


def test_correlation_verdict_quotes_the_denominators(synth):
    ppl, table = synth
    corr = study.rank_correlations(table[table.config != "fp16"].assign(**{"1 - K cosine": table["swap"]}),
                                   n_resamples=50)
    rates = study.discordance(table, ppl, ["swap"])
    text = study.correlation_verdict(corr, study.discordant_pairs(table, ppl, "swap"), rates)
    assert "swap: 1 of 9 (11.1% [" in text and "of 9 significant pairs among 10" in text


def test_proxy_table_gives_every_proxy_a_ci_over_error_windows(synth):
    ppl, _ = synth
    summary = study.summarize(ppl, n_resamples=200)
    rng = np.random.default_rng(0)
    rows = []
    for c in SHIFTS:
        for w in range(6):
            for layer in range(2):
                e = PROXY["good"][c] * (1 + 0.2 * rng.standard_normal())
                rows.append({"config": c, "window": w, "layer": layer, "head": 0, "k_mse": e, "k_nmse": e,
                             "k_cos": 1 - e, "v_mse": e, "v_nmse": e, "v_cos": 1 - e, "attn_nmse": e,
                             "attn_cos": 1 - e, "attn_kl": e})
    errors = pd.DataFrame(rows)
    t = study.proxy_table(summary, errors, n_resamples=500).set_index("config")
    q = t.loc["q4_0"]
    assert q.error_windows == 6
    assert q["K MSE_lo"] < q["K MSE"] < q["K MSE_hi"]
    assert q["1 - K cosine"] == pytest.approx(q["K MSE"])  # 1 - (1 - e): the same numbers
    assert q["1 - K cosine_lo"] == pytest.approx(1 - q.k_cos_hi) and q["1 - K cosine_hi"] == pytest.approx(1 - q.k_cos_lo)
    assert q["logits KL_lo"] <= q["logits KL"] <= q["logits KL_hi"]  # from the ppl rows' per-window KL
    # one error window: the CI collapses onto the value
    one = study.proxy_table(summary, errors[errors.window == 0].drop(columns="window")).set_index("config")
    assert (one["K MSE_lo"] == one["K MSE"]).all() and (one["K MSE_hi"] == one["K MSE"]).all()


def test_head_tables_average_the_error_windows_first():
    """worst_heads, error_share and the heatmaps see one value per (layer, head): the mean over windows."""
    from kvlab.study import plots

    rows = [{"config": "q4_0", "window": w, "layer": la, "head": h,
             "k_nmse": (2 * la + h + 1) * (1 + w), "v_nmse": 1.0, "attn_nmse": 1.0, "k_mse": float(la == 1 and h == 0)}
            for w in range(2) for la in range(2) for h in range(2)]
    errors = pd.DataFrame(rows)
    assert len(study.head_means(errors, "q4_0")) == 4
    assert study.worst_heads(errors, "q4_0", 2) == [(1, 1), (1, 0)]  # no (layer, head) twice
    assert study.error_share(errors, "q4_0", 1) == 1.0
    fig = plots.error_heatmaps(errors, ["q4_0"])
    assert fig is not None


def test_passkey_against_the_reference_is_paired():
    trials = range(20)
    ref = [{"policy": "fp16", "length": 1024, "trial": t, "correct": True} for t in trials]
    lossy = [{"policy": "kivi:bits=2", "length": 1024, "trial": t, "correct": t >= 15} for t in trials]
    near = [{"policy": "q4_0", "length": 1024, "trial": t, "correct": t != 3} for t in trials]
    long = [{"policy": p, "length": 4096, "trial": t, "correct": t < 5} for p in ("fp16", "q4_0") for t in trials]
    six = [{"policy": "int:bits=4", "length": 1024, "trial": t, "correct": t >= 6} for t in trials]  # p = 0.031
    pk = pd.DataFrame(ref + lossy + near + long + six)
    vs = study.passkey_vs_reference(pk).set_index(["policy", "length"])
    assert vs.at[("kivi:bits=2", 1024), "lost"] == 15 and vs.at[("kivi:bits=2", 1024), "p"] < 1e-3
    assert vs.at[("q4_0", 1024), "lost"] == 1 and vs.at[("q4_0", 1024), "p"] == 1.0
    assert vs.at[("q4_0", 4096), "lost"] == 0 and vs.at[("q4_0", 4096), "p"] == 1.0
    greedy = pd.DataFrame({"policy": ["fp16", "kivi:bits=2", "q4_0", "q8_0", "int:bits=8"],
                           "mean_agree": [64, 5, 20, 50, 60], "new_tokens": 64})
    summary = pd.DataFrame({"config": ["fp16", "kivi:bits=2", "q4_0", "q8_0", "int:bits=8"],
                            "delta_ppl": [0, 3, 0.5, 0.05, 0.01]})
    text = study.end_metrics_verdict(pk, greedy, summary)
    assert "20/20 trials at 1024 tokens, 5/20 trials at 4096" in text and "below 80% at 4096" in text
    assert "`kivi:bits=2` at 1024 (5/20, p = " in text and "No significant loss: `q4_0` at 1024 (19/20)" in text
    assert vs.at[("int:bits=4", 1024), "p"] < 0.05  # significant alone, not after Holm over the 3 tests at 1024
    assert "Holm-adjusted over the 3 tests" in text and "`int:bits=4` at 1024 (14/20)" in text.split("No significant")[1]
    assert "`q4_0` at 4096" not in text  # lengths where fp16 fails are not judged, only reported
    assert "At those lengths, for the record: `q4_0` 5/20 at 4096." in text
    assert "Spearman 1.00" in text


def test_ci_checks_catch_a_control_and_compare_halves():
    rng = np.random.default_rng(0)
    base = np.log(10) + 0.05 * rng.standard_normal(24)
    rows = []
    for c, shift, sd in (("fp16", 0, 0), ("bf16", 0, 1e-4), ("q4_0", 0.02, 0.002), ("bad", 0.0, 0.0)):
        x = base + shift + sd * rng.standard_normal(24)
        if c == "bad":  # a shift only in the odd windows: the halves disagree
            x = base + np.where(np.arange(24) % 2, 0.05, 0.0)
        rows += [{"config": c, "window": i, "nll": v} for i, v in enumerate(x)]
    ppl = pd.DataFrame(rows)
    ctl, halves = study.ci_checks(ppl, controls=("bf16", "q4_0"))
    ctl = ctl.set_index("config")
    assert not ctl.at["bf16", "significant"] and ctl.at["bf16", "holds 0"]
    assert ctl.at["q4_0", "significant"] and not ctl.at["q4_0", "holds 0"]  # a real shift is caught
    h = halves.set_index("config")
    assert h.at["q4_0", "overlap"] and h.at["bf16", "overlap"] and not h.at["bad", "overlap"]
    with pytest.raises(ValueError, match="control 'fp8' is not in the rows"):
        study.ci_checks(ppl, controls=("fp8",))
