"""Perplexity harness: non-overlapping windows from the start of a tokenized corpus.

The corpus is tokenized without special tokens. Without BOS, window ``i`` is text tokens
``[i*ctx, (i+1)*ctx)``; with BOS (as llama.cpp's perplexity tool and the usual harnesses do for a tokenizer
that adds one), window ``i`` is the BOS token followed by text tokens ``[i*(ctx-1), (i+1)*(ctx-1))``, so a
window is ``ctx`` tokens either way and fits a context of ``ctx``. Every token after the first in a window
is scored: a window contributes ``ctx - 1`` predictions, and the BOS is context, never a target.
Per-window mean NLLs are kept so schemes can be paired window by window.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

__all__ = ["BOS_MODES", "PplResult", "make_windows", "nll_per_window", "resolve_bos", "tokenize", "tokens_sha256",
           "window_nll"]

BOS_MODES = ("auto", "always", "never")


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


def resolve_bos(tokenizer, bos: str = "auto") -> int | None:
    """The BOS token id that starts every window, or None. ``bos``: ``"auto"`` (a BOS where the tokenizer
    puts one when it encodes with special tokens), ``"always"`` (the tokenizer's BOS token, which it must
    have) or ``"never"``."""
    if bos not in BOS_MODES:
        raise ValueError(f"bos={bos!r} is not allowed; allowed: {', '.join(BOS_MODES)}")
    if bos == "never":
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos == "always":
        if bos_id is None:
            raise ValueError(f"bos='always' but the tokenizer ({type(tokenizer).__name__}) has no BOS token; "
                             "allowed here: bos='auto' or 'never'")
        return int(bos_id)
    probe = "Hello world"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if bos_id is not None and len(with_special) > len(plain) and with_special[0] == bos_id:
        return int(bos_id)
    return None


SAMPLES = ("first", "spread")


def make_windows(ids: torch.Tensor, ctx: int, windows: int, bos: int | None = None, sample: str = "first",
                 seed: int = 0) -> torch.Tensor:
    """(N,) ids -> (n, ctx) windows, non-overlapping. With ``bos`` (a token id), each window is that token
    followed by ``ctx - 1`` text tokens. ``sample="first"``: the first ``windows`` that fit;
    ``"spread"``: the split's window slots are cut into ``windows`` equal strata and one slot is drawn
    from each with ``seed`` (so the windows cover the whole split, a few articles no longer stand for
    it), in corpus order."""
    if sample not in SAMPLES:
        raise ValueError(f"sample={sample!r} is not allowed; allowed: {', '.join(SAMPLES)}")
    if not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx={ctx!r} is too small; allowed: an integer >= 2 (one token is context, one scored)")
    if not isinstance(windows, int) or windows < 1:
        raise ValueError(f"windows={windows!r} is not allowed; allowed: an integer >= 1")
    text = ctx if bos is None else ctx - 1  # text tokens per window
    n_avail = ids.numel() // text
    if n_avail == 0:
        raise ValueError(f"the corpus has {ids.numel()} tokens, fewer than one window of ctx={ctx}; "
                         "use a smaller ctx or a longer corpus")
    if windows > n_avail:
        warnings.warn(f"windows={windows} requested but the corpus holds only {n_avail} windows of "
                      f"ctx={ctx}; using {n_avail}", stacklevel=2)
        windows = n_avail
    w = ids[: n_avail * text].reshape(n_avail, text)
    if sample == "first":
        w = w[:windows]
    else:
        edges = torch.arange(windows + 1) * n_avail // windows  # (windows + 1,): stratum i = [edges[i], edges[i+1])
        u = torch.rand(windows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        w = w[edges[:-1] + (u * (edges[1:] - edges[:-1])).long()]
    if bos is not None:
        w = torch.cat([torch.full((windows, 1), bos, dtype=w.dtype), w], dim=1)
    return w


def tokens_sha256(windows: torch.Tensor) -> str:
    """sha256 of the window ids as little-endian int64: identifies exactly which tokens were scored."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()).hexdigest()


def nll_per_window(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL per window: logits (n, ctx, V), ids (n, ctx) -> (n,) float64. In float64, 256
    positions at a time (a 262k vocabulary's 2048 positions would take 4.3 GB a float64 copy)."""
    tgt = ids[:, 1:].to(logits.device)
    nll = []
    for s in range(0, logits.shape[1] - 1, 256):
        e = min(s + 256, logits.shape[1] - 1)
        logp = torch.log_softmax(logits[:, s:e].double(), dim=-1)
        nll.append(-logp.gather(-1, tgt[:, s:e].unsqueeze(-1)).squeeze(-1))
    return torch.cat(nll, -1).mean(-1).cpu()


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
    """One perplexity evaluation. ``window_nll`` is kept for pairing schemes window by window. ``bos``: the
    BOS mode asked for (auto, always, never); ``bos_token_id``: the token that starts every window, or None."""

    ppl: float
    nll: float
    n_tokens_scored: int
    window_nll: list[float]
    tokens_sha256: str
    model: str
    corpus: str
    ctx: int
    windows: int
    bos: str = "auto"
    bos_token_id: int | None = None
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
        d["window_layout"] = "BOS + ctx-1 text tokens" if self.bos_token_id is not None else "ctx text tokens"
        d.update(d.pop("extra"))
        return d
