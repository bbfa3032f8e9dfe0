"""Every notebook executes headless with papermill in smoke mode and records its metrics."""

from __future__ import annotations

import json
import math

import pytest

from kvlab.study.runner import notebooks, run_notebooks


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("smoke")
    params = {"smoke": True, "data_dir": data_dir, "fig_dir": str(out / "figures"),
              "results_dir": str(out / "results"), "out_dir": str(out / "metrics")}
    paths = run_notebooks(out_dir=out / "executed", parameters=params, progress=False)
    with pytest.MonkeyPatch.context() as mp:  # the notebooks calibrate kvquantc beside their results folder
        mp.setenv("KVLAB_CALIBRATION_DIR", str(out / "calibration"))
        yield out, paths


def _stored_summary(out, m, shared=False):
    """The summary of the stored per-window rows of the windows a notebook's metrics ``m`` came from: the set
    of windows (tokens_sha256) at its ctx that holds every config of its delta_ppl (the shared smoke results
    folder holds other notebooks' windows too)."""
    import pandas as pd

    from kvlab.study import analysis as study

    ppl = pd.read_csv(out / "results" / "ppl.csv")
    if shared:  # notebook 07 names a per-model calibrated scheme without its calibration id
        from kvlab.study.families import shared_names

        ppl = shared_names(ppl)
    ppl = ppl[(ppl.ctx == m["ctx"]) & ppl.config.isin(m["delta_ppl"])]
    tokens = [t for t, g in ppl.groupby("tokens_sha256") if set(m["delta_ppl"]) <= set(g.config)]
    assert tokens, "no stored window set holds every config of the metrics"
    return study.summarize(ppl[ppl.tokens_sha256 == tokens[0]], seed=0).set_index("config")


def _metrics(out, name):
    return json.loads((out / "metrics" / f"{name}.metrics.json").read_text())


@pytest.mark.slow
def test_every_notebook_executed(smoke):
    out, paths = smoke
    assert [p.name for p in paths] == [p.name for p in notebooks()]
    assert len(paths) >= 4
    assert len(list((out / "figures").glob("*.png"))) >= 5


@pytest.mark.slow
def test_01_metrics(smoke):
    m = _metrics(smoke[0], "01_dump_tensors")
    assert m["corpus"] == "wikitext-2-v1"
    assert m["outlier_ratio_k_pre"] > 1 and m["outlier_ratio_v"] > 1 and m["kurtosis_v"] > 0


@pytest.mark.slow
def test_02_metrics(smoke):
    m = _metrics(smoke[0], "02_error_heatmaps")
    assert len(m["worst_heads"]) == 6
    assert all(0 < v <= 1 for v in m["k_share_worst"].values())
    assert m["mixed_bytes_per_token_4096"] > m["base_bytes_per_token_4096"]
    assert m["bytes_per_token_4096"]["fp16"] > m["bytes_per_token_4096"]["q4_0"]


@pytest.mark.slow
def test_03_metrics(smoke):
    m = _metrics(smoke[0], "03_cosine_vs_perplexity")
    assert m["n_configs"] >= 4 and m["delta_ppl"]["fp16"] == 0
    assert all(-1 <= v <= 1 for v in m["spearman"].values() if v is not None and not math.isnan(v))
    # discordance carries its denominators, over the causal configs only
    n = m["n_configs"] - len(m["oracle_configs"])
    for d in m["discordance"].values():
        assert d["pairs"] == n * (n - 1) // 2 and d["compared"] + d["tied"] == d["significant"] <= d["pairs"]
        assert d["discordant"] <= d["compared"]
    assert set(m["spearman_near_lossless"]) == set(m["spearman"])


    s = _stored_summary(smoke[0], m)  # the saved figures are the analysis of the stored rows
    assert set(s.index) == set(m["delta_ppl"])
    for c, d in m["delta_ppl"].items():
        assert s.at[c, "delta_ppl"] == pytest.approx(d, rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_04_metrics(smoke):
    m = _metrics(smoke[0], "04_negative_result")
    assert 2.5 < m["truncate_mse_ratio_8bit"] < 6  # truncation: ~4x the MSE of rounding
    assert m["bits_per_value"]["signmag:v=1"] < 2
    from kvlab.study.analysis import is_oracle

    assert not any(is_oracle(c) for c in m["pareto_front"])  # the front of causal configs
    assert 0 <= m["cosine_twins_overrated"] <= m["cosine_twins_better"] <= m["cosine_twins"]
    # the saved figures are those of the analysis functions on the run's stored per-window rows
    import pandas as pd

    from kvlab.evaluation import retrieval
    from kvlab.study.claims import VERDICTS

    res = smoke[0] / "results"
    s = _stored_summary(smoke[0], m)
    for c, d in m["delta_ppl"].items():
        assert s.at[c, "delta_ppl"] == pytest.approx(d, rel=1e-9, abs=1e-12)
    pk = retrieval.passkey_summary(pd.concat([pd.read_csv(f) for f in (res / "passkey").glob("*.csv")]))
    assert {(r.policy, r.length, r.correct, r.trials) for r in pk.itertuples()} == \
        {(r["policy"], r["length"], r["correct"], r["trials"]) for r in m["passkey"]}
    runs = [pd.read_csv(f) for f in (res / "greedy").glob("*.csv")]
    g = retrieval.greedy_summary(pd.concat([r for r in runs if "agree" in r]), seed=0).set_index("policy")
    for r in m["greedy"]:
        assert g.at[r["policy"], "mean_agree"] == pytest.approx(r["mean_agree"])
    assert m["claims"] and {c["verdict"] for c in m["claims"]} <= set(VERDICTS)
    assert m["sample"] in ("first", "spread") and m["error_windows"] >= 1


@pytest.mark.slow
def test_07_metrics(smoke):
    """07 (both labels on the embedded model in smoke mode): its delta PPLs are the stored rows' and its
    findings carry a label for every finding."""
    m = _metrics(smoke[0], "07_two_families")
    assert len(m["labels"]) == 2 and "fp16" in m["configs"]
    assert "kvquantc:bits=3" in m["configs"]  # each model's own calibration, one shared row
    for label in m["labels"]:
        s = _stored_summary(smoke[0], {"ctx": m["ctx"], "delta_ppl": m["delta_ppl"][label]}, shared=True)
        for c, d in m["delta_ppl"][label].items():
            assert s.at[c, "delta_ppl"] == pytest.approx(d, rel=1e-9, abs=1e-12)
    assert m["ranking_spearman"] == pytest.approx(1.0)  # the same model twice orders the configs alike
    assert all(r["across models"] for r in m["findings"]) and len(m["findings"]) >= 4
    a, b = (m["discordance"][label] for label in m["labels"])  # the same model twice: the same counts
    assert a == b and all(d["discordant"] <= d["compared"] <= d["significant"] <= d["pairs"] for d in a.values())
    # the end metrics per model are those of the stored rows, and the claims carry a verdict per model
    import pandas as pd

    from kvlab.evaluation import retrieval
    from kvlab.study.claims import VERDICTS

    res = smoke[0] / "results"
    pk = retrieval.passkey_summary(pd.concat([pd.read_csv(f) for f in (res / "passkey").glob("*.csv")]))
    stored = {(r.policy, r.length, r.correct, r.trials) for r in pk.itertuples()}
    runs = [pd.read_csv(f) for f in (res / "greedy").glob("*.csv")]
    g = retrieval.greedy_summary(pd.concat([r for r in runs if "agree" in r]), seed=0).set_index("policy")
    for label in m["labels"]:
        assert m["passkey"][label] and {(r["policy"], r["length"], r["correct"], r["trials"])
                                        for r in m["passkey"][label]} <= stored
        for r in m["greedy"][label]:
            assert g.at[r["policy"], "mean_agree"] == pytest.approx(r["mean_agree"])
    assert len(m["claims"]) >= 4
    for c in m["claims"]:  # the same model twice: the same verdict on both
        verdicts = {c[f"{label} verdict"] for label in m["labels"]}
        assert len(verdicts) == 1 and verdicts <= set(VERDICTS) and c["across models"].endswith(" on both")
