"""Evaluation text: Python's own pydoc topics (always offline), WikiText-2, C4, or any text file."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CORPORA", "load_corpus"]

CORPORA = ("pydoc", "wikitext-2-v1", "wikitext-2-raw-v1", "c4")
_SPLITS = {"test": "test", "valid": "validation", "validation": "validation", "train": "train"}


def _pydoc() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _wikitext(name: str, split: str, data_dir: str | None) -> str:
    file_split = "valid" if split in ("valid", "validation") else split
    searched = []
    for d in filter(None, (data_dir, os.environ.get("KVLAB_DATA_DIR"))):
        p = Path(d) / name / f"{file_split}.txt"
        searched.append(str(p))
        if p.is_file():
            return p.read_text(encoding="utf-8")
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", name, split=_SPLITS[split])
        return "".join(ds["text"])
    except Exception as e:  # offline, hub unreachable, datasets missing
        raise FileNotFoundError(
            f"corpus {name!r} split {split!r} is not available: no local copy "
            f"(looked at {', '.join(searched) or 'nothing: no --data-dir and KVLAB_DATA_DIR unset'}) "
            f"and the datasets hub failed ({type(e).__name__}: {str(e)[:200]}). Either pass --data-dir / set "
            f"KVLAB_DATA_DIR to a folder holding {name}/{file_split}.txt, or allow network access to the "
            f"Hugging Face hub (dataset 'wikitext', config {name!r})."
        ) from e


def _c4(split: str, n_docs: int = 2000) -> str:
    try:
        import datasets

        ds = datasets.load_dataset("allenai/c4", "en", split=_SPLITS[split], streaming=True)
        return "\n\n".join(row["text"] for _, row in zip(range(n_docs), ds))
    except Exception as e:
        raise FileNotFoundError(
            f"corpus 'c4' is not available offline ({type(e).__name__}: {str(e)[:200]}). It streams from the "
            "Hugging Face hub (allenai/c4, en): allow network access, or save text to a file and pass its path."
        ) from e


def load_corpus(name: str, split: str = "test", data_dir: str | None = None) -> str:
    """Return the text of corpus ``name``: one of ``CORPORA`` or a path to a UTF-8 text file."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"corpus must be a name ({', '.join(CORPORA)}) or a text file path, got {name!r}")
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not allowed; allowed: {', '.join(_SPLITS)}")
    if name == "pydoc":
        return _pydoc()
    if name in ("wikitext-2-v1", "wikitext-2-raw-v1"):
        return _wikitext(name, split, data_dir)
    if name == "c4":
        return _c4(split)
    p = Path(name)
    if p.is_dir():
        raise ValueError(f"corpus path {name!r} is a folder; give a text file, or one of: {', '.join(CORPORA)}")
    if not p.exists():
        raise ValueError(f"unknown corpus {name!r}: not a known name ({', '.join(CORPORA)}) and no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"corpus file {name!r} cannot be read as UTF-8 text: {e}") from e
    if not text.strip():
        raise ValueError(f"corpus file {name!r} is empty")
    return text
