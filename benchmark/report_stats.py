"""Statistics of the report: per-row mean, sd and Student-t confidence interval over seeds, paired
comparisons to a baseline row over the seeds both have, and Holm's correction across a table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
CI_KIND = "Student t, 95%"


def t_interval(values: np.ndarray | pd.Series, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided Student-t interval of the mean, ``mean ± t_{n-1} · sd / √n`` (NaNs with n < 2)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def paired_gap(values: pd.Series, baseline: pd.Series) -> tuple[float, float, int]:
    """Mean paired difference (points), paired t-test p-value and number of pairs, over the seeds
    (index) both have. p is NaN with fewer than two pairs or identical differences."""
    from scipy import stats

    common = values.index.intersection(baseline.index)
    if len(common) == 0:
        return math.nan, math.nan, 0
    diff = (values.loc[common] - baseline.loc[common]) * 100
    if len(common) < 2 or np.allclose(diff.to_numpy(), diff.iloc[0]):
        return float(diff.mean()), math.nan, len(common)
    p = stats.ttest_rel(values.loc[common], baseline.loc[common]).pvalue
    return float(diff.mean()), float(p), len(common)


def paired_interval(values: pd.Series, baseline: pd.Series) -> tuple[float, float]:
    """Student-t 95% interval of the mean paired difference (points) over the common seeds."""
    common = values.index.intersection(baseline.index)
    return t_interval((values.loc[common] - baseline.loc[common]).to_numpy() * 100)


def holm(pvalues: list[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaNs are not part of the family and
    stay NaN): the i-th smallest of m gets max_{j ≤ i} min(1, (m − j + 1) p_(j))."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    running = 0.0
    for rank, idx in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return out
