"""The one control loop (tideserve.autoscaler.control_loop) that the operator, the local runtime and the
simulator run: its pending, stale, drain and limit-push rules, and each of the three as its sensor/actuator."""

from __future__ import annotations

import asyncio

import numpy as np

from tideserve.autoscaler.control_loop import (OVERDUE_FACTOR, ControlLoop, Fleet, ReplicaView, drain_order,
                                               is_pending, pending_count)
from tideserve.autoscaler.observation import Decision, Observation
from tideserve.operator import metrics_source
from tideserve.sim.simulator import SimConfig, Simulation


def test_pending_means_refused_by_the_scheduler_or_overdue_and_never_ready():
    assert is_pending(False, True, 1.0, 90.0)  # no GPU: pending at once
    assert not is_pending(False, False, 90.0 * OVERDUE_FACTOR, 90.0)  # slow but not yet overdue
    assert is_pending(False, False, 90.0 * OVERDUE_FACTOR + 1, 90.0)
    assert not is_pending(True, True, 1000.0, 90.0)  # ready is never pending


def test_a_scale_down_takes_unschedulable_then_starting_replicas_then_the_policys_choice_then_the_least_loaded():
    live = [ReplicaView("a", True, 500, outstanding=1), ReplicaView("b", True, 500, outstanding=9),
            ReplicaView("c", False, 10), ReplicaView("d", True, 500, outstanding=3),
            ReplicaView("e", False, 5, unschedulable=True)]
    assert [r.name for r in drain_order(live, ["b"])] == ["e", "c", "b", "a", "d"]


def test_the_operator_sees_pods_by_the_same_rules():
    def pod(name, ready=False, unschedulable=False):
        conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
        if unschedulable:
            conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable"})
        return {"metadata": {"name": name, "creationTimestamp": "2026-12-01T00:00:00Z"},
                "status": {"podIP": "10.0.0.1", "conditions": conditions}}

    created = metrics_source.parse_time("2026-12-01T00:00:00Z")
    views = [metrics_source.replica_view(pod("new", unschedulable=True), created + 10, None),
             metrics_source.replica_view(pod("slow"), created + 60, None),
             metrics_source.replica_view(pod("stuck"), created + 200, None),
             metrics_source.replica_view(pod("up", ready=True), created + 500, None)]
    assert [pending_count([v], 90.0) for v in views] == [1, 0, 1, 0]
    assert [v.age_s for v in views] == [10, 60, 200, 500]


# --- the loop with a scripted sensor and actuator ------------------------------------------------------------


class Script:
    """Sensor, actuator and policy at once: returns the fleet and decision it is given, records the calls."""

    def __init__(self, fleet: Fleet, decision: Decision, stale: bool = False):
        self.the_fleet, self.decision, self.stale = fleet, decision, stale
        self.calls: list[tuple] = []
        self.seen: Observation | None = None
        self.startup_s = 90.0

    async def fleet(self, now):
        return self.the_fleet

    async def observe(self, now, fleet, pending_replicas):
        return Observation(now, 30.0, fleet.desired, sum(r.ready for r in fleet.replicas), pending_replicas,
                           *(fleet.limits or (256, 2048)), stale=self.stale)

    def decide(self, obs):
        self.seen = obs
        return self.decision

    async def push_limits(self, limits, replicas):
        self.calls.append(("limits", limits, tuple(replicas)))

    async def report(self, tick):
        self.calls.append(("report", tick.decision.replicas))

    async def scale(self, replicas, drain):
        self.calls.append(("scale", replicas, tuple(drain)))
        return True


def run(script: Script, acting=True, manages_limits=True):
    tick = asyncio.run(ControlLoop(script, script, script, acting=acting, manages_limits=manages_limits).tick(0.0))
    return tick, script.calls


def fleet(limits=(256, 2048)):
    return Fleet([ReplicaView("a", True, 500, outstanding=4, limits=limits),
                  ReplicaView("b", True, 500, outstanding=1, limits=(128, 1024)),
                  ReplicaView("c", False, 200),  # overdue at a 90 s start-up: pending
                  ReplicaView("d", True, 500, outstanding=2)],  # reports no limits
                 desired=4, limits=limits)


def decision(replicas, limits=(256, 2048), drain=()):
    return Decision(0.0, replicas, *limits, "because", "scale-down" if replicas < 4 else "hold", drain=list(drain))


def test_the_observation_counts_pending_replicas_by_the_policys_start_up_guess():
    script = Script(fleet(), decision(4))
    run(script)
    assert script.seen.pending_replicas == 1
    script.startup_s = 600.0  # a slower guess: not overdue yet
    run(script)
    assert script.seen.pending_replicas == 0


def test_a_scale_down_reports_first_then_drains_in_order():
    tick, calls = run(Script(fleet(), decision(2, drain=["a"])))
    assert calls == [("limits", (256, 2048), ("b",)), ("report", 2), ("scale", 2, ("c", "a"))]
    assert tick.actuation.scaled and tick.actuation.drain == ["c", "a"]


def test_new_limits_go_to_every_ready_replica_that_runs_others_and_stay_in_force():
    tick, calls = run(Script(fleet(), decision(4, limits=(64, 512))))
    assert calls[0] == ("limits", (64, 512), ("a", "b", "d"))  # d reports none: it gets the change
    assert [c[0] for c in calls] == ["limits", "report"]  # no replica change: no scale call
    _, calls = run(Script(fleet(), decision(4)))
    assert calls[0] == ("limits", (256, 2048), ("b",))  # unchanged: only the replica that runs others


def test_stale_metrics_advisory_mode_and_a_policy_that_says_so_never_act():
    for script, acting in ((Script(fleet(), decision(1, limits=(64, 512)), stale=True), True),
                           (Script(fleet(), decision(1, limits=(64, 512))), False)):
        tick, calls = run(script, acting=acting)
        assert not tick.actuation.acts and tick.actuation.limits == (256, 2048)
        assert [c[0] for c in calls] == ["limits", "report"]
    advisory = decision(1, limits=(64, 512))
    advisory.apply = False
    tick, calls = run(Script(fleet(), advisory))
    assert not tick.actuation.acts and "scale" not in [c[0] for c in calls]


def test_an_engine_whose_limits_the_loop_does_not_run_gets_no_push():
    _, calls = run(Script(fleet(), decision(4, limits=(64, 512))), manages_limits=False)
    assert calls[0] == ("limits", (256, 2048), ("b",))  # the limits in force, not the decision's
    _, calls = run(Script(fleet(limits=None), decision(5, limits=(64, 512))))
    assert calls == [("report", 5), ("scale", 5, ())]


def test_the_simulation_is_the_loops_sensor_and_actuator():
    """The simulator drives the product's loop: a quota-pending replica is counted pending and goes first."""
    class TwoThenOne:
        interval_s = 10.0
        name = "script"

        def __init__(self):
            self.seen = []

        def decide(self, obs):
            self.seen.append(obs)
            replicas = 3 if len(self.seen) == 1 else 2
            return Decision(obs.time, replicas, 64, 512, "script", "scale-up")

    policy = TwoThenOne()
    arrivals = np.arange(0.0, 60.0, 1.0)
    sim = Simulation(arrivals, np.full(60, 100), np.full(60, 10), policy, SimConfig(gpu_quota=2, initial_replicas=1))
    assert sim.loop.sensor is sim and sim.loop.actuator is sim
    result = sim.run()
    assert policy.seen[1].pending_replicas == 1  # the third replica has no GPU
    assert sim.pending == [] and result.batch_limit_changes == 1
    assert all(r.max_num_seqs == 64 for r in sim.replicas if not r.draining)
