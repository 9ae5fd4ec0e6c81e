"""One control loop for the operator, the local runtime and the simulator: sense -> decide -> actuate.

The three differ only in how they see a fleet and how they act on it (pods and the scale subresource; worker
processes on this machine; simulated replicas), so they implement the two small interfaces below. Everything
else is decided here, once: which replicas count as pending capacity, when a decision may act (never on stale
metrics, never when the policy only advises), which replicas go first when the fleet shrinks, and which
replicas need the batch limits pushed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tideserve.autoscaler.observation import Decision, Observation

# A replica not ready this long past its expected start-up waits for capacity as surely as an unschedulable one.
OVERDUE_FACTOR = 1.5

Limits = tuple[int, int]  # (max_num_seqs, max_num_batched_tokens)


@dataclass(frozen=True)
class ReplicaView:
    """One live replica (not terminating, not draining) as the loop needs to see it."""

    name: str
    ready: bool
    age_s: float  # since it was created (asked for)
    unschedulable: bool = False  # refused by the scheduler: no GPU for it
    outstanding: float = 0.0  # requests in flight on it: the fewer, the cheaper to drain
    limits: Limits | None = None  # the batch limits it reports running; None: unknown


@dataclass(frozen=True)
class Fleet:
    replicas: list[ReplicaView]
    desired: int  # the replica count asked for now
    limits: Limits | None  # the batch limits the replicas should run now; None: the loop sets none (vLLM)


@dataclass
class Actuation:
    """What one interval does, planned from the fleet and the decision."""

    acts: bool  # False: the decision is only reported (advisory, stale metrics, or the policy says so)
    replicas: int  # the replica count to run
    drain: list[str]  # the replicas to remove, in order, when the count shrinks
    limits: Limits | None  # the batch limits in force after this interval
    push_to: list[str]  # ready replicas that run other limits than those
    scaled: bool = False  # the replica count was written (set once the actuator ran)


@dataclass
class Tick:
    observation: Observation
    decision: Decision
    actuation: Actuation
    fleet: Fleet = field(repr=False)


class Sensor(Protocol):
    async def fleet(self, now: float) -> Fleet: ...

    async def observe(self, now: float, fleet: Fleet, pending_replicas: int) -> Observation: ...


class Actuator(Protocol):
    async def push_limits(self, limits: Limits, replicas: list[str]) -> None:
        """Make `limits` the ones in force (new replicas start with them) and push them to `replicas`."""

    async def report(self, tick: Tick) -> None:
        """Record the decision (status, conditions, metrics) before the replica count changes."""

    async def scale(self, replicas: int, drain: list[str]) -> bool:
        """Run `replicas` replicas, removing those in `drain` first; False when the change could not be made."""


def is_pending(ready: bool, unschedulable: bool, age_s: float, expected_startup_s: float) -> bool:
    """Asked for capacity and did not get it: not ready, and refused by the scheduler (no GPU) or overdue.
    The policy adds no replica while any exist (CapacityLimited)."""
    return not ready and (unschedulable or age_s > OVERDUE_FACTOR * expected_startup_s)


def pending_count(replicas: list[ReplicaView], expected_startup_s: float) -> int:
    return sum(is_pending(r.ready, r.unschedulable, r.age_s, expected_startup_s) for r in replicas)


def drain_order(replicas: list[ReplicaView], chosen: set[str] | list[str]) -> list[ReplicaView]:
    """The order in which replicas go on a scale-down: those the scheduler refused, then those still starting
    (they serve nothing yet), then the policy's choice (Decision.drain), then the least loaded."""
    chosen = set(chosen)
    return sorted(replicas, key=lambda r: (r.ready, not r.unschedulable, r.name not in chosen, r.outstanding))


def plan(fleet: Fleet, observation: Observation, decision: Decision, acting: bool,
         manages_limits: bool) -> Actuation:
    """The actuation of one decision. The limits in force are pushed to every ready replica that runs others
    (a replica that became ready since, or one a push failed on) even when nothing changes now; a replica that
    reports no limits gets them only when they change."""
    acts = acting and decision.apply and not observation.stale
    limits = fleet.limits
    if limits is not None and acts and manages_limits:
        limits = (decision.max_num_seqs, decision.max_num_batched_tokens)
    changed = limits != fleet.limits
    push_to = [] if limits is None else [
        r.name for r in fleet.replicas if r.ready and (r.limits != limits if r.limits is not None else changed)]
    replicas = max(0, decision.replicas) if acts else fleet.desired
    excess = len(fleet.replicas) - replicas
    drain = [r.name for r in drain_order(fleet.replicas, decision.drain)[:excess]] if acts and excess > 0 else []
    return Actuation(acts, replicas, drain, limits, push_to)


class ControlLoop:
    """sense -> decide -> actuate for one deployment. `acting` False: decide and report only (advisory mode,
    or autoscaling off); `manages_limits` False: the replicas keep the limits in force (an engine that cannot
    change them live). The policy may be replaced between ticks (a rebuilt or recalibrated one)."""

    def __init__(self, policy, sensor: Sensor, actuator: Actuator, *, acting: bool = True,
                 manages_limits: bool = True, expected_startup_s: float = 120.0):
        self.policy, self.sensor, self.actuator = policy, sensor, actuator
        self.acting, self.manages_limits = acting, manages_limits
        self.default_startup_s = expected_startup_s  # for policies that learn no start-up time of their own

    @property
    def expected_startup_s(self) -> float:
        return getattr(self.policy, "startup_s", None) or self.default_startup_s

    async def tick(self, now: float) -> Tick:
        fleet = await self.sensor.fleet(now)
        observation = await self.sensor.observe(now, fleet, pending_count(fleet.replicas, self.expected_startup_s))
        decision = self.policy.decide(observation)
        actuation = plan(fleet, observation, decision, self.acting, self.manages_limits)
        if actuation.limits is not None:
            await self.actuator.push_limits(actuation.limits, actuation.push_to)
        tick = Tick(observation, decision, actuation, fleet)
        await self.actuator.report(tick)
        if actuation.acts and actuation.replicas != fleet.desired:
            actuation.scaled = await self.actuator.scale(actuation.replicas, actuation.drain)
        return tick
