"""The seasonal forecaster: it learns a daily shape, follows a day that differs, and does not learn gaps."""

from __future__ import annotations

import math

import pytest

from tideserve.autoscaler.forecast import SeasonalForecaster, SeasonalProfile

DAY = 86400.0
SLOT = 600.0


def diurnal(t: float) -> float:
    return 100 + 60 * math.sin(2 * math.pi * (t % DAY) / DAY)


def feed(f: SeasonalForecaster, start: float, end: float, rate_fn, gap=None) -> None:
    t = start
    while t < end:
        rate = 0.0 if gap and gap[0] <= t < gap[1] else rate_fn(t)
        f.observe(t, SLOT, rate, 1000.0, 200.0)
        t += SLOT


def test_a_synthetic_daily_shape_is_learned_and_forecast_ahead():
    f = SeasonalForecaster(slot_s=SLOT, period_s=DAY, level_halflife_s=3600)
    feed(f, 0, 3 * DAY, diurnal)
    now = 3 * DAY + 5 * 3600  # morning, on the rise
    for horizon in (600, 3600, 3 * 3600):
        fc = f.forecast(now, horizon)
        assert fc.seasonal
        assert fc.rate == pytest.approx(diurnal(now + horizon), rel=0.08)


def test_a_day_at_twice_the_usual_level_is_followed():
    f = SeasonalForecaster(slot_s=SLOT, period_s=DAY, level_halflife_s=1800)
    feed(f, 0, 3 * DAY, diurnal)
    feed(f, 3 * DAY, 3 * DAY + 8 * 3600, lambda t: 2 * diurnal(t))
    now = 3 * DAY + 8 * 3600
    assert f.level == pytest.approx(2.0, rel=0.1)
    assert f.forecast(now, 3600).rate == pytest.approx(2 * diurnal(now + 3600), rel=0.12)


def test_a_data_gap_is_not_learned_as_a_trough():
    f = SeasonalForecaster(slot_s=SLOT, period_s=DAY)
    feed(f, 0, 2 * DAY, diurnal)
    gap = (2 * DAY + 10 * 3600, 2 * DAY + 14 * 3600)  # four hours of zeros (a collection gap)
    feed(f, 2 * DAY, 3 * DAY, diurnal, gap=gap)
    assert f.gaps_skipped == (gap[1] - gap[0]) / SLOT
    noon = 3 * DAY + 12 * 3600
    assert f.daily.expected(noon) == pytest.approx(diurnal(noon), rel=0.05)
    # A profile that had learned the gap would forecast next noon near zero.
    assert f.forecast(noon - 3600, 3600).rate > 0.5 * diurnal(noon)


def test_without_history_the_forecast_is_the_live_rate():
    f = SeasonalForecaster(slot_s=SLOT, period_s=DAY)
    assert f.forecast(0, 600) is None
    f.observe(0, SLOT, 42.0, 500.0, 100.0)
    fc = f.forecast(0, 3600)
    assert not fc.seasonal and fc.rate == 42.0 and fc.mean_input == 500.0


def test_the_mix_profile_forecasts_a_shift_to_long_inputs():
    f = SeasonalForecaster(slot_s=SLOT, period_s=DAY)
    t = 0.0
    while t < 3 * DAY:
        evening = (t % DAY) >= 18 * 3600
        f.observe(t, SLOT, 100.0, 3000.0 if evening else 500.0, 50.0 if evening else 300.0)
        t += SLOT
    afternoon = 3 * DAY + 16 * 3600
    fc = f.forecast(afternoon, 3 * 3600)  # looking ahead into the long-input evening
    assert fc.mean_input > 4 * 500 and fc.mean_output < 100


def test_state_round_trips():
    f = SeasonalForecaster(slot_s=SLOT, period_s=DAY)
    feed(f, 0, DAY, diurnal)
    g = SeasonalForecaster.from_dict(f.to_dict())
    assert g.forecast(DAY, 3600) == f.forecast(DAY, 3600)
    with pytest.raises(ValueError):
        SeasonalProfile(DAY, 7000)
