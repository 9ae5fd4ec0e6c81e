"""SLO math on tails: quantiles and attainment from Prometheus histogram deltas, and an error budget."""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Histogram:
    """A cumulative Prometheus histogram (or the delta of two scrapes): counts[i] observations <= edges[i]; the
    last edge is +Inf."""

    edges: tuple[float, ...]
    counts: tuple[float, ...]
    total: float = 0.0  # the _sum series

    @classmethod
    def from_values(cls, edges: tuple[float, ...], values) -> "Histogram":
        """Bucket raw observations the way prometheus-client does (le: value <= edge)."""
        per_bucket = [0] * len(edges)
        total = 0.0
        for v in values:
            per_bucket[bisect.bisect_left(edges, v)] += 1
            total += v
        cumulative, running = [], 0
        for c in per_bucket:
            running += c
            cumulative.append(float(running))
        return cls(edges, tuple(cumulative), total)

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def minus(self, earlier: "Histogram | None") -> "Histogram":
        """The delta since an earlier scrape. A counter reset (a restarted pod) makes the delta the new value."""
        if earlier is None:
            return self
        if earlier.edges != self.edges:
            raise ValueError("histograms have different bucket edges")
        delta = tuple(a - b for a, b in zip(self.counts, earlier.counts))
        if any(d < 0 for d in delta):
            return self
        return Histogram(self.edges, delta, self.total - earlier.total)

    def plus(self, other: "Histogram") -> "Histogram":
        if other.edges != self.edges:
            raise ValueError("histograms have different bucket edges")
        return Histogram(self.edges, tuple(a + b for a, b in zip(self.counts, other.counts)), self.total + other.total)

    @staticmethod
    def pool(total: "Histogram | None", window: "Histogram") -> "Histogram":
        """A running sum of windows' histograms; one with other bucket edges (a changed worker) starts it anew."""
        return window if total is None or total.edges != window.edges else total.plus(window)

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q*count.
        None when there are no observations."""
        if not 0 <= q <= 1:
            raise ValueError("quantile must be in [0, 1]")
        n = self.count
        if n <= 0:
            return None
        rank = q * n
        i = bisect.bisect_left(self.counts, rank)
        i = min(i, len(self.counts) - 1)
        if math.isinf(self.edges[i]):
            return self.edges[i - 1] if i > 0 else 0.0  # as Prometheus: the highest finite edge
        lower_edge = self.edges[i - 1] if i > 0 else 0.0
        lower_count = self.counts[i - 1] if i > 0 else 0.0
        in_bucket = self.counts[i] - lower_count
        if in_bucket <= 0:
            return self.edges[i]
        return lower_edge + (self.edges[i] - lower_edge) * (rank - lower_count) / in_bucket

    def fraction_at_most(self, threshold: float) -> float | None:
        """Share of observations <= threshold (interpolated inside its bucket). None when empty."""
        n = self.count
        if n <= 0:
            return None
        i = bisect.bisect_left(self.edges, threshold)
        if i >= len(self.edges):
            return 1.0
        lower_edge = self.edges[i - 1] if i > 0 else 0.0
        lower_count = self.counts[i - 1] if i > 0 else 0.0
        if math.isinf(self.edges[i]):
            return lower_count / n
        share = (threshold - lower_edge) / (self.edges[i] - lower_edge) if self.edges[i] > lower_edge else 1.0
        return (lower_count + share * (self.counts[i] - lower_count)) / n

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count > 0 else None


@dataclass(frozen=True)
class PercentileSLO:
    """`percentile` of the latency must stay at or below `target_s`."""

    percentile: float  # e.g. 90
    target_s: float

    def __post_init__(self):
        if not 0 < self.percentile < 100:
            raise ValueError("percentile must be in (0, 100)")
        if self.target_s <= 0:
            raise ValueError("target must be positive")

    def observed(self, hist: Histogram) -> float | None:
        return hist.quantile(self.percentile / 100)

    def met(self, hist: Histogram) -> bool | None:
        value = self.observed(hist)
        return None if value is None else value <= self.target_s

    def pressure(self, hist: Histogram) -> float | None:
        """Observed percentile over target: 1.0 is exactly at the SLO."""
        value = self.observed(hist)
        return None if value is None else value / self.target_s


class ErrorBudget:
    """Attainment target over a rolling horizon of windows, e.g. 99% of requests within SLO over 24 h.

    Each window contributes (requests, requests within SLO). burn_rate is the budget spent per unit of budget
    allowed: 1.0 spends it exactly by the end of the horizon; above 1 the SLO will be missed if it continues.
    """

    def __init__(self, target: float = 0.99, horizon_s: float = 86400.0, windows=()):
        if not 0 < target < 1:
            raise ValueError("attainment target must be in (0, 1)")
        self.target, self.horizon_s = target, horizon_s
        self.windows: deque[tuple[float, float, float]] = deque()  # (time, total, good)
        self._total = self._good = 0.0
        for w in windows:
            self.record(*w)

    def record(self, now: float, total: float, good: float) -> None:
        if total < 0 or good < 0 or good > total + 1e-9:
            raise ValueError("need 0 <= good <= total")
        self.windows.append((now, total, good))
        self._total += total
        self._good += good
        while self.windows and self.windows[0][0] < now - self.horizon_s:
            _, old_total, old_good = self.windows.popleft()
            self._total -= old_total
            self._good -= old_good

    @property
    def attainment(self) -> float | None:
        return None if self._total <= 0 else self._good / self._total

    @property
    def remaining(self) -> float:
        """Share of the horizon's budget still unspent (1.0 = untouched, negative = overspent)."""
        attainment = self.attainment
        if attainment is None:
            return 1.0
        return 1.0 - (1.0 - attainment) / (1.0 - self.target)

    def burn_rate(self, last_n: int = 1) -> float:
        recent = list(itertools.islice(reversed(self.windows), last_n))
        total = sum(w[1] for w in recent)
        if total <= 0:
            return 0.0
        return (1.0 - sum(w[2] for w in recent) / total) / (1.0 - self.target)

    def to_dict(self) -> dict:
        return {"target": self.target, "horizon_s": self.horizon_s, "windows": [list(w) for w in self.windows]}

    @classmethod
    def from_dict(cls, data: dict) -> "ErrorBudget":
        return cls(data["target"], data["horizon_s"], [tuple(w) for w in data["windows"]])
