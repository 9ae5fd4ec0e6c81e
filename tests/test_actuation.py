"""The rules every actuator applies alike (operator loop, local runtime, simulator), and the operator's pod
count by them."""

from __future__ import annotations

from dataclasses import dataclass

from tideserve.autoscaler.actuation import OVERDUE_FACTOR, drain_order, is_pending
from tideserve.operator import metrics_source
from tideserve.operator.metrics_source import pending_count


def test_pending_means_refused_by_the_scheduler_or_overdue_and_never_ready():
    assert is_pending(False, True, 1.0, 90.0)  # no GPU: pending at once
    assert not is_pending(False, False, 90.0 * OVERDUE_FACTOR, 90.0)  # slow but not yet overdue
    assert is_pending(False, False, 90.0 * OVERDUE_FACTOR + 1, 90.0)
    assert not is_pending(True, True, 1000.0, 90.0)  # ready is never pending


@dataclass
class R:
    name: str
    ready: bool
    outstanding: int


def test_a_scale_down_takes_starting_replicas_then_the_policys_choice_then_the_least_loaded():
    live = [R("a", True, 1), R("b", True, 9), R("c", False, 0), R("d", True, 3)]
    order = drain_order(live, ["b"], lambda r: r.ready, lambda r: r.name, lambda r: r.outstanding)
    assert [r.name for r in order] == ["c", "b", "a", "d"]


def test_the_operator_counts_pending_pods_by_the_same_rule():
    def pod(name, age_s, ready=False, unschedulable=False, terminating=False):
        meta = {"name": name, "creationTimestamp": "2026-12-01T00:00:00Z"}
        if terminating:
            meta["deletionTimestamp"] = "2026-12-01T00:10:00Z"
        conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
        if unschedulable:
            conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable"})
        return {"metadata": meta, "status": {"podIP": "10.0.0.1", "conditions": conditions}}, age_s

    created = metrics_source.parse_time("2026-12-01T00:00:00Z")
    pods = [pod("new", 10, unschedulable=True), pod("slow", 60), pod("stuck", 200), pod("up", 500, ready=True),
            pod("going", 500, terminating=True)]
    counted = [pending_count([p], created + age, 90.0) for p, age in pods]
    assert counted == [1, 0, 1, 0, 0]
    assert counted == [int(not p["metadata"].get("deletionTimestamp") and is_pending(
        metrics_source.is_ready(p), metrics_source.is_unschedulable(p), age, 90.0)) for p, age in pods]
