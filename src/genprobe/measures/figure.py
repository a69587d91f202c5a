"""The ranking's figure: :func:`plot_rank_correlation`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .ranking import eligible_models


def plot_rank_correlation(table: pd.DataFrame, ranking: pd.DataFrame, *,
                          target: str | None = None, limit: int | None = None):
    """A matplotlib Figure: each scored measure's Kendall τ-b, granulated τ and CMI with their
    bootstrap intervals (error bars), largest |τ| first, then one scatter of target against
    measure per measure. `ranking`: :func:`rank_correlation` of `table`; `limit`: at most this
    many measures (the strongest)."""
    from ..figures import BLUE, GREEN, GREY, ORANGE, new_figure, style

    target = target or ranking.attrs.get("target", "gap")
    if target not in table.columns:
        raise ConfigError(f"unknown target column {target!r} for the figure")
    scored = ranking.dropna(subset=["kendall_tau"])
    if limit is not None:
        scored = scored.iloc[:limit]
    names = list(scored["measure"])
    ncols = min(4, max(1, len(names)))
    nrows = math.ceil(len(names) / ncols)
    keep, _ = eligible_models(table, max_train_error=ranking.attrs.get("options", {}).get(
        "max_train_error", 0.5))
    used = table[keep]
    with style():
        fig = new_figure(3.2 * ncols + 2.6, 0.35 * max(len(names), 1) + 1.6 + 2.6 * nrows)
        grid = fig.add_gridspec(1 + nrows, ncols,
                                height_ratios=[0.3 * max(len(names), 1) + 1.0] + [2.4] * nrows)
        ax = fig.add_subplot(grid[0, :])
        y = np.arange(len(names))
        bars = (("kendall_tau", "Kendall τ-b", BLUE), ("granulated_tau", "granulated τ", ORANGE),
                ("cmi", "CMI (PGDL score)", GREEN))
        for i, (column, label, colour) in enumerate(bars):
            value = scored[column].to_numpy(dtype=float)
            low = scored[f"{column}_low"].to_numpy(dtype=float)
            high = scored[f"{column}_high"].to_numpy(dtype=float)
            errors = np.nan_to_num(np.vstack([value - low, high - value]), nan=0.0).clip(min=0.0)
            ax.barh(y + (i - 1) * 0.27, value, height=0.27, color=colour, label=label,
                    xerr=errors, error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": GREY})
        ax.axvline(0.0, color=GREY, linewidth=0.8)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlim(-1.0, 1.0)
        level = ranking.attrs.get("options", {}).get("level", 0.95)
        ax.set_xlabel(f"rank correlation with {target} (CMI in [0, 1]); bars: "
                      f"{level:.0%} bootstrap intervals")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title(f"how well each measure ranks {len(used)} models by {target}")
        g = used[target].to_numpy(dtype=np.float64, na_value=np.nan)
        for k, (name, tau) in enumerate(zip(names, scored["kendall_tau"], strict=True)):
            sx = fig.add_subplot(grid[1 + k // ncols, k % ncols])
            mu = used[name].to_numpy(dtype=np.float64, na_value=np.nan)
            ok = ~(np.isnan(mu) | np.isnan(g))
            sx.scatter(mu[ok], g[ok], s=14, color=BLUE, alpha=0.8)
            if ok.any() and (mu[ok] > 0).all() and mu[ok].max() > 100 * mu[ok].min():
                sx.set_xscale("log")
            sx.set_title(f"{name}\nτ = {tau:+.2f}", fontsize=8)
            sx.tick_params(labelsize=7)
            if k % ncols == 0:
                sx.set_ylabel(target)
    return fig



__all__ = ["plot_rank_correlation"]
