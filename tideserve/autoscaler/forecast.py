"""Seasonal forecasting of request rate and query mix.

A profile keeps, per slot of a period (a day, a week), an exponentially weighted mean of what was observed in
that slot. The forecast for t+h follows the live level and applies the profile's shape between now and t+h:
    forecast(t+h) = level(t) * profile(t+h),   level(t) = EWMA of observed(t) / profile(t)
so a day that runs 2-3x above or below the usual one is followed, while the daily shape still moves capacity
ahead of the ramp. Windows without data (stale or missing metrics) are never learned, and a window far below
what the profile expects (a collection gap, or an outage) is not learned as an idle period either.
"""

from __future__ import annotations

from dataclasses import dataclass

DAY_S = 86400.0
WEEK_S = 7 * DAY_S


class SeasonalProfile:
    def __init__(self, period_s: float, slot_s: float, alpha: float = 0.3):
        n = round(period_s / slot_s) if period_s > 0 and slot_s > 0 else 0
        if n < 1 or abs(n * slot_s - period_s) > 1e-6 * period_s:
            raise ValueError("period must be a positive multiple of the slot")
        self.period_s, self.slot_s, self.alpha = period_s, slot_s, alpha
        self.values: list[float | None] = [None] * n
        self.counts: list[int] = [0] * n

    def _slot(self, t: float) -> int:
        return min(len(self.values) - 1, int((t % self.period_s) // self.slot_s))

    def update(self, t: float, value: float) -> None:
        i = self._slot(t)
        old = self.values[i]
        # The first observations of a slot are averaged plainly; then the slot forgets at rate alpha.
        weight = max(self.alpha, 1.0 / (self.counts[i] + 1))
        self.values[i] = value if old is None else old + weight * (value - old)
        self.counts[i] += 1

    def expected(self, t: float) -> float | None:
        """The slot's value; None where a slot was never observed. No interpolation into the neighbouring
        slot: it may already hold today's value, which would bias the live level measured against it."""
        return self.values[self._slot(t)]

    def confidence(self, t: float) -> int:
        return self.counts[self._slot(t)]

    def to_dict(self) -> dict:
        return {"period_s": self.period_s, "slot_s": self.slot_s, "alpha": self.alpha,
                "values": self.values, "counts": self.counts}

    @classmethod
    def from_dict(cls, data: dict) -> "SeasonalProfile":
        profile = cls(data["period_s"], data["slot_s"], data["alpha"])
        if len(data["values"]) != len(profile.values):
            raise ValueError("profile size does not match its period and slot")
        profile.values, profile.counts = list(data["values"]), list(data["counts"])
        return profile


@dataclass
class Forecast:
    rate: float  # requests/s expected at the target time
    mean_input: float
    mean_output: float
    seasonal: bool  # False while the profile has no history for that time (live values only)


class SeasonalForecaster:
    """Rate and mix profiles over a day and a week, plus a live level."""

    def __init__(self, slot_s: float = 600.0, period_s: float = DAY_S, alpha: float = 0.3,
                 level_halflife_s: float = 1800.0, gap_ratio: float = 0.1, min_history: int = 1):
        self.daily = SeasonalProfile(period_s, slot_s, alpha)
        self.weekly = SeasonalProfile(period_s * 7, slot_s, alpha)
        self.input_profile = SeasonalProfile(period_s, slot_s, alpha)
        self.output_profile = SeasonalProfile(period_s, slot_s, alpha)
        self.level_halflife_s = level_halflife_s
        self.gap_ratio = gap_ratio
        self.min_history = min_history
        self.level = 1.0
        self.live_rate: float | None = None
        self.live_input: float | None = None
        self.live_output: float | None = None
        self._last_t: float | None = None
        self.gaps_skipped = 0

    def _profile_rate(self, t: float) -> float | None:
        weekly = self.weekly.expected(t)
        if weekly is not None and self.weekly.confidence(t) >= self.min_history:
            return weekly
        return self.daily.expected(t) if self.daily.confidence(t) >= self.min_history else None

    def observe(self, t: float, window_s: float, rate: float, mean_input: float | None,
                mean_output: float | None) -> bool:
        """Learn one window of fresh metrics. Returns False when the window was judged a gap and not learned
        into the profile (the live level still follows it)."""
        dt = window_s if self._last_t is None else max(0.0, t - self._last_t)
        self._last_t = t
        decay = 0.5 ** (dt / self.level_halflife_s) if self.level_halflife_s > 0 else 0.0
        self.live_rate = rate if self.live_rate is None else decay * self.live_rate + (1 - decay) * rate
        if mean_input is not None and mean_output is not None:
            short = 0.5 ** (dt / 60.0)  # the mix follows within a minute or two
            self.live_input = mean_input if self.live_input is None else short * self.live_input + (1 - short) * mean_input
            self.live_output = (mean_output if self.live_output is None
                                else short * self.live_output + (1 - short) * mean_output)
        expected = self._profile_rate(t)
        if expected is not None and expected > 0:
            if rate < self.gap_ratio * expected:
                self.gaps_skipped += 1
                return False
            self.level = decay * self.level + (1 - decay) * (rate / expected)
        self.daily.update(t, rate)
        self.weekly.update(t, rate)
        if mean_input is not None and mean_output is not None and rate > 0:
            self.input_profile.update(t, mean_input)
            self.output_profile.update(t, mean_output)
        return True

    def forecast(self, now: float, horizon_s: float) -> Forecast | None:
        """Expected rate and mix at now + horizon. None before any observation."""
        if self.live_rate is None:
            return None
        target = now + horizon_s
        mean_input = self.live_input or 1.0
        mean_output = self.live_output or 1.0
        profile_now, profile_then = self._profile_rate(now), self._profile_rate(target)
        if profile_then is None or profile_now is None or profile_now <= 0:
            return Forecast(self.live_rate, mean_input, mean_output, seasonal=False)

        def shifted(live: float, profile: SeasonalProfile) -> float:
            """The profile's change between now and then, applied to the live value."""
            a, b = profile.expected(now), profile.expected(target)
            return max(1.0, live * b / a) if a and b else live

        return Forecast(self.level * profile_then, shifted(mean_input, self.input_profile),
                        shifted(mean_output, self.output_profile), seasonal=True)

    def to_dict(self) -> dict:
        return {
            "daily": self.daily.to_dict(), "weekly": self.weekly.to_dict(),
            "input": self.input_profile.to_dict(), "output": self.output_profile.to_dict(),
            "level": self.level, "live": [self.live_rate, self.live_input, self.live_output], "last_t": self._last_t,
            "settings": {"level_halflife_s": self.level_halflife_s, "gap_ratio": self.gap_ratio,
                         "min_history": self.min_history},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SeasonalForecaster":
        f = cls(**data["settings"])
        f.daily = SeasonalProfile.from_dict(data["daily"])
        f.weekly = SeasonalProfile.from_dict(data["weekly"])
        f.input_profile = SeasonalProfile.from_dict(data["input"])
        f.output_profile = SeasonalProfile.from_dict(data["output"])
        f.level = data["level"]
        f.live_rate, f.live_input, f.live_output = data["live"]
        f._last_t = data["last_t"]
        return f
