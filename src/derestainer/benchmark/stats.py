"""Summary statistics of a Table-1 benchmark over seeds: mean and sample standard deviation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: Per model, per metric: ``{'mean', 'std', 'n', 'values'}``.
Summary = dict[str, dict[str, dict[str, Any]]]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value). Non-finite values are kept."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n == 1:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def is_number(v: Any) -> bool:
    """A real number (``bool`` is not one)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarize(runs: Sequence[dict[str, Any]], models: Sequence[str]) -> Summary:
    """Per model and numeric metric: ``{'mean', 'std', 'n', 'values'}`` over its seeds."""
    out: Summary = {}
    for m in models:
        recs = [r for r in runs if r["model"] == m]
        keys: list[str] = []
        for r in recs:
            keys += [k for k, v in r["metrics"].items() if is_number(v) and k not in keys]
        out[m] = {}
        for k in keys:
            vals = [float(r["metrics"][k]) for r in recs if is_number(r["metrics"].get(k))]
            mu, sd = mean_std(vals)
            out[m][k] = {"mean": mu, "std": sd, "n": len(vals), "values": vals}
    return out
