"""kvlab.model.loading: the embedded GGUF model, and clear errors for missing or foreign files."""

from __future__ import annotations

import pytest
import torch

import kvlab


def test_embedded_model_loads_and_gives_finite_logits(model, tokenizer):
    ids = torch.tensor([tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_missing_gguf_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        kvlab.load_model(str(tmp_path / "nope.gguf"))


def test_offline_unknown_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        kvlab.load_model("no-such-org/no-such-model")


def test_non_gguf_file_is_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        kvlab.load_model(str(f))
