"""Figures for the notebooks. Each function returns a matplotlib Figure; save it with
:func:`kvlab.report.save_figure`."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

__all__ = ["channel_magnitudes", "error_heatmaps", "pareto_plot", "proxy_scatter", "stats_by_layer",
           "value_histograms"]

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


def proxy_scatter(table: pd.DataFrame, proxies: list[str], target: str = "delta_ppl"):
    """Each proxy (log x) against delta PPL with its 95% CI, coloured by scheme family."""
    n = len(proxies)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    fams = sorted(table["family"].unique())
    palette = dict(zip(fams, sns.color_palette("tab20", len(fams))))
    for ax, p in zip(axes.flat, proxies):
        for fam, g in table.groupby("family"):
            ax.errorbar(g[p].clip(lower=1e-12), g[target], yerr=[g[target] - g["ci_lo"], g["ci_hi"] - g[target]],
                        fmt="o", ms=5, capsize=2, color=palette[fam], label=fam)
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
    return fig


def pareto_plot(summary: pd.DataFrame, front: pd.DataFrame, label_families=()):
    """Bits per value vs delta PPL (symlog), coloured by family; the Pareto front as a line."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    fams = sorted(summary["family"].unique())
    palette = dict(zip(fams, sns.color_palette("tab20", len(fams))))
    for fam, g in summary.groupby("family"):
        ax.errorbar(g["bits_per_value"], g["delta_ppl"], yerr=[g["delta_ppl"] - g["ci_lo"], g["ci_hi"] - g["delta_ppl"]],
                    fmt="o", ms=6, capsize=2, color=palette[fam], label=fam)
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
    return fig
