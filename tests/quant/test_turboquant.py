"""kvlab.quant.turboquant: rotation + Lloyd-Max codebook (+ QJL sketch), in the zoo, the emulation and the cache."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import kvlab
import kvlab.quant as kq
from kvlab.quant.turboquant import sphere_codebook
from kvlab.storage.cache import CompressedCache, cache_kwarg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Lloyd-Max levels of N(0, 1) (Max, 1960): the sphere's coordinate law times sqrt(D) tends to it
GAUSS_LLOYD_MAX = {1: [0.7979], 2: [0.4528, 1.5104], 3: [0.2451, 0.7560, 1.3440, 2.1520]}
# MSE of a unit vector for D large: the Gaussian Lloyd-Max distortions (Max, 1960), which TurboQuant quotes
# rounded as 0.36, 0.117, 0.03, 0.009 for b = 1..4
PAPER_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_codebook_tends_to_gaussian_lloyd_max(bits):
    levels = sphere_codebook(4096, bits) * math.sqrt(4096)
    upper = levels[len(levels) // 2 :].tolist()
    assert levels.tolist() == sorted(levels.tolist())
    assert torch.allclose(levels, -levels.flip(0), atol=1e-9)  # symmetric
    assert upper == pytest.approx(GAUSS_LLOYD_MAX[bits], abs=2e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_matches_the_paper(bits):
    x = torch.randn(1, 4, 512, 128, generator=torch.Generator().manual_seed(bits))
    q = kq.get(f"turboquant:bits={bits}")
    unit = x / x.norm(dim=-1, keepdim=True)
    mse = ((q.roundtrip(unit) - unit) ** 2).sum(-1).mean().item()
    assert mse == pytest.approx(PAPER_MSE[bits], rel=0.05)


def test_error_shrinks_with_bits_and_the_input_law_does_not_matter():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(2, 2, 64, 64, generator=g)
    outliers = gauss.clone()
    outliers[..., 3] *= 40  # one K-like outlier channel: the rotation spreads it over every coordinate
    for x in (gauss, outliers):
        nmse = [((kq.get(f"turboquant:bits={b}").roundtrip(x) - x) ** 2).sum() / (x**2).sum() for b in (1, 2, 3, 4)]
        assert all(a > b for a, b in zip(nmse, nmse[1:])), nmse
    rel = lambda x, b: (((kq.get(f"turboquant:bits={b}").roundtrip(x) - x) ** 2).sum() / (x**2).sum()).item()  # noqa: E731
    assert rel(outliers, 3) == pytest.approx(rel(gauss, 3), rel=0.25)


def test_qjl_residual_is_unbiased_for_inner_products():
    """<q, x_hat> - <q, x> averages to ~0 with the sketch (QJL's estimator), not without it at 1 codebook bit."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 4096, 64, generator=g)
    qv = torch.randn(64, generator=g)
    exact = x @ qv
    err = {qjl: (kq.get(f"turboquant:bits=2,qjl={qjl}").roundtrip(x) @ qv - exact) for qjl in ("true", "false")}
    se = err["true"].std().item() / math.sqrt(err["true"].numel())
    assert abs(err["true"].mean().item()) < 4 * se
    # without the sketch the 2-bit MSE codebook shrinks inner products towards 0: biased
    assert ((exact * err["false"]).mean() < 0).item()


def test_bits_are_every_stored_byte():
    x = torch.randn(2, 3, 10, 64)
    for spec, bpv in [("turboquant:bits=3", 3 + 16 / 64), ("turboquant:bits=3,qjl=true", 2 + 16 / 64 + 1 + 16 / 64)]:
        q = kq.get(spec)
        assert q.bits_per_value(10, 64) == pytest.approx(bpv)
        assert q.quantize(x).nbytes() * 8 == round(bpv * x.numel())


def test_seeded_and_deterministic():
    x = torch.randn(1, 2, 16, 64)
    a, b = kq.get("turboquant:bits=2").quantize(x), kq.get("turboquant:bits=2").quantize(x)
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    c = kq.get("turboquant:bits=2,seed=7").quantize(x)
    assert not torch.equal(a.tensors["codes"], c.tensors["codes"])


@pytest.mark.parametrize("spec, match", [
    ("turboquant:bits=5", "bits=5"), ("turboquant:bits=1,qjl=true", "qjl=true"),
    ("turboquant:seed=-1", "seed=-1"), ("turboquant:qjl=maybe", "qjl"),
])
def test_bad_parameters_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        kq.get(spec)


def test_norm_beyond_fp16_is_refused():
    x = torch.ones(1, 1, 2, 64)
    x[0, 0, 1, 0] = 2e5
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        kq.get("turboquant:bits=4").quantize(x)


def test_in_the_catalog_as_a_causal_scheme():
    from kvlab.quant.catalog import schemes_table

    row = next(r for r in schemes_table() if r["name"] == "turboquant")
    assert row["causal"] is True
    assert {p["name"] for p in row["params"]} >= {"bits", "qjl", "seed"}


def _tiny_llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(torch.float64)


def test_cache_decode_equals_emulation_and_holds_its_bytes():
    """Through CompressedCache in generate() (real packed storage) the greedy tokens are those of
    kvlab.compress' decode-exact emulation (float64), and the cache holds bits_per_value's bytes."""
    model = _tiny_llama()
    prompt = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    cache = CompressedCache("turboquant:bits=3", config=model.config)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                             **{cache_kwarg(model): cache})
    new = out[:, prompt.shape[1]:]
    with torch.no_grad(), kvlab.compress(model, "turboquant:bits=3"):
        logits = model(input_ids=out[:, :-1], use_cache=False).logits
    assert torch.equal(logits[:, prompt.shape[1] - 1 :].argmax(-1), new)
    L = out.shape[1] - 1  # the last token is generated, never stored
    q = kq.get("turboquant:bits=3")
    expect = 2 * 2 * 2 * L * 32 * q.bits_per_value(L, 32) / 8  # layers x {K, V} x kv heads x tokens x D
    assert cache.nbytes()["total"] == expect
