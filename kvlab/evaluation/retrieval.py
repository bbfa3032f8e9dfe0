"""End metrics beside perplexity: passkey retrieval and greedy agreement with a reference policy.

Both are scored teacher-forced, in one forward pass per trial under :func:`kvlab.compress` (decode-exact
emulation: query t reads the cache as it stood when it held t + 1 tokens):

- **Passkey** (Mohtashami & Jaggi 2023): a haystack of filler text of a target token length, a random
  5-digit key stated at a chosen depth, a question at the end, and the answer. A trial is correct when
  every answer token is the argmax of the logits before it, which is what greedy decoding would emit.
- **Greedy agreement**: the number of tokens a policy's greedy continuation shares with the reference
  policy's before the first divergence. Until that divergence the two read the same tokens, so one
  teacher-forced pass over prompt + reference continuation finds it: the first position whose argmax is
  not the reference token.

With ``out`` (a results folder, e.g. ``data/results``) each (policy, length) of passkey and each policy of
greedy agreement is stored as ``out/passkey/<key>.csv`` / ``out/greedy/<key>.csv``, keyed like the sweep's
files by the policy, the emulation, the model's fingerprint and the exact tokens scored (so the seed, the
depths, the filler, BOS and the trial count are all in the key), written atomically under a lock: a re-run
reads them back instead of recomputing, and a killed or concurrent run loses or duplicates nothing. The
reference continuations of greedy agreement are stored the same way (``greedy/<key>.csv``, token ids as
text).

Both equivalences hold for causal schemes. An oracle scheme (``Quantizer.oracle``) fits its statistics on
the whole window, which here includes the answer or the reference continuation: its rows are a ceiling,
never generation results (the study flags them with :func:`kvlab.study.analysis.is_oracle`).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kvlab.emulation.hooks import compress
from kvlab.evaluation.ppl import resolve_bos, tokens_sha256
from kvlab.evaluation.sweep import _claim, _write_csv
from kvlab.model.fingerprint import model_key
from kvlab.quant.policy import parse_policy

__all__ = ["FILLER", "PasskeyTrial", "greedy_agreement", "greedy_continuation", "greedy_summary", "passkey",
           "passkey_summary", "passkey_trials"]

#: the classic filler of the passkey test, one unit repeated to length
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


class PasskeyTrial:
    """One haystack: ``ids`` (T,) long, ``answer`` the slice of ``ids`` holding the key's tokens, the
    ``key``, the asked ``depth`` and the needle's actual token offset ``needle_at``."""

    __slots__ = ("answer", "depth", "ids", "key", "needle_at")

    def __init__(self, ids, answer, key, depth, needle_at):
        self.ids, self.answer, self.key, self.depth, self.needle_at = ids, answer, key, depth, needle_at


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_trials(tokenizer, length: int, trials: int, depths=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0,
                   filler: str | None = None, bos: str = "auto") -> list[PasskeyTrial]:
    """``trials`` haystacks of exactly ``length`` tokens, trial i with its needle at ``depths[i % len]``
    (a fraction of the filler) and a random 5-digit key, all drawn from ``seed`` (and ``length``), so every
    policy sees the same haystacks. ``filler``: text to draw the haystack from (a contiguous span at a
    random offset, e.g. a corpus split); default: :data:`FILLER` repeated, the needle placed between units."""
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials={trials!r} is not allowed; allowed: an integer >= 1")
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths={depths!r} is not allowed; allowed: fractions in [0, 1]")
    rng = np.random.default_rng([seed, length])
    bos_id = resolve_bos(tokenizer, bos)
    head = ([bos_id] if bos_id is not None else []) + _ids(tokenizer, PREFIX)
    question = _ids(tokenizer, QUESTION)
    unit = _ids(tokenizer, FILLER if filler is None else filler)
    out = []
    for i in range(trials):
        key = int(rng.integers(10_000, 100_000))
        needle, answer = _ids(tokenizer, NEEDLE.format(key=key)), _ids(tokenizer, ANSWER.format(key=key))
        n_fill = length - len(head) - len(needle) - len(question) - len(answer)
        if n_fill < 1:
            raise ValueError(f"length={length} leaves no room for filler around the {length - n_fill} tokens of "
                             "prompt, needle, question and answer; allowed: a larger length")
        if filler is None:
            fill = (unit * (n_fill // len(unit) + 1))[:n_fill]
            at = min(round(depths[i % len(depths)] * n_fill / len(unit)) * len(unit), n_fill)  # between units
        else:
            if len(unit) < n_fill:
                raise ValueError(f"filler has {len(unit)} tokens, fewer than the {n_fill} a haystack of "
                                 f"length={length} needs; allowed: a longer filler text")
            start = int(rng.integers(0, len(unit) - n_fill + 1))
            fill = unit[start: start + n_fill]
            at = round(depths[i % len(depths)] * n_fill)
        ids = head + fill[:at] + needle + fill[at:] + question + answer
        out.append(PasskeyTrial(torch.tensor(ids, dtype=torch.long), slice(len(ids) - len(answer), len(ids)),
                                key, depths[i % len(depths)], len(head) + at))
    return out


@torch.no_grad()
def _last_logits(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits (keep, V) of the last ``keep`` positions of ids (T,), from one forward pass that keeps
    only those (a 4k x 49k float32 logits tensor is 800 MB)."""
    x = ids[None].to(next(model.parameters()).device)
    try:
        return model(input_ids=x, use_cache=False, logits_to_keep=keep).logits[0]
    except TypeError:  # a model without logits_to_keep
        return model(input_ids=x, use_cache=False).logits[0, -keep:]


def _argmax_from(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Greedy predictions for positions start..T-1 of ids (T,): the argmax of the logits one position
    earlier. -> (T - start,) long."""
    return _last_logits(model, ids, ids.numel() - start + 1)[:-1].argmax(-1).cpu()


def _policy_meta(policy) -> dict:
    return {"policy": policy if isinstance(policy, str) else parse_policy(policy).spec}


def _ids_sha256(seqs) -> str:
    """sha256 over a list of 1-D id tensors, lengths included (so a different split cannot collide)."""
    h = hashlib.sha256()
    for t in seqs:
        h.update(f"{t.numel()}:".encode())
        h.update(tokens_sha256(t.reshape(1, -1)).encode())
    return h.hexdigest()


def _stored(out, kind: str, parts: list[str], n_rows: int, compute) -> pd.DataFrame:
    """The rows of one unit of work: read from ``out/kind/<key>.csv`` when a whole file of ``n_rows`` rows of
    this key (column ``result_key``) is there, else computed by ``compute()`` under the unit's lock and written atomically. Without
    ``out`` just ``compute()``."""
    if out is None:
        return compute()
    key = hashlib.sha256("|".join([kind, *parts]).encode()).hexdigest()[:16]
    path = Path(out) / kind / f"{key}.csv"

    def read():
        if not path.exists():
            return None
        try:
            df = pd.read_csv(path, dtype={"tokens": str})
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
            warnings.warn(f"{kind}: recomputing {path}: unreadable ({type(e).__name__})", stacklevel=3)
            return None
        if (len(df) != n_rows or "result_key" not in df.columns or (df["result_key"].astype(str) != key).any()
                or df.isna().any().any()):
            warnings.warn(f"{kind}: recomputing {path}: not the {n_rows} whole rows of key {key}", stacklevel=3)
            return None
        return df

    df = read()
    if df is not None:
        return df
    with _claim(path.with_suffix(".lock"), wait=True):
        df = read()  # a concurrent run may have finished it while this one waited
        if df is None:
            df = compute()
            df.insert(0, "result_key", key)
            _write_csv(df, path)
    return df


def passkey(model, tokenizer, policies=("fp16",), lengths=(1024,), trials: int = 20,
            depths=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0, filler: str | None = None, bos: str = "auto",
            emulation: str = "prefill", progress: bool = True, out=None) -> pd.DataFrame:
    """Passkey retrieval of every policy at every length: one row per (policy, length, trial) with
    ``key``, ``depth``, ``needle_at``, ``correct`` (every answer token the argmax), ``tokens_correct``,
    ``n_answer_tokens`` and ``seconds`` (the trial's forward pass). Every policy sees the same
    haystacks (:func:`passkey_trials`). ``out``: a results folder to store and reuse each (policy, length)
    (module docstring)."""
    frames = []
    mkey = model_key(model) if out is not None else ""
    for length in lengths:
        hay = passkey_trials(tokenizer, length, trials, depths=depths, seed=seed, filler=filler, bos=bos)
        tokens = _ids_sha256([t.ids for t in hay]) + f"|answers={[t.answer.start for t in hay]}"
        for policy in policies:
            meta = _policy_meta(policy)

            def run(meta=meta, policy=policy, hay=hay, length=length):
                rows = []
                with compress(model, policy, emulation=emulation):
                    for i, t in enumerate(tqdm(hay, desc=f"passkey {meta['policy']} @ {length}",
                                               disable=not progress, leave=False)):
                        t0 = time.perf_counter()
                        pred = _argmax_from(model, t.ids, t.answer.start)
                        hits = pred == t.ids[t.answer]
                        rows.append({**meta, "length": length, "trial": i, "key": t.key, "depth": t.depth,
                                     "needle_at": t.needle_at, "correct": bool(hits.all()),
                                     "tokens_correct": int(hits.sum()), "n_answer_tokens": int(hits.numel()),
                                     "seconds": time.perf_counter() - t0})
                return pd.DataFrame(rows)

            df = _stored(out, "passkey", [meta["policy"], emulation, mkey, tokens], len(hay), run)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def passkey_summary(df: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per (policy, length): trials, correct, accuracy with an exact (Clopper-Pearson) binomial CI
    (scipy.stats.binomtest), ``token_accuracy`` (the mean share of a trial's answer tokens that are the argmax:
    a trial missed by one token, e.g. a word before the key, scores high here and 0 in ``accuracy``), and the
    mean seconds per trial."""
    from scipy.stats import binomtest

    rows = []
    for (policy, length), g in df.groupby(["policy", "length"], sort=False):
        k, n = int(g["correct"].sum()), len(g)
        ci = binomtest(k, n).proportion_ci(confidence, method="exact")
        rows.append({"policy": policy, "length": length, "trials": n,
                     "correct": k, "accuracy": k / n, "ci_lo": float(ci.low), "ci_hi": float(ci.high),
                     "token_accuracy": float((g["tokens_correct"] / g["n_answer_tokens"]).mean()),
                     "seconds_per_trial": float(g["seconds"].mean())})
    return pd.DataFrame(rows)


@torch.no_grad()
def greedy_continuation(model, prompt: torch.Tensor, new_tokens: int, policy="fp16",
                        emulation: str = "prefill") -> torch.Tensor:
    """The greedy continuation (new_tokens,) of ``prompt`` (P,) under ``policy``, token by token (no EOS stop).

    ``emulation="prefill"``: one forward of the whole sequence per new token, each reading the cache exactly as
    the decode-exact emulation defines it (O(T^2) work per continuation). ``"decode"``: a real
    :class:`kvlab.CompressedCache` fed one token at a time, prompt included, as a compressed-cache server
    would decode (O(T)); the two agree up to floating-point rounding (``tests/storage``), and causal schemes
    only (the cache refuses oracle ones)."""
    if emulation == "decode":
        from kvlab.storage.cache import CompressedCache, cache_kwarg

        device = next(model.parameters()).device
        kw = {cache_kwarg(model): CompressedCache(policy, config=model.config)}
        ids = prompt.to(device)
        out = []
        for t in range(ids.numel()):
            logits = model(input_ids=ids[t: t + 1][None], use_cache=True, **kw).logits
        for _ in range(new_tokens):
            nxt = logits[0, -1].argmax(-1).view(1, 1)
            out.append(int(nxt))
            if len(out) < new_tokens:
                logits = model(input_ids=nxt, use_cache=True, **kw).logits
        return torch.tensor(out, dtype=torch.long)
    ids = prompt.cpu()
    with compress(model, policy, emulation=emulation):
        for _ in range(new_tokens):
            ids = torch.cat([ids, _last_logits(model, ids, 1).argmax(-1).cpu()])
    return ids[prompt.numel():]


def greedy_agreement(model, prompts: torch.Tensor, policies, new_tokens: int = 64, reference="fp16",
                     emulation: str = "prefill", progress: bool = True, out=None,
                     reference_emulation: str | None = None) -> pd.DataFrame:
    """For each prompt of ``prompts`` (n, P) and each policy: ``agree``, the number of greedy tokens equal to
    ``reference``'s greedy continuation before the first divergence (``new_tokens`` when none:
    ``censored``). The reference continuation is generated token by token; each policy is then scored in one
    teacher-forced pass over prompt + reference continuation. One row per (policy, prompt). ``out``: a
    results folder to store and reuse the reference continuations and each policy's rows (module docstring).
    ``reference_emulation``: how the reference continuation is generated (:func:`greedy_continuation`;
    default ``emulation``); ``"decode"`` runs a real cache token by token, far cheaper on long prompts. The
    reference policy's own row then checks that the two paths agree (it should never diverge)."""
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be (n, P) token ids, got shape {tuple(prompts.shape)}")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens!r} is not allowed; allowed: an integer >= 1")
    mkey = model_key(model) if out is not None else ""
    ref_meta = _policy_meta(reference)

    gen = reference_emulation or emulation
    conts_key = [] if gen == emulation else [f"generated={gen}"]

    def generate():
        conts = [greedy_continuation(model, p, new_tokens, reference, gen)
                 for p in tqdm(prompts, desc=f"greedy reference {ref_meta['policy']}", disable=not progress,
                               leave=False)]
        return pd.DataFrame({"prompt": range(len(conts)), "tokens": [" ".join(map(str, c.tolist())) for c in conts]})

    ref_df = _stored(out, "greedy", ["reference", ref_meta["policy"], emulation, mkey,
                                     _ids_sha256(list(prompts)), f"new_tokens={new_tokens}", *conts_key],
                     len(prompts), generate)
    refs = [torch.tensor([int(x) for x in str(t).split()], dtype=torch.long) for t in ref_df["tokens"]]
    scored = _ids_sha256([torch.cat([p, r]) for p, r in zip(prompts, refs)])
    frames = []
    for policy in policies:
        meta = _policy_meta(policy)

        def run(meta=meta, policy=policy):
            rows = []
            with compress(model, policy, emulation=emulation):
                for i, (p, ref) in enumerate(tqdm(list(zip(prompts, refs)), desc=f"greedy {meta['policy']}",
                                                  disable=not progress, leave=False)):
                    t0 = time.perf_counter()
                    pred = _argmax_from(model, torch.cat([p, ref]), p.numel())
                    miss = (pred != ref).nonzero()
                    agree = int(miss[0, 0]) if miss.numel() else new_tokens
                    rows.append({**meta, "reference": ref_meta["policy"], "prompt": i, "agree": agree,
                                 "censored": agree == new_tokens, "new_tokens": new_tokens,
                                 "seconds": time.perf_counter() - t0})
            return pd.DataFrame(rows)

        frames.append(_stored(out, "greedy", ["agreement", meta["policy"], emulation, mkey, scored],
                              len(prompts), run))
    return pd.concat(frames, ignore_index=True)


def greedy_summary(df: pd.DataFrame, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per policy: prompts, mean tokens agreed before the first divergence with a percentile bootstrap CI
    over prompts, the median, and the fraction of prompts that never diverged (censored at new_tokens)."""
    rng = np.random.default_rng(seed)
    tail = (1 - confidence) / 2 * 100
    rows = []
    for policy, g in df.groupby("policy", sort=False):
        a = g["agree"].to_numpy(np.float64)
        boot = a[rng.integers(0, a.size, size=(n_resamples, a.size))].mean(axis=1)
        lo, hi = np.percentile(boot, [tail, 100 - tail]) if a.size > 1 else (a.mean(), a.mean())
        rows.append({"policy": policy, "prompts": a.size,
                     "mean_agree": float(a.mean()), "ci_lo": float(lo), "ci_hi": float(hi),
                     "median_agree": float(np.median(a)), "never_diverged": float(g["censored"].mean()),
                     "new_tokens": int(g["new_tokens"].iloc[0])})
    return pd.DataFrame(rows)
