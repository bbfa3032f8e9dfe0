"""Figures for the notebooks. Each function returns a matplotlib Figure; save it with
:func:`kvlab.study.report.save_figure`."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["channel_magnitudes", "end_metrics_plot", "error_heatmaps", "families_end_metrics_plot", "families_plot", "family_styles", "lossless_by_codec", "lossless_by_layer",
           "mixed_ratio_vs_ppl", "pareto_plot", "place_labels", "proxy_scatter", "stats_by_layer",
           "value_histograms"]

sns.set_theme(style="whitegrid", context="notebook")

_TENSOR_LABEL = {"k_pre": "K pre-RoPE", "k_post": "K post-RoPE", "v": "V"}


def place_labels(ax, xs, ys, texts, fontsize: float = 7, pad_px: float = 2.0) -> list:
    """Annotate the points ``(xs, ys)`` of ``ax`` with ``texts`` so that no two labels overlap each other or
    another labelled point: each label takes the first of a ring of offsets (growing with each ring) whose box
    is free. Returns the annotations. Call it after the axis limits and scales are final."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    pts = [to_px((x, y)) for x, y in zip(xs, ys)]
    r = 3.0  # half a marker, in pixels: a label never covers a labelled point
    taken = [(px - r, py - r, px + r, py + r) for px, py in pts]
    dirs = [(1, 0.3), (1, -1), (-1, 0.3), (-1, -1), (0, 1.2), (0, -1.8), (1, 1.2), (-1, 1.2)]
    out = []
    for (px, py), (x, y), text in zip(pts, zip(xs, ys), texts):
        probe = ax.annotate(text, (x, y), fontsize=fontsize, ha="left", va="bottom")
        bb = probe.get_window_extent(renderer)
        w, h = bb.width, bb.height
        probe.remove()
        best = None
        for ring in range(1, 7):
            for dx, dy in dirs:
                ox = 4 * ring * dx + (0 if dx >= 0 else -w) + (-w / 2 if dx == 0 else 0)
                oy = 3 * ring * dy
                box = (px + ox - pad_px, py + oy - pad_px, px + ox + w + pad_px, py + oy + h + pad_px)
                if not any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
                    best = (ox, oy, box)
                    break
            if best:
                break
        if best is None:  # crowded: the first offset, on top of the others
            best = (4, 1, (px + 4, py + 1, px + 4 + w, py + 1 + h))
        ox, oy, box = best
        taken.append(box)
        # offsets in points (annotate's unit), the boxes above in pixels
        k = 72.0 / fig.dpi
        far = math.hypot(ox + w / 2, oy + h / 2) > 30
        out.append(ax.annotate(text, (x, y), xytext=(ox * k, oy * k), textcoords="offset points", fontsize=fontsize,
                               ha="left", va="bottom",
                               arrowprops=dict(arrowstyle="-", lw=0.4, color="grey") if far else None))
    return out


# ---- notebook 01: Q/K/V statistics -----------------------------------------------------------------


def channel_magnitudes(tensors: dict, layers: list[int]):
    """Mean |x| per head_dim channel of K pre-RoPE, K post-RoPE and V (one line per kv head), one row per
    layer; the legend sits above the panels, off the data."""
    fig, axes = plt.subplots(len(layers), 3, figsize=(15, 2.6 * len(layers) + 0.6), squeeze=False, sharex=True)
    for row, layer in enumerate(layers):
        for col, name in enumerate(("k_pre", "k_post", "v")):
            x = tensors[layer][name].float()  # (B, H, T, D)
            mag = x.abs().mean(dim=(0, 2))  # (H, D)
            ax = axes[row, col]
            for h in range(mag.shape[0]):
                ax.plot(mag[h].numpy(), lw=1, label=f"kv head {h}")
            ax.set_title(f"layer {layer}: {_TENSOR_LABEL[name]}", fontsize=10)
            if col == 0:
                ax.set_ylabel("mean |x| per channel")
    for ax in axes[-1]:
        ax.set_xlabel("head_dim channel")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9, frameon=False)
    return fig


def stats_by_layer(stats: pd.DataFrame, metrics=("kurtosis", "channel_outlier_ratio", "std")):
    """Each statistic of :func:`kvlab.study.analysis.kv_stats` against the layer, one line per tensor."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.0))
    data = stats.assign(tensor=stats.tensor.map(_TENSOR_LABEL).fillna(stats.tensor))
    for ax, m in zip(axes, metrics):
        sns.lineplot(data=data, x="layer", y=m, hue="tensor", marker="o", ax=ax, legend=False)
        ax.set_title(m.replace("_", " ") + (" (log)" if m != "std" else ""))
        ax.set_ylabel(m.replace("_", " "))
        if m != "std":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(mticker.FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
    colours = sns.color_palette(n_colors=data.tensor.nunique())
    handles = [plt.Line2D([], [], color=c, marker="o", label=t) for c, t in zip(colours, data.tensor.unique())]
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False)
    return fig


def value_histograms(tensors: dict, layers: list[int]):
    """Histograms of K (post-RoPE) and V values for a few layers (log count), legend beside the panels."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, name in zip(axes, ("k_post", "v")):
        for layer in layers:
            v = tensors[layer][name].float().flatten().numpy()
            ax.hist(v, bins=200, histtype="step", log=True, label=f"layer {layer}")
        ax.set_title(f"{_TENSOR_LABEL[name]} values, all heads and tokens")
        ax.set_xlabel("value")
        ax.set_ylabel("count (log)")
    axes[1].legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    return fig


# ---- notebook 02: error heatmaps ----------------------------------------------------------------------


def error_heatmaps(errors: pd.DataFrame, configs: list[str], metrics=("k_nmse", "v_nmse", "attn_nmse")):
    """Layer x kv-head heatmaps of each metric (columns) for each config (rows). One log colour scale per row
    (shared by its metrics, one colour bar), so within a config K, V and attention-output error compare by
    colour; the config names the row, the metric heads the column."""
    from matplotlib.colors import LogNorm

    names = {"k_nmse": "K NMSE", "v_nmse": "V NMSE", "attn_nmse": "attention-output NMSE"}
    fig, axes = plt.subplots(len(configs), len(metrics) + 1, figsize=(4.6 * len(metrics) + 0.6,
                                                                      1.25 * len(configs) + 0.9),
                             squeeze=False, gridspec_kw={"width_ratios": [1] * len(metrics) + [0.04]})
    for i, c in enumerate(configs):
        e = errors[errors["config"] == c].groupby(["head", "layer"])[list(metrics)].mean()  # over error windows
        grids = [e[m].unstack("layer") for m in metrics]
        vals = np.concatenate([g.to_numpy().ravel() for g in grids])
        pos = vals[np.isfinite(vals) & (vals > 0)]
        norm = LogNorm(vmin=pos.min(), vmax=pos.max()) if pos.size else None
        for j, (m, grid) in enumerate(zip(metrics, grids)):
            ax = axes[i, j]
            im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
            layers, heads = list(grid.columns), list(grid.index)
            step = max(1, len(layers) // 6)
            ax.set_xticks(range(0, len(layers), step), [str(layers[k]) for k in range(0, len(layers), step)],
                          fontsize=8)
            ax.set_yticks(range(len(heads)), [str(h) for h in heads], fontsize=8)
            ax.grid(False)
            if i == 0:
                ax.set_title(names.get(m, m), fontsize=11)
            if i == len(configs) - 1:
                ax.set_xlabel("layer", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{c}\nkv head", fontsize=9)
        cb = fig.colorbar(im, cax=axes[i, -1])
        cb.ax.yaxis.set_major_locator(mticker.LogLocator(numticks=4))
        cb.ax.yaxis.set_minor_formatter(mticker.NullFormatter())
        cb.ax.tick_params(labelsize=7)
    fig.suptitle("Error per layer x kv head (log colour; one scale per row)", fontsize=11)
    fig.tight_layout()
    return fig


# ---- notebooks 03 and 04: proxies, bits and perplexity ---------------------------------------------

# families drawn in one colour, told apart by the marker
_GROUPS = {"float": ("bf16", "fp8", "fpmant"), "int": ("int", "int (truncate)", "int+hadamard"),
           "llama.cpp": ("q4_0", "q4_0+hadamard", "q4_1", "q5_0", "q5_1", "q8_0"), "kivi": ("kivi",),
           "kvquant": ("kvquant",), "sign+magnitude": ("signmag",)}
_MARKERS = ("o", "s", "^", "D", "v", "P")


def family_styles(families) -> dict[str, tuple]:
    """{family: (colour, marker)}: one colour per group of related families (float, int, llama.cpp, kivi,
    kvquant, sign+magnitude, then any other family its own), a marker per family inside its group."""
    fams = sorted(set(families))
    groups = {f: g for g, members in _GROUPS.items() for f in members}
    order = list(_GROUPS) + sorted({f for f in fams if f not in groups})
    colours = dict(zip(order, sns.color_palette("tab10", len(order))))
    seen: dict[str, int] = {}
    out = {}
    for f in sorted(fams, key=lambda f: (order.index(groups.get(f, f)), f)):
        g = groups.get(f, f)
        out[f] = (colours[g], _MARKERS[seen.get(g, 0) % len(_MARKERS)])
        seen[g] = seen.get(g, 0) + 1
    return out


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


def _ci_points(ax, g: pd.DataFrame, x, y: str, color, label: str, ms: float, marker: str = "o", xerr=None) -> None:
    """Points with their 95% CI bars: causal configs filled, oracle ones (``oracle`` column) hollow.
    ``xerr(part)``: optional [lower, upper] x error bars."""
    oracle = g["oracle"].astype(bool) if "oracle" in g else pd.Series(False, index=g.index)
    for hollow, part in ((False, g[~oracle]), (True, g[oracle])):
        if part.empty:
            continue
        ax.errorbar(x(part), part[y], yerr=[part[y] - part["ci_lo"], part["ci_hi"] - part[y]],
                    xerr=xerr(part) if xerr else None, fmt=marker, ms=ms, capsize=2, color=color,
                    mfc="none" if hollow else color, elinewidth=0.9,
                    label=label if not hollow or oracle.all() else None)


def _oracle_note(fig, table: pd.DataFrame) -> None:
    if "oracle" in table and table["oracle"].any():
        fig.text(0.01, 0.005, "hollow markers: oracle configs (not causal: they see the whole window); a ceiling",
                 fontsize=8, ha="left", va="bottom")


def proxy_scatter(table: pd.DataFrame, proxies: list[str], target: str = "delta_ppl"):
    """Each proxy (log x) against delta PPL with its 95% CI; one colour per group of families (float, int,
    llama.cpp, kivi, kvquant, sign+magnitude), a marker per family; oracle configs hollow. Where ``table``
    holds a proxy's CI (columns ``{proxy} lo`` / ``{proxy} hi``) it is drawn as an x error bar."""
    n = len(proxies)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    styles = family_styles(table["family"])
    for ax, p in zip(axes.flat, proxies):
        xerr = None
        if f"{p} lo" in table and f"{p} hi" in table:
            def xerr(d, p=p):
                return [(d[p] - d[f"{p} lo"]).clip(lower=0), (d[f"{p} hi"] - d[p]).clip(lower=0)]
        for fam in styles:
            g = table[table["family"] == fam]
            colour, marker = styles[fam]
            _ci_points(ax, g, lambda d, p=p: d[p].clip(lower=1e-12), target, colour, fam, ms=5, marker=marker,
                       xerr=xerr)
        ax.set_xscale("log")
        _symlog_y(ax, table["ci_lo"], table["ci_hi"])
        ax.set_xlabel(p)
        ax.set_ylabel("delta PPL vs fp16 (95% CI)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(9, len(labels)), fontsize=8,
               bbox_to_anchor=(0.5, 1.06), frameon=False)
    fig.tight_layout()
    _oracle_note(fig, table)
    return fig


def pareto_plot(summary: pd.DataFrame, front: pd.DataFrame, label_families=()):
    """Bits per value vs delta PPL (symlog), one colour per group of families and a marker per family, oracle
    configs hollow; the Pareto front as a line. The legend names a family of one config; the configs of every
    family with several (the int family among them), and of ``label_families``, are labelled, the labels
    placed so that none overlaps another (:func:`place_labels`)."""
    fig, ax = plt.subplots(figsize=(10, 6))
    styles = family_styles(summary["family"])
    for fam in styles:
        g = summary[summary["family"] == fam]
        colour, marker = styles[fam]
        _ci_points(ax, g, lambda d: d["bits_per_value"], "delta_ppl", colour, fam, ms=6, marker=marker)
    ax.plot(front["bits_per_value"], front["delta_ppl"], "k--", lw=1, label="Pareto front")
    _symlog_y(ax, summary["ci_lo"], summary["ci_hi"])
    ax.set_xlabel("bits per value (metadata and fp16 windows included)")
    ax.set_ylabel("delta PPL vs fp16 (95% CI)")
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    counts = summary["family"].value_counts()
    lab = summary[summary["family"].isin(set(label_families) | set(counts.index[counts > 1]))]
    place_labels(ax, lab["bits_per_value"].tolist(), lab["delta_ppl"].tolist(), lab["config"].tolist())
    _oracle_note(fig, summary)
    return fig


# ---- notebook 06: lossless coding ---------------------------------------------------------------
_LOSSLESS_TENSORS = ["k_pre", "k_post", "v"]


def lossless_by_layer(table: pd.DataFrame, codecs: list[str]):
    """Lossless ratio per layer, one panel per tensor, a line per codec of ``codecs``, with the order-0 entropy
    bound of the byte planes dashed. The y axis is split: layer 0, whose repeated tokens compress far better,
    sits in a short upper band, so the deeper layers keep a readable linear scale. ``table``:
    :func:`kvlab.evaluation.lossless.ratio_table`."""
    data = table[table.codec.isin(codecs)]
    deep = data[data.layer > 0]
    bound = table[table.codec == "bytes+zstd"]
    lo_vals = pd.concat([deep.ratio, bound[bound.layer > 0].entropy_ratio]) if len(deep) else data.ratio
    lo = (min(1.0, lo_vals.min()) - 0.01, lo_vals.max() + 0.03)
    top_vals = pd.concat([data.ratio, bound.entropy_ratio])
    split = top_vals.max() > lo[1] + 0.05
    colours = dict(zip(codecs, sns.color_palette("tab10", len(codecs))))
    rows = 2 if split else 1
    fig, axes = plt.subplots(rows, 3, figsize=(14, 4.4), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [1, 3] if split else [1], "hspace": 0.08})
    for col, name in enumerate(_LOSSLESS_TENSORS):
        for r in range(rows):
            ax = axes[r, col]
            for c in codecs:
                d = data[(data.tensor == name) & (data.codec == c)].sort_values("layer")
                ax.plot(d.layer, d.ratio, marker="o", ms=3, lw=1.2, color=colours[c], label=c)
            b = bound[bound.tensor == name].sort_values("layer")
            ax.plot(b.layer, b.entropy_ratio, "k--", lw=1, label="order-0 bound, byte planes")
            ax.axhline(1.0, color="grey", lw=0.6)
        axes[-1, col].set_ylim(*lo)
        axes[-1, col].set_xlabel("layer")
        axes[0, col].set_title(_TENSOR_LABEL[name])
        if split:
            top, bot = axes[0, col], axes[1, col]
            top.set_ylim(lo[1] + 0.05, top_vals.max() * 1.08)
            top.spines["bottom"].set_visible(False)
            bot.spines["top"].set_visible(False)
            top.tick_params(bottom=False)
            kw = dict(marker=[(-1, -0.5), (1, 0.5)], markersize=8, linestyle="none", color="k", mec="k", mew=1,
                      clip_on=False)
            top.plot([0, 1], [0, 0], transform=top.transAxes, **kw)
            bot.plot([0, 1], [1, 1], transform=bot.transAxes, **kw)
    axes[-1, 0].set_ylabel("lossless ratio")
    if split:
        axes[0, 0].set_ylabel("layer 0", fontsize=9)
    handles, labels = axes[-1, 0].get_legend_handles_labels()
    fig.suptitle("Lossless ratio per layer (every container byte counted; y axis split above the deeper layers)",
                 fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.88, bottom=0.2, wspace=0.18)  # the legend under the panels
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=len(labels), fontsize=9,
               frameon=False)
    return fig


def lossless_by_codec(summary: pd.DataFrame, codecs: list[str]):
    """Pooled ratio per codec of ``codecs`` and tensor (bars rising from 1.0, no compression) against the
    order-0 bound of the same planes (black dashes). ``summary``: :func:`kvlab.evaluation.lossless.summarize`."""
    fig, ax = plt.subplots(figsize=(11, 4.2))
    data = summary[summary.codec.isin(codecs)].set_index(["codec", "tensor"])
    colours = dict(zip(_LOSSLESS_TENSORS, sns.color_palette("tab10", 3)))
    width = 0.8 / len(_LOSSLESS_TENSORS)
    x = np.arange(len(codecs))
    for j, t in enumerate(_LOSSLESS_TENSORS):
        pos = x - 0.4 + width * (j + 0.5)
        ratio = [data.at[(c, t), "ratio"] if (c, t) in data.index else np.nan for c in codecs]
        bound = [data.at[(c, t), "entropy_ratio"] if (c, t) in data.index else np.nan for c in codecs]
        ax.bar(pos, np.asarray(ratio) - 1.0, width * 0.95, bottom=1.0, color=colours[t], label=_TENSOR_LABEL[t])
        ax.scatter(pos, bound, marker="_", s=150, linewidths=2, color="k", zorder=3,
                   label="order-0 bound" if j == 0 else None)
    top = np.nanmax(summary[["ratio", "entropy_ratio"]].to_numpy())
    ax.set_ylim(1.0, 1.0 + (top - 1.0) * 1.12)
    ax.set_xticks(x, codecs, rotation=25, ha="right", fontsize=9)
    ax.set_ylabel("pooled lossless ratio")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9)
    ax.set_title("Pooled over layers: measured zstd ratio (bars) vs the order-0 entropy bound of the same planes",
                 fontsize=10)
    fig.tight_layout()
    return fig


def mixed_ratio_vs_ppl(res: pd.DataFrame, title: str):
    """Compression ratio vs delta PPL (95% CI bars) of the mixed lossless/lossy policies of
    :func:`kvlab.evaluation.lossless.evaluate_policies`, each point labelled with its policy (labels placed
    so that none overlaps another)."""
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    ax.errorbar(res.ratio, res.delta_ppl, yerr=[res.delta_ppl - res.ci_lo, res.ci_hi - res.delta_ppl], fmt="o",
                ms=6, color="tab:blue", ecolor="grey", capsize=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="compression ratio vs fp16 (every stored byte)", ylabel="delta PPL vs fp16 (95% CI)", title=title)
    span = res.ratio.max() - res.ratio.min()
    ax.set_xlim(res.ratio.min() - 0.08 * span - 0.01, res.ratio.max() + 0.3 * span + 0.01)
    fig.tight_layout()
    labels = [p.replace(";keep=fp16", "").replace("kv=", "") for p in res.policy]
    place_labels(ax, res.ratio.tolist(), res.delta_ppl.tolist(), labels, fontsize=8)
    return fig


def _passkey_axes(a, passkey: pd.DataFrame, title: str = "Passkey retrieval") -> None:
    """Passkey accuracy per policy on ``a``, one bar group per haystack length, with the binomial CI."""
    lengths = sorted(passkey["length"].unique())
    policies = list(dict.fromkeys(passkey["policy"]))
    width = 0.8 / max(len(lengths), 1)
    colors = sns.color_palette("crest", len(lengths))
    for j, length in enumerate(lengths):
        g = passkey[passkey["length"] == length].set_index("policy").reindex(policies)
        x = np.arange(len(policies)) + (j - (len(lengths) - 1) / 2) * width
        ok = g["accuracy"].notna().to_numpy()
        err = np.vstack([g["accuracy"] - g["ci_lo"], g["ci_hi"] - g["accuracy"]])[:, ok]
        a.bar(x[ok], g["accuracy"][ok], width * 0.95, yerr=err, capsize=3, color=colors[j],
              label=f"{length} tokens (n = {int(g['trials'].max())})")
    a.set_xticks(range(len(policies)), policies, rotation=20, ha="right", fontsize=9)
    a.set_ylim(0, 1.05)
    a.set_ylabel("passkey accuracy (95% CI)")
    a.set_title(title)
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=len(lengths), frameon=False)


def _greedy_axes(b, greedy: pd.DataFrame, title: str | None = None) -> None:
    """Mean greedy tokens agreed with the reference before the first divergence on ``b``, with its CI."""
    g = greedy.sort_values("mean_agree")
    y = np.arange(len(g))
    b.barh(y, g["mean_agree"], xerr=np.vstack([g["mean_agree"] - g["ci_lo"], g["ci_hi"] - g["mean_agree"]]),
           capsize=3, color=sns.color_palette("crest", 1)[0])
    b.set_yticks(y, g["policy"], fontsize=9)
    b.set_xlim(0, float(g["new_tokens"].max()) * 1.05)
    b.set_xlabel(f"greedy tokens equal to the reference before the first divergence (of {int(g['new_tokens'].max())})")
    b.set_title(title or f"Greedy agreement ({int(g['prompts'].max())} prompts, mean and 95% CI)")


def end_metrics_plot(passkey: pd.DataFrame, greedy: pd.DataFrame):
    """Left: passkey accuracy per policy, one bar group per haystack length, with the binomial CI
    (:func:`kvlab.evaluation.retrieval.passkey_summary`). Right: mean greedy tokens agreed with the reference
    before the first divergence, with its bootstrap CI (:func:`kvlab.evaluation.retrieval.greedy_summary`)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    _passkey_axes(a, passkey)
    _greedy_axes(b, greedy)
    fig.tight_layout()
    return fig


def families_end_metrics_plot(passkeys: dict[str, pd.DataFrame], greedies: dict[str, pd.DataFrame]):
    """:func:`end_metrics_plot` for each model, one row per model (same axes limits), titled by the model."""
    labels = list(passkeys)
    fig, axes = plt.subplots(len(labels), 2, figsize=(12, 4.4 * len(labels)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.1, 1]})
    for (a, b), label in zip(axes, labels):
        _passkey_axes(a, passkeys[label], title=f"{label}: passkey retrieval")
        g = greedies[label]
        _greedy_axes(b, g, title=f"{label}: greedy agreement ({int(g['prompts'].max())} prompts, 95% CI)")
    fig.tight_layout()
    return fig


# ---- notebook 07: two model families ------------------------------------------------------------
def families_plot(side: pd.DataFrame, labels):
    """Two panels from :func:`kvlab.study.families.side_by_side`: (left) each config's delta PPL on the first
    model (x) against the second (y), both symlog with 95% CI bars, the diagonal dashed; (right) the same as
    a fraction of each model's fp16 PPL against bits per value on the first model, one line per model, so a
    reader sees where the two models part. Colours per family group, oracle configs hollow, configs labelled
    without overlaps (:func:`place_labels`)."""
    a, b = labels
    t = side[side.config != "fp16"]
    if (side.config == "fp16").sum() != 1:
        raise ValueError("families_plot needs the fp16 row of side_by_side (the relative losses are against it)")
    fp16 = {m: float(side.loc[side.config == "fp16", f"{m} ppl"].iloc[0]) for m in (a, b)}
    styles = family_styles(t["family"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    for fam in styles:
        g = t[t["family"] == fam]
        colour, marker = styles[fam]
        for hollow, part in ((False, g[~g.oracle]), (True, g[g.oracle])):
            if part.empty:
                continue
            ax.errorbar(part[f"{a} delta_ppl"], part[f"{b} delta_ppl"],
                        xerr=[part[f"{a} delta_ppl"] - part[f"{a} ci_lo"], part[f"{a} ci_hi"] - part[f"{a} delta_ppl"]],
                        yerr=[part[f"{b} delta_ppl"] - part[f"{b} ci_lo"], part[f"{b} ci_hi"] - part[f"{b} delta_ppl"]],
                        fmt=marker, ms=6, capsize=2, color=colour, mfc="none" if hollow else colour, elinewidth=0.9,
                        label=fam if not hollow or part is g else None)
            for m, off in ((a, -0.12), (b, 0.12)):
                d = part[f"{m} delta_ppl"]
                ax2.errorbar(part[f"{a} bits_per_value"] + off, d / fp16[m] * 100,
                             yerr=[(d - part[f"{m} ci_lo"]) / fp16[m] * 100, (part[f"{m} ci_hi"] - d) / fp16[m] * 100],
                             fmt=marker if m == a else "s", ms=5, capsize=2, color=colour,
                             mfc=colour if m == a else "none", elinewidth=0.8, alpha=0.9)
    lo = float(min(t[f"{a} ci_lo"].min(), t[f"{b} ci_lo"].min()))
    hi = float(max(t[f"{a} ci_hi"].max(), t[f"{b} ci_hi"].max()))
    _symlog_y(ax, [lo], [hi])
    ax.set_xscale("symlog", linthresh=0.05)
    ax.set_xlim(ax.get_ylim())
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(ax.get_yticks())
    ax.xaxis.set_minor_locator(mticker.NullLocator())
    ax.plot(ax.get_xlim(), ax.get_xlim(), "k--", lw=0.8)
    ax.set_xlabel(f"delta PPL on {a} (95% CI)")
    ax.set_ylabel(f"delta PPL on {b} (95% CI)")
    ax.set_title("the same configs on both models (diagonal: equal loss)")
    place_labels(ax, t[f"{a} delta_ppl"].tolist(), t[f"{b} delta_ppl"].tolist(), t["config"].tolist())
    ax2.set_yscale("symlog", linthresh=1)
    ax2.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}%"))
    ax2.set_xlabel(f"bits per value (on {a}; the two models' bits differ only with head_dim)")
    ax2.set_ylabel("delta PPL / fp16 PPL (95% CI)")
    ax2.set_title(f"filled: {a}, hollow squares: {b}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    _oracle_note(fig, t)
    return fig
