"""One look for every figure of the book, one vocabulary of arm names and one palette.

The ``draw_*`` helpers take a tidy DataFrame (as returned by the experiments) and an optional
matplotlib ``ax``, draw, and return the ``ax``; a registered experiment's ``plot(df)`` returns
a Figure. Bands are the spread over seeds. Arms are named from :data:`ARMS` (the book's
vocabulary) and every figure colours an arm the same way (:func:`color`).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["set_theme", "draw_curves", "draw_sweep", "draw_percentiles", "learning_curves",
           "sweep", "percentile_bands", "ARMS", "ARM_COLORS", "color", "new_axes", "facets"]

# The book's arm names, each with its colour (colour-blind palette): one vocabulary everywhere.
ARMS: dict[str, str] = {
    "plain": "#7f7f7f",          # no normaliser
    "BN": "#0173b2",             # batch norm (before the activation unless the arm says)
    "BN after": "#56b4e9",       # batch norm after the activation
    "ghost BN": "#029e73",       # batch norm over virtual (ghost) batches
    "noisy BN": "#cc78bc",       # batch norm with injected noise (chapter 6)
    "LN": "#de8f05",             # layer norm
    "GN": "#d55e00",             # group norm
    "BRN": "#ca9161",            # batch renormalization
    "WS+GN": "#fbafe4",          # weight standardization with group norm
    "SkipInit": "#949494",       # no normaliser, residual branches scaled from zero
    "residual": "#ece133",       # residual connections, no normaliser
    "residual + BN": "#012f55",  # residual connections and batch norm
    "dropout": "#a3573a",        # dropout, no normaliser
    "BN + dropout": "#6a3d9a",   # batch norm and dropout
    "plain + noise": "#e69f00",  # no normaliser, with the noise that noisy BN injects
    "dropout before BN": "#8c564b",   # dropout feeding a batch norm (the variance shift)
    "dropout after last BN": "#c49c94",
    "folded": "#ff7f0e",         # BN folded into the preceding layer
    "standardized input": "#b15928",
}
# Older names that still appear in some results, mapped to the vocabulary.
ALIASES = {"no BN": "plain", "none": "plain", "batch": "BN", "bn": "BN", "layer": "LN",
           "group": "GN", "BN (torch)": "BN", "BN (bnlib)": "ghost BN"}
ARM_COLORS = {**ARMS, **{k: ARMS[v] for k, v in ALIASES.items()}}


def color(arm: str) -> str:
    """The colour of ``arm`` in every figure of the book."""
    return ARM_COLORS.get(arm) or ARM_COLORS.get(str(arm)) or "#333333"


# The book's pages show a figure about 9 inches wide; panels are sized so that text set in
# points stays readable there: at most three panels a row, each at least 3.6 inches wide.
PAGE_WIDTH = 11.0
MAX_COLUMNS = 3


def set_theme() -> None:
    """The book's seaborn theme: white grid, fonts sized for the rendered page, colour-blind palette."""
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind",
                  rc={"figure.figsize": (7.0, 4.0), "figure.dpi": 100, "axes.titleweight": "bold",
                      "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
                      "ytick.labelsize": 10, "legend.fontsize": 10, "legend.title_fontsize": 10,
                      "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False})


def new_axes(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 3.8, **kw):
    """A figure with ``nrows × ncols`` axes sized for the book's page (the panels shrink so
    that a row fits :data:`PAGE_WIDTH`; use :func:`facets` for more than three panels)."""
    panel = max(min(width, PAGE_WIDTH / ncols), 3.6)
    scale = panel / width
    return plt.subplots(nrows, ncols, figsize=(panel * ncols, max(height * scale, 2.8) * nrows),
                        constrained_layout=True, squeeze=False, **kw)


def facets(values: Sequence, draw, *, width: float = 6.0, height: float = 3.8,
           columns: int = MAX_COLUMNS):
    """One panel per value, at most ``columns`` a row: ``draw(value, ax)`` fills each.
    Returns the figure (unused panels of the last row are hidden)."""
    values = list(values)
    ncols = min(len(values), columns)
    nrows = -(-len(values) // ncols)
    fig, axes = new_axes(ncols, nrows, width=width, height=height)
    flat = axes.ravel()
    for ax, value in zip(flat, values):
        draw(value, ax)
    for ax in flat[len(values):]:
        ax.set_visible(False)
    return fig


def _palette(values: Sequence) -> dict:
    """Fixed colours for the usual arm names (plain grey, BN blue), the colour-blind
    palette in order of appearance for the rest: an arm keeps its colour across figures."""
    values = list(dict.fromkeys(values))
    free = [c for c in sns.color_palette("colorblind", 10)[1:]]
    out, k = {}, 0
    for v in values:
        if v in ARM_COLORS:
            out[v] = ARM_COLORS[v]
        else:
            out[v] = free[k % len(free)]
            k += 1
    return out


def draw_curves(df: pd.DataFrame, *, x: str = "step", y: str = "accuracy",
                    hue: str = "arm", split: str | None = "val", errorbar=("sd", 1),
                    ax=None, logy: bool = False, title: str | None = None,
                    palette: dict | None = None):
    """Mean curve per ``hue`` with a band of ± one standard deviation over seeds."""
    ax = ax or plt.gca()
    data = df if split is None else df[df["split"] == split]
    sns.lineplot(data=data, x=x, y=y, hue=hue, errorbar=errorbar, ax=ax,
                 palette=(palette or _palette(data[hue])) if hue else None)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title or "")
    return ax


def draw_sweep(df: pd.DataFrame, *, x: str, y: str, hue: str = "arm", logx: bool = True,
          diverged: str | None = "diverged", errorbar=("sd", 1), ax=None, title: str | None = None,
          palette: dict | None = None):
    """A metric against a swept value, one line per ``hue``, mean ± sd over seeds.

    Where runs diverged (column ``diverged`` true), a red × marks the swept value, so a
    missing point is never mistaken for a good one.
    """
    ax = ax or plt.gca()
    ok = df[~df[diverged]] if diverged in df else df
    sns.lineplot(data=ok, x=x, y=y, hue=hue, marker="o", errorbar=errorbar, ax=ax,
                 palette=(palette or _palette(df[hue])) if hue else None)
    if diverged in df and df[diverged].any():
        bad = df[df[diverged]].drop_duplicates([x, hue] if hue else [x])
        ax.scatter(bad[x], np.full(len(bad), ax.get_ylim()[0]), marker="x", color="red",
                   zorder=5, clip_on=False, label="diverged")
        ax.legend()
    if logx:
        ax.set_xscale("log")
    ax.set_title(title or "")
    return ax


def draw_percentiles(df: pd.DataFrame, *, x: str = "step", hue: str = "arm",
                     lo: str = "p15", mid: str = "p50", hi: str = "p85", ax=None,
                     title: str | None = None):
    """The median as a line and the band between two percentiles, per ``hue``
    (the BN paper's Figure 1(b, c) view of one unit's input distribution over training)."""
    ax = ax or plt.gca()
    groups = list(dict.fromkeys(df[hue])) if hue else [None]
    colors = _palette(groups)
    for g in groups:
        d = df if g is None else df[df[hue] == g]
        d = d.groupby(x)[[lo, mid, hi]].mean().reset_index()
        ax.plot(d[x], d[mid], color=colors[g], label=f"{g} (median)" if g is not None else "median")
        ax.fill_between(d[x], d[lo], d[hi], color=colors[g], alpha=0.25)
    ax.legend()
    ax.set_title(title or "")
    return ax


# the names the chapters used before the draw_* convention
learning_curves, sweep, percentile_bands = draw_curves, draw_sweep, draw_percentiles


if matplotlib.get_backend().lower() == "agg":  # headless runs: no interactive surprises
    plt.ioff()
