"""Today's autoscalers as the simulator's baselines, implemented from their documented rules and defaults
(../shared/reference/autoscaling-baselines.md summarises the sources). Every baseline sees the same
Observation as the Tideserve policy and controls replicas only; the batch limit stays at the engine's setting.

Where a baseline needs the capacity of one replica (Dynamo's profile, the HPA target), it gets the true step-time
model of the simulated engine, i.e. perfect offline profiling, which favours the baseline.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from tideserve.autoscaler.observation import Decision, Observation
from tideserve.autoscaler.perf_model import BatchLimits, PerformanceModel, QueryMix, StepTimeParams


def _hold(obs: Observation, replicas: int, reason: str) -> Decision:
    action = "scale-up" if replicas > obs.desired_replicas else "scale-down" if replicas < obs.desired_replicas else "hold"
    return Decision(time=obs.time, replicas=replicas, max_num_seqs=obs.max_num_seqs,
                    max_num_batched_tokens=obs.max_num_batched_tokens, reason=reason, action=action)


class StaticPolicy:
    """A fixed replica count (static at peak or at mean; `tideserve simulate` sizes them)."""

    interval_s = 60.0

    def __init__(self, name: str, replicas: int):
        self.name, self.replicas = name, replicas

    def decide(self, obs: Observation) -> Decision:
        return _hold(obs, self.replicas, f"static at {self.replicas}")


class HPAPolicy:
    """Kubernetes HPA on average running requests per replica (the usual KServe/production-stack recipe):
    desired = ceil(N * metric/target) outside a 10% tolerance, every 15 s, scale-down stabilization 300 s."""

    name = "hpa"
    interval_s = 15.0

    def __init__(self, target_running: float, min_replicas: int = 1, max_replicas: int = 32,
                 tolerance: float = 0.1, down_stabilization_s: float = 300.0):
        self.target, self.min, self.max = target_running, min_replicas, max_replicas
        self.tolerance, self.down_window = tolerance, down_stabilization_s
        self.history: deque[tuple[float, int]] = deque()

    def decide(self, obs: Observation) -> Decision:
        n = max(1, obs.desired_replicas)
        # Pods not yet ready count as using nothing (the HPA's rule), so the average is over all desired pods.
        per_replica = (obs.running + obs.waiting) / n
        ratio = per_replica / self.target
        desired = n if abs(ratio - 1) <= self.tolerance else math.ceil(n * ratio)
        desired = max(self.min, min(self.max, desired))
        self.history.append((obs.time, desired))
        while self.history and self.history[0][0] < obs.time - self.down_window:
            self.history.popleft()
        if desired < n:  # HPA: scale down to the highest recommendation of the window
            desired = max(r for _, r in self.history)
        return _hold(obs, desired, f"HPA running/replica {per_replica:.1f} vs target {self.target:.1f}")


class LlmdSLOPolicy:
    """llm-d's SLO-aware KEDA recipe: s = max(P90 TTFT/SLO, P90 TPOT/SLO) clamped at 2 and smoothed over 45 s
    (the recipe's P90; `percentile` reads another quantile, e.g. the attainment goal's);
    scale up when s > 0.55 by n*(s*c/0.55 - 1), down when s < 0.40 by n*(1 - s/0.40); HPA behaviour: up at most
    max(100%, 4 pods) per 60 s, down 1 pod per 120 s. c = ready / provisioned replicas."""

    name = "llm-d"
    interval_s = 15.0

    def __init__(self, ttft_slo_s: float, tpot_slo_s: float, min_replicas: int = 1, max_replicas: int = 32,
                 percentile: float = 90.0, name: str = "llm-d"):
        self.ttft_slo, self.tpot_slo = ttft_slo_s, tpot_slo_s
        self.quantile, self.name = percentile / 100, name
        self.min, self.max = min_replicas, max_replicas
        self.samples: deque[tuple[float, float]] = deque()
        self.last_up = self.last_down = -math.inf

    def decide(self, obs: Observation) -> Decision:
        n = max(1, obs.desired_replicas)
        tpot = obs.decode_latency
        ratios = []
        if obs.ttft is not None and obs.ttft.count:
            ratios.append(obs.ttft.quantile(self.quantile) / self.ttft_slo)
        if tpot is not None and tpot.count:
            ratios.append(tpot.quantile(self.quantile) / self.tpot_slo)
        if ratios:
            self.samples.append((obs.time, min(2.0, max(ratios))))
        while self.samples and self.samples[0][0] < obs.time - 45:
            self.samples.popleft()
        if not self.samples:
            return _hold(obs, n, "no latency samples")
        s = sum(v for _, v in self.samples) / len(self.samples)
        credit = obs.ready_replicas / n
        desired = n
        if s > 0.55 and obs.time - self.last_up >= 60:
            desired = min(n + max(n, 4), n + math.ceil(n * (s * credit / 0.55 - 1)))
        elif s < 0.40 and obs.time - self.last_down >= 120:
            desired = max(n - 1, n - math.floor(n * (1 - s / 0.40)))
        desired = max(self.min, min(self.max, desired))
        if desired > n:
            self.last_up = obs.time
        elif desired < n:
            self.last_down = obs.time
        return _hold(obs, desired, f"llm-d SLO ratio {s:.2f}")


class DynamoPlannerPolicy:
    """NVIDIA Dynamo's throughput planner: every 180 s, forecast the next interval's request rate and mean
    ISL/OSL (local-linear-trend Kalman predictor) and set replicas = demand / capacity of one engine at the SLA
    from its profile; the SLA is checked on means, as Dynamo does."""

    name = "dynamo"
    interval_s = 180.0

    def __init__(self, params: StepTimeParams, ttft_slo_s: float, tpot_slo_s: float, max_num_seqs: int,
                 max_num_batched_tokens: int, min_replicas: int = 1, max_replicas: int = 32):
        self.model = PerformanceModel(params)
        self.ttft_slo, self.tpot_slo = ttft_slo_s, tpot_slo_s
        self.limits = BatchLimits(max_num_seqs, max_num_batched_tokens)
        self.min, self.max = min_replicas, max_replicas
        self.rate, self.isl, self.osl = _Kalman(), _Kalman(), _Kalman()
        self._in_flight = 0.0

    def decide(self, obs: Observation) -> Decision:
        in_flight = obs.running + obs.waiting
        rate = max(0.0, obs.requests_finished + in_flight - self._in_flight) / obs.window_s
        self._in_flight = in_flight
        demand = self.rate.update(rate)
        if obs.prompt_tokens is not None and obs.prompt_tokens.count:
            self.isl.update(obs.prompt_tokens.mean)
            self.osl.update(obs.generation_tokens.mean)
        if self.isl.level is None:
            return _hold(obs, obs.desired_replicas, "warming up")
        mix = QueryMix(max(1.0, self.isl.level), max(1.0, self.osl.level))
        capacity = self.model.capacity(mix, self.tpot_slo, self.ttft_slo, self.limits).rate
        desired = max(self.min, min(self.max, math.ceil(demand / capacity))) if demand > 0 else self.min
        return _hold(obs, desired, f"dynamo demand {demand:.1f} req/s / {capacity:.1f} per engine")


class _Kalman:
    """Local linear trend Kalman filter; predicts one interval ahead."""

    def __init__(self, q_level: float = 0.1, q_trend: float = 0.01, r: float = 1.0):
        self.level: float | None = None
        self.trend = 0.0
        self.p = [[1.0, 0.0], [0.0, 1.0]]
        self.q_level, self.q_trend, self.r = q_level, q_trend, r

    def update(self, value: float) -> float:
        if self.level is None:
            self.level = value
            return value
        level, trend = self.level + self.trend, self.trend
        p = self.p
        p00 = p[0][0] + 2 * p[0][1] + p[1][1] + self.q_level
        p01 = p[0][1] + p[1][1]
        p11 = p[1][1] + self.q_trend
        s = p00 + self.r
        k0, k1 = p00 / s, p01 / s
        innovation = value - level
        self.level, self.trend = level + k0 * innovation, trend + k1 * innovation
        self.p = [[(1 - k0) * p00, (1 - k0) * p01], [p01 - k1 * p00, p11 - k1 * p01]]
        return max(0.0, self.level + self.trend)


class KubeAIPolicy:
    """KubeAI: every 10 s, the sum of active requests; a moving average over 10 minutes; desired =
    ceil(average / targetRequests); scale down only after 30 s of consecutive lower decisions."""

    name = "kubeai"
    interval_s = 10.0

    def __init__(self, target_requests: float = 100.0, min_replicas: int = 1, max_replicas: int = 32,
                 window_s: float = 600.0, scale_down_delay_s: float = 30.0):
        self.target, self.min, self.max = target_requests, min_replicas, max_replicas
        self.samples: deque[float] = deque(maxlen=int(window_s / self.interval_s))
        self.down_delay = scale_down_delay_s
        self.lower_since: float | None = None

    def decide(self, obs: Observation) -> Decision:
        self.samples.append(obs.running + obs.waiting)
        average = sum(self.samples) / len(self.samples)
        desired = max(self.min, min(self.max, math.ceil(average / self.target)))
        n = obs.desired_replicas
        if desired < n:
            self.lower_since = obs.time if self.lower_since is None else self.lower_since
            if obs.time - self.lower_since < self.down_delay:
                desired = n
        else:
            self.lower_since = None
        return _hold(obs, desired, f"kubeai active avg {average:.1f} / {self.target:.0f}")


class HindsightPolicy:
    """Not a deployable policy but a bound on what replica scaling can save: it reads the trace's future.
    Every interval it asks for the replicas that the busiest minute of arrivals starting now, one interval
    ahead, one start-up ahead or one start-up and an interval ahead needs at `rate_per_replica` (so a replica
    asked for now is ready when its load arrives), and releases them as soon as that minute has passed. The
    simulator searches the per-replica rate and the token budget for the cheapest run that meets the goal;
    a causal policy, which must guess the next start-up time's arrivals, cannot do better by much."""

    name = "hindsight"
    interval_s = 15.0

    def __init__(self, arrivals, rate_per_replica: float, startup_s: float, window_s: float = 60.0,
                 min_replicas: int = 1, max_replicas: int = 64):
        seconds = np.bincount(np.maximum(0, arrivals - arrivals[0]).astype(int))
        self._cumulative = np.concatenate([[0], np.cumsum(seconds)])
        self._start = float(arrivals[0])
        self.rate_per_replica, self.startup_s, self.window_s = rate_per_replica, startup_s, window_s
        self.min, self.max = min_replicas, max_replicas

    def window_rate(self, start_s: float) -> float:
        """Arrivals per second in the minute (window) that starts at start_s; a window cut short by the end
        of the trace is averaged over what remains of it."""
        last = len(self._cumulative) - 1
        lo = min(last - 1, max(0, int(start_s - self._start)))
        hi = min(last, lo + int(self.window_s))
        return (self._cumulative[hi] - self._cumulative[lo]) / (hi - lo)

    def decide(self, obs: Observation) -> Decision:
        leads = (0.0, self.interval_s, self.startup_s, self.startup_s + self.interval_s)
        busiest = max(self.window_rate(obs.time + lead) for lead in leads)
        desired = max(self.min, min(self.max, math.ceil(busiest / self.rate_per_replica)))
        return _hold(obs, desired, f"hindsight {busiest:.1f} req/s at {self.rate_per_replica:.2f} per replica")
