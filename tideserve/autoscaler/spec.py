"""An LLMDeployment's spec (schema-defaulted, as the API server and tideserve.operator.resource.defaulted give
it) -> the policy's configuration. Shared by the cluster loop and the local runtime, so one YAML means the
same autoscaler everywhere."""

from __future__ import annotations

from typing import Any

from tideserve.autoscaler.perf_model import H100_8B, StepTimeParams
from tideserve.autoscaler.policy import PolicyConfig
from tideserve.autoscaler.slo import PercentileSLO

# Without a target for one of the two latencies, that one is bounded loosely rather than not at all, so that
# the capacity model stays finite; the CRD requires at least one of them when autoscaling is on.
UNSET_TTFT_S = 60.0
UNSET_TPOT_S = 2.0
SEASON_SLOTS = 144  # slots per period: 10 minutes of a day


def autoscaling_mode(spec: dict[str, Any]) -> str:
    return spec.get("autoscaling", {}).get("mode", "off")


def initial_batch_limits(spec: dict[str, Any]) -> tuple[int, int]:
    engine = spec["engine"]
    return int(engine["maxNumSeqs"]), int(engine["maxNumBatchedTokens"])


def policy_config(spec: dict[str, Any], bootstrap: StepTimeParams = H100_8B) -> PolicyConfig:
    """Raises ValueError (with the field named) when the spec cannot drive an autoscaler."""
    autoscaling = spec.get("autoscaling", {})
    slo = spec.get("slo") or {}
    if not slo.get("ttft") and not slo.get("tpot"):
        raise ValueError("slo: autoscaling needs slo.ttft or slo.tpot")

    def objective(name: str, unset_s: float) -> PercentileSLO:
        target = slo.get(name)
        if not target:
            return PercentileSLO(90, unset_s)
        return PercentileSLO(float(target.get("percentile", 90)), target["targetMs"] / 1000.0)

    seasonality = spec.get("seasonality", {})
    period = float(seasonality.get("periodSeconds", 86400))
    max_seqs, max_tokens = initial_batch_limits(spec)
    engine_is_tideserve = spec["engine"].get("kind", "tideserve") == "tideserve"
    step = int(autoscaling.get("maxStep", 2))
    try:
        return PolicyConfig(
            ttft=objective("ttft", UNSET_TTFT_S),
            tpot=objective("tpot", UNSET_TPOT_S),
            attainment_target=min(float(slo.get("targetAttainment", 0.95)), 0.999),
            min_replicas=int(autoscaling.get("minReplicas", 1)),
            scale_to_zero_after_s=float(autoscaling.get("scaleToZeroAfterSeconds", 0)),
            max_replicas=int(autoscaling.get("maxReplicas", 4)),
            interval_s=float(autoscaling.get("intervalSeconds", 30)),
            scale_up_stabilization_s=float(autoscaling.get("scaleUpStabilizationSeconds", 60)),
            scale_down_stabilization_s=float(autoscaling.get("scaleDownStabilizationSeconds", 300)),
            # One step down per minute, or faster when the user asked for a shorter stabilization window.
            scale_down_period_s=min(60.0, float(autoscaling.get("scaleDownStabilizationSeconds", 300))),
            max_step_up=step,
            max_step_down=step,
            seasonality=bool(seasonality.get("enabled", False)),
            season_period_s=period,
            season_slot_s=min(600.0, period / SEASON_SLOTS),
            default_startup_s=float(seasonality.get("leadTimeSeconds", 600)),
            # vLLM cannot change its batch limits without a restart: the autoscaler then only sets replicas.
            manage_batch_limits=engine_is_tideserve,
            advisory=autoscaling_mode(spec) == "advisory",
            bootstrap=StepTimeParams(**{**bootstrap.to_dict(), "max_num_seqs": max(max_seqs, 1),
                                        "max_num_batched_tokens": max_tokens}),
        )
    except ValueError as exc:
        raise ValueError(f"autoscaling: {exc}") from None
