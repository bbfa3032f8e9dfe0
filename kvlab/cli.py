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
    from .evaluate import baseline_ppl, scheme_report

    policy = a.policy or a.scheme
    if policy is None:
        if a.emulation != "prefill":
            raise ValueError("--emulation needs --scheme or --policy")
        d = baseline_ppl(a.model, a.corpus, a.ctx, a.windows, a.data_dir).to_dict()
    else:
        if a.policy and a.scheme:
            raise ValueError("give --scheme (one scheme everywhere) or --policy (a policy spec), not both")
        d = scheme_report(a.model, a.corpus, a.ctx, a.windows, a.data_dir, policy, a.emulation)
    if a.json:
        print(json.dumps(d))
        return 0
    line = (f"{d['model']} on {d['corpus']}: PPL {d['ppl']:.4f} (NLL {d['nll']:.5f}) over "
            f"{d['n_tokens_scored']} tokens, {d['windows']} windows x ctx {d['ctx']}")
    if policy is not None:
        lo, hi = d["delta_ppl_ci"]
        line += (f"\n  {d['scheme']}: {d['bits_per_value']:.3f} bits/value, {d['bytes_per_token']:.0f} B/token; "
                 f"delta PPL vs fp16 {d['delta_ppl']:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}], KL {d['kl']:.5f}")
    print(line)
    return 0


def cmd_errors(a) -> int:
    from .evaluate import error_table, load_windows
    from .models import load_model

    model, tok = load_model(a.model)
    _, w = load_windows(tok, a.corpus, a.ctx, a.windows, a.data_dir)
    df = error_table(model, w, a.policy or a.scheme, emulation=a.emulation)
    df.insert(0, "scheme", a.policy or a.scheme)
    print(df.to_json(orient="records") if a.json else df.to_string(index=False, float_format="%.5g"))
    return 0


def cmd_schemes(a) -> int:
    from .quant.catalog import format_schemes, schemes_table

    rows = schemes_table()
    print(json.dumps(rows) if a.json else format_schemes(rows))
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
    for p in (p,):
        p.add_argument("--scheme", default=None, help="a scheme spec for every layer, e.g. kivi:bits=2")
        p.add_argument("--policy", default=None, help="a policy spec, e.g. 'kv=q4_0;keep_first=2'")
        p.add_argument("--emulation", default="prefill", choices=("prefill", "static", "decode"),
                       help="prefill: decode-exact in one pass; static: quantize all then prefill; "
                            "decode: token by token through CompressedCache")
    p = sub.add_parser("errors", help="per-layer/head tensor and attention-output errors of a scheme")
    _common(p)
    p.set_defaults(windows=2)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--scheme")
    g.add_argument("--policy")
    p.add_argument("--emulation", default="prefill", choices=("prefill", "static"))
    p.set_defaults(fn=cmd_errors)
    p = sub.add_parser("schemes", help="every scheme with its parameters and bits per value")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_schemes)
    p = sub.add_parser("study", help="the main job: run the study on the embedded defaults")
    _common(p)
    p.set_defaults(fn=cmd_study)
    a = parser.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvlab: error: {e}", file=sys.stderr)
        return 2
