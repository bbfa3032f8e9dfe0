"""The study's verdict functions on small hand-made summaries (no model)."""

from __future__ import annotations

import pandas as pd

from kvlab.study import analysis as study


def _summary(rows):
    """rows: (config, bits, delta, ci half-width); fp16 PPL 10."""
    df = pd.DataFrame([{"config": c, "family": study.family(c), "bits_per_value": b, "delta_ppl": d,
                        "ci_lo": d - w, "ci_hi": d + w, "ppl": 10 + d} for c, b, d, w in rows])
    return df


def _verdict(df):
    matched = study.matched_bits(df, "signmag", ["kivi", "q4_0", "int"])
    return study.thesis_verdict(df, matched, study.pareto_front(df)), matched


def test_pareto_front():
    df = _summary([("fp16", 16, 0, 0), ("q4_0", 4.5, 2, 0.5), ("signmag:v=4", 4, 20, 5), ("int:bits=8", 8.25, 0.1, 0.1),
                   ("kivi:bits=4", 7.75, 0.5, 0.2)])
    assert list(study.pareto_front(df)["config"]) == ["signmag:v=4", "q4_0", "kivi:bits=4", "int:bits=8", "fp16"]


def test_thesis_supported_when_signmag_loses_everywhere():
    df = _summary([("fp16", 16, 0, 0), ("q4_0", 4.5, 2, 0.5), ("signmag:v=4", 4, 20, 5), ("kivi:bits=2", 4.2, 1, 0.5)])
    text, matched = _verdict(df)
    assert (matched["verdict"] == "rival better").all() and len(matched) == 2
    assert "**The data support the thesis**" in text
    assert "front: `signmag:v=4` (only as the lowest-bits point measured" in text


def test_thesis_mostly_supported_names_the_rivals_signmag_beats():
    df = _summary([("fp16", 16, 0, 0), ("q4_0", 4.5, 2, 0.5), ("signmag:v=4", 4, 20, 5),
                   ("int:bits=2,group=32", 3.5, 1000, 100), ("signmag:v=1", 1.25, 5000, 1000)])
    text, matched = _verdict(df)
    assert sorted(matched["verdict"]) == ["challenger better", "rival better"]
    assert "**The data only partly support the thesis**" in text  # one win, one loss
    assert "wins only against `int:bits=2,group=32` (PPL 1010.0, 101.0x fp16's)" in text
    # a third loss, and signmag:v=4 dominated (kvquant-3: fewer bits, lower delta): off the front
    df = pd.concat([df, _summary([("int:bits=4,group=32", 4.5, 3, 0.5), ("kvquant:bits=3", 3.6, 1.5, 0.5)])],
                   ignore_index=True)
    text, _ = _verdict(df)
    assert "**The data mostly support the thesis**: sign+magnitude loses 2 of 3" in text


def test_thesis_contradicted_and_untested():
    df = _summary([("fp16", 16, 0, 0), ("q4_0", 4.5, 20, 0.5), ("signmag:v=4", 4, 2, 0.5)])
    text, _ = _verdict(df)
    assert "**The data contradict the thesis**" in text
    df = _summary([("fp16", 16, 0, 0), ("q4_0", 4.5, 2, 0.5), ("signmag:v=1", 1.25, 5000, 1000),
                   ("kivi:bits=2", 6.25, 1, 0.5)])
    text, matched = _verdict(df)
    assert matched.empty and "not tested here" in text
