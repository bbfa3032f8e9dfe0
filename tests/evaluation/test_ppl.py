"""kvlab.evaluation.corpus and .ppl: corpora, windowing and the perplexity harness."""

from __future__ import annotations

import math

import pytest
import torch

import kvlab
from kvlab.evaluation.evaluate import load_windows
from kvlab.evaluation.ppl import PplResult, make_windows, nll_per_window, tokens_sha256, window_nll


def test_pydoc_corpus_is_offline_text():
    text = kvlab.load_corpus("pydoc")
    assert len(text) > 100_000 and "assert" in text


def test_wikitext_from_data_dir(data_dir):
    text = kvlab.load_corpus("wikitext-2-v1", data_dir=data_dir)
    assert text.startswith(" \n = Robert <unk> = \n")
    valid = kvlab.load_corpus("wikitext-2-v1", split="valid", data_dir=data_dir)
    assert valid != text and len(valid) > 1_000_000


def test_wikitext_from_env(data_dir, monkeypatch):
    monkeypatch.setenv("KVLAB_DATA_DIR", data_dir)
    assert "Robert <unk>" in kvlab.load_corpus("wikitext-2-v1")


def test_wikitext_offline_error_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.delenv("KVLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        kvlab.load_corpus("wikitext-2-raw-v1", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "--data-dir" in msg and "KVLAB_DATA_DIR" in msg and "hub" in msg
    assert str(tmp_path) in msg


def test_c4_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="c4"):
        kvlab.load_corpus("c4")


def test_text_file_corpus(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n", encoding="utf-8")
    assert kvlab.load_corpus(str(f)) == "hello world\n"


@pytest.mark.parametrize("bad, match", [("no-such-corpus", "unknown corpus"), ("", "corpus must be")])
def test_unknown_corpus(bad, match):
    with pytest.raises(ValueError, match=match):
        kvlab.load_corpus(bad)


def test_unreadable_corpus_file(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\xfa\x00\x81")
    with pytest.raises(ValueError, match="UTF-8"):
        kvlab.load_corpus(str(f))
    with pytest.raises(ValueError, match="folder"):
        kvlab.load_corpus(str(tmp_path))


def test_windows_are_non_overlapping_from_start():
    ids = torch.arange(100)
    w = make_windows(ids, 10, 3)
    assert w.tolist() == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]


def test_corpus_shorter_than_one_window():
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(torch.arange(5), 10, 1)


def test_more_windows_than_available_uses_what_exists():
    with pytest.warns(UserWarning, match="only 3 windows"):
        w = make_windows(torch.arange(35), 10, 8)
    assert w.shape == (3, 10)


@pytest.mark.parametrize("ctx, windows, match", [(1, 4, "ctx=1"), (0, 4, "ctx=0"), (8, 0, "windows=0")])
def test_bad_window_arguments(ctx, windows, match):
    with pytest.raises(ValueError, match=match):
        make_windows(torch.arange(100), ctx, windows)


def test_token_checksum_changes_with_tokens():
    a = make_windows(torch.arange(40), 10, 4)
    b = a.clone()
    b[3, 9] += 1
    assert tokens_sha256(a) == tokens_sha256(a.clone()) != tokens_sha256(b)


def test_nll_hand_checkable():
    # vocab of 2; uniform logits -> NLL log 2 per token; a sure logit -> ~0
    logits = torch.zeros(1, 3, 2)
    ids = torch.tensor([[0, 1, 0]])
    assert nll_per_window(logits, ids).item() == pytest.approx(math.log(2))
    logits2 = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0], [0.0, 0.0]]])
    # p(1 | pos0) = 3/4, p(0 | pos1) = 3/4 -> NLL = -log(3/4)
    assert nll_per_window(logits2, ids).item() == pytest.approx(-math.log(0.75))
    r = PplResult.from_nll(torch.tensor([math.log(2), math.log(8)], dtype=torch.float64),
                           torch.zeros(2, 3, dtype=torch.long), model="m", corpus="c")
    assert r.ppl == pytest.approx(4.0) and r.n_tokens_scored == 4


class _Uniform(torch.nn.Module):
    """A 'model' whose logits are uniform over V: its perplexity must be exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return type("O", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_window_nll_of_uniform_model_is_log_vocab():
    w = make_windows(torch.randint(0, 7, (64,), generator=torch.Generator().manual_seed(0)), 16, 4)
    nll = window_nll(_Uniform(7), w, progress=False)
    r = PplResult.from_nll(nll, w, model="u", corpus="c")
    assert r.ppl == pytest.approx(7.0, rel=1e-12)


def test_real_model_ppl_is_deterministic(model, tokenizer):
    name, w = load_windows(tokenizer, "pydoc", ctx=64, windows=2)
    a = window_nll(model, w, progress=False)
    b = window_nll(model, w, progress=False)
    assert torch.equal(a, b)
    assert 1.0 < math.exp(a.mean()) < 200
