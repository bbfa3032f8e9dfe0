"""kvlab.evaluation.calibrate and the calibrated KVQuant inside the real model: calibration files, the CLI,
and prefill emulation equal to token-by-token decoding through CompressedCache."""

from __future__ import annotations

import json

import pytest
import torch

from kvlab import cli
from kvlab.emulation import hooks
from kvlab.evaluation.calibrate import calibrate_kvquant, calibration_windows, outlier_report
from kvlab.evaluation.evaluate import load_windows
from kvlab.evaluation.ppl import nll_per_window
from kvlab.model.fingerprint import model_fingerprint
from kvlab.quant.kvquantc import CALIBRATION_DIR_ENV, Calibration
from kvlab.storage.cache import CompressedCache, cache_kwarg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = {"corpus": "pydoc", "ctx": 64, "windows": 3, "sample": "spread", "seed": 0}


@pytest.fixture(scope="module")
def cal_dir(tmp_path_factory, model, tokenizer):
    """A folder holding a small bits=3 and bits=4 calibration of the embedded model (pydoc text)."""
    d = tmp_path_factory.mktemp("calibration")
    cals = calibrate_kvquant(model, tokenizer, (3, 4), out=d, progress=False, **SMALL)
    return d, {c.bits: c for c in cals}


def test_calibration_is_deterministic_and_describes_itself(cal_dir, model, tokenizer, tmp_path):
    d, cals = cal_dir
    again = calibrate_kvquant(model, tokenizer, 3, out=tmp_path, progress=False, **SMALL)[0]
    assert again.id == cals[3].id
    a, b = Calibration.load(again.id, tmp_path), Calibration.load(again.id, d)  # (safetensors orders its header
    assert a.metadata == b.metadata  # metadata as a hash map: the bytes may differ, the content may not)
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in b.tensors)
    meta = Calibration.load(cals[3].id, d).metadata
    assert meta["model_fingerprint"] == model_fingerprint(model)
    assert {k: meta[k] for k in ("corpus", "split", "ctx", "windows", "sample", "seed", "bits", "skip_first")} == {
        "corpus": "pydoc", "split": "valid", "ctx": "64", "windows": "3", "sample": "spread", "seed": "0",
        "bits": "3", "skip_first": "1"}
    cfg = model.config
    assert Calibration.load(cals[3].id, d).geometry == (cfg.num_hidden_layers, cfg.num_key_value_heads,
                                                         cfg.hidden_size // cfg.num_attention_heads)
    other = calibrate_kvquant(model, tokenizer, 3, out=tmp_path, progress=False, **{**SMALL, "seed": 1})[0]
    assert other.id != cals[3].id  # another draw of windows, another calibration


def test_calibration_reads_the_validation_split(tokenizer, data_dir):
    valid = calibration_windows(tokenizer, "wikitext-2-v1", "valid", ctx=128, windows=2, data_dir=data_dir)
    _, test = load_windows(tokenizer, "wikitext-2-v1", 128, 2, data_dir, sample="spread", seed=0)
    same_split = calibration_windows(tokenizer, "wikitext-2-v1", "test", ctx=128, windows=2, data_dir=data_dir)
    assert torch.equal(same_split, test)  # cut as the evaluation cuts its split
    assert not torch.equal(valid, test)
    with pytest.raises(ValueError, match="corpus='auto' is not allowed"):
        calibration_windows(tokenizer, "auto")


def test_bad_calibration_fails_before_any_work(cal_dir, model, monkeypatch):
    d, cals = cal_dir
    monkeypatch.setenv(CALIBRATION_DIR_ENV, str(d))
    with pytest.raises(ValueError, match=f"calibration 'abcdefabcdefabcd' not found: no {d}"):
        hooks.compress(model, "kvquantc:bits=3,calib=abcdefabcdefabcd").__enter__()
    small = Calibration({n: t[:, :1] for n, t in cals[3].tensors.items()} | {
        "k_codebook": cals[3].tensors["k_codebook"], "v_codebook": cals[3].tensors["v_codebook"]},
        cals[3].metadata).register()  # one kv head where the model has 3
    with pytest.raises(ValueError, match="is for 30 layers x 1 kv heads"):
        with hooks.compress(model, f"kvquantc:bits=3,calib={small.id}"):
            pass
    with pytest.raises(ValueError, match="pass rope=model"):
        CompressedCache(f"kvquantc:bits=3,calib={cals[3].id}", config=model.config)


def test_cli_calibrate_prints_the_specs(model, tmp_path, capsys, cal_dir, monkeypatch):
    rc = cli.main(["calibrate", "--corpus", "pydoc", "--ctx", "64", "--windows", "3", "--bits", "3", "4",
                   "--out", str(tmp_path), "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["spec"] for r in rows] == [f"kvquantc:bits={b},calib={cal_dir[1][b].id}" for b in (3, 4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{r['id']}.safetensors" for r in rows)
    monkeypatch.setenv(CALIBRATION_DIR_ENV, str(tmp_path))
    assert cli.main(["ppl", "--scheme", "kvquantc:bits=3,calib=0000000000000000", "--corpus", "pydoc"]) == 2
    assert "calibration '0000000000000000' not found" in capsys.readouterr().err


def test_outlier_report_counts_every_value(cal_dir, model, tokenizer, monkeypatch):
    d, cals = cal_dir
    monkeypatch.setenv(CALIBRATION_DIR_ENV, str(d))
    w = calibration_windows(tokenizer, "pydoc", "test", ctx=64, windows=2)
    r = outlier_report(model, w, f"kvquantc:bits=3,calib={cals[3].id}", progress=False)
    cfg = model.config
    n = 2 * 63 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert r["k"]["values"] == r["v"]["values"] == n  # every token but the sink of every window
    assert 0 < r["k"]["beyond"] == r["k"]["kept"] + r["k"]["saturated"] < n
    assert r["v"]["saturated"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["kvquantc:bits=3,calib={c3}", "kv=kvquantc:bits=4,calib={c4};keep_heads=3.1+7.0"])
def test_prefill_emulation_equals_token_by_token_decode(cal_dir, model64, tokenizer, monkeypatch, policy):
    """The cache undoes RoPE on the tokens it quantizes and re-applies it when it reads; the emulation
    quantizes pre-RoPE K of the whole window. Float64, as tests/emulation/test_hooks.py's decode test."""
    from kvlab.model.rope import apply_rope, invert_rope, rope_cos_sin
    from kvlab.quant.policy import parse_policy

    d, cals = cal_dir
    monkeypatch.setenv(CALIBRATION_DIR_ENV, str(d))
    spec = policy.format(c3=cals[3].id, c4=cals[4].id)
    _, ids = load_windows(tokenizer, "pydoc", ctx=120, windows=1)
    with torch.no_grad():
        with hooks.compress(model64, spec):
            pre = nll_per_window(model64(input_ids=ids, use_cache=False).logits, ids)
        with hooks.capture(model64, which=("k", "v"), rope=("post",)) as got:
            fp = nll_per_window(model64(input_ids=ids, use_cache=False).logits, ids)
        cache = CompressedCache(spec, config=model64.config, rope=model64)
        logits = [model64(input_ids=ids[:, t : t + 1], use_cache=True, **{cache_kwarg(model64): cache}).logits
                  for t in range(ids.shape[1])]
    dec = nll_per_window(torch.cat(logits, dim=1), ids)
    assert torch.allclose(pre, dec, rtol=1e-6, atol=0), (pre, dec)
    assert not torch.allclose(pre, fp, rtol=1e-4, atol=0)  # the scheme really acted
    # the same K/V given to a cache token by token come back as the scheme's roundtrip of the window (K pre-RoPE),
    # the sink and kept heads as their fp16 values
    pol, n = parse_policy(spec), model64.config.num_hidden_layers
    cache = CompressedCache(spec, config=model64.config, rope=model64)
    T = ids.shape[1]
    for t in range(T):
        held = [cache.update(got[(la, "k_post")][:, :, t : t + 1], got[(la, "v")][:, :, t : t + 1], la)
                for la in range(n)]
    cos, sin = rope_cos_sin(model64, got[(0, "k_post")], torch.arange(T).unsqueeze(0))
    for layer in (0, 3, 7):
        k16, v16 = (got[(layer, name)].half().double() for name in ("k_post", "v"))
        for h in range(k16.shape[1]):
            qk, qv = pol.quantizer(layer, h, "k", n), pol.quantizer(layer, h, "v", n)
            want_k = apply_rope(qk.roundtrip(invert_rope(k16, cos, sin)), cos, sin)[:, h]
            want_v = qv.roundtrip(v16)[:, h]
            if pol.kept(layer, h, "k", n):
                want_k, want_v = k16[:, h], v16[:, h]
            want_k[:, :1], want_v[:, :1] = k16[:, h, :1], v16[:, h, :1]  # the sink
            assert torch.allclose(held[layer][0][:, h], want_k, rtol=0, atol=1e-12)
            assert torch.equal(held[layer][1][:, h], want_v)


def test_kvquantc_specs_reuse_a_matching_file_and_refuse_pydoc(cal_dir, model, tokenizer, tmp_path, monkeypatch,
                                                               data_dir):
    from kvlab.evaluation import calibrate
    from kvlab.quant import kvquantc

    d, cals = cal_dir
    small = {"ctx": 64, "windows": 2, "sample": "spread", "seed": 0}
    with pytest.warns(UserWarning, match="pydoc"):  # one text for every split: it would calibrate on the test text
        assert calibrate.kvquantc_specs(model, tokenizer, (3,), corpus="pydoc", folder=d, progress=False, **small) == []
    specs = calibrate.kvquantc_specs(model, tokenizer, (3, 4), corpus="wikitext-2-v1", data_dir=data_dir,
                                     folder=tmp_path, progress=False, **small)
    assert [s.split(",")[0] for s in specs] == ["kvquantc:bits=3", "kvquantc:bits=4"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    kvquantc._MEMORY.clear()
    def recalibrated(*a, **k):
        raise RuntimeError("recalibrated a file on disk")

    monkeypatch.setattr(calibrate, "_capture_kv", recalibrated)
    again = calibrate.kvquantc_specs(model, tokenizer, (4, 3), corpus="wikitext-2-v1", data_dir=data_dir,
                                     folder=tmp_path, progress=False, **small)
    assert again == specs[::-1]
    assert kvlab_spec_loads(again[0])
    with pytest.raises(RuntimeError, match="recalibrated"):  # another draw of windows is another calibration
        calibrate.kvquantc_specs(model, tokenizer, (3,), corpus="wikitext-2-v1", data_dir=data_dir,
                                 folder=tmp_path, progress=False, **{**small, "seed": 1})


def kvlab_spec_loads(spec: str) -> bool:
    """The spec builds a quantizer in this process (its calibration registered in memory, not on the default path)."""
    from kvlab import quant

    return quant.get(spec).calib == spec.split("calib=")[1].split(",")[0]
