"""kvlab.evaluation.dump: load_dump verifies its manifest (own checksum, entries against each file's
metadata, paths inside the folder) and names what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kvlab.evaluation.dump import _manifest_digest, dump, load_dump


@pytest.fixture(scope="module")
def dumped(model, tmp_path_factory):
    tokens = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    return dump(model, tokens, tmp_path_factory.mktemp("dump") / "d", layers=[0, 7], which=("k", "v"),
                rope=("post",), corpus="random")


@pytest.fixture
def copy(dumped, tmp_path):
    return shutil.copytree(dumped, tmp_path / "d")


def _edit(folder, fn, reseal: bool):
    """Apply ``fn`` to the manifest; with ``reseal``, also recompute its checksum (a careful forger)."""
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    if reseal:
        m["manifest_sha256"] = _manifest_digest(m)
    path.write_text(json.dumps(m))


def test_roundtrip(dumped):
    manifest, tensors = load_dump(dumped)
    assert sorted(tensors) == [0, 7] and set(tensors[7]) == {"k_post", "v"}
    assert manifest["dtype"] == "float16" and tensors[7]["v"].dtype == torch.float16


@pytest.mark.parametrize("field, value", [("ctx", 8), ("model", "other"), ("tokens_sha256", "0" * 64),
                                          ("dtype", "float32"), ("batch", 2)])
@pytest.mark.parametrize("reseal", [False, True])
def test_edited_header_is_refused(copy, field, value, reseal):
    _edit(copy, lambda m: m.__setitem__(field, value), reseal)
    with pytest.raises(ValueError, match=f"own checksum|{field}="):
        load_dump(copy)


@pytest.mark.parametrize("reseal", [False, True])
def test_entry_moved_to_another_layer_is_refused(copy, reseal):
    """Renaming layer 0's entry to layer 7's (and 7's away) would return layer 0's tensors as layer 7."""
    def swap(m):
        f = m["files"]
        f["layer_000.safetensors"]["layer"], f["layer_007.safetensors"]["layer"] = 7, 0

    _edit(copy, swap, reseal)
    with pytest.raises(ValueError, match="own checksum|says layer"):
        load_dump(copy)


@pytest.mark.parametrize("reseal", [False, True])
def test_deleted_entry_is_refused(copy, reseal):
    _edit(copy, lambda m: m["files"].pop("layer_007.safetensors"), reseal)
    with pytest.raises(ValueError, match="own checksum|layer_007.safetensors, which the manifest does not list"):
        load_dump(copy)


def test_paths_outside_the_folder_are_refused(copy, tmp_path):
    other = shutil.copytree(copy, tmp_path / "other")

    def escape(m):
        m["files"]["../other/layer_000.safetensors"] = m["files"].pop("layer_000.safetensors")

    _edit(copy, escape, reseal=True)
    (copy / "layer_000.safetensors").unlink()
    with pytest.raises(ValueError, match=r"'\.\./other/layer_000.safetensors' is not a layer_NNN.safetensors"):
        load_dump(copy)
    assert other.exists()


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("files"), "lacks files"),
    (lambda m: m.__setitem__("files", []), "'files' must map"),
    (lambda m: m["files"]["layer_007.safetensors"]["tensors"].pop("v"), r"holds tensors \['k_post', 'v'\]"),
    (lambda m: m["files"]["layer_007.safetensors"]["tensors"].__setitem__("x", {"shape": [1], "dtype": "float16"}),
     r"the manifest lists \['k_post', 'v', 'x'\]"),
    (lambda m: m["files"]["layer_007.safetensors"]["tensors"]["v"].__setitem__("shape", [1, 3, 16, 32]),
     "tensor v has shape"),
    (lambda m: m.pop("manifest_sha256"), "lacks manifest_sha256"),
    (lambda m: m.__setitem__("extra", 1), "unknown keys extra"),
])
def test_malformed_manifest_gives_a_clear_error(copy, edit, match):
    _edit(copy, edit, reseal="manifest_sha256" not in match)
    with pytest.raises(ValueError, match=match):
        load_dump(copy)


def test_file_of_another_dump_is_refused(copy, model, tmp_path):
    """A layer file swapped in from another dump (its manifest entry forged to match) is caught by its metadata."""
    from kvlab._io import sha256_file

    tokens = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    other = dump(model, tokens, tmp_path / "o", layers=[7], which=("k", "v"), rope=("post",))
    shutil.copy(other / "layer_007.safetensors", copy / "layer_007.safetensors")
    _edit(copy, lambda m: m["files"]["layer_007.safetensors"].__setitem__(
        "sha256", sha256_file(copy / "layer_007.safetensors")), reseal=True)
    with pytest.raises(ValueError, match="metadata says tokens_sha256="):
        load_dump(copy)


def test_a_new_dump_into_the_same_folder_replaces_the_old_one(model, tmp_path):
    """Layers of an earlier dump that the new one does not hold are removed, so the folder loads (a notebook
    that dumps other layers into a folder another notebook used is the normal case)."""
    tokens = torch.arange(1, 17).unsqueeze(0)
    dump(model, tokens, tmp_path / "d", layers=[0, 7], which=("k",), rope=("post",))
    dump(model, tokens, tmp_path / "d", layers=[3], which=("k",), rope=("post",))
    manifest, tensors = load_dump(tmp_path / "d")
    assert sorted(tensors) == [3]
    assert sorted(p.name for p in (tmp_path / "d").glob("layer_*")) == ["layer_003.safetensors"]
