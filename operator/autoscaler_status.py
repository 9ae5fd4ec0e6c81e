"""What the autoscaling loop writes into an LLMDeployment's status, and the events it posts: pure functions.

The loop owns status.autoscaling and status.metrics and three conditions, SLOMet, MetricsStale and
SLOInfeasible (requests that no replica can serve within the TTFT target, so no scaling fixes); it also
writes status.batchLimits, computed as reconcile computes it (status.batch_limits), so the two writers agree on
it. Conditions are a list that a merge patch replaces whole: the loop sends the list it read with only its
own two conditions replaced, under a resourceVersion precondition, and reconcile keeps conditions it does not
own, so neither drops the other's.

Events go out on changes only (a scaling action, new batch limits, a condition turning), never every interval.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

from tideserve.autoscaler.observation import Decision, Observation
from tideserve.autoscaler.policy import MIN_INFEASIBLE_SHARE, PolicyConfig
from tideserve.operator.status import changed_conditions, condition, timestamp

SLO_MET, METRICS_STALE, SLO_INFEASIBLE = "SLOMet", "MetricsStale", "SLOInfeasible"
LOOP_CONDITIONS = (SLO_MET, METRICS_STALE, SLO_INFEASIBLE)
NO_BASELINE = "no earlier sample to take a window from yet"
MAX_MESSAGE = 2048
REASON_CODES = ("MetricsStale", "CapacityLimited", "Forecast", "QueryMixShift", "Demand", "TPOT", "WithinCapacity")


@dataclass(frozen=True)
class LoopEvent:
    type: str  # Normal or Warning
    reason: str
    message: str


def _number(value: Any, digits: int = 4) -> float | None:
    """A finite float rounded for display; None for missing, NaN or infinite values (JSON has no NaN)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _ms(seconds: Any) -> float | None:
    value = _number(seconds)
    return None if value is None else _number(value * 1000.0)


def _compact(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def reason_code(decision: Decision) -> str:
    """A short, bounded label for why: the label of the decisions counter and status.autoscaling."""
    details = decision.details
    if details.get("stale"):
        return "MetricsStale"
    if decision.reason.startswith("CapacityLimited"):
        return "CapacityLimited"
    if decision.action == "batch-limit":
        return "TPOT"
    if decision.action in ("scale-up", "scale-down"):
        forecast = decision.forecast or {}
        if forecast.get("seasonal") and (forecast.get("rate") or 0.0) >= (details.get("demand") or 0.0) > \
                (details.get("rate") or 0.0) * 1.05:
            return "Forecast"
        return "QueryMixShift" if details.get("mix_shift") else "Demand"
    return "WithinCapacity"


def latency_p90(obs: Observation, now: datetime.datetime) -> dict[str, Any] | None:
    """status.metrics: p90 TTFT and TPOT over the last window; None when the window has no finished request."""
    tpot_hist = obs.decode_latency
    ttft = obs.ttft.quantile(0.9) if obs.ttft is not None and obs.ttft.count else None
    tpot = tpot_hist.quantile(0.9) if tpot_hist is not None and tpot_hist.count else None
    if ttft is None and tpot is None:
        return None
    return _compact({"ttftP90Ms": _ms(ttft), "tpotP90Ms": _ms(tpot), "observedAt": timestamp(now)})


def autoscaling_status(decision: Decision, obs: Observation, config: PolicyConfig, mode: str,
                       batch_limits: dict[str, int] | None, now: datetime.datetime) -> dict[str, Any]:
    """status.autoscaling: what the policy observed, predicted and decided in the last interval."""
    d = decision.details
    mix = d.get("mix") or [None, None]
    forecast = decision.forecast or {}
    result: dict[str, Any] = {
        "mode": mode,
        "observedAt": timestamp(now),
        "desiredReplicas": decision.replicas,
        "readyReplicas": obs.ready_replicas,
        "pendingReplicas": obs.pending_replicas,
        "lastDecision": _compact({
            "time": timestamp(now), "action": decision.action, "reasonCode": reason_code(decision),
            "reason": decision.reason, "applied": decision.apply, "replicas": decision.replicas,
            "maxNumSeqs": decision.max_num_seqs, "maxNumBatchedTokens": decision.max_num_batched_tokens,
            "predictedAttainment": _number(decision.predicted_attainment)}),
    }
    slo = _compact({
        "ttftMs": _ms(d.get("ttft_p")), "ttftTargetMs": _ms(config.ttft.target_s),
        "tpotMs": _ms(d.get("tpot_p")), "tpotTargetMs": _ms(config.tpot.target_s),
        "windowAttainment": _number(d.get("window_attainment")), "attainment": _number(d.get("attainment")),
        "targetAttainment": _number(config.attainment_target),
        "errorBudgetRemaining": _number(d.get("budget_remaining")), "burnRate": _number(d.get("burn_rate")),
        "pressure": _number(d.get("smoothed_pressure")), "infeasibleShare": _number(d.get("infeasible_share")),
        "maxFeasiblePromptTokens": _number(d.get("max_feasible_prompt"), 6)})
    load = _compact({
        "requestRate": _number(d.get("rate")), "demand": _number(d.get("demand")),
        "capacityPerReplica": _number(d.get("capacity_per_replica")), "limitedBy": d.get("limited_by"),
        "headroom": _number(d.get("headroom")), "meanInputTokens": _number(mix[0]),
        "meanOutputTokens": _number(mix[1]), "queryMixShift": d.get("mix_shift")})
    fc = _compact({
        "requestRate": _number(forecast.get("rate")), "meanInputTokens": _number(forecast.get("mean_input")),
        "meanOutputTokens": _number(forecast.get("mean_output")), "seasonal": forecast.get("seasonal"),
        "horizonSeconds": _number(forecast.get("horizon_s"))})
    for key, value in (("slo", slo), ("load", load), ("forecast", fc)):
        if value:
            result[key] = value
    if batch_limits:
        result["batchLimits"] = dict(batch_limits)
    return result


def loop_conditions(decision: Decision, obs: Observation, config: PolicyConfig, previous: list[dict[str, Any]],
                    generation: int | None, now: datetime.datetime) -> list[dict[str, Any]]:
    """SLOMet and MetricsStale for this interval. A window that only lacks its baseline (the first after a
    start) changes neither; a stale window leaves SLOMet as it was (nothing was measured)."""
    before = {c["type"]: c for c in previous}
    found = []
    problems = [p for p in obs.problems if p != NO_BASELINE]
    if obs.stale and problems:
        reason = "NoReadyReplica" if problems == ["no ready replica"] else "ScrapeFailed"
        message = "holding replicas and batch limits: " + "; ".join(problems)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        found.append(condition(METRICS_STALE, True, reason, message, generation, before, now))
    elif obs.stale:
        if METRICS_STALE not in before:
            found.append(condition(METRICS_STALE, None, "WaitingForBaseline",
                                   "the first window after a start has nothing to compare with", generation, before, now))
    else:
        found.append(condition(METRICS_STALE, False, "MetricsFresh",
                               f"metrics of {obs.ready_replicas} ready replica(s) collected", generation, before, now))
    if not obs.stale:
        d = decision.details
        share = d.get("infeasible_share")
        if share is not None and share >= MIN_INFEASIBLE_SHARE:
            found.append(condition(
                SLO_INFEASIBLE, True, "PromptsTooLong",
                f"{share:.1%} of requests have prompts over {d['max_feasible_prompt']:.0f} tokens, which no replica "
                f"prefills within the {config.ttft.target_s * 1000:.0f} ms TTFT target: more replicas cannot fix "
                "them, so the autoscaler plans over the other requests", generation, before, now))
        elif share is not None:
            found.append(condition(SLO_INFEASIBLE, False, "AllFeasible",
                                   "every recent request can meet the TTFT target on an idle replica", generation,
                                   before, now))
        attainment = d.get("attainment")
        tails = []
        if d.get("ttft_p") is not None:
            tails.append(f"TTFT p{config.ttft.percentile:g} {d['ttft_p'] * 1000:.0f}/{config.ttft.target_s * 1000:.0f} ms")
        if d.get("tpot_p") is not None:
            tails.append(f"TPOT p{config.tpot.percentile:g} {d['tpot_p'] * 1000:.1f}/{config.tpot.target_s * 1000:.0f} ms")
        detail = "; ".join(tails)
        if attainment is None:
            if SLO_MET not in before:
                found.append(condition(SLO_MET, None, "NoTraffic", "no request has finished yet", generation, before, now))
        else:
            met = attainment >= config.attainment_target
            message = (f"{attainment:.2%} of requests within the SLO (target {config.attainment_target:.2%}), "
                       f"error budget {d.get('budget_remaining', 0.0):.0%} left")
            found.append(condition(SLO_MET, met, "WithinTarget" if met else "AttainmentBelowTarget",
                                   f"{message}; {detail}" if detail else message, generation, before, now))
    return found


def merge_conditions(existing: list[dict[str, Any]], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conditions list with ours replaced in place (or appended); the other writers' left as they are."""
    by_type = {c["type"]: c for c in ours}
    merged = [by_type.pop(c.get("type"), c) for c in existing]
    return merged + [c for c in ours if c["type"] in by_type]


def without_loop_conditions(existing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in existing if c.get("type") not in LOOP_CONDITIONS]


def condition_events(previous: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[LoopEvent]:
    events = []
    for old, cond in changed_conditions(previous, current):
        if cond["type"] == METRICS_STALE and cond["status"] == "True":
            # No ready replica (a rollout, a fresh deployment) is told by reconcile's Ready/NotReady events.
            if cond["reason"] != "NoReadyReplica":
                events.append(LoopEvent("Warning", "MetricsStale", cond["message"]))
        elif cond["type"] == METRICS_STALE and cond["status"] == "False" and old.get("status") == "True":
            events.append(LoopEvent("Normal", "MetricsFresh", cond["message"]))
        elif cond["type"] == SLO_INFEASIBLE and cond["status"] == "True":
            events.append(LoopEvent("Warning", "SLOInfeasible", cond["message"]))
        elif cond["type"] == SLO_MET and cond["status"] == "False":
            events.append(LoopEvent("Warning", "SLOMissed", cond["message"]))
        elif cond["type"] == SLO_MET and cond["status"] == "True" and old.get("status") == "False":
            events.append(LoopEvent("Normal", "SLOMet", cond["message"]))
    return events


def decision_events(decision: Decision, mode: str, current_replicas: int, scaled: bool,
                    previous_recommendation: int | None, limits_before: dict[str, int] | None,
                    limits_after: dict[str, int] | None) -> list[LoopEvent]:
    """Events of one decision: a replica change applied (active) or a new recommendation (advisory), new batch
    limits."""
    events = []
    if scaled:
        direction = "Up" if decision.replicas > current_replicas else "Down"
        events.append(LoopEvent("Normal", f"Autoscaled{direction}",
                                f"spec.replicas {current_replicas} -> {decision.replicas}: {decision.reason}"))
    elif mode == "advisory" and decision.replicas != current_replicas and decision.replicas != previous_recommendation:
        events.append(LoopEvent("Normal", "ScaleRecommended",
                                f"advisory: {current_replicas} -> {decision.replicas} replicas: {decision.reason}"))
    if limits_before and limits_after and limits_before != limits_after:
        events.append(LoopEvent("Normal", "BatchLimitsChanged",
                                f"max_num_seqs {limits_before['maxNumSeqs']} -> {limits_after['maxNumSeqs']}, "
                                f"max_num_batched_tokens {limits_before['maxNumBatchedTokens']} -> "
                                f"{limits_after['maxNumBatchedTokens']}: {decision.reason}"))
    return events
