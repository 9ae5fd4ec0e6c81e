"""What a policy sees each interval and what it answers: the same shapes for the cluster, the local runtime
and the simulator."""

from __future__ import annotations

from dataclasses import dataclass, field

from tideserve.autoscaler.slo import Histogram


@dataclass
class ReplicaState:
    name: str
    ready: bool
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    started_at: float = 0.0


@dataclass
class Observation:
    """One control window of one deployment. Histograms are deltas over the window, summed over replicas."""

    time: float
    window_s: float
    desired_replicas: int
    ready_replicas: int
    pending_replicas: int  # created but not ready past their expected start-up: capacity feedback
    max_num_seqs: int
    max_num_batched_tokens: int
    stale: bool = False  # metrics missing or older than allowed: the policy must hold
    ttft: Histogram | None = None
    itl: Histogram | None = None
    tpot: Histogram | None = None  # per-request mean inter-token latency, when exported
    queue_time: Histogram | None = None
    prompt_tokens: Histogram | None = None
    generation_tokens: Histogram | None = None
    requests_finished: float = 0.0
    running: float = 0.0  # summed over ready replicas, at the end of the window
    waiting: float = 0.0
    kv_usage: float = 0.0  # the highest over replicas
    held_requests: float = 0.0  # held by the router for lack of a ready replica: demand at zero replicas
    kv_capacity_tokens: float | None = None  # what the smallest replica's KV cache holds, when it says
    # Engine step statistics over the window (means per step), for calibrating the performance model.
    steps: float = 0.0
    step_s: float | None = None
    step_seqs: float | None = None
    step_tokens: float | None = None
    mbu: float | None = None  # mean model bandwidth utilization of the window's steps (tideserve workers)
    replica_startup_s: float | None = None  # measured start-up of the most recent new replica
    replicas: list[ReplicaState] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why the window is stale, for status and events

    @property
    def decode_latency(self) -> Histogram | None:
        """Per-request TPOT where the workers export it and the window has some, else inter-token latency."""
        return self.tpot if self.tpot is not None and self.tpot.count else self.itl


@dataclass
class Decision:
    time: float
    replicas: int
    max_num_seqs: int
    max_num_batched_tokens: int
    reason: str
    action: str  # scale-up | scale-down | hold | batch-limit
    apply: bool = True  # False in advisory mode: report, do not act
    predicted_attainment: float | None = None
    forecast: dict | None = None
    drain: list[str] = field(default_factory=list)  # replicas to drain first when scaling down
    details: dict = field(default_factory=dict)
