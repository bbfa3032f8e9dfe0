"""make_windows(sample="spread"): seeded windows drawn across the whole split, one per stratum."""

from __future__ import annotations

import pytest
import torch

from kvlab.evaluation.ppl import make_windows


def test_first_is_the_default_and_unchanged():
    ids = torch.arange(1000)
    assert torch.equal(make_windows(ids, 10, 4), ids[:40].reshape(4, 10))
    assert torch.equal(make_windows(ids, 10, 4, sample="first", seed=3), make_windows(ids, 10, 4))


def test_spread_covers_the_split_one_window_per_stratum():
    ids = torch.arange(1000)  # 100 slots of 10 tokens; 8 strata of 12 or 13 slots
    w = make_windows(ids, 10, 8, sample="spread", seed=0)
    assert w.shape == (8, 10)
    slot = (w[:, 0] // 10).tolist()
    assert all((w[i] == torch.arange(slot[i] * 10, slot[i] * 10 + 10)).all() for i in range(8))  # whole slots
    edges = [i * 100 // 8 for i in range(9)]
    assert all(edges[i] <= slot[i] < edges[i + 1] for i in range(8))  # one per stratum, in corpus order
    assert slot[-1] >= 87  # reaches the end of the split, unlike the first 8
    assert torch.equal(w, make_windows(ids, 10, 8, sample="spread", seed=0))  # seeded
    assert not torch.equal(w, make_windows(ids, 10, 8, sample="spread", seed=1))


def test_spread_with_bos_and_every_slot():
    ids = torch.arange(10, 100)
    w = make_windows(ids, 5, 3, bos=2, sample="spread", seed=4)  # 22 slots of 4 text tokens
    assert w.shape == (3, 5) and (w[:, 0] == 2).all()
    assert torch.equal(make_windows(torch.arange(40), 10, 4, sample="spread"), torch.arange(40).reshape(4, 10))
    with pytest.raises(ValueError, match="sample='random'"):
        make_windows(ids, 5, 3, sample="random")


def test_load_windows_spread_draws_across_the_whole_corpus(tokenizer):
    """load_windows(sample="spread") tokenizes the whole split (not a prefix) and draws from all of it."""
    from kvlab.evaluation.corpus import load_corpus
    from kvlab.evaluation.evaluate import load_windows
    from kvlab.evaluation.ppl import tokenize

    ids = tokenize(tokenizer, load_corpus("pydoc"))
    _, first = load_windows(tokenizer, "pydoc", ctx=64, windows=6)
    _, spread = load_windows(tokenizer, "pydoc", ctx=64, windows=6, sample="spread", seed=3)
    assert torch.equal(first, ids[: 6 * 64].reshape(6, 64))
    slots = ids[: ids.numel() // 64 * 64].reshape(-1, 64)
    where = [int((slots == row).all(1).nonzero()[0]) for row in spread]
    assert where == sorted(where) and where[-1] >= slots.shape[0] * 5 // 6  # the last stratum is reached
    _, again = load_windows(tokenizer, "pydoc", ctx=64, windows=6, sample="spread", seed=3)
    assert torch.equal(spread, again)
    with pytest.raises(ValueError, match="sample='random' is not allowed; allowed: first, spread"):
        load_windows(tokenizer, "pydoc", ctx=64, windows=6, sample="random")
