"""The Tideserve policy: tail-percentile SLOs, a calibrated performance model, seasonal forecasts, and two
knobs (replicas and per-replica max_num_seqs), behind safety rules.

Each interval:
 1. stale or missing metrics -> hold and say so;
 2. SLO state from the window's histograms: p90s, attainment, error-budget burn;
 3. refit the performance model from step times, and the tail factors (the observed planning quantile over
    the mean; the planning quantile is the attainment goal, e.g. p99, so that 99% of requests meet the targets);
 4. learn the rate and mix into the seasonal profiles; detect a query-mix shift;
 5. demand = max(live arrivals plus backlog, forecast at now + measured start-up time);
 6. batch limit = the largest max_num_seqs whose predicted TPOT p90 stays inside the SLO under the mix;
 7. replicas = demand / (capacity of one replica at that limit x headroom); the headroom is steered so the
    observed tail sits at a setpoint below the targets (tighter while the error budget burns), and an observed
    miss adds replicas in proportion at once;
 8. safety: min/max, bounded steps, stabilization windows, scale down only when N-1 replicas carry the load with
    margin, no further scale-up while new replicas are Pending, and drain the least-loaded replicas first.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from tideserve.autoscaler.forecast import SeasonalForecaster
from tideserve.autoscaler.observation import Decision, Observation
from tideserve.autoscaler.perf_model import H100_8B, PerformanceModel, QueryMix, StepTimeParams
from tideserve.autoscaler.slo import ErrorBudget, PercentileSLO


@dataclass
class PolicyConfig:
    ttft: PercentileSLO = field(default_factory=lambda: PercentileSLO(90, 1.0))
    tpot: PercentileSLO = field(default_factory=lambda: PercentileSLO(90, 0.05))
    attainment_target: float = 0.99
    min_replicas: int = 1
    max_replicas: int = 32
    interval_s: float = 15.0
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 120.0
    max_step_up: int = 8
    max_step_down: int = 1
    headroom: float = 0.85  # plan each replica at this share of its predicted SLO capacity (steered online)
    min_headroom: float = 0.5
    max_headroom: float = 0.98
    pressure_setpoint: float = 0.8  # steer the observed tail to this share of its target
    scale_down_margin: float = 0.95  # N-1 replicas must carry the demand at this share of the planned load
    backlog_clear_s: float = 60.0  # plan to clear a waiting queue within this time
    seasonality: bool = True
    season_period_s: float = 86400.0
    season_slot_s: float = 600.0
    default_startup_s: float = 120.0
    manage_batch_limit: bool = True
    engine_max_num_seqs: int = 256
    advisory: bool = False
    bootstrap: StepTimeParams = H100_8B

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if not 0 < self.min_headroom <= self.headroom <= self.max_headroom <= 1:
            raise ValueError("need 0 < min_headroom <= headroom <= max_headroom <= 1")
        if self.max_step_up < 1 or self.max_step_down < 1:
            raise ValueError("step bounds must be >= 1")


class TideservePolicy:
    name = "tideserve"

    def __init__(self, config: PolicyConfig | None = None):
        self.config = c = config or PolicyConfig()
        self.model = PerformanceModel(c.bootstrap)
        self.forecaster = SeasonalForecaster(slot_s=c.season_slot_s, period_s=c.season_period_s)
        self.budget = ErrorBudget(c.attainment_target, horizon_s=c.season_period_s)
        self.headroom = c.headroom
        self.quantile = max(c.ttft.percentile, c.tpot.percentile, 100 * c.attainment_target) / 100
        self.tpot_tail = 1.3  # observed planning quantile over mean, refined online
        self.ttft_tail = 3.0
        self.startup_s = c.default_startup_s
        self._recommendations: list[tuple[float, int]] = []
        self._last_in_flight = 0.0
        self._rates: deque[float] = deque(maxlen=8)
        self._smoothed_rate: float | None = None
        self._started: float | None = None
        self._mix_baseline: tuple[float, float] | None = None

    @property
    def interval_s(self) -> float:
        return self.config.interval_s

    # --- the decision ---------------------------------------------------------------------------------

    def decide(self, obs: Observation) -> Decision:
        c = self.config
        current = obs.desired_replicas
        if self._started is None:
            self._started = obs.time
        if obs.stale:
            return self._decision(obs, current, obs.max_num_seqs, "hold", "MetricsStale: holding replicas and "
                                  "batch limit until fresh metrics arrive", details={"stale": True})
        slo = self._slo_state(obs)
        self._calibrate(obs)
        rate, mix = self._load(obs)
        mix_shift = self._mix_shift(mix)
        if mix is not None:
            self.forecaster.observe(obs.time, obs.window_s, rate, mix.mean_input, mix.mean_output)
        else:
            self.forecaster.observe(obs.time, obs.window_s, rate, None, None)
        if obs.replica_startup_s:
            self.startup_s = 0.7 * self.startup_s + 0.3 * obs.replica_startup_s
        lead = self.startup_s + c.interval_s
        forecast = self.forecaster.forecast(obs.time, lead) if c.seasonality else None
        plan_mix = mix or QueryMix(512, 128)
        demand = self._live_demand(obs, rate)
        if forecast is not None and forecast.seasonal:
            demand = max(demand, forecast.rate)
            plan_mix = QueryMix(max(plan_mix.mean_input, forecast.mean_input),
                                max(plan_mix.mean_output, forecast.mean_output)) if mix_shift else QueryMix(
                forecast.mean_input, forecast.mean_output)
        self._adapt_headroom(slo)

        batch_limit = self._batch_limit(obs, plan_mix, slo)
        capacity = self.model.capacity(plan_mix, c.tpot.target_s, c.ttft.target_s, batch_limit,
                                       self.tpot_tail, self.ttft_tail)
        per_replica = max(capacity.rate * self.headroom, 1e-6)
        needed = math.ceil(demand / per_replica) if demand > 0 else c.min_replicas
        pressure = slo["pressure"] or 0.0
        if pressure > 1.0 and obs.ready_replicas >= current:
            # The model under-predicts: the SLO is missed now. Add capacity in proportion to the miss.
            needed = max(needed, current + math.ceil(current * min(pressure - 1.0, 1.0)))
        target = self._stabilize(obs, needed, demand, capacity.rate)
        reason, action = self._explain(current, target, batch_limit, obs, demand, capacity, pressure, mix_shift)
        if target > current and obs.pending_replicas > 0:
            target, action = current, "hold"
            reason = (f"CapacityLimited: {obs.pending_replicas} new replica(s) still Pending; not adding more "
                      f"(wanted {needed})")
        details = {
            "rate": rate, "demand": demand, "capacity_per_replica": capacity.rate, "limited_by": capacity.limited_by,
            "headroom": self.headroom, "mix": [plan_mix.mean_input, plan_mix.mean_output], "mix_shift": mix_shift,
            "lead_s": lead, "tpot_tail": self.tpot_tail, "ttft_tail": self.ttft_tail, **slo,
        }
        fc = None if forecast is None else {"rate": forecast.rate, "mean_input": forecast.mean_input,
                                            "mean_output": forecast.mean_output, "seasonal": forecast.seasonal,
                                            "horizon_s": lead}
        return self._decision(obs, target, batch_limit, action, reason, forecast=fc, details=details,
                              predicted=self._predicted_attainment(demand / max(target, 1), plan_mix, batch_limit),
                              drain=self._choose_drain(obs, current - target))

    # --- steps ------------------------------------------------------------------------------------------

    def _slo_state(self, obs: Observation) -> dict:
        c = self.config
        tpot_hist = obs.tpot if obs.tpot is not None and obs.tpot.count else obs.itl
        state = {"ttft_p": None, "tpot_p": None, "ttft_pressure": None, "tpot_pressure": None,
                 "window_attainment": None}
        if obs.ttft is not None and obs.ttft.count:
            state["ttft_p"] = c.ttft.observed(obs.ttft)
            state["ttft_pressure"] = c.ttft.pressure(obs.ttft)
        if tpot_hist is not None and tpot_hist.count:
            state["tpot_p"] = c.tpot.observed(tpot_hist)
            state["tpot_pressure"] = c.tpot.pressure(tpot_hist)
        pressures = [hist.quantile(self.quantile) / slo.target_s for hist, slo in ((obs.ttft, c.ttft), (tpot_hist, c.tpot))
                     if hist is not None and hist.count >= 20]
        state["pressure"] = max(pressures) if pressures else None
        n = obs.ttft.count if obs.ttft is not None else 0.0
        if n > 0:
            good_ttft = obs.ttft.fraction_at_most(c.ttft.target_s) or 0.0
            good_tpot = tpot_hist.fraction_at_most(c.tpot.target_s) if tpot_hist is not None and tpot_hist.count else 1.0
            # Both must hold; without the joint distribution assume the misses overlap as little as possible.
            attainment = max(0.0, good_ttft + good_tpot - 1.0)
            self.budget.record(obs.time, n, n * attainment)
            state["window_attainment"] = attainment
        state["attainment"] = self.budget.attainment
        state["budget_remaining"] = self.budget.remaining
        state["burn_rate"] = self.budget.burn_rate(last_n=8)
        return state

    def _calibrate(self, obs: Observation) -> None:
        if obs.step_s and obs.steps and obs.step_seqs is not None and obs.step_tokens is not None:
            mean_in = obs.prompt_tokens.mean if obs.prompt_tokens is not None and obs.prompt_tokens.count else 512
            mean_out = (obs.generation_tokens.mean if obs.generation_tokens is not None
                        and obs.generation_tokens.count else 128)
            prefill = max(0.0, obs.step_tokens - obs.step_seqs)
            context = obs.step_seqs * (mean_in + mean_out / 2)
            self.model.observe(obs.step_s, obs.step_seqs, context, prefill, obs.steps)
        for hist, attr, low, high in ((obs.tpot if obs.tpot is not None else obs.itl, "tpot_tail", 1.0, 3.0),
                                      (obs.ttft, "ttft_tail", 1.0, 10.0)):
            if hist is not None and hist.count >= 20 and hist.mean:
                ratio = min(high, max(low, hist.quantile(self.quantile) / hist.mean))
                setattr(self, attr, 0.9 * getattr(self, attr) + 0.1 * ratio)

    def _load(self, obs: Observation) -> tuple[float, QueryMix | None]:
        in_flight = obs.running + obs.waiting
        growth = in_flight - self._last_in_flight
        self._last_in_flight = in_flight
        rate = max(0.0, obs.requests_finished + growth) / obs.window_s
        mix = None
        if (obs.prompt_tokens is not None and obs.prompt_tokens.count and obs.generation_tokens is not None
                and obs.generation_tokens.count):
            mix = QueryMix(max(1.0, obs.prompt_tokens.mean), max(1.0, obs.generation_tokens.mean))
        return rate, mix

    def _live_demand(self, obs: Observation, rate: float) -> float:
        """The rate to plan for now: the upper envelope of the last few windows (arrivals are bursty at the
        scale of a window), never below a smoothed rate, plus what it takes to clear the waiting queue."""
        self._rates.append(rate)
        decay = 0.5 ** (obs.window_s / 45.0)
        self._smoothed_rate = rate if self._smoothed_rate is None else decay * self._smoothed_rate + (1 - decay) * rate
        recent = sorted(self._rates)
        upper = recent[int(0.75 * (len(recent) - 1) + 0.5)]
        return max(self._smoothed_rate, upper) + obs.waiting / self.config.backlog_clear_s

    def _mix_shift(self, mix: QueryMix | None) -> bool:
        """A shift of the prefill:decode balance (e.g. to long-input/short-output) against the last hour."""
        if mix is None:
            return False
        ratio = mix.mean_input / mix.mean_output
        if self._mix_baseline is None:
            self._mix_baseline = (ratio, mix.mean_input)
            return False
        base_ratio, base_input = self._mix_baseline
        shifted = not (1 / 1.5 <= ratio / base_ratio <= 1.5) or not (1 / 1.5 <= mix.mean_input / base_input <= 1.5)
        w = min(1.0, self.config.interval_s / 3600.0)
        self._mix_baseline = (base_ratio + w * (ratio - base_ratio), base_input + w * (mix.mean_input - base_input))
        return shifted

    def _adapt_headroom(self, slo: dict) -> None:
        """Steer the planned utilization so the observed tail sits at the setpoint: loosen while latency has
        room (cheaper), tighten when it approaches the target or the error budget burns faster than allowed."""
        c = self.config
        if slo["pressure"] is not None:
            factor = (c.pressure_setpoint / max(slo["pressure"], 1e-3)) ** 0.25
            self.headroom *= min(1.03, max(0.9, factor))
        if slo["window_attainment"] is not None and slo["burn_rate"] > 1.0:
            self.headroom *= 0.97
        self.headroom = min(c.max_headroom, max(c.min_headroom, self.headroom))

    def _batch_limit(self, obs: Observation, mix: QueryMix, slo: dict) -> int:
        c = self.config
        if not c.manage_batch_limit:
            return obs.max_num_seqs
        if self.forecaster.live_input and self.forecaster.live_output:  # the smoothed mix, not one noisy window
            mix = QueryMix(self.forecaster.live_input, self.forecaster.live_output)
        limit = self.model.batch_limit_for_tpot(mix, c.tpot.target_s, self.tpot_tail)
        limit = min(limit, c.engine_max_num_seqs)
        if slo["tpot_pressure"] is not None and slo["tpot_pressure"] > 1.0:
            limit = min(limit, max(1, int(obs.max_num_seqs / slo["tpot_pressure"])))
        # Hysteresis: ignore changes under 25%, and move at most 2x per interval.
        current = obs.max_num_seqs
        if abs(limit - current) <= 0.25 * current:
            return current
        return max(current // 2, min(current * 2, limit))

    def _stabilize(self, obs: Observation, needed: int, demand: float, capacity_rate: float) -> int:
        c = self.config
        current = obs.desired_replicas
        needed = max(c.min_replicas, min(c.max_replicas, needed))
        self._recommendations.append((obs.time, needed))
        horizon = max(c.scale_up_stabilization_s, c.scale_down_stabilization_s)
        self._recommendations = [(t, r) for t, r in self._recommendations if t >= obs.time - horizon]
        if needed > current:
            window = [r for t, r in self._recommendations if t >= obs.time - c.scale_up_stabilization_s]
            return min(current + c.max_step_up, min(window) if window else needed)
        if needed < current:
            if obs.time - self._started < c.scale_down_stabilization_s:
                return current  # not yet a full window of evidence
            window = [r for t, r in self._recommendations if t >= obs.time - c.scale_down_stabilization_s]
            target = max(window) if window else needed
            if target >= current:
                return current
            # Only when N-1 replicas carry the load with margin.
            if demand > (current - 1) * capacity_rate * self.headroom * c.scale_down_margin:
                return current
            return max(target, current - c.max_step_down)
        return current

    def _explain(self, current, target, batch_limit, obs, demand, capacity, pressure, mix_shift):
        mix_note = "; query-mix shift detected" if mix_shift else ""
        if target > current:
            return (f"scale up {current}->{target}: demand {demand:.2f} req/s, {capacity.rate:.2f} req/s per "
                    f"replica ({capacity.limited_by}-bound), SLO pressure {pressure:.2f}{mix_note}", "scale-up")
        if target < current:
            return (f"scale down {current}->{target}: demand {demand:.2f} req/s fits {target} replicas at "
                    f"{capacity.rate:.2f} req/s each{mix_note}", "scale-down")
        if batch_limit != obs.max_num_seqs:
            return (f"batch limit {obs.max_num_seqs}->{batch_limit}: predicted TPOT p90 within "
                    f"{self.config.tpot.target_s * 1000:.0f} ms{mix_note}", "batch-limit")
        return f"hold at {current}: demand {demand:.2f} req/s within capacity{mix_note}", "hold"

    def _predicted_attainment(self, rate_per_replica: float, mix: QueryMix, batch_limit: int) -> float:
        """Chance a request meets both SLOs, with exponential tails around the predicted means."""
        c = self.config
        tpot = self.model.step_time_at(rate_per_replica, mix)
        ttft = self.model.ttft_at(rate_per_replica, mix)
        if not (math.isfinite(tpot) and math.isfinite(ttft)):
            return 0.0
        p_ttft = 1 - math.exp(-c.ttft.target_s / ttft * math.log(10) / max(self.ttft_tail, 1e-6))
        p_tpot = 1.0 if tpot * self.tpot_tail <= c.tpot.target_s else 0.5
        return max(0.0, min(1.0, p_ttft * p_tpot))

    def _choose_drain(self, obs: Observation, count: int) -> list[str]:
        if count <= 0:
            return []
        order = sorted(obs.replicas, key=lambda r: (r.ready, r.running + r.waiting, -r.started_at))
        return [r.name for r in order[:count]]

    def _decision(self, obs, replicas, batch_limit, action, reason, forecast=None, details=None, predicted=None,
                  drain=()):
        return Decision(time=obs.time, replicas=replicas, max_num_seqs=batch_limit, reason=reason, action=action,
                        apply=not self.config.advisory, predicted_attainment=predicted, forecast=forecast,
                        drain=list(drain), details=details or {})

    # --- persistence (the operator keeps this across restarts) -------------------------------------------

    def state_dict(self) -> dict:
        return {"forecaster": self.forecaster.to_dict(), "model": self.model.to_dict(),
                "budget": self.budget.to_dict(), "headroom": self.headroom, "tpot_tail": self.tpot_tail,
                "ttft_tail": self.ttft_tail, "startup_s": self.startup_s}

    def load_state_dict(self, state: dict) -> None:
        self.forecaster = SeasonalForecaster.from_dict(state["forecaster"])
        self.model = PerformanceModel.from_dict(state["model"])
        self.budget = ErrorBudget.from_dict(state["budget"])
        self.headroom, self.tpot_tail, self.ttft_tail = state["headroom"], state["tpot_tail"], state["ttft_tail"]
        self.startup_s = state["startup_s"]
