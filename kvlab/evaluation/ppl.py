"""Perplexity harness: non-overlapping windows from the start of a tokenized corpus.

Window ``i`` is tokens ``[i*ctx, (i+1)*ctx)`` of the corpus tokenized without special tokens; every token
after the first in a window is scored, so a window contributes ``ctx - 1`` predictions. Per-window mean
NLLs are kept so schemes can be paired window by window.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

__all__ = ["PplResult", "make_windows", "nll_per_window", "tokenize", "tokens_sha256", "window_nll"]


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (N,) of ``text`` with no special tokens. ``max_tokens`` stops early on long corpora
    (the text is cut at a line boundary with a margin, then the ids are truncated)."""
    if max_tokens is not None:
        # ~4 characters a token in English; tokenize a generous prefix, grow it if it falls short
        n_chars = max(4096, 8 * max_tokens)
        while True:
            cut = text if n_chars >= len(text) else text[: text.rfind("\n", 0, n_chars) + 1 or n_chars]
            ids = tokenizer(cut, add_special_tokens=False)["input_ids"]
            if len(ids) > max_tokens or cut is text or len(cut) == len(text):
                break
            n_chars *= 2
        return torch.tensor(ids[: max_tokens + 1] if len(ids) > max_tokens else ids, dtype=torch.long)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def make_windows(ids: torch.Tensor, ctx: int, windows: int) -> torch.Tensor:
    """(N,) ids -> (n, ctx) windows, the first ``windows`` non-overlapping ones that fit."""
    if not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx={ctx!r} is too small; allowed: an integer >= 2 (one token is context, one scored)")
    if not isinstance(windows, int) or windows < 1:
        raise ValueError(f"windows={windows!r} is not allowed; allowed: an integer >= 1")
    n_avail = ids.numel() // ctx
    if n_avail == 0:
        raise ValueError(f"the corpus has {ids.numel()} tokens, fewer than one window of ctx={ctx}; "
                         "use a smaller ctx or a longer corpus")
    if windows > n_avail:
        warnings.warn(f"windows={windows} requested but the corpus holds only {n_avail} windows of "
                      f"ctx={ctx}; using {n_avail}", stacklevel=2)
        windows = n_avail
    return ids[: windows * ctx].reshape(windows, ctx)


def tokens_sha256(windows: torch.Tensor) -> str:
    """sha256 of the window ids as little-endian int64: identifies exactly which tokens were scored."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()).hexdigest()


def nll_per_window(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL per window: logits (n, ctx, V), ids (n, ctx) -> (n,) float64."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    tgt = ids[:, 1:].to(logits.device)
    return -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).mean(-1).cpu()


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, progress: bool = True, desc: str = "windows") -> torch.Tensor:
    """(n, ctx) windows -> (n,) float64 mean NLL per window, one forward pass per window."""
    device = next(model.parameters()).device
    out = torch.empty(windows.shape[0], dtype=torch.float64)
    for i in tqdm(range(windows.shape[0]), desc=desc, disable=not progress, leave=False):
        ids = windows[i : i + 1].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        out[i] = nll_per_window(logits, ids)[0]
    return out


@dataclass
class PplResult:
    """One perplexity evaluation. ``window_nll`` is kept for pairing schemes window by window."""

    ppl: float
    nll: float
    n_tokens_scored: int
    window_nll: list[float]
    tokens_sha256: str
    model: str
    corpus: str
    ctx: int
    windows: int
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_nll(cls, nll: torch.Tensor, windows: torch.Tensor, **meta) -> PplResult:
        mean = float(nll.mean())
        return cls(
            ppl=math.exp(mean), nll=mean, n_tokens_scored=int(windows.shape[0] * (windows.shape[1] - 1)),
            window_nll=[float(v) for v in nll], tokens_sha256=tokens_sha256(windows),
            ctx=int(windows.shape[1]), windows=int(windows.shape[0]), **meta,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d
