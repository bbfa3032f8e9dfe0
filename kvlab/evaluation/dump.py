"""Dump Q/K/V from a model to safetensors with a JSON manifest; load them back verified.

Layout of a dump folder: ``layer_{i:03d}.safetensors`` holding tensors named ``q_pre``, ``q_post``,
``k_pre``, ``k_post``, ``v`` (each (B, heads, T, D)), and ``manifest.json`` with the model, corpus, ctx,
token checksum, shapes, dtypes and the sha256 of every file. Every file is written to a temporary name
and renamed into place (atomic), the manifest last; ``load_dump`` refuses a tampered or truncated file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvlab._io import atomic_save_tensors, atomic_write_bytes, sha256_file
from kvlab.emulation.hooks import capture
from kvlab.evaluation.ppl import tokens_sha256

__all__ = ["dump", "load_dump"]


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
    for layer, tensors in sorted(by_layer.items()):
        path = out / f"layer_{layer:03d}.safetensors"
        atomic_save_tensors(tensors, path, {"layer": str(layer)})
        files[path.name] = {
            "layer": layer, "sha256": sha256_file(path),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                        for k, v in tensors.items()},
        }
    manifest = {
        "model": getattr(model.config, "kvlab_name", getattr(model.config, "_name_or_path", "")),
        "corpus": corpus, "ctx": int(tokens.shape[1]), "batch": int(tokens.shape[0]),
        "tokens_sha256": tokens_sha256(tokens.cpu()),
        "rope_theta": getattr(model.config, "rope_theta", None) or
        (getattr(model.config, "rope_parameters", None) or {}).get("rope_theta"),
        "num_layers": model.config.num_hidden_layers, "num_kv_heads": model.config.num_key_value_heads,
        "num_heads": model.config.num_attention_heads, "files": files,
    }
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    return out


def load_dump(folder: str | Path, layers=None) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """Return (manifest, {layer: {name: tensor}}), verifying every file's sha256 against the manifest."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"no dump manifest at {mpath}; create a dump with kvlab.dump(...)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"dump manifest {mpath} is not valid JSON ({e}); the dump is corrupt") from e
    out = {}
    for name, info in sorted(manifest["files"].items()):
        if layers is not None and info["layer"] not in layers:
            continue
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"dump file {path} listed in the manifest is missing")
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise ValueError(f"dump file {path} fails its checksum (sha256 {digest[:16]}..., manifest says "
                             f"{info['sha256'][:16]}...): truncated or modified; re-create the dump")
        tensors = load_file(str(path))
        for k, meta in info["tensors"].items():
            if list(tensors[k].shape) != meta["shape"]:
                raise ValueError(f"{path}: tensor {k} has shape {list(tensors[k].shape)}, manifest says {meta['shape']}")
        out[info["layer"]] = tensors
    if layers is not None:
        missing = sorted(set(layers) - set(out))
        if missing:
            raise ValueError(f"layers {missing} are not in the dump at {folder}; it holds "
                             f"{sorted(i['layer'] for i in manifest['files'].values())}")
    return manifest, out
