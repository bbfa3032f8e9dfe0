"""kvlab._io: atomic writes land whole, with the mode of a plain open() (the process umask), not 0600."""

from __future__ import annotations

import os

import pytest
import torch

from kvlab._io import atomic_save_tensors, atomic_write_bytes


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.csv", b"x")
        atomic_save_tensors({"t": torch.zeros(2)}, tmp_path / "b.safetensors", {})
        open(tmp_path / "plain", "w").close()
    finally:
        os.umask(before)
    want = 0o666 & ~umask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == want
    for name in ("a.csv", "b.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.safetensors", "plain"]
