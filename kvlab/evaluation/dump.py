"""Dump Q/K/V from a model to safetensors with a JSON manifest; load them back verified.

Layout of a dump folder: ``layer_{i:03d}.safetensors`` holding tensors named ``q_pre``, ``q_post``,
``k_pre``, ``k_post``, ``v`` (each (B, heads, T, D)), and ``manifest.json`` with the model, corpus, ctx,
token checksum, shapes, dtypes and the sha256 of every file, and ``manifest_sha256``, the sha256 of the
rest of the manifest (canonical JSON). Each tensor file also carries, in its safetensors metadata, its
layer and the dump's model, ctx, batch, dtype and token checksum. Every file is written to a temporary
name and renamed into place (atomic), the manifest last.

``load_dump`` trusts nothing it can check: the manifest's own checksum and keys, that every entry names a
``layer_NNN.safetensors`` file inside the folder, that each file's sha256, metadata (layer, model, ctx,
dtype, tokens), tensor names, shapes and dtypes agree with its entry, and that no layer file in the
folder is missing from the manifest; any disagreement is a ValueError naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kvlab._io import atomic_save_tensors, atomic_write_bytes, sha256_file
from kvlab.emulation.hooks import capture
from kvlab.evaluation.ppl import tokens_sha256

__all__ = ["dump", "load_dump"]

_KEYS = ("model", "corpus", "ctx", "batch", "dtype", "tokens_sha256", "rope_theta", "num_layers", "num_kv_heads",
         "num_heads", "files")
_FILE = re.compile(r"layer_(\d{3,})\.safetensors")
_FILE_META = ("model", "ctx", "batch", "dtype", "tokens_sha256")  # copied into every tensor file


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def dump(model, tokens: torch.Tensor, out: str | Path, layers=None, which=("q", "k", "v"),
         rope=("pre", "post"), corpus: str = "", dtype: torch.dtype = torch.float16) -> Path:
    """Run ``tokens`` (B, T) through ``model`` and write the captured Q/K/V of ``layers`` to ``out``.

    Tensors are stored in ``dtype`` (fp16 by default, the usual KV-cache precision). Returns the folder.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, T) token ids, got shape {tuple(tokens.shape)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    with capture(model, layers=layers, which=which, rope=rope) as caps:
        model(input_ids=tokens.to(device), use_cache=False)
    files = {}
    by_layer: dict[int, dict] = {}
    for (layer, name), t in caps.items():
        by_layer.setdefault(layer, {})[name] = t.to(dtype).contiguous()
    common = {"model": getattr(model.config, "kvlab_name", getattr(model.config, "_name_or_path", "")),
              "ctx": int(tokens.shape[1]), "batch": int(tokens.shape[0]),
              "dtype": str(dtype).replace("torch.", ""), "tokens_sha256": tokens_sha256(tokens.cpu())}
    for layer, tensors in sorted(by_layer.items()):
        path = out / f"layer_{layer:03d}.safetensors"
        atomic_save_tensors(tensors, path, {"layer": str(layer), **{k: str(common[k]) for k in _FILE_META}})
        files[path.name] = {
            "layer": layer, "sha256": sha256_file(path),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in tensors.items()},
        }
    manifest = {
        **common, "corpus": corpus,
        "rope_theta": getattr(model.config, "rope_theta", None) or
        (getattr(model.config, "rope_parameters", None) or {}).get("rope_theta"),
        "num_layers": model.config.num_hidden_layers, "num_kv_heads": model.config.num_key_value_heads,
        "num_heads": model.config.num_attention_heads, "files": files,
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    for stale in out.glob("layer_*.safetensors"):  # layers of an earlier dump into this folder: a folder holds one
        if _FILE.fullmatch(stale.name) and stale.name not in files:
            stale.unlink()
    return out


def _check_manifest(manifest, mpath: Path) -> None:
    if not isinstance(manifest, dict):
        raise ValueError(f"dump manifest {mpath} is not a JSON object; the dump is corrupt")
    missing = [k for k in (*_KEYS, "manifest_sha256") if k not in manifest]
    if missing:
        raise ValueError(f"dump manifest {mpath} lacks {', '.join(missing)} (edited, or written by an older "
                         "kvlab); re-create the dump with kvlab.dump(...)")
    extra = sorted(set(manifest) - {*_KEYS, "manifest_sha256"})
    if extra:
        raise ValueError(f"dump manifest {mpath} has unknown keys {', '.join(extra)}; the manifest was edited")
    digest = _manifest_digest(manifest)
    if manifest["manifest_sha256"] != digest:
        raise ValueError(f"dump manifest {mpath} fails its own checksum (sha256 {digest[:16]}..., it says "
                         f"{str(manifest['manifest_sha256'])[:16]}...): it was edited; re-create the dump")
    if not isinstance(manifest["files"], dict):
        raise ValueError(f"dump manifest {mpath}: 'files' must map file names to entries, got "
                         f"{type(manifest['files']).__name__}")


def _check_entry(folder: Path, name: str, info, manifest: dict) -> Path:
    """The path of entry ``name``, its name, keys and layer checked (no file is read here)."""
    m = _FILE.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"dump manifest in {folder}: entry {name!r} is not a layer_NNN.safetensors file of the "
                         "folder (paths outside the dump folder are refused)")
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise ValueError(f"dump manifest in {folder}: entry {name!r} resolves outside the dump folder")
    if not isinstance(info, dict) or sorted(info) != ["layer", "sha256", "tensors"]:
        raise ValueError(f"dump manifest in {folder}: entry {name!r} must hold exactly layer, sha256 and tensors; "
                         f"it holds {sorted(info) if isinstance(info, dict) else type(info).__name__}")
    if info["layer"] != int(m.group(1)):
        raise ValueError(f"dump manifest in {folder}: entry {name!r} says layer {info['layer']!r}, its name says "
                         f"{int(m.group(1))}")
    return path


def _check_file(path: Path, info: dict, manifest: dict, tensors: dict) -> None:
    """The file's safetensors metadata, names, shapes and dtypes against its entry and the manifest."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    want = {"layer": str(info["layer"]), **{k: str(manifest[k]) for k in _FILE_META}}
    for k, v in want.items():
        if meta.get(k) != v:
            raise ValueError(f"{path}: its metadata says {k}={meta.get(k)!r}, the manifest says {v!r}; the "
                             "manifest was edited or the file belongs to another dump")
    listed, held = set(info["tensors"]), set(tensors)
    if listed != held:
        raise ValueError(f"{path}: holds tensors {sorted(held)}, the manifest lists {sorted(listed)}")
    for k, t in tensors.items():
        entry = info["tensors"][k]
        if not isinstance(entry, dict) or set(entry) != {"shape", "dtype"}:
            raise ValueError(f"{path}: manifest entry of tensor {k} must hold shape and dtype, got {entry!r}")
        if list(t.shape) != entry["shape"]:
            raise ValueError(f"{path}: tensor {k} has shape {list(t.shape)}, manifest says {entry['shape']}")
        dtype = str(t.dtype).replace("torch.", "")
        if dtype != entry["dtype"] or dtype != manifest["dtype"]:
            raise ValueError(f"{path}: tensor {k} is {dtype}, manifest says {entry['dtype']} (dump dtype "
                             f"{manifest['dtype']})")
        if t.dim() != 4 or t.shape[0] != manifest["batch"] or t.shape[2] != manifest["ctx"]:
            raise ValueError(f"{path}: tensor {k} of shape {list(t.shape)} is not (batch={manifest['batch']}, "
                             f"heads, ctx={manifest['ctx']}, head_dim)")


def load_dump(folder: str | Path, layers=None) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """Return (manifest, {layer: {name: tensor}}), verified as the module docstring says."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"no dump manifest at {mpath}; create a dump with kvlab.dump(...)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"dump manifest {mpath} is not valid JSON ({e}); the dump is corrupt") from e
    _check_manifest(manifest, mpath)
    paths = {name: _check_entry(folder, name, info, manifest) for name, info in manifest["files"].items()}
    unlisted = sorted(p.name for p in folder.glob("layer_*.safetensors") if p.name not in paths)
    if unlisted:
        raise ValueError(f"dump folder {folder} holds {', '.join(unlisted)}, which the manifest does not list "
                         "(an entry was deleted); re-create the dump")
    out = {}
    for name, info in sorted(manifest["files"].items()):
        if layers is not None and info["layer"] not in layers:
            continue
        path = paths[name]
        if not path.is_file():
            raise FileNotFoundError(f"dump file {path} listed in the manifest is missing")
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise ValueError(f"dump file {path} fails its checksum (sha256 {digest[:16]}..., manifest says "
                             f"{str(info['sha256'])[:16]}...): truncated or modified; re-create the dump")
        tensors = load_file(str(path))
        _check_file(path, info, manifest, tensors)
        out[info["layer"]] = tensors
    if layers is not None:
        missing = sorted(set(layers) - set(out))
        if missing:
            raise ValueError(f"layers {missing} are not in the dump at {folder}; it holds "
                             f"{sorted(i['layer'] for i in manifest['files'].values())}")
    return manifest, out
