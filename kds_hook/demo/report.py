"""Paired statistics and markdown tables for the demo and the benchmarks."""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

__all__ = ["mean_se", "fmt_mean_se", "markdown_table"]


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
