"""Command line: ``python -m kvlab {ppl,schemes,errors,study} ...``."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _positive(kind):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind}={s!r} is not an integer") from None
        lo = 2 if kind == "ctx" else 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"{kind}={v} is not allowed; allowed: an integer >= {lo}")
        return v

    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--corpus", default="auto",
                   help="pydoc, wikitext-2-v1, wikitext-2-raw-v1, c4, a text file, or auto (WikiText-2 if "
                        "reachable, else pydoc)")
    p.add_argument("--data-dir", default=None, help="folder holding wikitext-2-v1/{test,valid}.txt")
    p.add_argument("--ctx", type=_positive("ctx"), default=512)
    p.add_argument("--windows", type=_positive("windows"), default=24)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_ppl(a) -> int:
    from .evaluate import baseline_ppl

    r = baseline_ppl(a.model, a.corpus, a.ctx, a.windows, a.data_dir)
    if a.json:
        print(json.dumps(r.to_dict()))
    else:
        print(f"{r.model} on {r.corpus}: PPL {r.ppl:.4f} (NLL {r.nll:.5f}) over {r.n_tokens_scored} tokens, "
              f"{r.windows} windows x ctx {r.ctx}, tokens sha256 {r.tokens_sha256[:12]}")
    return 0


def cmd_study(a) -> int:
    print("kvlab study: baseline perplexity of the embedded model", file=sys.stderr)
    return cmd_ppl(a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvlab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl", help="perplexity of a model, optionally with a KV scheme")
    _common(p)
    p.set_defaults(fn=cmd_ppl)
    p = sub.add_parser("study", help="the main job: run the study on the embedded defaults")
    _common(p)
    p.set_defaults(fn=cmd_study)
    a = parser.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvlab: error: {e}", file=sys.stderr)
        return 2
