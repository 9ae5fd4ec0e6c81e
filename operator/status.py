"""Observed state: the LLMDeployment's status computed from its Deployment and pods, and the status patch.

Pure functions; `now` is passed in. Conditions follow metav1.Condition (type, status, reason, message,
observedGeneration, lastTransitionTime), with lastTransitionTime kept while a condition's status holds, so a
reconcile that observes nothing new computes an identical status and writes nothing.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from tideserve.operator.manifests import endpoint_url, label_selector

READY, PROGRESSING, DEGRADED, CAPACITY_LIMITED = "Ready", "Progressing", "Degraded", "CapacityLimited"
OWN_CONDITIONS = (READY, PROGRESSING, DEGRADED, CAPACITY_LIMITED)
# Status fields reconcile writes; autoscaling and metrics belong to the autoscaling loop (autoscaler_loop.py),
# kopf to kopf. batchLimits is computed the same way by both: the autoscaler's limits while it runs them.
OWN_FIELDS = ("observedGeneration", "replicas", "readyReplicas", "updatedReplicas", "selector", "endpoint",
              "batchLimits", "lastScalingDecision", "conditions")
# Container waiting reasons that will not fix themselves.
FAILING_WAIT_REASONS = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                        "CreateContainerConfigError", "CreateContainerError"}


@dataclass(frozen=True)
class Problem:
    """Something wrong that the operator found itself (invalid spec, name conflict, a rejected write)."""
    reason: str
    message: str


def timestamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(ctype: str, true: bool | None, reason: str, message: str, generation: int | None,
              previous: dict[str, dict[str, Any]], now: datetime.datetime) -> dict[str, Any]:
    """A metav1.Condition (true None: status Unknown); lastTransitionTime is kept while the status holds."""
    status = "Unknown" if true is None else "True" if true else "False"
    before = previous.get(ctype)
    since = before["lastTransitionTime"] if before and before.get("status") == status else timestamp(now)
    condition = {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def _pods_unschedulable(pods: list[dict[str, Any]]) -> list[tuple[str, str]]:
    found = []
    for pod in pods:
        if pod.get("status", {}).get("phase") != "Pending" or pod["metadata"].get("deletionTimestamp"):
            continue
        for cond in pod.get("status", {}).get("conditions", []):
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                found.append((pod["metadata"]["name"], cond.get("message", "")))
    return found


def _pods_failing(pods: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    found = []
    for pod in pods:
        statuses = pod.get("status", {}).get("initContainerStatuses", []) + pod.get("status", {}).get("containerStatuses", [])
        for container in statuses:
            waiting = container.get("state", {}).get("waiting", {})
            if waiting.get("reason") in FAILING_WAIT_REASONS:
                found.append((pod["metadata"]["name"], waiting["reason"], waiting.get("message", "")))
    return found


def _deployment_condition(deployment: dict[str, Any] | None, ctype: str) -> dict[str, Any]:
    for cond in (deployment or {}).get("status", {}).get("conditions", []):
        if cond.get("type") == ctype:
            return cond
    return {}


def compute_status(llmd: dict[str, Any], deployment: dict[str, Any] | None, pods: list[dict[str, Any]],
                   problems: list[Problem], scaling_decision: dict[str, Any] | None,
                   now: datetime.datetime) -> dict[str, Any]:
    """The status fields this operator owns (OWN_FIELDS), from a defaulted LLMDeployment, its Deployment
    (None if absent), its pods, and problems found while reconciling."""
    spec, old = llmd["spec"], llmd.get("status", {})
    generation = llmd["metadata"].get("generation")
    previous = {c["type"]: c for c in old.get("conditions", [])}
    desired = spec["replicas"]
    dep_status = (deployment or {}).get("status", {})
    replicas = dep_status.get("replicas", 0)
    ready = dep_status.get("readyReplicas", 0)
    updated = dep_status.get("updatedReplicas", 0)
    dep_seen = deployment is not None and dep_status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
    rolled_out = not problems and dep_seen and updated >= desired and ready >= desired and replicas == desired
    stalled = _deployment_condition(deployment, "Progressing").get("reason") == "ProgressDeadlineExceeded"
    replica_failure = _deployment_condition(deployment, "ReplicaFailure")
    quota = replica_failure.get("status") == "True" and "exceeded quota" in replica_failure.get("message", "")

    def cond(ctype: str, true: bool, reason: str, message: str) -> dict[str, Any]:
        return condition(ctype, true, reason, message, generation, previous, now)

    counts = f"{ready}/{desired} replicas ready, {updated}/{desired} updated"
    if problems:
        ready_c = cond(READY, False, problems[0].reason, problems[0].message)
    elif rolled_out:
        ready_c = cond(READY, True, "ScaledToZero" if desired == 0 else "Available",
                       "no replicas requested" if desired == 0 else counts)
    else:
        ready_c = cond(READY, False, "DeploymentMissing" if deployment is None else "ReplicasNotReady", counts)

    if problems:
        progressing_c = cond(PROGRESSING, False, problems[0].reason, problems[0].message)
    elif stalled:
        progressing_c = cond(PROGRESSING, False, "ProgressDeadlineExceeded",
                             _deployment_condition(deployment, "Progressing").get("message", ""))
    elif rolled_out:
        progressing_c = cond(PROGRESSING, False, "RolloutComplete", counts)
    else:
        progressing_c = cond(PROGRESSING, True, "RollingOut", counts)

    failing = _pods_failing(pods)
    if problems:
        degraded_c = cond(DEGRADED, True, problems[0].reason, "; ".join(p.message for p in problems))
    elif failing:
        pod, reason, message = failing[0]
        degraded_c = cond(DEGRADED, True, reason, f"{len(failing)} container(s) failing; pod {pod}: {message}".rstrip(": "))
    elif stalled:
        degraded_c = cond(DEGRADED, True, "ProgressDeadlineExceeded", progressing_c["message"])
    elif replica_failure.get("status") == "True" and not quota:
        degraded_c = cond(DEGRADED, True, "ReplicaFailure", replica_failure.get("message", ""))
    else:
        degraded_c = cond(DEGRADED, False, "AsExpected", "no failures observed")

    unschedulable = _pods_unschedulable(pods)
    if unschedulable:
        pod, message = unschedulable[0]
        capacity_c = cond(CAPACITY_LIMITED, True, "Unschedulable",
                          f"{len(unschedulable)} pod(s) pending, not schedulable; pod {pod}: {message}")
    elif quota:
        capacity_c = cond(CAPACITY_LIMITED, True, "QuotaExceeded", replica_failure.get("message", ""))
    else:
        capacity_c = cond(CAPACITY_LIMITED, False, "Schedulable", "no pods waiting for capacity")

    foreign = [c for c in old.get("conditions", []) if c.get("type") not in OWN_CONDITIONS]
    status = {
        "replicas": replicas,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": label_selector(llmd["metadata"]["name"]),
        "endpoint": endpoint_url(llmd),
        "batchLimits": batch_limits(llmd),
        "conditions": [ready_c, progressing_c, degraded_c, capacity_c] + foreign,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    decision = scaling_decision or old.get("lastScalingDecision")
    if decision:
        status["lastScalingDecision"] = decision
    return status


def autoscaler_runs_batch_limits(spec: dict[str, Any]) -> bool:
    """Whether the autoscaler sets the batch limits: mode active on the tideserve engine (vLLM cannot change
    them without a restart)."""
    return spec["autoscaling"]["mode"] == "active" and spec["engine"]["kind"] == "tideserve"


def batch_limits(llmd: dict[str, Any]) -> dict[str, int]:
    """The batch limits the replicas run and new pods are given: the autoscaler's (status.autoscaling.batchLimits,
    pushed to every ready pod) while it runs them, else the spec's (the pods' start arguments)."""
    spec = llmd["spec"]
    engine = spec["engine"]
    limits = {"maxNumSeqs": engine["maxNumSeqs"], "maxNumBatchedTokens": engine["maxNumBatchedTokens"]}
    chosen = llmd.get("status", {}).get("autoscaling", {}).get("batchLimits")
    if autoscaler_runs_batch_limits(spec) and isinstance(chosen, dict) and \
            isinstance(chosen.get("maxNumSeqs"), int) and isinstance(chosen.get("maxNumBatchedTokens"), int):
        seqs = max(1, min(chosen["maxNumSeqs"], engine["maxNumSeqs"]))
        limits = {"maxNumSeqs": seqs, "maxNumBatchedTokens": max(chosen["maxNumBatchedTokens"], seqs)}
    return limits


def scaling_decision(llmd: dict[str, Any], from_replicas: int, to_replicas: int,
                     now: datetime.datetime) -> dict[str, Any]:
    """The record of a replica change the operator is applying. The reason is the autoscaler's, from
    status.autoscaling.lastDecision, when that decision asked for this very change (so a stale one is never
    reused); otherwise someone else (a user, GitOps, `kubectl scale`) changed spec.replicas."""
    reason = f"spec.replicas changed from {from_replicas} to {to_replicas}"
    told = llmd.get("status", {}).get("autoscaling", {}).get("lastDecision", {})
    if told.get("applied") and told.get("action") in ("scale-up", "scale-down") and \
            told.get("replicas") == to_replicas and told.get("reason"):
        reason = str(told["reason"])
    return {"time": timestamp(now), "from": from_replicas, "to": to_replicas, "reason": reason}


def status_patch(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The merge patch for the status subresource: the owned fields that differ; {} when none do."""
    return {key: value for key, value in desired.items() if current.get(key) != value}


def changed_conditions(old_conditions: list[dict[str, Any]], new_conditions: list[dict[str, Any]]
                       ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(before, after) for each new condition whose status or reason differs from before ({} if it is new)."""
    old = {c["type"]: c for c in old_conditions}
    return [(old.get(c["type"], {}), c) for c in new_conditions
            if (old.get(c["type"], {}).get("status"), old.get(c["type"], {}).get("reason")) != (c["status"], c["reason"])]


def condition_events(old_conditions: list[dict[str, Any]], new_conditions: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(type, reason, message) Kubernetes events for condition changes worth telling in `kubectl describe`."""
    events = []
    for before, cond in changed_conditions(old_conditions, new_conditions):
        ctype, true = cond["type"], cond["status"] == "True"
        if ctype == READY and true:
            events.append(("Normal", "Ready", cond["message"]))
        elif ctype == READY and before.get("status") == "True":
            events.append(("Warning", "NotReady", cond["message"]))
        elif ctype in (DEGRADED, CAPACITY_LIMITED) and true:
            events.append(("Warning", cond["reason"] if ctype == DEGRADED else CAPACITY_LIMITED,
                           f"{cond['reason']}: {cond['message']}" if ctype == CAPACITY_LIMITED else cond["message"]))
        elif ctype in (DEGRADED, CAPACITY_LIMITED) and before.get("status") == "True":
            events.append(("Normal", "Recovered" if ctype == DEGRADED else "CapacityAvailable", cond["message"]))
    return events
