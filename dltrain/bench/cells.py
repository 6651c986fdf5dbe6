"""The cells and tables of report.md: numbers to a few significant digits, a figure's mean ± std
over repeats, pipe tables, message sizes."""

from __future__ import annotations

from dltrain.bench.result import Config, Stats


def num(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1e3:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fig(cfg: Config, key: str, scale: float = 1.0, digits: int = 3) -> str:
    f = cfg.figures.get(key)
    if not f:
        return "-"
    text = num(f.mean * scale, digits)
    return text + (f" ± {num(f.std * scale, 2)}" if f.n > 1 else "")


def stats(fig: Stats | None) -> str:
    if not fig:
        return "-"
    return num(fig.mean) + (f" ± {num(fig.std, 2)}" if fig.n > 1 else "")


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["(none)", ""]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"
