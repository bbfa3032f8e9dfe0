"""Seed-claim verdicts (kvlab.study.claims) on hand-made per-window tables: each rule gives each verdict
when, and only when, its figures say so."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kvlab.study import analysis as study
from kvlab.study import claims

N = 24


def _ppl(shifts: dict[str, tuple[float, float]], bits: dict[str, float] | None = None, seed: int = 0) -> pd.DataFrame:
    """Per-window NLL rows: fp16 at log(10) plus noise shared by every config (the window's difficulty),
    each config shifted by ``mean`` with its own noise of scale ``sd``."""
    rng = np.random.default_rng(seed)
    base = np.log(10) + 0.05 * rng.standard_normal(N)
    rows = []
    for c, (mean, sd) in {"fp16": (0.0, 0.0), **shifts}.items():
        nll = base + mean + sd * rng.standard_normal(N)
        b = (bits or {}).get(c, 16.0 if c == "fp16" else 4.0)
        rows += [{"key": c, "config": c, "window": i, "nll": float(x), "kl": 0.0, "bits_per_value": b,
                  "bytes_per_token_4096": b, "tokens_sha256": "t"} for i, x in enumerate(nll)]
    return pd.DataFrame(rows)


def _errors(configs: dict[str, list[float]]) -> pd.DataFrame:
    """Per-window head errors: configs -> K MSE per head (V MSE one tenth, NMSE = MSE)."""
    rows = []
    for c, ks in configs.items():
        for w in range(2):
            for h, k in enumerate(ks):
                rows.append({"config": c, "window": w, "layer": h // 3, "head": h % 3, "k_mse": k, "v_mse": k / 10,
                             "k_nmse": k, "v_nmse": k / 2})
    return pd.DataFrame(rows)


def test_kv_split_needs_the_claimed_factor():
    ppl = _ppl({"k=q4_0;v=fp16": (0.05, 0.002), "k=fp16;v=q4_0": (0.005, 0.002)})
    s = study.summarize(ppl)
    e = _errors({"q4_0": [1.0] * 6})
    r = claims.kv_split(s, ppl, e, "k=q4_0;v=fp16", "k=fp16;v=q4_0", "q4_0", claimed=5)
    assert r["verdict"] == "confirmed" and "NMSE ratio 2.00" in r["measured"] and "MSE ratio 10.0" in r["measured"]
    r = claims.kv_split(s, ppl, e, "k=q4_0;v=fp16", "k=fp16;v=q4_0", "q4_0", claimed=50)
    assert r["verdict"] == "refuted" and "not 50x" in r["why"] and "NMSE 2.00x" in r["why"]
    same = _ppl({"k=q4_0;v=fp16": (0.0, 0.01), "k=fp16;v=q4_0": (0.0, 0.01)})
    r = claims.kv_split(study.summarize(same), same, e, "k=q4_0;v=fp16", "k=fp16;v=q4_0", "q4_0")
    assert r["verdict"] == "refuted" and "no significant difference" in r["why"]


def test_head_concentration_is_judged_against_fp16_casting():
    spread = [1.0] * 30
    peaked = [100.0] * 3 + [1.0] * 27
    e = _errors({"fp16": spread, "int:bits=2,group=32": peaked})
    r = claims.head_concentration(e, "int:bits=2,group=32", 3)
    assert r["verdict"] == "confirmed" and "91.7%" in r["measured"]
    e = _errors({"fp16": peaked, "int:bits=2,group=32": peaked})  # concentrated, but as fp16 casting is
    assert claims.head_concentration(e, "int:bits=2,group=32", 3)["verdict"] == "refuted"
    e = _errors({"fp16": spread, "int:bits=2,group=32": spread})
    assert claims.head_concentration(e, "int:bits=2,group=32", 3)["verdict"] == "refuted"


def test_outlier_heads_and_recency():
    pol = "kv=int:bits=4,group=32;keep_k_heads=0.0;keep=fp16"
    ppl = _ppl({"int:bits=4,group=32": (0.05, 0.002), pol: (0.01, 0.002)}, bits={pol: 4.6})
    s = study.summarize(ppl)
    r = claims.outlier_heads(s, ppl, "int:bits=4,group=32", pol)
    assert r["verdict"] == "confirmed" and "+0.6 bits" in r["why"]
    ppl = _ppl({"int:bits=4,group=32": (0.05, 0.002), pol: (0.045, 0.002)}, bits={pol: 4.6})
    r = claims.outlier_heads(study.summarize(ppl), ppl, "int:bits=4,group=32", pol)
    assert r["verdict"] == "refuted" and "significantly better" in r["why"] and "rule: >= 50%" in r["why"]
    ppl = _ppl({"int:bits=4,group=32": (0.05, 0.002), pol: (0.05, 0.002)}, bits={pol: 4.6})
    assert claims.outlier_heads(study.summarize(ppl), ppl, "int:bits=4,group=32", pol)["verdict"] == "refuted"
    ppl = _ppl({"int:bits=8": (0.0, 0.001), "kv=int:bits=8;keep_k_heads=0.0;keep=fp16": (0.0, 0.001)})
    r = claims.outlier_heads(study.summarize(ppl), ppl, "int:bits=8", "kv=int:bits=8;keep_k_heads=0.0;keep=fp16")
    assert r["verdict"] == "untestable here"

    rec = "kv=int:bits=4,group=32;recent=1024;old=int:bits=2,group=32"
    for shift, verdict in ((0.01, "confirmed"), (0.1, "refuted"), (0.05, "not reproduced here")):
        ppl = _ppl({"int:bits=3,group=32": (0.05, 0.001), rec: (shift, 0.001)},
                   bits={rec: 3.5, "int:bits=3,group=32": 3.5})
        assert claims.recency_allocation(study.summarize(ppl), ppl, rec, "int:bits=3,group=32")["verdict"] == verdict
    ppl = _ppl({"int:bits=3,group=32": (0.05, 0.001), rec: (0.0, 0.001)}, bits={rec: 3.6, "int:bits=3,group=32": 3.5})
    with pytest.raises(ValueError, match="more than uniform"):
        claims.recency_allocation(study.summarize(ppl), ppl, rec, "int:bits=3,group=32")


def test_oracles_are_refused_and_small_loss_rule():
    ppl = _ppl({"kvquant:bits=2": (0.1, 0.001), "kivi:bits=2": (0.1, 0.001)})
    with pytest.raises(ValueError, match="oracle"):
        claims.paired(ppl, "kvquant:bits=2", "kivi:bits=2")
    s = study.summarize(ppl)  # kivi:bits=2 costs exp(0.1) - 1 = 10.5% of fp16's PPL
    assert claims.small_loss(s, "kivi:bits=2", small=0.02)["verdict"] == "refuted"
    assert claims.small_loss(s, "kivi:bits=2", small=0.2)["verdict"] == "confirmed"
    assert claims.lossless_ratio({"k": 1.17, "v": 1.20}, (1.26, 1.36))["verdict"] == "not reproduced here"
    assert claims.lossless_ratio({"k": 1.17, "v": 1.30}, (1.26, 1.36))["verdict"] == "confirmed"
    m = pd.DataFrame({"rival": ["q4_0", "kivi:bits=2", "int:bits=2,group=32", "q8_0"],
                      "verdict": ["rival better", "rival better", "challenger better", "CIs overlap"]})
    assert claims.matched_bits_claim(m.iloc[:3])["verdict"] == "refuted"  # 2 of 3
    r = claims.matched_bits_claim(m)  # 2 of 4: not most
    assert r["verdict"] == "not reproduced here" and "(against `int:bits=2,group=32`)" in r["measured"]
    assert claims.matched_bits_claim(m.iloc[2:3])["verdict"] == "confirmed"
    t = claims.claims_table([claims.matched_bits_claim(m)])
    assert list(t.columns) == claims.COLUMNS and len(t) == 1


def test_markdown_table_escapes_pipes():
    t = pd.DataFrame({"a": ["x|y"], "b": ["two\nlines"]})
    assert claims.markdown(t) == "| a | b |\n| --- | --- |\n| x\\|y | two lines |"


def test_end_metrics_text_lists_one_config():
    pk = pd.DataFrame({"policy": ["fp16", "kivi:bits=2", "kivi:bits=2"], "length": [1024, 1024, 2048],
                       "trials": 20, "correct": [19, 8, 7]})
    gr = pd.DataFrame({"policy": ["kivi:bits=2"], "mean_agree": [6.25], "ci_lo": [2.06], "ci_hi": [12.1],
                       "new_tokens": [64]})
    assert claims.end_metrics_text(pk, gr, "kivi:bits=2") == \
        "passkey 8/20 at 1024; passkey 7/20 at 2048; greedy agreement 6.2 [2.1, 12.1] of 64 tokens"
