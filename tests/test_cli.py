"""kvlab.cli: the ppl command end to end, and its refusals of bad input (one line, exit 2)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


def test_cli_ppl_json_is_deterministic(data_dir):
    cmd = [sys.executable, "-m", "kvlab", "ppl", "--corpus", f"{data_dir}/wikitext-2-v1/test.txt",
           "--ctx", "128", "--windows", "2", "--json"]
    runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout) for _ in range(2)]
    assert runs[0] == runs[1]
    d = runs[0]
    for key in ("ppl", "nll", "n_tokens_scored", "window_nll", "tokens_sha256", "model", "corpus", "ctx"):
        assert key in d
    assert d["n_tokens_scored"] == 2 * 127 and len(d["window_nll"]) == 2
    assert d["ppl"] == pytest.approx(math.exp(sum(d["window_nll"]) / 2))


@pytest.mark.parametrize("args, match", [(["--ctx", "1"], "ctx=1"), (["--windows", "0"], "windows=0"),
                                         (["--corpus", "nonexistent-corpus"], "unknown corpus")])
def test_cli_bad_inputs(args, match):
    r = subprocess.run([sys.executable, "-m", "kvlab", "ppl", *args], capture_output=True, text=True)
    assert r.returncode == 2 and match in r.stderr


def test_cli_study_inplace_refuses_the_pydoc_fallback(monkeypatch, tmp_path, capsys):
    """Re-rendering the committed findings without WikiText-2 reachable is refused before any notebook runs
    (an explicit --corpus still renders on purpose)."""
    from kvlab.cli import main

    monkeypatch.delenv("KVLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["study", "--inplace", "--only", "05", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--inplace renders the committed findings on WikiText-2" in err and str(tmp_path) in err


@pytest.mark.parametrize("scheme, match", [
    ("kivi:bits=2,bits=4", "sets bits twice"),
    ("kivi:group=48", "kivi: group=48 does not divide residual=128"),
    ("kv=q4_0;kv=q8_0", "sets k again"),
    (";", "has no items"),
    ("kv=q4_0;keep_first=--1", "keep_first='--1' is not an integer"),
    ("kivi:group=48,residual=96", "group=48 does not divide head_dim D=64"),  # checked before the fp16 run
    ("int:bits=4,group=48", "group=48"),
])
def test_cli_bad_scheme_is_one_line_before_any_run(scheme, match, monkeypatch, capsys):
    """Bad specs, and specs that do not fit the model, are refused before the fp16 reference or any config runs."""
    import kvlab.evaluation.evaluate as E
    from kvlab.cli import main

    monkeypatch.setattr(E, "evaluate_policy", lambda *a, **k: pytest.fail("a run started before the check"))
    assert main(["ppl", "--scheme", scheme, "--corpus", "pydoc", "--ctx", "32", "--windows", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvlab")]  # not load bars
    assert len(err) == 1 and err[0].startswith("kvlab: error: ") and match in err[0], err


def test_cli_study_findings_regenerates_the_readme_block_only(monkeypatch, tmp_path, capsys):
    """`kvlab study --findings` executes no notebook and rewrites only the README's findings block."""
    import kvlab.study.runner as R
    from kvlab.cli import main
    from kvlab.study import findings as F

    monkeypatch.setattr(R, "run_notebooks", lambda *a, **k: pytest.fail("a notebook ran"))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{F.BEGIN}\nstale\n{F.END}\nafter\n")
    monkeypatch.setattr(F, "README", readme)
    assert main(["study", "--findings"]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# x\n") and text.endswith(f"{F.END}\nafter\n")
    assert "**Kernels**" in text and "findings regenerated" in capsys.readouterr().out
    assert main(["study", "--findings"]) == 0 and "findings unchanged" in capsys.readouterr().out


def test_cli_study_says_how_many_configs_it_reused_and_fresh_reuses_none(monkeypatch, tmp_path, capsys):
    """`kvlab study` sums the reused / computed counts its notebooks' sweeps report; `--fresh` points the
    notebooks at a new, empty results folder. (Notebooks replaced by a stand-in that runs one real sweep.)"""
    import kvlab.study.runner as R
    from kvlab.cli import main
    from kvlab.evaluation.sweep import sweep
    from kvlab.study import findings as F

    seen = []

    def fake_run(only, out_dir=None, parameters=None):
        seen.append(dict(parameters))
        sweep(["q4_0"], corpus="pydoc", ctx=32, windows=2, progress=False,
              out=parameters.get("results_dir", tmp_path / "results"))
        return []

    monkeypatch.setattr(R, "run_notebooks", fake_run)
    monkeypatch.setattr(F, "update_readme", lambda: False)
    assert main(["study", "--only", "05", "--out", str(tmp_path / "exec")]) == 0
    assert "ppl results: 0 configs reused from finished files, 2 computed (1 sweeps)" in capsys.readouterr().out
    assert main(["study", "--only", "05", "--out", str(tmp_path / "exec")]) == 0
    assert "ppl results: 2 configs reused from finished files, 0 computed" in capsys.readouterr().out
    assert main(["study", "--only", "05", "--fresh", "--out", str(tmp_path / "exec")]) == 0
    out = capsys.readouterr().out
    assert "0 configs reused from finished files, 2 computed" in out and "fresh-" in seen[-1]["results_dir"]
