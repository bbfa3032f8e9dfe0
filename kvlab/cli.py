"""Command line: ``python -m kvlab {ppl,errors,sweep,calibrate,schemes,study} ...``."""

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
    p.add_argument("--model", default=None,
                   help="HF id, local folder, .gguf, or an alias: smollm2-135m-instruct (the default, embedded), "
                        "gemma3-270m (opt-in: make setup MODELS=gemma3-270m)")
    p.add_argument("--corpus", default="auto",
                   help="pydoc, wikitext-2-v1, wikitext-2-raw-v1, c4, a text file, or auto (WikiText-2 if "
                        "reachable, else pydoc)")
    p.add_argument("--data-dir", default=None, help="folder holding wikitext-2-v1/{test,valid}.txt")
    p.add_argument("--ctx", type=_positive("ctx"), default=512)
    p.add_argument("--windows", type=_positive("windows"), default=24)
    p.add_argument("--bos", default="auto", choices=("auto", "always", "never"),
                   help="start every window with the BOS token: auto (where the tokenizer adds one when "
                        "encoding), always, never. A window with BOS is BOS + ctx-1 text tokens; BOS is never "
                        "scored")
    p.add_argument("--sample", default="first", choices=("first", "spread"),
                   help="which windows: first (the split's first windows) or spread (one window drawn from each "
                        "of --windows equal strata of the whole split, seeded by --sample-seed)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of --sample spread's draw")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_ppl(a) -> int:
    from kvlab.evaluation.evaluate import baseline_ppl, scheme_report

    policy = a.policy or a.scheme
    if policy is None:
        if a.emulation != "prefill":
            raise ValueError("--emulation needs --scheme or --policy")
        d = baseline_ppl(a.model, a.corpus, a.ctx, a.windows, a.data_dir, bos=a.bos, sample=a.sample,
                         seed=a.sample_seed).to_dict()
    else:
        if a.policy and a.scheme:
            raise ValueError("give --scheme (one scheme everywhere) or --policy (a policy spec), not both")
        d = scheme_report(a.model, a.corpus, a.ctx, a.windows, a.data_dir, policy, a.emulation, bos=a.bos,
                          sample=a.sample, seed=a.sample_seed)
    if a.json:
        print(json.dumps(d))
        return 0
    line = (f"{d['model']} on {d['corpus']}: PPL {d['ppl']:.4f} (NLL {d['nll']:.5f}) over "
            f"{d['n_tokens_scored']} tokens, {d['windows']} windows x ctx {d['ctx']} "
            f"({'BOS + ctx-1 text tokens' if d['bos_token_id'] is not None else 'no BOS'})")
    if policy is not None:
        lo, hi = d["delta_ppl_ci"]
        line += (f"\n  {d['scheme']}: {d['bits_per_value']:.3f} bits/value, {d['bytes_per_token']:.0f} B/token; "
                 f"delta PPL vs fp16 {d['delta_ppl']:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}], KL {d['kl']:.5f}")
    print(line)
    return 0


def cmd_errors(a) -> int:
    from kvlab.evaluation.evaluate import error_table, load_windows
    from kvlab.model.loading import load_model

    model, tok = load_model(a.model)
    _, w = load_windows(tok, a.corpus, a.ctx, a.windows, a.data_dir, bos=a.bos, sample=a.sample,
                        seed=a.sample_seed)
    df = error_table(model, w, a.policy or a.scheme, emulation=a.emulation)
    df.insert(0, "scheme", a.policy or a.scheme)
    print(df.to_json(orient="records") if a.json else df.to_string(index=False, float_format="%.5g"))
    return 0


def cmd_sweep(a) -> int:
    from kvlab.evaluation.sweep import sweep
    from kvlab.study.analysis import summarize

    kinds = ("ppl", "errors") if a.errors else ("ppl",)
    tables = sweep(a.configs, model_name=a.model, corpus=a.corpus, data_dir=a.data_dir, ctx=a.ctx,
                   windows=a.windows, out=a.out, kinds=kinds, emulation=a.emulation,
                   error_windows=a.error_windows, shard=a.shard, progress=not a.json, bos=a.bos,
                   sample=a.sample, seed=a.sample_seed)
    ppl = tables.get("ppl")
    if ppl is None or not (ppl["config"] == "fp16").any():
        print(f"kvlab sweep: this shard's configs are under {a.out}; the summary needs fp16's rows (shard 0): "
              "run the same command without --shard once every shard is done")
        return 0
    summary = summarize(ppl, seed=a.seed)
    cols = ["config", "bits_per_value", "bytes_per_token_4096", "ppl", "delta_ppl", "ci_lo", "ci_hi", "kl", "windows"]
    if a.json:
        print(summary[cols].to_json(orient="records"))
    else:
        print(summary[cols].to_string(index=False, float_format="%.5g"))
    return 0


def cmd_calibrate(a) -> int:
    from kvlab.evaluation.calibrate import calibrate_kvquant
    from kvlab.model.loading import load_model

    model, tok = load_model(a.model)
    cals = calibrate_kvquant(model, tok, a.bits, corpus=a.corpus, split=a.split, ctx=a.ctx, windows=a.windows,
                             seed=a.sample_seed, data_dir=a.data_dir, out=a.out, outlier_frac=a.outlier_frac,
                             sample=a.sample, bos=a.bos, model_name=a.model, progress=not a.json)
    rows = [{"bits": c.bits, "id": c.id, "spec": c.spec} for c in cals]
    print(json.dumps(rows) if a.json else "\n".join(r["spec"] for r in rows))
    return 0


def cmd_schemes(a) -> int:
    from kvlab.quant.catalog import format_schemes, schemes_table

    rows = schemes_table()
    print(json.dumps(rows) if a.json else format_schemes(rows))
    return 0


def cmd_study(a) -> int:
    import os
    import time

    from kvlab.study import findings
    from kvlab.study.runner import run_notebooks

    def readme() -> int:
        changed = findings.update_readme()
        print(f"kvlab study: README.md findings {'regenerated' if changed else 'unchanged'} from "
              f"{findings.METRICS_DIR.relative_to(findings.ROOT)}/ and benchmarks/results/")
        return 0

    if a.findings:
        return readme()
    params = {"smoke": a.smoke}
    if a.smoke:  # smoke figures and tables must not overwrite the rendered findings
        base = os.path.abspath(a.out)
        params.update(fig_dir=f"{base}/figures", results_dir=f"{base}/results", out_dir=f"{base}/metrics")
    data_dir = a.data_dir or os.environ.get("KVLAB_DATA_DIR") or None
    if data_dir:
        params["data_dir"] = os.path.abspath(data_dir)
    if a.model:
        params["model"] = a.model
    for key in ("corpus", "ctx", "windows"):
        if getattr(a, key) is not None:
            params[key] = getattr(a, key)
    if a.inplace and not a.smoke and a.corpus is None:
        # the committed notebooks are the findings: never re-render them on the pydoc fallback by accident
        from kvlab.evaluation.corpus import load_corpus

        try:
            load_corpus("wikitext-2-v1", data_dir=data_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--inplace renders the committed findings on WikiText-2, which is not "
                                    f"reachable ({e}); give --data-dir (or KVLAB_DATA_DIR), or name another "
                                    f"corpus with --corpus to render on it deliberately") from None
    if a.fresh:  # nothing reused: the sweeps write into a new, empty results folder
        params["results_dir"] = os.path.abspath(os.path.join(a.out, f"fresh-{time.strftime('%Y%m%d-%H%M%S')}",
                                                             "results"))
    import json
    import tempfile

    from kvlab.evaluation.sweep import LEDGER_ENV

    ledger = tempfile.NamedTemporaryFile(prefix="kvlab-sweeps-", suffix=".jsonl", delete=False)
    ledger.close()
    os.environ[LEDGER_ENV] = ledger.name  # the notebooks' kernels inherit it
    t0 = time.perf_counter()
    try:
        paths = run_notebooks(a.only, out_dir=None if a.inplace else a.out, parameters=params)
    finally:
        del os.environ[LEDGER_ENV]
        with open(ledger.name, encoding="utf-8") as f:
            runs = [json.loads(line) for line in f if line.strip()]
        os.unlink(ledger.name)
    print(f"kvlab study: {len(paths)} notebooks executed in {time.perf_counter() - t0:.0f} s:")
    for kind in ("ppl", "errors"):
        n = [r[kind] for r in runs if kind in r]
        if n:
            print(f"  {kind} results: {sum(c['reused'] for c in n)} configs reused from finished files, "
                  f"{sum(c['computed'] for c in n)} computed ({len(n)} sweeps"
                  + (f"; results in {params['results_dir']}" if a.fresh else "") + ")")
    for p in paths:
        print(f"  {p}")
    print("  figures: figures/*.png")
    if a.inplace and not a.smoke:  # the committed renders' metrics are committed beside them
        for p in paths:
            print(f"  metrics: {findings.record_metrics(p, params)}")
    return readme()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvlab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ppl", help="perplexity of a model, optionally with a KV scheme")
    _common(p)
    p.set_defaults(fn=cmd_ppl)
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
    p = sub.add_parser("sweep", help="a resumable grid of schemes/policies: per-window NLL and KL (and errors) "
                       "under --out, then a summary table with delta PPL vs fp16 and its 95%% CI")
    _common(p)
    p.add_argument("configs", nargs="+", help="scheme or policy specs; fp16 is always added")
    p.add_argument("--out", default="data/results", help="results folder (default data/results)")
    p.add_argument("--errors", action="store_true", help="also the per-layer/head error tables")
    p.add_argument("--error-windows", type=_positive("error-windows"), default=2)
    p.add_argument("--emulation", default="prefill", choices=("prefill", "static", "decode"))
    p.add_argument("--shard", default=None, help="'i/n': run every n-th config from i (job arrays, GPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap CIs")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("calibrate", help="fit kvquantc calibrations (pre-RoPE K thresholds, codebooks) on a "
                       "calibration split; prints the spec of each")
    _common(p)
    p.set_defaults(fn=cmd_calibrate, corpus="wikitext-2-v1", ctx=2048, windows=16, sample="spread")
    p.add_argument("--split", default="valid", help="split of --corpus to calibrate on (default valid)")
    p.add_argument("--bits", type=int, nargs="+", default=[3], help="one calibration per value (2, 3, 4)")
    p.add_argument("--outlier-frac", type=float, default=0.01)
    p.add_argument("--out", default=None, help="folder of the files (default $KVLAB_CALIBRATION_DIR or "
                   "data/calibration)")
    p = sub.add_parser("schemes", help="every scheme with its parameters and bits per value")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_schemes)
    p = sub.add_parser("study", help="execute the study notebooks headless (papermill)")
    p.add_argument("--model", default=None)
    p.add_argument("--corpus", default=None, help="override every notebook's corpus parameter")
    p.add_argument("--data-dir", default=None, help="folder holding wikitext-2-v1/ (default: $KVLAB_DATA_DIR)")
    p.add_argument("--ctx", type=_positive("ctx"), default=None)
    p.add_argument("--windows", type=_positive("windows"), default=None)
    p.add_argument("--smoke", action="store_true", help="a few windows and layers: minutes, not a finding")
    p.add_argument("--only", nargs="*", default=None, help="notebook numbers or names, e.g. 01 03")
    p.add_argument("--out", default="data/executed", help="where executed notebooks go (default data/executed)")
    p.add_argument("--inplace", action="store_true", help="overwrite notebooks/ (renders the committed findings) "
                   "and copy each notebook's metrics to notebooks/metrics/")
    p.add_argument("--fresh", action="store_true", help="reuse no finished sweep results: compute every config "
                   "again, into a new folder under --out")
    p.add_argument("--findings", action="store_true", help="execute nothing: only regenerate README.md's findings "
                   "from notebooks/metrics/ and benchmarks/results/ (every study run does this last)")
    p.set_defaults(fn=cmd_study)
    a = parser.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvlab: error: {e}", file=sys.stderr)
        return 2
