"""kvlab.study.kernel_tables: the tables and figure notebook 05 renders from saved benchmark results (no GPU,
no triton: the results are JSON files). The module lives in the study support; its tests sit with the kernels
whose benchmark output it reads."""

from __future__ import annotations

import pytest

from kvlab.study import kernel_tables as report


def _fake_results(path):
    import json

    grid = []
    for B, T in [(8, 4096), (8, 32768)]:
        g = {"B": B, "T": T, "sdpa_us": 100.0, "sdpa_bw": 0.9, "sdpa_graph_us": 90.0}
        for i, k in enumerate(("kivi-int4", "kivi-int2", "q4_0", "q8_0", "cuda-int4", "cuda-int2")):
            us = 20.0 + 10 * i
            g.update({f"{k}_us": us, f"{k}_speedup": 100.0 / us, f"{k}_bw": 0.2 * (i + 1),
                      f"{k}_relerr_vs_fp16": 0.1, f"{k}_graph_us": us - 1, f"{k}_graph_speedup": 90.0 / (us - 1),
                      f"{k}_graph_bw": 0.2 * (i + 1)})
        grid.append(g)
    path.write_text(json.dumps({"device": "FakeGPU", "triton": "0", "copy_bw": 3e12, "grid": grid}))
    return path


def test_report_tables_and_goals(tmp_path):
    df = report.load_results(_fake_results(tmp_path / "r.json"))
    assert df.attrs["device"] == "FakeGPU"
    assert set(df.kernel) == {"sdpa", *report.KERNELS} - {"fi-fp16", "fi-fp8"}  # an H100 run: no FlashInfer
    assert set(df.timing) == {"eager", "graph"}
    t = report.speedup_table(df)
    assert list(t.index) == [(8, 4096), (8, 32768)]
    assert t.loc[(8, 32768), "kivi-int4 x"] == pytest.approx(5.0)
    assert t.loc[(8, 32768), "kivi-int2 bw"] == pytest.approx(0.4)
    goals = report.goal_check(df).set_index("goal")
    assert goals.loc["kivi-int4 speedup over fp16 SDPA", "met"]            # 5.0 >= 3.2
    assert not goals.loc["kivi-int2 speedup over fp16 SDPA", "met"]        # 3.33 < 5
    assert not goals.loc["kivi-int4 fraction of copy bandwidth", "met"]    # 0.2 < 0.85
    assert goals.loc["cuda-int2 fraction of copy bandwidth", "met"]        # 1.2 >= 0.85
    assert not goals.loc["cuda-int4 speedup over fp16 SDPA", "met"]        # 100 / 60 < 3.2
    text = report.verdict_markdown(df, report.goal_check(df))
    assert "FakeGPU" in text and "Goals met: 3 of 8" in text
    fig = report.plot_speedups(df)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) >= len(report.KERNELS)


def test_group_table(tmp_path):
    import json



    path = _fake_results(tmp_path / "r.json")
    with pytest.raises(ValueError, match="no group sweep"):
        report.group_table(path)
    raw = json.loads(path.read_text())
    raw["groups"] = {"B": 8, "T": 32768, "sdpa_us": 350.0, "sdpa_graph_us": 340.0, "rows": [
        {"group": g, "bits": b, "variant": "folded", "bits_per_value": b + 32 / g, "us": 100.0 / b + g / 32,
         "graph_us": 90.0 / b, "speedup": 350.0 / (100.0 / b + g / 32), "graph_speedup": 340.0 / (90.0 / b),
         "bw_frac": 0.8, "floor_speedup": 16 / (b + 32 / g), "relerr_vs_reference": 1e-3}
        for g in (32, 128) for b in (4, 2)]}
    path.write_text(json.dumps(raw))
    df = report.group_table(path)
    assert list(df.index) == [(32, 4), (32, 2), (128, 4), (128, 2)]
    assert df.loc[(128, 2), "bits/value"] == pytest.approx(2.25)
    assert df.loc[(32, 4), "floor x"] == pytest.approx(3.2)
    assert df.loc[(32, 2), "x"] == pytest.approx(350.0 / 51.0)
    assert df.attrs["device"] == "FakeGPU"


def test_cuda_variant_table(tmp_path):
    import json



    path = _fake_results(tmp_path / "r.json")
    raw = json.loads(path.read_text())
    raw["sweep"] = [
        {"kernel": "cuda-int2-folded", "B": 8, "T": 32768, "relerr_vs_reference": 7e-4},
        {"kernel": "cuda-int2-folded", "B": 8, "T": 32768, "num_splits": None, "us": 50.0, "graph_us": 45.0,
         "bw_frac": 0.6},
        {"kernel": "cuda-int2-folded", "B": 8, "T": 32768, "num_splits": 4, "us": 55.0, "graph_us": 46.0},
        {"kernel": "cuda-int2-staged", "B": 8, "T": 32768, "num_splits": None, "us": 60.0, "graph_us": 50.0},
        {"kernel": "cuda-int2-staged", "B": 8, "T": 4096, "us": 9.0, "graph_us": 8.0},  # time against length
        {"kernel": "cuda-int2-folded", "B": 8, "T": 32768, "us": 51.0, "graph_us": 44.0},  # the same, at T
        {"kernel": "kivi-int4", "B": 8, "T": 32768, "us": 1.0}]
    path.write_text(json.dumps(raw))
    t = report.cuda_variant_table(path)
    assert list(t.index) == [(2, "folded"), (2, "staged")]
    assert t.loc[(2, "folded"), "x"] == pytest.approx(2.0) and t.loc[(2, "folded"), "graph x"] == pytest.approx(2.0)
    assert t.loc[(2, "folded"), "error"] == pytest.approx(7e-4) and t["error"].isna().sum() == 1
    assert t.loc[(2, "folded"), "bw"] == pytest.approx(0.6)
    raw.pop("sweep")
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="no --cuda-sweep rows"):
        report.cuda_variant_table(path)


def test_fused_cache_table(tmp_path):
    import json



    rows = [{"T": 4096, "cache": c, "step_ms": ms, "tok_s": 8 * 1000 / ms, "bytes": b}
            for c, ms, b in [("DynamicCache", 40.0, 2**30), ("StaticCache", 4.0, 2**30),
                             ("CompressedCache kivi-2", 12.0, 2**28), ("FusedCache kivi-2", 8.0, 2**28)]]
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"device": "FakeGPU", "args": {"batch": 8, "layers": 4, "steps": 64}, "rows": rows}))
    t = report.fused_cache_table(path)
    assert t.attrs["device"] == "FakeGPU" and t.attrs["batch"] == 8
    assert t.loc[(4096, "FusedCache kivi-2"), "x unfused"] == pytest.approx(1.5)
    assert t.loc[(4096, "FusedCache kivi-2"), "x StaticCache"] == pytest.approx(0.5)
    assert t.loc[(4096, "FusedCache kivi-2"), "x DynamicCache"] == pytest.approx(5.0)
    assert t.loc[(4096, "CompressedCache kivi-2"), "cache MiB"] == pytest.approx(256)
    assert t["x unfused"].isna().sum() == 3
    path.write_text(json.dumps({"rows": [], "failed": {"FusedCache kivi-2": "boom"}}))
    with pytest.raises(ValueError, match="no rows"):
        report.fused_cache_table(path)


# ---- issue 20's view (H200 runs on): byte floors, spread, FlashInfer, the decode step from graphs ----------


def _fake_floor_results(path):
    import json

    grid = []
    for B, T in [(1, 32768), (8, 32768)]:
        g = {"B": B, "T": T, "sdpa_us": 200.0, "sdpa_p10": 195.0, "sdpa_p90": 205.0, "sdpa_bw": 1.0,
             "sdpa_graph_us": 190.0, "sdpa_relerr_vs_ref": 3e-4}
        for k, us, floor in (("fi-fp16", 210.0, 1.0), ("fi-fp8", 160.0, 2.0), ("cuda-int4", 100.0, 3.2),
                             ("cuda-int2", 80.0, 5.3)):
            g.update({f"{k}_us": us, f"{k}_p10": us - 2, f"{k}_p90": us + 3, f"{k}_speedup": 200.0 / us,
                      f"{k}_floor_x": floor, f"{k}_of_floor": 200.0 / us / floor, f"{k}_bw": 0.5,
                      f"{k}_relerr_vs_ref": 4e-4, f"{k}_relerr_vs_fp16": 0.1, f"{k}_graph_us": us / 2,
                      f"{k}_graph_speedup": 190.0 / (us / 2), f"{k}_graph_bw": 0.6})
        grid.append(g)
    groups = {"B": 8, "T": 32768, "sdpa_us": 200.0, "sdpa_graph_us": 190.0, "rows": [
        dict(group=grp, bits=b, variant="folded", bits_per_value=b + 32 / grp, us=us, p10=us, p90=us, graph_us=us,
             speedup=200.0 / us, graph_speedup=190.0 / us, bytes=1, bw_frac=0.5, floor_speedup=fl,
             relerr_vs_reference=8e-4, of_floor=200.0 / us / fl)
        for grp, b, us, fl in ((32, 4, 100.0, 3.2), (32, 2, 80.0, 5.3), (128, 4, 75.0, 3.7), (128, 2, 65.0, 7.0))]}
    path.write_text(json.dumps({"device": "FakeGPU", "triton": "0", "torch": "0", "copy_bw": 4e12,
                                "started": "now", "grid": grid, "groups": groups}))
    return path


def test_point_table_and_markdown_read_the_floors(tmp_path):
    path = _fake_floor_results(tmp_path / "r.json")
    df = report.load_results(path)
    t = report.point_table(df)
    assert list(t.index) == [(8, 32768), (1, 32768)]  # the order
    assert t.loc[(8, 32768), "cuda-int4 x"] == pytest.approx(2.0)
    assert t.loc[(8, 32768), "cuda-int4 of floor"] == pytest.approx(2.0 / 3.2)
    assert t.loc[(8, 32768), "fi-fp8 of floor"] == pytest.approx(1.25 / 2.0)
    text = report.point_markdown(df)
    assert "**200.0 us**" in text and "**2.00x**, 62% of its 3.20x" in text and "not met" in text
    assert "**1.60x** FlashInfer's fp8" in text  # 160 / 100
    assert "from CUDA graphs int4 takes 50.0 us" in text
    fig = report.plot_points(df)
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 2 * 6 - 2 * 2  # no Triton rows in this run


def test_group_markdown_and_of_floor(tmp_path):
    path = _fake_floor_results(tmp_path / "r.json")
    g = report.group_table(path)
    assert g.loc[(128, 4), "of floor"] == pytest.approx(200.0 / 75.0 / 3.7)
    text = report.group_markdown(path)
    assert "group 128 int4 (4.25 bits/value): 75.0 us" in text and "faster than int2 at group 32" in text


def test_fused_graph_table(tmp_path):
    import json

    rows = [{"T": 32768, "cache": c, "step_ms": ms, "tok_s": 1.0, "bytes": b * 2**20, "reserved": 0}
            for c, ms, b in (("DynamicCache", 4.0, 4096.0), ("FusedCache kivi-4", 4.5, 1290.0))]
    graph_rows = [{"T": 32768, "cache": c, "step_ms": ms, "step_median_ms": ms, "step_p10_ms": ms, "step_p90_ms": ms,
                   "bytes": b * 2**20, "same_as_eager": "512/512"}
                  for c, ms, b in (("DynamicCache", 28.0, 4096.0), ("FusedCache kivi-4", 1.6, 1290.0))]
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"device": "FakeGPU", "args": {"batch": 8, "layers": 4, "steps": 64},
                                "rows": rows, "graph_rows": graph_rows}))
    t = report.fused_graph_table(path)
    assert t.loc[(32768, "FusedCache kivi-4"), "graph x DynamicCache eager"] == pytest.approx(2.5)
    assert t.loc[(32768, "FusedCache kivi-4"), "eager ms/step"] == pytest.approx(4.5)
    text = report.fused_graph_markdown(path)
    assert "**2.50x** DynamicCache's eager step" in text and "(0.315x DynamicCache's)" in text
    path.write_text(json.dumps({"device": "x", "rows": rows}))
    with pytest.raises(ValueError, match="no CUDA-graph rows"):
        report.fused_graph_table(path)
