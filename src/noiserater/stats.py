"""Small summary statistics shared by the pipelines: the one paired interval and p-value of every report."""

from __future__ import annotations

import math
from typing import Iterable

from scipy import stats


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of ``values``: SE = sample std (n - 1) / sqrt(n); 0 for one value."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    var = sum((x - mean) ** 2 for x in v) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def paired_interval(diffs: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean, sample SD, t-interval half-width and two-sided p-value of paired differences (one per seed).

    The one definition of every report's paired interval and p-value: both come from the same one-sample t
    statistic of the differences the report shows (relative differences, in %), so p < 1 - level exactly when
    the interval excludes 0."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "half": math.nan, "p": math.nan}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else (0.0 if mean else 1.0)
    return {"n": n, "mean": mean, "sd": sd, "half": float(half), "p": p}
