"""kvquantc: the causal, calibrated KVQuant (kvlab.quant.kvquantc)."""

from __future__ import annotations

import math

import pytest
import torch

import kvlab.quant as kq
from kvlab.quant.kvquantc import CALIBRATION_DIR_ENV, Calibration, fit_calibration
from kvlab.quant.packing import packed_len
from kvlab.quant.policy import parse_policy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

L, H, D = 2, 3, 64


def _kv(n: int, layer: int, seed: int = 0, heads: int = H, d: int = D):
    """K-like (per-channel offsets and scales fixed by ``layer``) and V-like (H, n, d) tensors, noise by ``seed``."""
    g = torch.Generator().manual_seed(layer)
    chan = torch.randn(heads, 1, d, generator=g) * 2
    scale = torch.rand(heads, 1, d, generator=g) * 3 + 0.2
    g = torch.Generator().manual_seed(1000 + seed)
    k = chan + scale * torch.randn(heads, n, d, generator=g)
    return k, torch.randn(heads, n, d, generator=g)


@pytest.fixture(scope="module")
def cals():
    """Calibrations for bits 2, 3, 4 on the same synthetic layers (registered in memory)."""
    layers = [_kv(2000, layer) for layer in range(L)]
    ks, vs = [k for k, _ in layers], [v for _, v in layers]
    return {b: fit_calibration(ks, vs, b, 0.01, {"model": "synthetic"}).register() for b in (2, 3, 4)}


def _q(cal, which="k", layer=1, **kw):
    return kq.get(f"kvquantc:bits={cal.bits},calib={cal.id}" + "".join(f",{k}={v}" for k, v in kw.items())
                  ).for_tensor(which).for_layer(layer)


def _test_x(seed=7, T=50):
    k, v = _kv(T, 1, seed)  # layer 1's channels, other tokens than its calibration
    return k.unsqueeze(0), v.unsqueeze(0)  # (1, H, T, D)


@pytest.mark.parametrize("which", ["k", "v"])
def test_causal_future_tokens_do_not_move_earlier_ones(cals, which):
    q = _q(cals[3], which)
    assert q.causal
    k, v = _test_x()
    x = k if which == "k" else v
    y = q.roundtrip(x)
    x2 = x.clone()
    x2[..., 30:, :] = torch.randn_like(x2[..., 30:, :]) * 50  # very different future tokens
    y2 = q.roundtrip(x2)
    assert torch.equal(y[..., :30, :], y2[..., :30, :])
    assert not torch.equal(y[..., 30:, :], y2[..., 30:, :])
    # quantizing the prefix alone (what a cache holds at that length) gives the same values
    assert torch.equal(q.roundtrip(x[..., :30, :]), y[..., :30, :])


@pytest.mark.parametrize("which", ["k", "v"])
def test_roundtrip_within_bound_and_error_shrinks_with_bits(cals, which):
    k, v = _test_x(T=200)
    x = k if which == "k" else v
    nmse = []
    for b in (2, 3, 4):
        q = _q(cals[b], which)
        y = q.roundtrip(x)
        assert ((x - y).abs() <= q.error_bound(x) + 1e-6).all()
        nmse.append(float(((x - y) ** 2).mean() / (x**2).mean()))
    assert nmse[0] > nmse[1] > nmse[2]
    assert nmse[1] < 0.05  # 3 bits on data like the calibration's: a few percent of the energy
    # sinks (the first token) and the outlier slots are fp16
    q = _q(cals[3], which)
    y = q.roundtrip(x)
    assert torch.equal(y[..., 0, :], x[..., 0, :].half().float())
    packed = q.quantize(x)
    idx = packed.tensors["out_idx"].long()
    assert torch.equal(y[..., 1:, :].gather(-1, idx), x[..., 1:, :].gather(-1, idx).half().float())


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("T", [1, 2, 37])
def test_bits_are_the_stored_bytes(cals, which, T):
    q = _q(cals[3], which, sinks=1)
    k, v = _test_x(T=T)
    x = torch.cat([k, k + 1]) if which == "k" else torch.cat([v, v * 2])  # B = 2
    packed = q.quantize(x)
    B = x.shape[0]
    assert packed.nbytes() * 8 == q.bits_per_value(T, D) * T * D * B * H
    n = math.ceil(0.01 * D)  # outlier slots per token: value fp16 + uint8 index
    per_token = packed_len(D, 3) * 8 + n * 24 + (32 if which == "v" else 0)
    assert q.bits_per_value(T, D) * T * D == 16 * D + (T - 1) * per_token
    # a cache's runs (quantize_all) hold the same per-token bytes, and join by concatenation
    runs = [q.quantize_all(x[..., :1, :]), q.quantize_all(x[..., 1:, :])] if T > 1 else [q.quantize_all(x)]
    joined = q.concat(runs)
    assert joined is not None and joined.nbytes() * 8 == per_token * T * B * H
    assert torch.equal(q.dequantize(joined), q.dequantize(q.quantize_all(x)))
    assert q.table_nbytes() == L * 8 * 2 + (L * H * D * 4 if which == "k" else 0)


def test_all_zero_v_gives_zeros_and_k_stays_within_its_bound(cals):
    x = torch.zeros(1, H, 20, D)
    assert torch.equal(_q(cals[3], "v").roundtrip(x), x)  # a constant token: scale 0, decodes to its zero
    q = _q(cals[3], "k")  # K's range is calibrated: 0 comes back within the bound, not exactly
    assert ((q.roundtrip(x) - x).abs() <= q.error_bound(x) + 1e-6).all()


def test_spec_round_trip_names_the_calibration(cals):
    cal = cals[4]
    for which in "kv":
        q = kq.get(f"kvquantc:bits=4,calib={cal.id}").for_tensor(which)
        assert f"calib={cal.id}" in q.spec and f"tensor={which}" in q.spec
        assert kq.get(q.spec).spec == q.spec
        assert kq.get(q.spec).for_layer(0).spec == q.spec  # the layer is not part of the spec
    assert parse_policy(f"kvquantc:bits=4,calib={cal.id}").spec != parse_policy(
        f"kvquantc:bits=4,calib={cals[3].id}".replace("bits=4", "bits=3")).spec


def test_file_round_trip_and_id_is_content(tmp_path, cals, monkeypatch):
    cal = cals[3]
    path = cal.save(tmp_path)
    assert path.name == f"{cal.id}.safetensors"
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    loaded = Calibration.load(cal.id, tmp_path)
    assert loaded.metadata == cal.metadata
    for name, t in cal.tensors.items():
        assert torch.equal(loaded.tensors[name], t)
    # a file whose content is not its name's is refused
    other = cals[4].save(tmp_path)
    fake = tmp_path / "0123456789abcdef.safetensors"
    fake.write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match="holds calibration .* not 0123456789abcdef"):
        Calibration.load("0123456789abcdef", tmp_path)
    # the env var points the scheme at the folder
    monkeypatch.setenv(CALIBRATION_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=f"not found.*{tmp_path}"):
        kq.get("kvquantc:bits=3,calib=fedcba9876543210")


def test_bad_ids_and_settings_name_what_is_wrong(cals):
    with pytest.raises(ValueError, match="calib='nothex' is not a calibration id"):
        kq.get("kvquantc:bits=3,calib=nothex")
    with pytest.raises(ValueError, match="calibration 'ffffffffffffffff' not found"):
        kq.get("kvquantc:bits=3,calib=ffffffffffffffff")
    with pytest.raises(ValueError, match="fitted for bits=3"):
        kq.get(f"kvquantc:bits=4,calib={cals[3].id}")
    with pytest.raises(ValueError, match="fitted for .*outlier_frac"):
        kq.get(f"kvquantc:bits=3,calib={cals[3].id},outlier_frac=0.02")
    with pytest.raises(ValueError, match="no calibration"):
        kq.get("kvquantc").quantize(torch.randn(1, 1, 4, 8))


def test_geometry_is_checked_against_the_model(cals):
    spec = f"kvquantc:bits=3,calib={cals[3].id}"
    parse_policy(spec).check_model(L, H, D)
    for bad in ((L + 1, H, D), (L, H - 1, D), (L, H, 128)):
        with pytest.raises(ValueError, match=f"is for {L} layers x {H} kv heads x head_dim {D}"):
            parse_policy(spec).check_model(*bad)
    q = _q(cals[3])
    with pytest.raises(ValueError, match="holds 3 kv heads x head_dim 64 here, the tensor 2 x 64"):
        q.quantize(torch.randn(1, 2, 5, D))
    with pytest.raises(ValueError, match="layer 5 is not in calibration"):
        kq.get(spec).for_layer(5)


def test_policy_gives_each_layer_its_tables_and_heads_slice(cals):
    spec = f"kvquantc:bits=3,calib={cals[3].id}"
    pol = parse_policy(spec)
    k, _ = _test_x()
    y0 = pol.quantizer(0, 0, "k", L).roundtrip(k)
    y1 = pol.quantizer(1, 0, "k", L).roundtrip(k)
    assert not torch.equal(y0, y1)  # layer 0's thresholds are not layer 1's
    assert pol.quantizer(1, 2, "k", L) is pol.quantizer(1, 0, "k", L)  # one quantizer per layer, every head
    # a subset of heads (a policy that keeps some heads in fp16) reads those heads' tables
    part = pol.quantizer(1, 0, "k", L).for_heads([0, 2])
    assert torch.equal(part.roundtrip(k[:, [0, 2]]), y1[:, [0, 2]])
    assert torch.equal(part.for_heads([1]).roundtrip(k[:, [2]]), y1[:, [2]])


def test_calibration_thresholds_hold_the_outlier_fraction(cals):
    cal = cals[3]
    k, v = _kv(2000, 1)  # layer 1's calibration tokens
    lo, hi = cal.tensors["k_lo"][1], cal.tensors["k_hi"][1]  # (H, D)
    beyond = ((k < lo[:, None]) | (k > hi[:, None])).float().mean()
    assert 0.005 <= float(beyond) <= 0.015  # about outlier_frac = 1% beyond, by construction
    q = _q(cal, "k", layer=1)
    c = q.outlier_counts(k.unsqueeze(0))
    assert c["values"] == k[:, 1:].numel() and c["kept"] + c["saturated"] == c["beyond"] > 0
    assert _q(cal, "v", layer=1).outlier_counts(v.unsqueeze(0))["saturated"] == 0
    # fitting is deterministic
    again = fit_calibration([_kv(2000, la)[0] for la in range(L)], [_kv(2000, la)[1] for la in range(L)], 3, 0.01,
                            {"model": "synthetic"})
    assert again.id == cal.id
