"""The Tideserve policy: tail SLOs, a calibrated performance model, seasonal forecasts, and two knobs
(replicas, and per-replica batch limits: max_num_seqs and the per-step token budget), behind safety rules.

Each interval:
 1. stale or missing metrics -> hold everything and say so;
 2. SLO state from the window's histograms: tails at the planning quantile (the attainment goal, e.g. p99, so
    that 99% of requests meet the targets), window attainment, error-budget burn;
 3. refit the performance model from the step-time statistics (and take the KV capacity the workers report),
    and the tail factors (quantile over mean);
 4. learn the rate and mix into the seasonal profiles, and detect a query-mix shift against the last hour;
 5. demand = max(the live arrival envelope plus what clears the queue, the forecast at now + start-up time);
 6. batch limits: among token budgets, the one whose busy step (a full prefill chunk beside the largest batch
    that still fits) keeps TPOT inside its target and gives a replica the most capacity: TPOT is protected by
    construction, and load beyond the plan queues (TTFT) instead of slowing every decode;
 7. replicas = demand / (capacity of one replica x headroom); the headroom is steered so the observed tail sits
    at a setpoint below the targets and tightened while the error budget burns; an observed miss adds capacity;
 8. misses are attributed to what can fix them: a prompt whose own prefill on an idle replica outlasts the TTFT
    target is infeasible (no knob fixes it): its share is reported (SLOInfeasible), the TTFT tail is read and
    planned over the feasible requests only, and the token budget must keep the feasible prompts feasible;
 9. safety: min/max, bounded steps, stabilization windows, scale down only when N-1 replicas carry the demand
    with margin and latency has room, no further scale-up while new replicas are Pending or while a ready
    replica sits idle (fewer requests in flight on average than ready replicas less one, none waiting), never
    more replicas than the load's work keeps busy at min_utilization, drain the least loaded.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from tideserve.autoscaler.forecast import SeasonalForecaster
from tideserve.autoscaler.observation import Decision, Observation
from tideserve.autoscaler.perf_model import (
    H100_8B,
    TOKEN_BUDGETS,
    BatchLimits,
    PerformanceModel,
    QueryMix,
    ReplicaCapacity,
    StepTimeParams,
)
from tideserve.autoscaler.slo import ErrorBudget, Histogram, PercentileSLO

DEFAULT_MIX = QueryMix(512, 128)  # before the first request has finished
BURST_FACTOR = 4.0
TAIL_SAMPLES = 20
MIN_TAIL_SAMPLES = 5
TAIL_POOL_WINDOWS = 4
PROMPT_POOL_WINDOWS = 20  # the prompt-length distribution behind the infeasible share: ten minutes at 30 s
MIN_INFEASIBLE_SHARE = 0.001  # below this, long prompts are noise in the tail, not a class of their own


@dataclass
class PolicyConfig:
    ttft: PercentileSLO = field(default_factory=lambda: PercentileSLO(90, 1.0))
    tpot: PercentileSLO = field(default_factory=lambda: PercentileSLO(90, 0.05))
    attainment_target: float = 0.99
    min_replicas: int = 1  # 0: the deployment may sit at zero (started by held requests, see scale_to_zero_after_s)
    max_replicas: int = 32
    scale_to_zero_after_s: float = 0.0  # with min_replicas 0: go to zero after this long without a request; 0 never
    interval_s: float = 15.0
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 180.0  # two replica start-ups; the other scale-down guards still apply
    max_step_up: int = 8
    max_step_down: int = 1
    scale_down_period_s: float = 60.0  # at most max_step_down replicas removed per period (start-ups are slow)
    headroom: float = 0.85  # plan each replica at this share of its predicted SLO capacity (steered online)
    min_headroom: float = 0.35
    max_headroom: float = 1.5  # above 1 when the model turns out conservative
    pressure_setpoint: float = 0.9  # steer the observed tail to this share of its target
    scale_down_margin: float = 0.95  # N-1 replicas must carry the demand at this share of the planned load
    backlog_clear_s: float = 60.0  # plan to clear a waiting queue within this time
    seasonality: bool = True
    season_period_s: float = 86400.0
    season_slot_s: float = 600.0
    default_startup_s: float = 120.0
    manage_batch_limits: bool = True
    # A replica is worth its GPU only while the load keeps it at least this busy (the model's share of step time
    # spent on the load's tokens): a cap on replicas that no latency signal can push through.
    min_utilization: float = 0.2
    advisory: bool = False
    bootstrap: StepTimeParams = H100_8B

    @property
    def floor(self) -> int:
        """The fewest replicas while the deployment serves: one even with min_replicas 0 (only scale_to_zero
        and an idle start leave it at zero)."""
        return max(1, self.min_replicas)

    def __post_init__(self):
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if self.scale_to_zero_after_s < 0:
            raise ValueError("scale_to_zero_after_s must be >= 0")
        if not 0 < self.min_headroom <= self.headroom <= self.max_headroom:
            raise ValueError("need 0 < min_headroom <= headroom <= max_headroom")
        if self.max_step_up < 1 or self.max_step_down < 1:
            raise ValueError("step bounds must be >= 1")
        if not 0 < self.attainment_target < 1:
            raise ValueError("attainment target must be in (0, 1)")
        if not 0 < self.min_utilization < 1:
            raise ValueError("min_utilization must be in (0, 1)")


class TideservePolicy:
    name = "tideserve"

    def __init__(self, config: PolicyConfig | None = None):
        self.config = c = config or PolicyConfig()
        self.model = PerformanceModel(c.bootstrap)
        self.forecaster = SeasonalForecaster(slot_s=c.season_slot_s, period_s=c.season_period_s)
        self.budget = ErrorBudget(c.attainment_target, horizon_s=c.season_period_s)
        self.quantile = max(c.ttft.percentile, c.tpot.percentile, 100 * c.attainment_target) / 100
        self.headroom = c.headroom
        self.tpot_tail = 1.3  # planning quantile over mean, refined online
        self.ttft_tail = 3.0
        self.startup_s = c.default_startup_s
        self._recommendations: deque[tuple[float, int]] = deque()
        self._rates: deque[float] = deque(maxlen=8)
        self._smoothed_rate: float | None = None
        self._live_rate = 0.0
        self._smoothed_pressure = 0.0
        self._tail_windows: deque[tuple] = deque(maxlen=TAIL_POOL_WINDOWS)
        self._prompt_windows: deque = deque(maxlen=PROMPT_POOL_WINDOWS)
        self.infeasible_share = 0.0
        self.max_feasible_prompt = math.inf
        self._last_in_flight = 0.0
        self._last_request: float | None = None  # when a request was last seen (scale to zero)
        self._started: float | None = None
        self._last_scale_down = -math.inf
        self._mix_baseline: tuple[float, float] | None = None

    @property
    def interval_s(self) -> float:
        return self.config.interval_s

    # --- the decision ---------------------------------------------------------------------------------

    def _at_or_to_zero(self, obs: Observation, limits: BatchLimits) -> Decision | None:
        """Scale from zero on requests the router holds, to zero after scale_to_zero_after_s without any;
        None when neither applies and the usual decision follows."""
        c = self.config
        if obs.held_requests or obs.requests_finished or obs.running or obs.waiting or self._last_request is None:
            self._last_request = obs.time
        if obs.desired_replicas == 0 and c.min_replicas == 0:
            if obs.held_requests:
                target = min(c.max_replicas, max(c.floor, math.ceil(obs.held_requests / max(limits.max_num_seqs, 1))))
                return self._decision(obs, target, limits, "scale-up", f"scale from zero 0->{target}: "
                                      f"{obs.held_requests:g} request(s) held by the router")
            return self._decision(obs, 0, limits, "hold", "at zero: no request held by the router")
        idle_s = obs.time - self._last_request
        if c.min_replicas == 0 and c.scale_to_zero_after_s > 0 and idle_s >= c.scale_to_zero_after_s and not obs.stale:
            return self._decision(obs, 0, limits, "scale-down", f"scale to zero {obs.desired_replicas}->0: no request "
                                  f"for {idle_s:.0f} s (scaleToZeroAfterSeconds {c.scale_to_zero_after_s:g})")
        return None

    def decide(self, obs: Observation) -> Decision:
        c = self.config
        current = obs.desired_replicas
        current_limits = BatchLimits(obs.max_num_seqs, obs.max_num_batched_tokens)
        if self._started is None:
            self._started = obs.time
        if (zero := self._at_or_to_zero(obs, current_limits)) is not None:
            return zero
        if obs.stale:
            why = f" ({'; '.join(obs.problems)})" if obs.problems else ""
            return self._decision(obs, current, current_limits, "hold", "MetricsStale: holding replicas and batch "
                                  f"limits until fresh metrics arrive{why}", details={"stale": True})
        self._calibrate(obs)
        tail_input = self._feasibility(obs, current_limits)
        slo = self._slo_state(obs)
        rate, mix = self._load(obs)
        mix_shift = self._mix_shift(mix)
        self.forecaster.observe(obs.time, obs.window_s, rate, mix and mix.mean_input, mix and mix.mean_output)
        if obs.replica_startup_s:
            self.startup_s = 0.7 * self.startup_s + 0.3 * obs.replica_startup_s
        lead = self.startup_s + c.interval_s
        forecast = self.forecaster.forecast(obs.time, lead) if c.seasonality else None
        demand = self._live_demand(obs, rate)
        plan_mix = self._smoothed_mix() or mix or DEFAULT_MIX
        if forecast is not None and forecast.seasonal:
            demand = max(demand, forecast.rate)
            if not mix_shift:  # after a shift the profile is out of date: plan on what is live
                plan_mix = QueryMix(max(plan_mix.mean_input, forecast.mean_input),
                                    max(plan_mix.mean_output, forecast.mean_output))
        if tail_input is not None:
            plan_mix = QueryMix(plan_mix.mean_input, plan_mix.mean_output, tail_input)
        limits, capacity = self._batch_limits(current_limits, plan_mix)
        self._adapt_headroom(obs, slo, rate, capacity.rate)
        per_replica = max(capacity.rate * self.headroom, 1e-6)
        needed = math.ceil(demand / per_replica) if demand > 0 else c.floor
        if self._smoothed_pressure > 1.0 and obs.ready_replicas >= current:
            # The model under-predicts: the tail misses its target now. Add capacity in proportion (<= +25%).
            needed = max(needed, current + math.ceil(current * min(self._smoothed_pressure - 1.0, 0.25)))
        in_flight = self._mean_in_flight(obs)
        useful = self._useful_replicas(demand, plan_mix, in_flight)
        needed = min(needed, useful)
        target = self._stabilize(obs, needed, demand, capacity.rate)
        reason, action = self._explain(current, target, current_limits, limits, demand, capacity, mix_shift)
        # Idle: on average fewer requests in flight than ready replicas less one, and none waiting.
        idle = obs.ready_replicas >= 2 and in_flight < obs.ready_replicas - 1 and not obs.waiting
        seasonal_rise = forecast is not None and forecast.seasonal and forecast.rate > self._live_rate
        if target > current and obs.pending_replicas > 0:
            target, action = current, "hold"
            reason = (f"CapacityLimited: {obs.pending_replicas} new replica(s) still Pending; not adding more "
                      f"(wanted {needed})")
        elif target > current and idle and not seasonal_rise:
            target, action = current, "hold"
            reason = (f"hold at {current}: {in_flight:.1f} requests in flight on average over {obs.ready_replicas} "
                      f"ready replicas and none waiting: a replica sits idle, more would idle too (wanted {needed})")
        if self.infeasible_share >= MIN_INFEASIBLE_SHARE:
            reason += (f"; SLOInfeasible: {100 * self.infeasible_share:.1f}% of requests have prompts over "
                       f"{self.max_feasible_prompt:.0f} tokens, which no replica prefills within the "
                       f"{c.ttft.target_s:g} s TTFT target (planned over the rest)")
        details = {
            "rate": rate, "demand": demand, "capacity_per_replica": capacity.rate, "limited_by": capacity.limited_by,
            "headroom": self.headroom, "mix": [plan_mix.mean_input, plan_mix.mean_output], "mix_shift": mix_shift,
            "lead_s": lead, "tpot_tail": self.tpot_tail, "ttft_tail": self.ttft_tail,
            "max_num_batched_tokens": limits.max_num_batched_tokens, "infeasible_share": self.infeasible_share,
            "max_feasible_prompt": self.max_feasible_prompt, "useful_replicas": useful, "in_flight": in_flight, **slo,
        }
        fc = None if forecast is None else {"rate": forecast.rate, "mean_input": forecast.mean_input,
                                            "mean_output": forecast.mean_output, "seasonal": forecast.seasonal,
                                            "horizon_s": lead}
        return self._decision(obs, target, limits, action, reason, forecast=fc, details=details,
                              predicted=(1 - self.infeasible_share) *
                              self._predicted_attainment(demand / max(target, 1), plan_mix, limits),
                              drain=self._choose_drain(obs, current - target))

    # --- steps ------------------------------------------------------------------------------------------

    def _slo_state(self, obs: Observation) -> dict:
        c = self.config
        tpot_hist = obs.decode_latency
        state: dict = {"ttft_p": None, "tpot_p": None, "pressure": None, "window_attainment": None}
        if obs.ttft is not None and obs.ttft.count:
            state["ttft_p"] = c.ttft.observed(obs.ttft)
        if tpot_hist is not None and tpot_hist.count:
            state["tpot_p"] = c.tpot.observed(tpot_hist)
        # Pressure: the planning-quantile tail over its target, from windows with enough samples to read it.
        # A tail read from few requests is noise: a quiet or short window is pooled with the windows before it
        # (up to TAIL_POOL_WINDOWS of them) until TAIL_SAMPLES requests are behind the quantile; a pool that
        # stays below MIN_TAIL_SAMPLES is not read at all.
        self._tail_windows.append((obs.ttft, tpot_hist))
        pressures = []
        for index, slo in ((0, c.ttft), (1, c.tpot)):
            pooled = None
            for window in reversed(self._tail_windows):
                hist = window[index]
                if hist is not None and hist.count:
                    pooled = Histogram.pool(pooled, hist)
                if pooled is not None and pooled.count >= TAIL_SAMPLES:
                    break
            if pooled is not None and pooled.count >= MIN_TAIL_SAMPLES:
                # TTFT over the feasible requests: the infeasible ones are the longest prompts, at the top.
                level = self.quantile * (1 - self.infeasible_share) if index == 0 else self.quantile
                if level > 0:
                    pressures.append(pooled.quantile(level) / slo.target_s)
        decay = 0.5 ** (obs.window_s / (2 * c.interval_s))  # one window's tail is noisy: a half-life of two
        if pressures:
            state["pressure"] = max(pressures)
            self._smoothed_pressure = decay * self._smoothed_pressure + (1 - decay) * state["pressure"]
        elif not obs.requests_finished and not obs.running and not obs.waiting:
            self._smoothed_pressure *= decay  # nothing in flight: no request is waiting on latency
        state["smoothed_pressure"] = self._smoothed_pressure
        n = obs.ttft.count if obs.ttft is not None else 0.0
        if n > 0:
            good_ttft = obs.ttft.fraction_at_most(c.ttft.target_s) or 0.0
            good_tpot = tpot_hist.fraction_at_most(c.tpot.target_s) if tpot_hist is not None and tpot_hist.count else 1.0
            # Both must hold; without the joint distribution assume the misses do not overlap (the worst case).
            attainment = max(0.0, good_ttft + good_tpot - 1.0)
            self.budget.record(obs.time, n, n * attainment)
            state["window_attainment"] = attainment
        state["attainment"] = self.budget.attainment
        state["budget_remaining"] = self.budget.remaining
        state["burn_rate"] = self.budget.burn_rate(last_n=8)
        return state

    def _calibrate(self, obs: Observation) -> None:
        if obs.kv_capacity_tokens:
            self.model.set_kv_capacity(int(obs.kv_capacity_tokens))
        if obs.step_s and obs.steps and obs.step_seqs is not None and obs.step_tokens is not None:
            mix = self._window_mix(obs) or DEFAULT_MIX
            prefill = max(0.0, obs.step_tokens - obs.step_seqs)
            self.model.observe(obs.step_s, obs.step_seqs, obs.step_seqs * mix.mean_context, prefill, obs.steps)
        tpot_hist = obs.tpot if obs.tpot is not None else obs.itl
        for hist, attr, high in ((tpot_hist, "tpot_tail", 3.0), (obs.ttft, "ttft_tail", 10.0)):
            if hist is not None and hist.count >= 20 and hist.mean:
                ratio = min(high, max(1.0, hist.quantile(self.quantile) / hist.mean))
                setattr(self, attr, 0.9 * getattr(self, attr) + 0.1 * ratio)

    def _feasibility(self, obs: Observation, current: BatchLimits) -> float | None:
        """The share of requests no replica can serve within the TTFT target: prompts longer than the longest
        one whose own prefill, on an idle replica with the largest token budget, fits it (a share of the last
        PROMPT_POOL_WINDOWS windows' prompts). Returns the prompt length at the planning quantile among the
        feasible requests, for the TTFT tail, when that share matters; None otherwise."""
        c = self.config
        if obs.prompt_tokens is not None and obs.prompt_tokens.count:
            self._prompt_windows.append(obs.prompt_tokens)
        pooled = None
        for hist in self._prompt_windows:
            pooled = Histogram.pool(pooled, hist)
        if pooled is None:
            return None
        budget = max(max(TOKEN_BUDGETS), current.max_num_batched_tokens)
        self.max_feasible_prompt = self.model.max_feasible_prompt(c.ttft.target_s, BatchLimits(1, budget))
        feasible = pooled.fraction_at_most(self.max_feasible_prompt)
        self.infeasible_share = 1.0 - (1.0 if feasible is None else feasible)
        if self.infeasible_share < MIN_INFEASIBLE_SHARE:
            return None
        if self.infeasible_share > 1 - MIN_INFEASIBLE_SHARE:
            return 0.0  # no request is feasible: only the queueing is left to plan
        return min(self.max_feasible_prompt, pooled.quantile(self.quantile * (1 - self.infeasible_share)))

    def _useful_replicas(self, demand: float, mix: QueryMix, in_flight: float) -> int:
        """The most replicas the load can use: as many as keep min_utilization of their step time busy with the
        planned load's tokens (the calibrated model), or, where the model under-predicts, one per request in
        flight. A cap that no latency signal raises: a tail that more replicas cannot shorten must not buy them."""
        c = self.config
        work = demand * self.model.load_coefficient(mix)  # step-seconds per second of the load's tokens
        return max(c.floor, math.ceil(work / c.min_utilization), math.ceil(in_flight))

    @staticmethod
    def _mean_in_flight(obs: Observation) -> float:
        """Requests in flight over the window: Little's law on the finished ones (their rate times their mean
        latency, TTFT plus the decode), or the gauges at the window's end where they say more. The gauges alone
        read 0 between short requests on a busy replica."""
        gauges = obs.running + obs.waiting
        ttft = obs.ttft.mean if obs.ttft is not None else None
        tpot_hist = obs.decode_latency
        tpot = tpot_hist.mean if tpot_hist is not None else None
        output = obs.generation_tokens.mean if obs.generation_tokens is not None else None
        if ttft is None or obs.window_s <= 0:
            return gauges
        latency = ttft + (tpot or 0.0) * max(0.0, (output or 1.0) - 1)
        return max(gauges, obs.requests_finished / obs.window_s * latency)

    @staticmethod
    def _window_mix(obs: Observation) -> QueryMix | None:
        p, g = obs.prompt_tokens, obs.generation_tokens
        if p is None or g is None or not p.count or not g.count:
            return None
        return QueryMix(max(1.0, p.mean), max(1.0, g.mean))

    def _load(self, obs: Observation) -> tuple[float, QueryMix | None]:
        """Arrivals in the window (finished requests plus the growth of what is in flight), smoothed with a
        half-life of three windows, and the window's query mix."""
        in_flight = obs.running + obs.waiting
        growth = in_flight - self._last_in_flight
        self._last_in_flight = in_flight
        rate = max(0.0, obs.requests_finished + growth) / obs.window_s
        self._rates.append(rate)
        decay = 0.5 ** (obs.window_s / (3 * self.config.interval_s))
        self._smoothed_rate = rate if self._smoothed_rate is None else decay * self._smoothed_rate + (1 - decay) * rate
        mix = self._window_mix(obs)
        if mix is not None and obs.steps and obs.step_seqs and self._smoothed_rate > 0:
            # Finished requests under-represent long outputs while the running set is not in steady state (a
            # cold start, a shift to longer outputs): those finish last, minutes later. The decode throughput
            # does not: in steady state, tokens generated per second = arrivals x (mean output - 1).
            generated = obs.steps * obs.step_seqs / obs.window_s
            mix = QueryMix(mix.mean_input, max(mix.mean_output, 1 + generated / self._smoothed_rate))
        return rate, mix

    def _live_demand(self, obs: Observation, rate: float) -> float:
        """The rate to plan for now: the upper envelope of the last few windows (arrivals are bursty at the
        scale of a window), never below the smoothed rate, plus what it takes to clear the waiting queue."""
        recent = sorted(self._rates)
        upper = recent[int(0.75 * (len(recent) - 1) + 0.5)]
        self._live_rate = max(self._smoothed_rate, upper)
        return self._live_rate + obs.waiting / self.config.backlog_clear_s

    def _smoothed_mix(self) -> QueryMix | None:
        f = self.forecaster
        return QueryMix(f.live_input, f.live_output) if f.live_input and f.live_output else None

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

    def _adapt_headroom(self, obs: Observation, slo: dict, rate: float, capacity_rate: float) -> None:
        """Steer the planned utilization (a correction of the model's capacity) so the observed tail sits at the
        setpoint. Tighten when the tail nears its target or the error budget burns; loosen only while replicas
        actually run near the planned load, since an over-provisioned deployment shows low latency whatever the
        headroom (learning from it would wind the headroom up). Hold while new replicas are still starting:
        the pressure then reflects capacity that is already on its way."""
        c = self.config
        if obs.ready_replicas < obs.desired_replicas or slo["pressure"] is None:
            return
        # At most 3% a window either way: with 0.95 down against 1.03 up, one noisy window's tail undid two
        # calm ones and the headroom of a bursty load ratcheted down (the battery: docs/autoscaling.md).
        factor = min(1.03, max(0.97, (c.pressure_setpoint / max(slo["pressure"], 1e-3)) ** 0.25))
        near_plan = rate / max(obs.ready_replicas, 1) >= 0.85 * capacity_rate * self.headroom
        if factor < 1 or near_plan:
            self.headroom *= factor
        if slo["window_attainment"] is not None and slo["burn_rate"] > 1.0:
            self.headroom *= 0.97
        self.headroom = min(c.max_headroom, max(c.min_headroom, self.headroom))

    def _batch_limits(self, current: BatchLimits, mix: QueryMix) -> tuple[BatchLimits, ReplicaCapacity]:
        """The token budget whose busy step fits the TPOT target (chunked prefill then bounds every step), and a
        max_num_seqs that caps the batch where that still holds, but never below twice the batch the planned
        load needs, so a burst queues a little rather than being refused service."""
        c = self.config
        # With no feasible request at all there is no TTFT left to plan for: only TPOT, the batch and KV bound.
        ttft_s = math.inf if mix.tail_input == 0 else c.ttft.target_s
        budgets = TOKEN_BUDGETS
        if mix.tail_input:
            # Long prompts in the mix: only budgets that still prefill the feasible ones within the target (a
            # smaller one, for the decodes' TPOT, would make them infeasible too) and that hold TPOT at all.
            budgets = tuple(b for b in TOKEN_BUDGETS
                            if self.model.max_feasible_prompt(ttft_s, BatchLimits(1, b)) >= mix.tail_input
                            and self.model.largest_batch(mix, c.tpot.target_s, b) >= 1)
        if c.manage_batch_limits and budgets:
            limits, capacity = self.model.choose_limits(mix, c.tpot.target_s, ttft_s, self.tpot_tail,
                                                        self.ttft_tail, token_budgets=budgets)
            planned = self.model.decode_batch_at(capacity.rate * self.headroom, mix, self.model.params.max_num_seqs)
            seqs = min(self.model.params.max_num_seqs, max(limits.max_num_seqs, math.ceil(BURST_FACTOR * planned)))
            limits = BatchLimits(seqs, max(limits.max_num_batched_tokens, seqs))
            # Hysteresis: keep the current limits while their busy step still fits the TPOT target and they
            # give at least 90% of the new limits' capacity; limits that flap cost restarts of nothing, but
            # each change is an admin call to every replica and a step change in latency.
            kept = self.model.capacity(mix, c.tpot.target_s, ttft_s, current, self.tpot_tail, self.ttft_tail)
            busy = self.model.busy_step(min(planned, current.max_num_seqs), mix, current.max_num_batched_tokens)
            if busy <= c.tpot.target_s and kept.rate >= 0.9 * capacity.rate:
                limits = current
        else:  # vLLM, or no budget both keeps the feasible prompts feasible and holds TPOT: leave the limits be
            limits = current
        return limits, self.model.capacity(mix, c.tpot.target_s, ttft_s, limits, self.tpot_tail,
                                           self.ttft_tail)

    def _stabilize(self, obs: Observation, needed: int, demand: float, capacity_rate: float) -> int:
        c = self.config
        current = obs.desired_replicas
        needed = max(c.floor, min(c.max_replicas, needed))
        self._recommendations.append((obs.time, needed))
        horizon = max(c.scale_up_stabilization_s, c.scale_down_stabilization_s)
        while self._recommendations and self._recommendations[0][0] < obs.time - horizon:
            self._recommendations.popleft()
        if needed > current:
            if obs.waiting > 0 and self._smoothed_pressure > 1.0:
                # A queue that grows while the tail misses is not noise: no stabilization window for it.
                return min(current + c.max_step_up, needed)
            # The lowest recommendation of the window, but never below the current count: an earlier, lower
            # one must not turn a scale-up into a scale-down that bypasses every scale-down guard.
            window = [r for t, r in self._recommendations if t >= obs.time - c.scale_up_stabilization_s]
            return min(current + c.max_step_up, max(current, min(window) if window else needed))
        if needed < current:
            if obs.time - self._started < c.scale_down_stabilization_s:
                return current  # not yet a full window of evidence
            window = [r for t, r in self._recommendations if t >= obs.time - c.scale_down_stabilization_s]
            target = max(window) if window else needed
            if target >= current:
                return current
            # Only when N-1 replicas carry the demand with margin, and latency has room now.
            if demand > (current - 1) * capacity_rate * self.headroom * c.scale_down_margin:
                return current
            if self._smoothed_pressure > c.pressure_setpoint:
                return current
            if obs.time - self._last_scale_down < c.scale_down_period_s:
                return current
            self._last_scale_down = obs.time
            return max(target, current - c.max_step_down)
        return current

    def _explain(self, current, target, old: BatchLimits, new: BatchLimits, demand, capacity, mix_shift):
        note = "; query-mix shift detected" if mix_shift else ""
        limits = "" if new == old else (
            f"batch limits {old.max_num_seqs}/{old.max_num_batched_tokens} -> {new.max_num_seqs}/"
            f"{new.max_num_batched_tokens} (max_num_seqs/tokens per step): TPOT stays within "
            f"{self.config.tpot.target_s * 1000:.0f} ms")
        also = f"; {limits}" if limits else ""  # a replica change that also retunes the limits says both
        if target > current:
            return (f"scale up {current}->{target}: demand {demand:.2f} req/s, {capacity.rate:.2f} req/s per "
                    f"replica ({capacity.limited_by}-bound), tail pressure {self._smoothed_pressure:.2f}{also}{note}",
                    "scale-up")
        if target < current:
            return (f"scale down {current}->{target}: demand {demand:.2f} req/s fits {target} replicas at "
                    f"{capacity.rate:.2f} req/s each{also}{note}", "scale-down")
        if limits:
            return f"{limits}{note}", "batch-limit"
        return f"hold at {current}: demand {demand:.2f} req/s within capacity{note}", "hold"

    def _predicted_attainment(self, rate_per_replica: float, mix: QueryMix, limits: BatchLimits) -> float:
        """Share of requests expected within both targets, with exponential tails around the predicted means."""
        c = self.config
        ttft = self.model.ttft_at(rate_per_replica, mix, limits)
        tpot = self.model.tpot_tail_at(rate_per_replica, mix, limits, self.tpot_tail)
        if not (math.isfinite(ttft) and math.isfinite(tpot)):
            return 0.0
        p_ttft = 1 - math.exp(-c.ttft.target_s / ttft)
        p_tpot = 1.0 if tpot <= c.tpot.target_s else c.tpot.target_s / tpot
        return max(0.0, min(1.0, p_ttft * p_tpot))

    def _choose_drain(self, obs: Observation, count: int) -> list[str]:
        """Replicas to remove first: not ready, then the fewest requests in flight, then the newest."""
        if count <= 0:
            return []
        order = sorted(obs.replicas, key=lambda r: (r.ready, r.running + r.waiting, -r.started_at))
        return [r.name for r in order[:count]]

    def _decision(self, obs, replicas, limits: BatchLimits, action, reason, forecast=None, details=None,
                  predicted=None, drain=()):
        return Decision(time=obs.time, replicas=replicas, max_num_seqs=limits.max_num_seqs,
                        max_num_batched_tokens=limits.max_num_batched_tokens, reason=reason, action=action,
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
