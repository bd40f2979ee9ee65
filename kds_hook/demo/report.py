"""Paired statistics and markdown tables for the demo and the benchmarks."""

from __future__ import annotations

import math
import textwrap
from typing import Sequence, Tuple

import torch

__all__ = ["mean_se", "fmt_mean_se", "markdown_table", "add_caption"]


def mean_se(values: torch.Tensor) -> Tuple[float, float]:
    """Mean and standard error of the mean of a 1-D sample (SE is NaN for a single value)."""
    v = values.double().reshape(-1)
    if v.numel() == 0:
        raise ValueError("mean_se needs at least one value")
    se = float(v.std(unbiased=True)) / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")
    return float(v.mean()), se


def fmt_mean_se(values: torch.Tensor, digits: int = 3, signed: bool = False) -> str:
    """``"mean ± se"``; with ``signed`` the mean carries its sign (for paired differences)."""
    mean, se = mean_se(values)
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f} ± {se:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def add_caption(fig, caption: str, legend_on_top: bool = True) -> None:
    """Writes ``caption`` wrapped to the figure's width under the axes of a matplotlib figure and lays the axes
    out above it (leaving room at the top for a figure legend when ``legend_on_top``)."""
    lines = textwrap.wrap(caption, int(15 * fig.get_size_inches()[0]))  # about 15 characters per inch at 8.5 pt
    fig.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", fontsize=8.5)
    height = fig.get_size_inches()[1]
    bottom = (0.2 + 0.16 * len(lines)) / height  # inches of caption, as a fraction of the figure
    top = 1 - 0.35 / height if legend_on_top else 1
    fig.tight_layout(rect=(0, bottom, 1, top))
