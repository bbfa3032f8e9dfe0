"""Read the saved decode-attention benchmark (``benchmarks/bench_decode_attention.py``) into tables and a figure.

No GPU needed: this only reads the JSON that the benchmark wrote on the device machine. Notebook 05 calls it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

__all__ = ["GOALS", "KERNELS", "cuda_variant_table", "fused_cache_table", "goal_check", "group_table", "load_results",
           "plot_speedups", "speedup_table", "verdict_markdown"]

# kivi-intN: the Triton KIVI kernel; cuda-intN: the CUDA C++ one (same cache); ggml q4_0 / q8_0 (Triton)
KERNELS = ("kivi-int4", "kivi-int2", "cuda-int4", "cuda-int2", "q4_0", "q8_0")
# the project's goals at the reference point (B=8, T=32k): speedup over fp16 SDPA of the KIVI int4 / int2
# kernels (each backend checked), and their fraction of the copy bandwidth
GOALS = {"point": (8, 32768), "speedup": {"int4": 3.2, "int2": 5.0}, "bw_frac": 0.85}


def load_results(path: str | Path) -> pd.DataFrame:
    """Tidy rows of the benchmark grid: one per (B, T, kernel, timing).

    Columns: ``B``, ``T``, ``kernel`` (``sdpa`` or one of :data:`KERNELS`), ``timing`` (``eager``: one
    timed call, L2 flushed; ``graph``: replayed from a CUDA graph), ``us`` (median time), ``speedup`` (fp16
    SDPA time of the same timing / ``us``), ``bw_frac`` (bytes read / time / copy bandwidth) and
    ``relerr_vs_fp16``. ``df.attrs`` holds ``device``, ``triton``, ``torch``, ``copy_bw`` (bytes/s).
    """
    raw = json.loads(Path(path).read_text())
    rows = []
    for g in raw["grid"]:
        for timing, sfx in (("eager", ""), ("graph", "_graph")):
            sdpa_us = g.get(f"sdpa{sfx}_us")
            if sdpa_us is None:
                continue
            rows.append(dict(B=g["B"], T=g["T"], kernel="sdpa", timing=timing, us=sdpa_us, speedup=1.0,
                             bw_frac=g.get("sdpa_bw") if timing == "eager" else None, relerr_vs_fp16=0.0))
            for k in KERNELS:
                us = g.get(f"{k}{sfx}_us")
                if us is None:
                    continue
                rows.append(dict(B=g["B"], T=g["T"], kernel=k, timing=timing, us=us,
                                 speedup=g.get(f"{k}{sfx}_speedup", sdpa_us / us), bw_frac=g.get(f"{k}{sfx}_bw"),
                                 relerr_vs_fp16=g.get(f"{k}_relerr_vs_fp16")))
    df = pd.DataFrame(rows).astype({"bw_frac": float, "relerr_vs_fp16": float})
    df.attrs.update({k: raw.get(k) for k in ("device", "triton", "torch", "copy_bw", "started")})
    return df


def speedup_table(df: pd.DataFrame, timing: str = "eager") -> pd.DataFrame:
    """Wide table, one row per (B, T): ``{kernel} us``, ``{kernel} x`` (over SDPA), ``{kernel} bw`` columns."""
    d = df[df.timing == timing]
    wide = d.pivot_table(index=["B", "T"], columns="kernel", values=["us", "speedup", "bw_frac"])
    cols = {}
    for k in ("sdpa",) + KERNELS:
        if ("us", k) not in wide.columns:
            continue
        cols[f"{k} us"] = wide[("us", k)]
        if k != "sdpa":
            cols[f"{k} x"] = wide[("speedup", k)]
        if ("bw_frac", k) in wide.columns:
            cols[f"{k} bw"] = wide[("bw_frac", k)]
    return pd.DataFrame(cols)


def goal_check(df: pd.DataFrame, timing: str = "eager") -> pd.DataFrame:
    """The goals at the reference point, one row per goal and KIVI kernel present (Triton ``kivi-``, CUDA
    ``cuda-``): ``goal``, ``target``, ``reached``, ``met``."""
    B, T = GOALS["point"]
    at = df[(df.B == B) & (df["T"] == T) & (df.timing == timing)].set_index("kernel")
    rows = []
    for backend in ("kivi", "cuda"):
        for width, target in GOALS["speedup"].items():
            k = f"{backend}-{width}"
            if k in at.index:
                rows.append(dict(goal=f"{k} speedup over fp16 SDPA", target=target,
                                 reached=float(at.at[k, "speedup"])))
        for width in GOALS["speedup"]:
            k = f"{backend}-{width}"
            if k in at.index:
                rows.append(dict(goal=f"{k} fraction of copy bandwidth", target=GOALS["bw_frac"],
                                 reached=float(at.at[k, "bw_frac"])))
    out = pd.DataFrame(rows)
    out["met"] = out.reached >= out.target
    return out


def verdict_markdown(df: pd.DataFrame, goals: pd.DataFrame) -> str:
    """Prose built from the numbers: the reference point, the best speedups over the grid, goals met or not."""
    B, T = GOALS["point"]
    eager = df[df.timing == "eager"]
    at = eager[(eager.B == B) & (eager["T"] == T)].set_index("kernel")
    lines = [f"On one **{df.attrs.get('device', '?')}** (Triton {df.attrs.get('triton', '?')}), at B={B}, "
             f"T={T // 1024}k fp16 SDPA takes **{at.at['sdpa', 'us']:.0f} us**."]
    for k in KERNELS:
        if k in at.index:
            lines.append(f"- `{k}`: {at.at[k, 'us']:.0f} us, **{at.at[k, 'speedup']:.2f}x** SDPA, "
                         f"{at.at[k, 'bw_frac']:.0%} of the copy bandwidth on the bytes it reads.")
    best = df[df.kernel != "sdpa"].sort_values("speedup").groupby("kernel").tail(1).set_index("kernel")
    lines.append("\nBest speedup anywhere in the grid (either timing): "
                 + ", ".join(f"`{k}` {best.at[k, 'speedup']:.2f}x (B={best.at[k, 'B']}, T={best.at[k, 'T']}, "
                             f"{best.at[k, 'timing']})" for k in KERNELS if k in best.index) + ".")
    met, missed = goals[goals.met], goals[~goals.met]
    lines.append(f"\n**Goals met: {len(met)} of {len(goals)}.**")
    for _, r in missed.iterrows():
        lines.append(f"- not met: {r.goal}: {r.reached:.2f} against {r.target:.2f}")
    for _, r in met.iterrows():
        lines.append(f"- met: {r.goal}: {r.reached:.2f} against {r.target:.2f}")
    return "\n".join(lines)


def plot_speedups(df: pd.DataFrame, timing: str = "eager"):
    """Speedup over fp16 SDPA against context length, one panel per batch size, one line per kernel;
    dashed lines at the int4 and int2 goals. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    d = df[(df.timing == timing) & (df.kernel != "sdpa")]
    batches = sorted(d.B.unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.4), sharey=True, squeeze=False)
    for ax, B in zip(axes[0], batches):
        for k in KERNELS:
            s = d[(d.B == B) & (d.kernel == k)].sort_values("T")
            if len(s):
                ax.plot(s["T"], s.speedup, marker="o", label=k)
        for width, target in GOALS["speedup"].items():
            ax.axhline(target, ls="--", lw=0.8, color="grey")
            ax.text(d["T"].min(), target, f" {width} goal", va="bottom", fontsize=7, color="grey")
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_title(f"B={B}")
        ax.set_xlabel("context length T")
    axes[0][0].set_ylabel("speedup over fp16 SDPA")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Fused decode attention over quantized KV ({timing} timing), {df.attrs.get('device', '')}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend under the panels
    return fig


def fused_cache_table(path: str | Path) -> pd.DataFrame:
    """The saved ``benchmarks/bench_fused_cache.py`` run (greedy decoding through whole caches) as one row per
    (T, cache): ``ms/step``, ``tok/s``, ``cache MiB`` (bytes held), and the step time's ratio to HF's fp16
    ``DynamicCache`` and ``StaticCache`` and to the unfused ``CompressedCache`` of the same scheme at the same
    T (> 1: faster).
    ``df.attrs`` holds ``device``, ``batch``, ``layers``, ``steps`` and ``failed`` (caches that did not run)."""
    raw = json.loads(Path(path).read_text())
    df = pd.DataFrame(raw["rows"])
    if df.empty:
        raise ValueError(f"{path}: the benchmark saved no rows (failed: {raw.get('failed')})")
    steps = df.set_index(["T", "cache"])["step_ms"]

    def ratio(row, other):
        key = (row["T"], other)
        return steps[key] / row["step_ms"] if key in steps.index else float("nan")

    out = pd.DataFrame({
        "T": df["T"], "cache": df["cache"], "ms/step": df["step_ms"], "tok/s": df["tok_s"],
        "cache MiB": df["bytes"] / 2**20,
        "x DynamicCache": [ratio(r, "DynamicCache") for _, r in df.iterrows()],
        "x StaticCache": [ratio(r, "StaticCache") for _, r in df.iterrows()],
        "x unfused": [ratio(r, r["cache"].replace("FusedCache", "CompressedCache"))
                      if r["cache"].startswith("FusedCache") else float("nan") for _, r in df.iterrows()],
    }).set_index(["T", "cache"])
    out.attrs.update({"device": raw.get("device"), "failed": raw.get("failed", {}),
                      **{k: raw.get("args", {}).get(k) for k in ("batch", "layers", "steps")}})
    return out


def cuda_variant_table(path: str | Path) -> pd.DataFrame:
    """The CUDA kernel's variants side by side at the reference point, from the benchmark's ``--cuda-sweep``
    (automatic split plan): one row per (bits, variant) with ``us`` and ``graph us`` (medians), ``x`` and
    ``graph x`` (over fp16 SDPA of the same run and timing), ``bw`` (fraction of the copy bandwidth) and
    ``error`` (relative L2 error against the pure-torch fp32 reference). ``df.attrs`` holds ``device``.
    Raises ValueError when the run has no such sweep."""
    raw = json.loads(Path(path).read_text())
    B, T = GOALS["point"]
    point = next((g for g in raw.get("grid", []) if (g["B"], g["T"]) == (B, T)), {})
    rows: dict[tuple[int, str], dict] = {}
    for e in raw.get("sweep", []):
        name = e.get("kernel", "")
        if not name.startswith("cuda-int") or (e["B"], e["T"]) != (B, T):
            continue
        bits, variant = int(name[len("cuda-int")]), name.split("-", 2)[2]
        row = rows.setdefault((bits, variant), {})
        if "relerr_vs_reference" in e:
            row["error"] = e["relerr_vs_reference"]
        elif "num_splits" in e and e["num_splits"] is None and "us" in e:  # not a time-against-length row
            row.update({"us": e["us"], "graph us": e.get("graph_us"), "bw": e.get("bw_frac")})
    if not rows:
        raise ValueError(f"{path}: no --cuda-sweep rows at B={B}, T={T}")
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index = pd.MultiIndex.from_tuples(df.index, names=["bits", "variant"])
    df["x"] = point.get("sdpa_us", float("nan")) / df["us"]
    df["graph x"] = point.get("sdpa_graph_us", float("nan")) / df["graph us"]
    df.attrs["device"] = raw.get("device")
    return df[["us", "x", "graph us", "graph x", "bw", "error"]].sort_index(ascending=[False, True])


def group_table(path: str | Path) -> pd.DataFrame:
    """The CUDA kernel against the KIVI group at the reference point, from the benchmark's group sweep: one row
    per (group, bits) with the variant "auto" took, ``bits/value`` (code plus its share of the fp16 scale and
    minimum), ``us`` / ``x`` (over fp16 SDPA of the same run) / ``bw`` (fraction of the copy bandwidth),
    ``graph us`` / ``graph x``, ``floor x`` (fp16 bytes over the bytes read: the speedup at equal bandwidth)
    and ``error`` against the fp32 reference. ``df.attrs`` holds ``device``. ValueError when the run has none."""
    raw = json.loads(Path(path).read_text())
    rows = (raw.get("groups") or {}).get("rows")
    if not rows:
        raise ValueError(f"{path}: no group sweep (bench_decode_attention.py --groups)")
    df = pd.DataFrame(rows).rename(columns={"bits_per_value": "bits/value", "speedup": "x", "bw_frac": "bw",
                                            "graph_us": "graph us", "graph_speedup": "graph x",
                                            "floor_speedup": "floor x", "relerr_vs_reference": "error"})
    df = df.set_index(["group", "bits"]).sort_index(ascending=[True, False])
    df.attrs["device"] = raw.get("device")
    return df[["variant", "bits/value", "us", "x", "bw", "graph us", "graph x", "floor x", "error"]]
