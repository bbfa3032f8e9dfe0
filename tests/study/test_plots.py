"""kvlab.study.plots: the properties the figures promise (shared colour scale per row, labels that do not
overlap, bars from 1.0, a split axis when layer 0 dominates)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from kvlab.study import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_place_labels_never_overlap():
    fig, ax = plt.subplots(figsize=(5, 4))
    xs = np.array([1.0, 1.02, 1.04, 1.06, 2.0, 2.01, 3.0, 3.0])
    ys = np.array([1.0, 1.01, 0.99, 1.0, 5.0, 5.02, 2.0, 2.05])
    ax.scatter(xs, ys)
    ax.set_xlim(0, 4), ax.set_ylim(0, 6)
    anns = plots.place_labels(ax, xs, ys, [f"config number {i}" for i in range(len(xs))])
    fig.canvas.draw()
    boxes = [Text.get_window_extent(a) for a in anns]  # the text alone, not its leader line
    assert len(boxes) == len(xs)
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def _errors():
    rows = []
    rng = np.random.default_rng(0)
    for c, scale in (("a", 1e-4), ("b", 1e-1)):
        for layer in range(4):
            for head in range(2):
                rows.append(dict(config=c, layer=layer, head=head, k_nmse=scale * rng.uniform(1, 10),
                                 v_nmse=scale * rng.uniform(0.1, 1), attn_nmse=scale * rng.uniform(1, 100)))
    return pd.DataFrame(rows)


def test_error_heatmaps_share_one_colour_scale_per_row():
    errors = _errors()
    fig = plots.error_heatmaps(errors, ["a", "b"])
    rows = [[ax for ax in fig.axes if ax.images and ax.get_subplotspec().rowspan.start == r] for r in (0, 1)]
    for r, c in zip(rows, ("a", "b")):
        norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in r}
        assert len(norms) == 1  # one scale for the row
        e = errors[errors.config == c][["k_nmse", "v_nmse", "attn_nmse"]].to_numpy()
        assert norms.pop() == pytest.approx((e.min(), e.max()))


def test_lossless_figures_bars_from_one_and_a_split_axis():
    codecs = ["zstd", "bytes+zstd"]
    table = pd.DataFrame([dict(layer=layer, tensor=t, codec=c, ratio=(4.0 if layer == 0 else 1.1 + 0.01 * layer),
                               entropy_ratio=1.2) for layer in range(5) for t in ("k_pre", "k_post", "v")
                          for c in codecs])
    fig = plots.lossless_by_layer(table, codecs)
    assert len(fig.axes) == 6  # two bands per tensor: layer 0 above, the deeper layers below
    assert fig.axes[3].get_ylim()[1] < 1.3 < fig.axes[0].get_ylim()[1]
    summary = table.groupby(["codec", "tensor"], as_index=False)[["ratio", "entropy_ratio"]].mean()
    fig = plots.lossless_by_codec(summary, codecs)
    bars = fig.axes[0].patches
    assert bars and all(b.get_y() == 1.0 for b in bars) and fig.axes[0].get_ylim()[0] == 1.0


def test_family_styles_tell_every_family_apart():
    fams = ["bf16", "fp8", "fpmant", "int", "int (truncate)", "q4_0", "q8_0", "kivi", "kvquant", "signmag", "new"]
    styles = plots.family_styles(fams)
    assert len(set(styles.values())) == len(fams)
    assert len({c for c, _ in styles.values()}) <= 7  # one colour per group, not per family
