"""Figures for the notebooks. Each function returns a matplotlib Figure; save it with
:func:`kvlab.study.report.save_figure`."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import pandas as pd
import seaborn as sns

__all__ = ["channel_magnitudes", "error_heatmaps", "lossless_by_codec", "lossless_by_layer", "mixed_ratio_vs_ppl",
           "pareto_plot", "proxy_scatter", "stats_by_layer", "value_histograms"]

sns.set_theme(style="whitegrid", context="notebook")


def channel_magnitudes(tensors: dict, layers: list[int]):
    """Mean |x| per head_dim channel of K pre-RoPE, K post-RoPE and V (heads side by side)."""
    fig, axes = plt.subplots(len(layers), 3, figsize=(15, 2.6 * len(layers)), squeeze=False, sharex=True)
    for row, layer in enumerate(layers):
        for col, name in enumerate(("k_pre", "k_post", "v")):
            x = tensors[layer][name].float()  # (B, H, T, D)
            mag = x.abs().mean(dim=(0, 2))  # (H, D)
            ax = axes[row, col]
            for h in range(mag.shape[0]):
                ax.plot(mag[h].numpy(), lw=1, label=f"kv head {h}")
            ax.set_title(f"layer {layer}: {name}  (mean |x| per channel)", fontsize=10)
            if col == 0:
                ax.set_ylabel("mean |x|")
    axes[-1, 0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("head_dim channel")
    fig.tight_layout()
    return fig


def stats_by_layer(stats: pd.DataFrame, metrics=("kurtosis", "channel_outlier_ratio", "std")):
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    for ax, m in zip(axes, metrics):
        sns.lineplot(data=stats, x="layer", y=m, hue="tensor", marker="o", ax=ax)
        ax.set_title(m)
        if m != "std":
            ax.set_yscale("log")
    fig.tight_layout()
    return fig


def value_histograms(tensors: dict, layers: list[int]):
    """Histograms of K (post-RoPE) and V values for a few layers (log count)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for ax, name in zip(axes, ("k_post", "v")):
        for layer in layers:
            v = tensors[layer][name].float().flatten().numpy()
            ax.hist(v, bins=200, histtype="step", log=True, label=f"layer {layer}")
        ax.set_title(f"{name} values")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def error_heatmaps(errors: pd.DataFrame, configs: list[str], metrics=("k_nmse", "v_nmse", "attn_nmse")):
    """Layer x kv-head heatmaps of each metric (columns) for each config (rows), log colour scale."""
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(len(configs), len(metrics), figsize=(6.0 * len(metrics), 1.6 * len(configs) + 0.6),
                             squeeze=False)
    for i, c in enumerate(configs):
        e = errors[errors["config"] == c]
        for j, m in enumerate(metrics):
            grid = e.pivot(index="head", columns="layer", values=m)
            vals = grid.to_numpy()
            pos = vals[vals > 0]
            norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.size else None
            sns.heatmap(grid, ax=axes[i, j], cmap="magma", norm=norm, cbar=True)
            axes[i, j].set_title(f"{c}\n{m}", fontsize=9)
    fig.tight_layout()
    return fig


def _symlog_y(ax, lo, hi, linthresh: float = 0.05) -> None:
    """Symlog y limited to the data (``lo``/``hi``: CI bounds), ticks at 0 and +-powers of ten only."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    ax.set_yscale("symlog", linthresh=linthresh)
    lo, hi = float(min(lo)), float(max(hi))
    bottom = lo * 1.6 if lo < 0 else -linthresh / 2
    top = hi * 1.6 if hi > 0 else linthresh
    ax.set_ylim(bottom, top)
    ticks = [0.0] + [s * 10.0**k for k in range(-1, 7) for s in (1, -1)]
    ax.set_yticks(sorted(t for t in ticks if bottom <= t <= top))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _ci_points(ax, g: pd.DataFrame, x, y: str, color, label: str, ms: float) -> None:
    """Points with their 95% CI bars: causal configs filled, oracle ones (``oracle`` column) hollow."""
    oracle = g["oracle"].astype(bool) if "oracle" in g else pd.Series(False, index=g.index)
    for hollow, part in ((False, g[~oracle]), (True, g[oracle])):
        if part.empty:
            continue
        ax.errorbar(x(part), part[y], yerr=[part[y] - part["ci_lo"], part["ci_hi"] - part[y]], fmt="o", ms=ms,
                    capsize=2, color=color, mfc="none" if hollow else color,
                    label=label if not hollow or oracle.all() else None)


def _oracle_note(fig, table: pd.DataFrame) -> None:
    if "oracle" in table and table["oracle"].any():
        fig.text(0.01, 0.005, "hollow markers: oracle configs (not causal: they see the whole window); a ceiling",
                 fontsize=8, ha="left", va="bottom")


def proxy_scatter(table: pd.DataFrame, proxies: list[str], target: str = "delta_ppl"):
    """Each proxy (log x) against delta PPL with its 95% CI, coloured by scheme family; oracle configs
    hollow."""
    n = len(proxies)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    fams = sorted(table["family"].unique())
    palette = dict(zip(fams, sns.color_palette("tab20", len(fams))))
    for ax, p in zip(axes.flat, proxies):
        for fam, g in table.groupby("family"):
            _ci_points(ax, g, lambda d, p=p: d[p].clip(lower=1e-12), target, palette[fam], fam, ms=5)
        ax.set_xscale("log")
        _symlog_y(ax, table["ci_lo"], table["ci_hi"])
        ax.set_xlabel(p)
        ax.set_ylabel("delta PPL vs fp16")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(6, len(labels)), fontsize=8,
               bbox_to_anchor=(0.5, 1.08))
    fig.tight_layout()
    _oracle_note(fig, table)
    return fig


def pareto_plot(summary: pd.DataFrame, front: pd.DataFrame, label_families=()):
    """Bits per value vs delta PPL (symlog), coloured by family, oracle configs hollow; the Pareto front as
    a line."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    fams = sorted(summary["family"].unique())
    palette = dict(zip(fams, sns.color_palette("tab20", len(fams))))
    for fam, g in summary.groupby("family"):
        _ci_points(ax, g, lambda d: d["bits_per_value"], "delta_ppl", palette[fam], fam, ms=6)
        if fam in label_families:
            for r in g.itertuples():
                ax.annotate(r.config, (r.bits_per_value, r.delta_ppl), fontsize=7, xytext=(4, 2),
                            textcoords="offset points")
    ax.plot(front["bits_per_value"], front["delta_ppl"], "k--", lw=1, label="Pareto front")
    _symlog_y(ax, summary["ci_lo"], summary["ci_hi"])
    ax.set_xlabel("bits per value (metadata and fp16 windows included)")
    ax.set_ylabel("delta PPL vs fp16 (95% CI)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    _oracle_note(fig, summary)
    return fig


# ---- notebook 06: lossless coding ---------------------------------------------------------------
_LOSSLESS_TENSORS = ["k_pre", "k_post", "v"]


def lossless_by_layer(table: pd.DataFrame, codecs: list[str]):
    """Lossless ratio per layer (log axis), one panel per tensor, a line per codec of ``codecs``, with the
    order-0 entropy bound of the byte planes dashed. ``table``: :func:`kvlab.evaluation.lossless.ratio_table`."""
    grid = sns.relplot(data=table[table.codec.isin(codecs)], x="layer", y="ratio", hue="codec",
                       col="tensor", col_order=_LOSSLESS_TENSORS, kind="line", marker="o", height=3.4, aspect=1.1)
    for ax, name in zip(grid.axes.flat, _LOSSLESS_TENSORS):
        bound = table[(table.tensor == name) & (table.codec == "bytes+zstd")]
        (line,) = ax.plot(bound.layer, bound.entropy_ratio, "k--", lw=1, label="order-0 bound, byte planes")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(mticker.FixedLocator([1, 1.1, 1.2, 1.3, 1.5, 2, 3, 4, 5]))
        ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%.1f"))
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    grid.axes.flat[0].legend(handles=[line], loc="upper right", fontsize=8)
    grid.set_axis_labels("layer", "lossless ratio (log)")
    grid.figure.suptitle("Lossless ratio per layer (every container byte counted)", y=1.03)
    return grid.figure


def lossless_by_codec(summary: pd.DataFrame, codecs: list[str]):
    """Pooled ratio per codec of ``codecs`` and tensor (bars) against the order-0 bound of the same planes
    (dashes). ``summary``: :func:`kvlab.evaluation.lossless.summarize`."""
    fig, ax = plt.subplots(figsize=(10, 3.8))
    data = summary[summary.codec.isin(codecs)]
    sns.barplot(data=data, x="codec", y="ratio", hue="tensor", order=codecs, hue_order=_LOSSLESS_TENSORS, ax=ax)
    sns.stripplot(data=data, x="codec", y="entropy_ratio", hue="tensor", order=codecs,
                  hue_order=_LOSSLESS_TENSORS, dodge=True, marker="_", s=18, linewidth=2, color="k",
                  palette="dark:k", legend=False, ax=ax)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set(ylabel="pooled ratio (bars) / order-0 bound (dashes)", xlabel="",
           ylim=(0.9, 1.05 * summary[["ratio", "entropy_ratio"]].max().max()))
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), title="tensor")
    ax.tick_params(axis="x", rotation=30)
    ax.set_title("Pooled over layers: measured zstd ratio vs the order-0 entropy bound of the same planes")
    return fig


def mixed_ratio_vs_ppl(res: pd.DataFrame, title: str):
    """Compression ratio vs delta PPL (95% CI bars) of the mixed lossless/lossy policies of
    :func:`kvlab.evaluation.lossless.evaluate_policies`, each point labelled with its policy."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    sns.scatterplot(data=res, x="ratio", y="delta_ppl", hue="policy", s=70, ax=ax, legend=False)
    ax.errorbar(res.ratio, res.delta_ppl, yerr=[res.delta_ppl - res.ci_lo, res.ci_hi - res.delta_ppl], fmt="none",
                ecolor="grey", capsize=3)
    for row in res.itertuples():
        ax.annotate(row.policy.replace(";keep=fp16", ""), (row.ratio, row.delta_ppl), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="compression ratio vs fp16 (every stored byte)", ylabel="delta PPL vs fp16 (95% CI)", title=title)
    return fig
