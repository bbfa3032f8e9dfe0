"""Shared fixtures: the embedded real model (loaded once per session) and the shared WikiText-2 folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton picks interpreter-or-compiler when a kernel is decorated, i.e. when kvlab.kernels is first
# imported, which any test module may do (the cache, the quantizers). Without CUDA the kernels can only
# run through the interpreter, so the variable is set here, before any test module is collected.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): small
    tensors run faster on one, and on 2 shared, loaded cores 2 threads made greedy decoding ~30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _embedded(**kwargs):
    """Load the embedded model. A missing model is an error (``make setup`` installs it, so CI fails on a
    missing install step), except where ``KVLAB_ALLOW_NO_MODEL=1`` says the machine cannot hold it (the
    GPU machine, which the GGUF file cannot travel to): there the tests that need it skip."""
    import kvlab

    try:
        return kvlab.load_model(**kwargs)
    except FileNotFoundError as exc:
        if os.environ.get("KVLAB_ALLOW_NO_MODEL") == "1":
            pytest.skip(f"embedded model not installed here (KVLAB_ALLOW_NO_MODEL=1): {exc}")
        raise


@pytest.fixture(scope="session")
def model_and_tokenizer():
    return _embedded()


@pytest.fixture(scope="session")
def model64():
    """The embedded model in float64: decode and prefill then see the same K/V to the last bit, so
    comparisons are not swamped by fp32 GEMM-order noise amplified by the quantizers' rounding steps."""
    import torch

    return _embedded(dtype=torch.float64)[0]


@pytest.fixture(scope="session")
def model(model_and_tokenizer):
    return model_and_tokenizer[0]


@pytest.fixture(scope="session")
def tokenizer(model_and_tokenizer):
    return model_and_tokenizer[1]


@pytest.fixture(scope="session")
def data_dir():
    if not (SHARED_DATA / "wikitext-2-v1" / "test.txt").is_file():
        pytest.skip(f"WikiText-2 not found under {SHARED_DATA}")
    return str(SHARED_DATA)
