"""Statistics over seeds: the difference of two means with Welch's t interval (unequal
variances, unequal n), as a leaderboard compares a method's seeds with the baseline's."""

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Difference:
    mean: float  # mean(a) - mean(b)
    low: float  # the confidence interval's ends
    high: float
    dof: float  # Welch-Satterthwaite degrees of freedom (inf when both samples have no spread)


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Optional[Difference]:
    """mean(a) - mean(b) with its two-sided Welch t interval; None when a side has fewer than two
    values (no variance to estimate)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import t

    diff = statistics.fmean(a) - statistics.fmean(b)
    share_a, share_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)  # squared standard errors
    se = math.sqrt(share_a + share_b)
    if se == 0:  # identical values on both sides: the interval is the point
        return Difference(diff, diff, diff, math.inf)
    dof = (share_a + share_b) ** 2 / (share_a**2 / (len(a) - 1) + share_b**2 / (len(b) - 1))
    half = float(t.ppf(0.5 + confidence / 2, dof)) * se
    return Difference(diff, diff - half, diff + half, dof)
