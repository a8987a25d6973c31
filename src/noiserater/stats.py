"""Small summary statistics shared by the pipelines."""

from __future__ import annotations

import math
from typing import Iterable


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of ``values``: SE = sample std (n - 1) / sqrt(n); 0 for one value."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    var = sum((x - mean) ** 2 for x in v) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)
