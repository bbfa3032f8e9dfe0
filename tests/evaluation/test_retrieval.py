"""Passkey retrieval and greedy agreement: haystack construction (deterministic, exact length, key at the
asked depth), the summaries' CIs on hand-made tables, and smoke runs on the embedded model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from kvlab.evaluation import retrieval


def test_passkey_trials_are_seeded_exact_length_and_place_the_key(tokenizer):
    trials = retrieval.passkey_trials(tokenizer, 300, 4, depths=(0.0, 0.5, 1.0), seed=0)
    again = retrieval.passkey_trials(tokenizer, 300, 4, depths=(0.0, 0.5, 1.0), seed=0)
    assert [t.key for t in trials] == [t.key for t in again]
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(trials, again))
    assert [t.key for t in retrieval.passkey_trials(tokenizer, 300, 4, seed=1)] != [t.key for t in trials]
    for t in trials:
        assert t.ids.numel() == 300 and 10_000 <= t.key < 100_000
        assert tokenizer.decode(t.ids[t.answer]).strip() == str(t.key)  # the answer is the last tokens
        assert tokenizer.decode(t.ids[t.needle_at:]).startswith(f"The pass key is {t.key}.")
    at = [t.needle_at for t in trials]
    assert at[0] < at[1] < at[2] and at[3] == at[0]  # depths cycle: 0, 0.5, 1, 0
    filler = " ".join(f"Sentence number {i} of the corpus." for i in range(200))
    t = retrieval.passkey_trials(tokenizer, 300, 1, seed=0, filler=filler)[0]
    assert t.ids.numel() == 300 and "Sentence number" in tokenizer.decode(t.ids)
    with pytest.raises(ValueError, match="length=40 leaves no room"):
        retrieval.passkey_trials(tokenizer, 40, 1)


def test_summaries_give_binomial_and_bootstrap_cis():
    df = pd.DataFrame({"policy": ["a"] * 20 + ["b"] * 20, "length": 1024, "correct": [True] * 20 + [True, False] * 10,
                       "tokens_correct": [6] * 20 + [6, 5] * 10, "n_answer_tokens": 6, "seconds": 1.0})
    s = retrieval.passkey_summary(df).set_index("policy")
    assert s.at["a", "accuracy"] == 1 and s.at["a", "ci_hi"] == 1 and 0.8 < s.at["a", "ci_lo"] < 0.9
    assert s.at["b", "accuracy"] == 0.5 and s.at["b", "ci_lo"] < 0.5 < s.at["b", "ci_hi"]
    assert s.at["a", "token_accuracy"] == 1 and s.at["b", "token_accuracy"] == pytest.approx(11 / 12)  # one token off
    g = pd.DataFrame({"policy": ["a"] * 4, "agree": [2, 4, 6, 64], "censored": [False] * 3 + [True], "new_tokens": 64})
    s = retrieval.greedy_summary(g, n_resamples=500)
    assert s["mean_agree"].iloc[0] == 19 and s["median_agree"].iloc[0] == 5 and s["never_diverged"].iloc[0] == 0.25
    assert 2 <= s["ci_lo"].iloc[0] < 19 < s["ci_hi"].iloc[0] <= 64


@pytest.mark.slow
def test_passkey_smoke(model, tokenizer):
    # 256 tokens keeps the test small (a 512-token trial takes ~20 s on 2 loaded cores)
    df = retrieval.passkey(model, tokenizer, policies=("fp16", "signmag:v=1"), lengths=(256,), trials=2,
                           depths=(0.2, 0.8), seed=0, progress=False)
    assert len(df) == 4 and set(df.columns) >= {"policy", "length", "trial", "key", "correct", "seconds"}
    fp = df[df.policy == "fp16"]
    assert fp["correct"].all()  # the embedded model retrieves a key from 256 tokens
    assert (df.groupby("trial")["key"].nunique() == 1).all()  # every policy sees the same haystacks
    again = retrieval.passkey(model, tokenizer, policies=("fp16",), lengths=(256,), trials=1, depths=(0.2, 0.8),
                              seed=0, progress=False)  # the first trial again: the same haystack, the same answer
    cols = ["key", "correct", "tokens_correct"]
    assert again[cols].to_dict("records") == fp[cols].head(1).to_dict("records")


@pytest.mark.slow
def test_greedy_agreement_smoke(model, tokenizer):
    text = "The history of the city begins in the early middle ages, when a small market town grew around"
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])[None]
    df = retrieval.greedy_agreement(model, ids, ["fp16", "signmag:v=1", "signmag:v=1"], new_tokens=6,
                                    progress=False)
    a = df["agree"].tolist()
    assert a[0] == 6  # the reference agrees with itself: teacher forcing = token-by-token greedy
    assert 0 <= a[1] < 6 and a[2] == a[1]  # a broken scheme diverges, the same way twice


@pytest.mark.slow
def test_end_metrics_are_stored_and_reused(model, tokenizer, tmp_path, monkeypatch):
    kw = dict(policies=("fp16", "signmag:v=1"), lengths=(200,), trials=2, depths=(0.2, 0.8), seed=0, progress=False)
    first = retrieval.passkey(model, tokenizer, out=tmp_path, **kw)
    files = sorted((tmp_path / "passkey").glob("*.csv"))
    assert len(files) == 2 and not list((tmp_path / "passkey").glob("*.lock"))  # one file per (policy, length)
    text = "The history of the city begins in the early middle ages, when a small market town grew around"
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])[None]
    g_first = retrieval.greedy_agreement(model, ids, ["fp16", "signmag:v=1"], new_tokens=5, progress=False,
                                         out=tmp_path)
    assert len(list((tmp_path / "greedy").glob("*.csv"))) == 3  # the reference continuation + two policies

    def no_model(*a, **k):
        raise AssertionError("a stored result was recomputed")

    monkeypatch.setattr(retrieval, "_argmax_from", no_model)
    monkeypatch.setattr(retrieval, "greedy_continuation", no_model)
    again = retrieval.passkey(model, tokenizer, out=tmp_path, **kw)
    cols = ["policy", "length", "trial", "key", "correct", "tokens_correct"]
    assert again[cols].to_dict("records") == first[cols].to_dict("records")
    g_again = retrieval.greedy_agreement(model, ids, ["fp16", "signmag:v=1"], new_tokens=5, progress=False,
                                         out=tmp_path)
    assert g_again["agree"].tolist() == g_first["agree"].tolist()
    with pytest.raises(AssertionError, match="recomputed"):  # other inputs (a new seed) are a new key
        retrieval.passkey(model, tokenizer, out=tmp_path, **{**kw, "seed": 1})
    monkeypatch.undo()
    files[0].write_text(files[0].read_text()[:-40])  # a truncated file is recomputed, not trusted
    with pytest.warns(UserWarning, match="recomputing"):
        fixed = retrieval.passkey(model, tokenizer, out=tmp_path, **kw)
    assert fixed[cols].to_dict("records") == first[cols].to_dict("records")


@pytest.mark.slow
def test_greedy_continuation_through_a_real_cache_matches_the_emulation(model, tokenizer):
    text = "The history of the city begins in the early middle ages, when a small market town grew around"
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    for policy in ("fp16", "q4_0"):
        a = retrieval.greedy_continuation(model, ids, 8, policy, emulation="prefill")
        b = retrieval.greedy_continuation(model, ids, 8, policy, emulation="decode")
        assert a.tolist() == b.tolist() and a.numel() == 8
    g = retrieval.greedy_agreement(model, ids[None], ["fp16"], new_tokens=8, progress=False,
                                   reference_emulation="decode")
    assert g["agree"].tolist() == [8]  # the reference generated by the cache, scored by the emulation
