"""Rules that every place applying a decision follows alike (the operator's loop, the local runtime, the
simulator): which replicas count as pending capacity, and which go first when the fleet shrinks."""

from __future__ import annotations

from typing import Callable, Collection, TypeVar

# A replica not ready this long past its expected start-up waits for capacity as surely as an unschedulable one.
OVERDUE_FACTOR = 1.5

Replica = TypeVar("Replica")


def is_pending(ready: bool, unschedulable: bool, age_s: float, expected_startup_s: float) -> bool:
    """Asked for capacity and did not get it: not ready, and refused by the scheduler (no GPU) or overdue.
    The policy adds no replica while any exist (CapacityLimited)."""
    return not ready and (unschedulable or age_s > OVERDUE_FACTOR * expected_startup_s)


def drain_order(live: list[Replica], chosen: Collection[str], ready: Callable[[Replica], bool],
                name: Callable[[Replica], str], outstanding: Callable[[Replica], float]) -> list[Replica]:
    """The order in which replicas go on a scale-down: those still starting (they serve nothing yet), then the
    policy's choice (Decision.drain), then the least loaded (fewest requests to drain)."""
    return sorted(live, key=lambda r: (ready(r), name(r) not in chosen, outstanding(r)))
