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


# ---------------------------------------------------------------------------------------------------
# BOS: the first token of every window when the tokenizer adds one; context, never a target
# ---------------------------------------------------------------------------------------------------
class _BosTokenizer:
    """Encodes a character per token (ids 3..), with BOS id 2 in front when ``add_special_tokens``."""

    bos_token_id = 2

    def __init__(self, adds_bos: bool = True):
        self.adds_bos = adds_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + ord(c) % 50 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.adds_bos else []) + ids}


def test_smollm2_tokenizer_adds_no_bos(tokenizer):
    """The embedded model's tokenizer has a BOS token (<|im_start|>, id 1) but adds none when encoding, so
    ``auto`` resolves to no BOS and its windows (and stored results) are those of before the option."""
    assert tokenizer.bos_token_id == 1
    assert kvlab.resolve_bos(tokenizer, "auto") is None and kvlab.resolve_bos(tokenizer, "never") is None
    assert kvlab.resolve_bos(tokenizer, "always") == 1
    _, auto = load_windows(tokenizer, "pydoc", ctx=32, windows=2, bos="auto")
    _, never = load_windows(tokenizer, "pydoc", ctx=32, windows=2, bos="never")
    assert torch.equal(auto, never)


def test_resolve_bos_follows_the_tokenizer():
    assert kvlab.resolve_bos(_BosTokenizer(), "auto") == 2
    assert kvlab.resolve_bos(_BosTokenizer(adds_bos=False), "auto") is None
    assert kvlab.resolve_bos(_BosTokenizer(), "never") is None
    no_bos = _BosTokenizer(adds_bos=False)
    no_bos.bos_token_id = None
    with pytest.raises(ValueError, match="no BOS token"):
        kvlab.resolve_bos(no_bos, "always")
    with pytest.raises(ValueError, match="bos='yes' is not allowed; allowed: auto, always, never"):
        kvlab.resolve_bos(_BosTokenizer(), "yes")


def test_windows_with_bos_are_bos_then_ctx_minus_1_text_tokens():
    w = make_windows(torch.arange(10, 100), 5, 3, bos=2)
    assert w.tolist() == [[2, 10, 11, 12, 13], [2, 14, 15, 16, 17], [2, 18, 19, 20, 21]]
    with pytest.warns(UserWarning, match="only 2 windows"):
        assert make_windows(torch.arange(9), 5, 3, bos=2).shape == (2, 5)


def test_bos_is_context_never_a_target():
    """Every text token of a window is scored (ctx-1 targets, the first text token included, predicted from
    BOS), the BOS never."""
    w = make_windows(torch.randint(3, 10, (64,), generator=torch.Generator().manual_seed(0)), 16, 4, bos=2)
    nll = window_nll(_Uniform(10), w, progress=False)
    r = PplResult.from_nll(nll, w, model="u", corpus="c", bos="always", bos_token_id=2)
    assert r.ppl == pytest.approx(10.0, rel=1e-12) and r.n_tokens_scored == 4 * 15
    d = r.to_dict()
    assert d["bos"] == "always" and d["bos_token_id"] == 2 and d["window_layout"] == "BOS + ctx-1 text tokens"
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = 50.0  # BOS predicts text token 1 surely; the next predictions are uniform
    assert nll_per_window(logits, torch.tensor([[2, 1, 0]])).item() == pytest.approx(math.log(4) / 2, rel=1e-6)


def test_ppl_json_records_bos(tokenizer, capsys):
    from kvlab.cli import main

    assert main(["ppl", "--corpus", "pydoc", "--ctx", "16", "--windows", "2", "--bos", "always", "--json"]) == 0
    d = __import__("json").loads(capsys.readouterr().out)
    assert d["bos"] == "always" and d["bos_token_id"] == 1 and d["n_tokens_scored"] == 30
    assert d["window_layout"] == "BOS + ctx-1 text tokens"
    _, w = load_windows(tokenizer, "pydoc", ctx=16, windows=2, bos="always")
    assert d["tokens_sha256"] == tokens_sha256(w) and (w[:, 0] == 1).all()
