"""Helpers notebooks call to leave machine-readable results and figures under deterministic names."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvlab._io import atomic_write_bytes

__all__ = ["save_figure", "save_metrics"]


def _clean(v):
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def save_metrics(name: str, metrics: dict, out_dir: str | Path) -> Path:
    """Write ``{out_dir}/{name}.metrics.json`` atomically (the last cell of every notebook calls this,
    so that tests can execute a notebook and assert on its key numbers)."""
    path = Path(out_dir) / f"{name}.metrics.json"
    atomic_write_bytes(path, json.dumps(_clean(metrics), indent=1, sort_keys=True).encode())
    return path


def save_figure(fig, name: str, fig_dir: str | Path) -> Path:
    """Save ``fig`` as ``{fig_dir}/{name}.png`` (deterministic name, no timestamp metadata)."""
    path = Path(fig_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    return path
