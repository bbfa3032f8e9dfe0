"""kvlab.evaluation.evaluate: a policy is parsed once, at the public function, and passed down as an object."""

from __future__ import annotations

import pytest

from kvlab.evaluation.evaluate import scheme_report
from kvlab.quant import policy as P


def test_scheme_report_parses_each_policy_once(model, tokenizer, monkeypatch):
    made = []
    original = P.Policy.__post_init__

    def counting(self):
        made.append(self.spec if hasattr(self, "k") else None)
        original(self)

    monkeypatch.setattr(P.Policy, "__post_init__", counting)
    r = scheme_report(model=model, tokenizer=tokenizer, corpus="pydoc", ctx=32, windows=1,
                      policy="kv=q4_0;keep_first=1", progress=False)
    assert r["scheme"].startswith("k=q4_0") or "q4_0" in r["scheme"]
    # one Policy for the scheme (emulation, hooks and checks all receive that object) and one for the
    # fp16 reference: no layer below re-parses the string
    assert len(made) == 2, made


def test_a_policy_object_passes_through_unparsed():
    p = P.parse_policy("kv=q8_0;keep_last=1")
    assert P.parse_policy(p) is p
    with pytest.raises(ValueError, match="policy spec must be a non-empty string"):
        P.parse_policy(3)


def test_base_logprobs_spill_to_a_folder_and_are_read_back(model, tokenizer, tmp_path, monkeypatch):
    """Log-probs that do not fit in memory go to $KVLAB_BASE_LOGPROBS_DIR once, and a later config (or
    process) reads them instead of repeating the unmodified forward; the KL is the same either way."""
    import torch

    from kvlab.evaluation import evaluate as E

    _, w = E.load_windows(tokenizer, "pydoc", 32, 2)
    monkeypatch.setattr(E, "_BASE_LOGPROBS", {})
    monkeypatch.setattr(E, "_BASE_CACHE_BYTES", 0)  # nothing fits in memory
    monkeypatch.delenv(E.BASE_LOGPROBS_DIR_ENV, raising=False)
    plain = E.evaluate_policy(model, w, "q4_0", progress=False)["window_kl"]
    monkeypatch.setenv(E.BASE_LOGPROBS_DIR_ENV, str(tmp_path / "lp"))
    first = E.evaluate_policy(model, w, "q4_0", progress=False)["window_kl"]
    files = sorted((tmp_path / "lp").glob("*.safetensors"))
    assert len(files) == 2 and all(f.name.endswith(f"-w{i}.safetensors") for i, f in enumerate(files))
    assert first == pytest.approx(plain, rel=1e-12, abs=1e-15)
    calls = []
    original = E._spilled

    def no_compute(path, compute):
        calls.append(path)
        return original(path, lambda: pytest.fail("the unmodified forward ran again"))

    monkeypatch.setattr(E, "_spilled", no_compute)
    again = E.evaluate_policy(model, w, "q4_0", progress=False)["window_kl"]
    assert len(calls) == 2 and again == first
    files[0].write_bytes(b"not safetensors")  # a damaged file is recomputed, with a warning
    monkeypatch.setattr(E, "_spilled", original)
    with pytest.warns(UserWarning, match="unreadable"):
        assert E.evaluate_policy(model, w, "q4_0", progress=False)["window_kl"] == first
    assert torch.isfinite(torch.tensor(first)).all()


def test_error_table_skips_the_lm_head_and_measures_the_same(model, tokenizer):
    """The error tables run the decoder without its LM head (a 262k vocabulary's head is most of a small
    model's forward); the rows equal those of measuring a full forward."""
    import pandas as pd
    import torch

    from kvlab.emulation import hooks
    from kvlab.evaluation import evaluate as E

    _, w = E.load_windows(tokenizer, "pydoc", 32, 2)
    assert model.base_model is not model
    got = E.error_table(model, w, "q4_0", progress=False, per_window=True)
    with hooks.measure(model, "q4_0") as rows, torch.no_grad():
        for i in range(w.shape[0]):
            start = len(rows)
            model(input_ids=w[i : i + 1], use_cache=False)
            for r in rows[start:]:
                r["window"] = i
    want = pd.DataFrame(list(rows)).groupby(["window", "layer", "head"], as_index=False).mean()
    pd.testing.assert_frame_equal(got, want[got.columns], check_exact=True)


@pytest.mark.parametrize("scale", [1e-3, 0.1, 3.0])
def test_window_scores_match_the_direct_float64_formulas(scale):
    """NLL and KL from one log-sum-exp and one dot product per position (with the base's p, sum p log p and
    sum p) agree with log_softmax in float64, for perturbations from near-lossless to broken."""
    import torch

    from kvlab.evaluation import evaluate as E
    from kvlab.evaluation.ppl import nll_per_window

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 37, 3000, generator=g) * 4
    logits = base + scale * torch.randn(1, 37, 3000, generator=g)
    ids = torch.randint(0, 3000, (1, 37), generator=g)
    lp = torch.log_softmax(base, -1)
    nll, kl = E._window_scores(logits, ids, E._base_stats(lp))
    lpd, lq = lp.double(), torch.log_softmax(logits.double(), -1)
    want_kl = float((lpd.exp() * (lpd - lq)).sum(-1).clamp_min(0).mean())
    assert nll == pytest.approx(float(nll_per_window(logits, ids)[0]), rel=1e-13)
    assert kl == pytest.approx(want_kl, rel=1e-5)  # p is held in float32 (relative 6e-8 a value)
    assert E._window_scores(logits, ids)[1] is None
