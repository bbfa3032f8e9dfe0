"""kvlab.study.findings: the README's Findings block is what the committed metrics generate, and every
number in it moves with the metrics it comes from."""

from __future__ import annotations

import copy
import json

import pytest

from kvlab.study import findings as F
from kvlab.study.runner import NOTEBOOK_DIR, notebooks, parameter_defaults


@pytest.fixture(scope="module")
def metrics():
    return F.load_metrics()


@pytest.fixture(scope="module")
def block(metrics):
    return F.findings_block(metrics)


def test_every_rendered_notebook_has_committed_metrics(metrics):
    assert set(F.NOTEBOOK_BULLETS) <= set(metrics), sorted(set(F.NOTEBOOK_BULLETS) - set(metrics))
    assert set(metrics) <= {p.stem for p in notebooks()}


def test_readme_findings_match_the_committed_metrics(block):
    """The drift test: regenerate the block from notebooks/metrics/ and benchmarks/results/ and compare.
    On failure run `python -m kvlab study --findings` (or re-render) and commit README.md."""
    text = F.README.read_text()
    assert F.replace_block(text, block) == text, "README.md's findings block drifted from notebooks/metrics/"


def test_committed_metrics_match_the_rendered_notebooks(metrics):
    """Notebooks that display their metrics in the last cell show the same numbers as the committed copy."""
    import ast
    import re

    for name, m in metrics.items():
        nb = json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())
        last = [c for c in nb["cells"] if c["cell_type"] == "code"][-1]
        shown = [o["data"]["text/plain"] for o in last.get("outputs", []) if "text/plain" in o.get("data", {})]
        if not shown or not "".join(shown[-1]).lstrip().startswith("{"):
            continue
        rendered = ast.literal_eval(re.sub(r"np\.(?:float64|int64)\(([^()]*)\)", r"\1", "".join(shown[-1])))
        assert json.loads(json.dumps(rendered)) == m, name


@pytest.mark.parametrize("name, path, value, old, new", [
    ("01_dump_tensors", ("outlier_ratio_k_pre",), 77.7, "K pre-RoPE 10.3", "K pre-RoPE 77.7"),
    ("02_error_heatmaps", ("mixed_delta_ppl",), 12.5, "to +839.0", "to +12.5"),
    ("03_cosine_vs_perplexity", ("discordance", "1 - V cosine", "discordant"), 7, "V cosine 35 of 519",
     "V cosine 7 of 519"),
    ("04_negative_result", ("rival_better",), 5, "in 15 of 17", "in 5 of 17"),
    ("06_lossless", ("lossless_ratio_all_layers",), 9.87, None, "9.87x"),
])
def test_a_changed_metric_changes_the_text(metrics, block, name, path, value, old, new):
    m = copy.deepcopy(metrics)
    d = m[name]
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    changed = F.findings_block(m)
    assert new in changed and new not in block
    if old is not None:
        assert old in block and old not in changed


def test_02_verdict_follows_the_numbers(metrics):
    """'broken everywhere' is said only while keeping the worst heads leaves most of the loss."""
    m = copy.deepcopy(metrics["02_error_heatmaps"])
    assert "broken everywhere" in F.nb02(m)
    m["mixed_delta_ppl"] = m["base_delta_ppl"] / 10
    assert "broken everywhere" not in F.nb02(m) and "90% of the loss" in F.nb02(m)


def test_benchmark_bullets_come_from_the_results_files(tmp_path):
    src = F.ROOT / "benchmarks" / "results" / "fused_cache_h200.json"
    raw = json.loads(src.read_text())
    T = max(r["T"] for r in raw["graph_rows"])
    at = {r["cache"]: r for r in raw["graph_rows"] if r["T"] == T}  # the bullet's prompt length
    kivi2 = at["FusedCache kivi-2"]["step_ms"]
    shown = f"{at['FusedCache kivi-4']['step_ms']:.2f} / {kivi2:.2f} ms"
    at["FusedCache kivi-4"]["step_ms"] = 2.0  # kivi-4's step from graphs
    path = tmp_path / "fused_cache_h200.json"
    path.write_text(json.dumps(raw))
    assert shown in F.fused_bullet(src) and f"2.00 / {kivi2:.2f} ms" in F.fused_bullet(path)
    cpu = (F.ROOT / "benchmarks" / "results" / "cache_cpu.txt").read_text()
    (tmp_path / "cache_cpu.txt").write_text(cpu.replace("CompressedCache q4_0                1.10        15.65",
                                                        "CompressedCache q4_0                1.10        17.65"))
    assert "q4_0 15.65" in F.cache_cpu_bullet() and "q4_0 17.65" in F.cache_cpu_bullet(tmp_path / "cache_cpu.txt")


def test_each_kivi_group_gets_the_studys_perplexity_cost():
    from kvlab.study import kernel_tables as kt

    path = F.ROOT / "benchmarks" / "results" / "decode_attention_h200.json"
    assert "perplexity cost is not in the saved study results" in F.kernels_bullet(path, study=None)
    study = {"corpus": "wikitext-2-v1", "ctx": 2048, "windows": 24,
             "delta_ppl": {"kivi:bits=4": 0.03, "kivi:bits=2": 3.7, "kivi:bits=4,group=128": 0.25,
                           "k=kivi:bits=2,group=128;v=kivi:bits=2,group=64": 9.5},
             "delta_ppl_ci": {"k=kivi:bits=2,group=128;v=kivi:bits=2,group=64": [8.0, 11.0]}}
    assert "it costs delta PPL +0.25 (int4) and +9.50 (int2) against +0.03 / +3.70 at group 32" in \
        F.kernels_bullet(path, study=study)
    q = kt.group_quality(path, study)
    assert q.loc[(128, 2), "study"] == "k=kivi:bits=2,group=128;v=kivi:bits=2,group=64" and q.loc[(128, 2), "ci hi"] == 11.0
    assert q.loc[(32, 4), "ci lo"] != q.loc[(32, 4), "ci lo"]  # no CI saved: NaN, not a made-up figure
    assert "for delta PPL +9.500 [+8.000, +11.000]" in kt.group_quality_markdown(q, study)
    assert "not shown" in kt.group_quality_markdown(kt.group_quality(path, None), None)


def test_replace_block_needs_both_markers():
    with pytest.raises(ValueError, match="once"):
        F.replace_block("no markers here", "x")
    text = f"a\n{F.BEGIN}\nold\n{F.END}\nb\n"
    assert F.replace_block(text, "new") == f"a\n{F.BEGIN}\nnew\n{F.END}\nb\n"


def test_record_metrics_copies_what_the_render_saved(tmp_path):
    nb = notebooks(["01"])[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{nb.stem}.metrics.json").write_text(json.dumps({"ctx": 7}))
    dst = F.record_metrics(nb, {"out_dir": str(out)}, metrics_dir=tmp_path / "metrics")
    assert json.loads(dst.read_text()) == {"ctx": 7} and dst.name == f"{nb.stem}.json"
    assert parameter_defaults(nb)["out_dir"] == "../data/01"
    with pytest.raises(FileNotFoundError, match="saved no metrics"):
        F.record_metrics(nb, {"out_dir": str(tmp_path / "nowhere")}, metrics_dir=tmp_path / "metrics")


def test_03_04_use_the_keys_their_notebooks_may_add(metrics):
    """The keys asked of notebooks 03 and 04 fill in the CIs, the rule and the examples when they appear."""
    m3 = copy.deepcopy(metrics["03_cosine_vs_perplexity"])
    m3.update(spearman_ci={"1 - K cosine": [0.92, 0.99]}, near_lossless=3.0, n_near_lossless=17,
              proxy_tolerance=0.1, bits_per_value={"signmag:v=1": 1.25, "fp16": 16.0},
              discordant_example={"1 - V cosine": ["int:bits=3", "kivi:bits=2", 109.2, 29.9]})
    for d in m3["discordance"].values():
        d["rule"] = "holm over 406 pairs at alpha=0.05"
    m3["discordance"]["1 - V cosine"].update(rate_lo=0.024, rate_hi=0.075)
    t3 = F.nb03(m3)
    for s in ("K cosine 0.98 [0.92, 0.99]", "delta PPL <= 3, 17 configs", "within 10%", "from 1.25 to 16 bits",
              "(6.7% [2.4%, 7.5%])", "after Holm's correction", "prefers `int:bits=3` over `kivi:bits=2`"):
        assert s in t3, s
    m4 = copy.deepcopy(metrics["04_negative_result"])
    m4.update(fp16_ppl=27.6147, signmag_wins_against=["int:bits=2,group=32"], thesis="only partly support",
              delta_ppl_ci={"signmag:v=4": [20.9, 35.7]}, cosine_twins_overrated_configs=["signmag:v=2,outliers=8"])
    t4 = F.nb04(m4)
    for s in ("against `int:bits=2,group=32` (PPL 1068, 38.7x fp16's)", "+26.4 [+20.9, +35.7]",
              "data only partly support the thesis", "(`signmag:v=2,outliers=8`)"):
        assert s in t4, s


def test_07_bullet_names_each_models_end_metrics_and_claims():
    from kvlab.study.findings import nb07

    row = {"finding": "K costs more perplexity than V at equal bits", "across models": "holds on both"}
    m = {"labels": ["A", "B"], "configs": ["fp16", "q4_0"], "fp16_ppl": {"A": 10.0, "B": 20.0}, "ctx": 2048,
         "windows": 24, "ranking_spearman": 1.0, "ranking_p": 0.01, "ranking_configs": 5, "findings": [row]}
    assert "end metrics" not in nb07(m) and "07_end_metrics" not in nb07(m)  # metrics saved before the section
    m["passkey"] = {lab: [{"policy": "fp16", "length": 1024, "correct": c, "trials": 20}] for lab, c in (("A", 19), ("B", 15))}
    m["greedy"] = {lab: [{"policy": "fp16", "mean_agree": 64.0, "new_tokens": 64},
                         {"policy": "q4_0", "mean_agree": a, "new_tokens": 64}] for lab, a in (("A", 4.6), ("B", 7.25))}
    m["claims"] = [{"seed": "KIVI", "claim": "`kivi:bits=2` with small loss", "A verdict": "refuted",
                    "B verdict": "refuted", "across models": "refuted on both"},
                   {"seed": "KVQuant", "claim": "recency", "A verdict": "confirmed", "B verdict": "refuted",
                    "across models": "differs"}]
    text = nb07(m)
    assert "A end metrics: passkey `fp16` 19/20 at 1024; greedy tokens equal to fp16's (of 64) `q4_0` 4.6." in text
    assert "B end metrics: passkey `fp16` 15/20 at 1024; greedy tokens equal to fp16's (of 64) `q4_0` 7.2" in text
    assert "KIVI, `kivi:bits=2` with small loss: refuted on both; KVQuant, recency: differs (A confirmed, B refuted)." in text
    assert text.endswith("![](figures/07_end_metrics.png)")


def test_sweep_bullet_is_the_studys_protocol():
    """The README's sweep table comes from the committed rows at the study's shape (ctx 2048, 24 spread windows),
    and its fp16 PPL is notebook 03's."""
    text = F.sweep_bullet()
    assert text is not None and "ctx 2048 x 24 windows" in text and "--sample spread" in text
    m3 = F.load_metrics()["03_cosine_vs_perplexity"]
    assert m3["ctx"] == 2048 and f"(PPL {m3['fp16_ppl']:.3f})" in text
