"""SLO math: quantiles and attainment from histogram deltas, and the error budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tideserve.autoscaler.slo import ErrorBudget, Histogram, PercentileSLO
from tideserve.buckets import TTFT_BUCKETS

EDGES = tuple(TTFT_BUCKETS) + (math.inf,)


def test_quantiles_from_fine_buckets_track_the_raw_values():
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=-1.0, sigma=1.0, size=20_000)
    hist = Histogram.from_values(EDGES, values)
    for q in (0.5, 0.9, 0.99):
        exact = np.quantile(values, q)
        assert hist.quantile(q) == pytest.approx(exact, rel=0.06)  # 20 buckets per decade: ~12% wide
    assert hist.count == len(values) and hist.mean == pytest.approx(values.mean())


def test_delta_of_two_scrapes_and_counter_reset():
    first = Histogram.from_values(EDGES, [0.1, 0.2, 5.0])
    later = Histogram.from_values(EDGES, [0.1, 0.2, 5.0, 0.3, 0.3])
    delta = later.minus(first)
    assert delta.count == 2 and delta.quantile(0.5) == pytest.approx(0.3, rel=0.13)
    restarted = Histogram.from_values(EDGES, [1.0])  # a pod restarted: its counters start again
    assert restarted.minus(later) == restarted
    with pytest.raises(ValueError, match="different bucket edges"):
        later.minus(Histogram.from_values((1.0, math.inf), [0.5]))


def test_empty_histogram_has_no_quantile_and_overflow_reads_as_highest_edge():
    assert Histogram.from_values(EDGES, []).quantile(0.9) is None
    overflow = Histogram.from_values(EDGES, [1000.0] * 10)
    assert overflow.quantile(0.99) == EDGES[-2]
    with pytest.raises(ValueError):
        overflow.quantile(1.5)


def test_fraction_at_most_is_the_attainment_of_a_threshold():
    values = np.linspace(0.01, 2.0, 1000)
    hist = Histogram.from_values(EDGES, values)
    assert hist.fraction_at_most(1.0) == pytest.approx(np.mean(values <= 1.0), abs=0.02)
    assert hist.fraction_at_most(100.0) == 1.0


def test_percentile_slo_pressure():
    slo = PercentileSLO(90, 0.5)
    hist = Histogram.from_values(EDGES, [0.1] * 80 + [0.9] * 20)
    assert slo.met(hist) is False and slo.pressure(hist) == pytest.approx(1.8, rel=0.13)
    with pytest.raises(ValueError):
        PercentileSLO(100, 1.0)


def test_error_budget_burn_and_rolling_horizon():
    budget = ErrorBudget(target=0.99, horizon_s=100)
    budget.record(0, 1000, 995)  # 0.5% bad: half the allowed rate
    assert budget.burn_rate() == pytest.approx(0.5)
    assert budget.remaining == pytest.approx(0.5)
    budget.record(50, 1000, 960)  # 4% bad: burning 4x faster than allowed
    assert budget.burn_rate() == pytest.approx(4.0)
    assert budget.remaining < 0
    budget.record(200, 100, 100)  # the old windows left the horizon
    assert budget.attainment == 1.0 and budget.remaining == 1.0
    restored = ErrorBudget.from_dict(budget.to_dict())
    assert restored.attainment == budget.attainment
    with pytest.raises(ValueError):
        budget.record(300, 10, 11)
