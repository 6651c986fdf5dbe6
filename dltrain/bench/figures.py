"""Reading a configuration's aggregated figures, for the report and the scaling model alike."""

from __future__ import annotations


def figure_mean(cfg: dict | None, key: str) -> float | None:
    """The mean over repeats of figure `key` of an aggregated configuration (None when absent)."""
    fig = (cfg or {}).get("figures", {}).get(key)
    return fig["mean"] if fig else None
