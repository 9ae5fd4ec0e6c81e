"""A discrete-event simulator of one deployment: a router, replicas running continuous batching, cold starts,
drains, a GPU quota, and the control loop of any policy, which sees the same metric windows a real deployment
exports (histogram deltas of TTFT, TPOT, prompt and output lengths; running and waiting; step statistics)."""

from __future__ import annotations

import heapq
import math
import operator
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from tideserve.autoscaler.control_loop import ControlLoop, Fleet, Limits, ReplicaView, Tick
from tideserve.autoscaler.observation import Observation, ReplicaState
from tideserve.autoscaler.perf_model import H100_8B, StepTimeParams
from tideserve.autoscaler.slo import Histogram
from tideserve.buckets import TOKEN_COUNT_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS
from tideserve.router.balancer import Balancer, WorkerLoad
from tideserve.sim.replica import INF, Replica, SimRequest

TTFT_EDGES = tuple(TTFT_BUCKETS) + (math.inf,)
TPOT_EDGES = tuple(TPOT_BUCKETS) + (math.inf,)
TOKEN_EDGES = tuple(TOKEN_COUNT_BUCKETS) + (math.inf,)


@dataclass
class SimConfig:
    params: StepTimeParams = H100_8B
    startup_s: float = 90.0  # pod scheduled -> model loaded -> ready
    initial_replicas: int = 1
    initial_max_num_seqs: int = 256
    initial_max_num_batched_tokens: int | None = None  # default: the params' value
    gpus_per_replica: int = 1
    gpu_quota: int | None = None  # replicas beyond it stay Pending (no GPU free)
    interval_s: float = 15.0  # control interval (a policy may bring its own)
    # The router's policy (tideserve.router.balancer): None picks prefix affinity for workloads with prefix blocks,
    # least-outstanding otherwise. Prefix blocks are block_tokens long (Mooncake's hash_ids: 512).
    router: str | None = None
    prefix_block_tokens: int = 512


_by_outstanding = operator.attrgetter("outstanding")


@dataclass
class SimResult:
    policy: str
    arrival: np.ndarray
    ttft: np.ndarray
    tpot: np.ndarray
    output_tokens: np.ndarray
    gpu_seconds: float
    duration_s: float
    timeline: dict  # arrays sampled at every control step
    decisions: int  # replica changes applied
    batch_limit_changes: int
    reasons: dict = field(default_factory=dict)
    prefix_cache_hit_rate: float = 0.0  # prompt tokens served from a replica's prefix cache, over all prompt tokens


class Simulation:
    def __init__(self, arrivals: np.ndarray, inputs: np.ndarray, outputs: np.ndarray, policy, config: SimConfig,
                 prefixes: list[tuple | None] | None = None):
        if not (len(arrivals) == len(inputs) == len(outputs)) or (prefixes is not None and len(prefixes) != len(arrivals)):
            raise ValueError("arrival, input, output and prefix arrays differ in length")
        self.arrivals, self.inputs, self.outputs = arrivals, inputs, outputs
        self.prefixes = prefixes if prefixes is not None and any(prefixes) else None
        self.block_tokens = config.prefix_block_tokens if self.prefixes is not None else 0
        self.balancer = Balancer(config.router or ("prefix" if self.prefixes is not None else "least-outstanding"),
                                 block_tokens=config.prefix_block_tokens)
        self.policy = policy
        self.config = config
        self.interval_s = getattr(policy, "interval_s", None) or config.interval_s
        self.params = config.params
        self.max_num_seqs = config.initial_max_num_seqs
        self.max_num_batched_tokens = config.initial_max_num_batched_tokens or config.params.max_num_batched_tokens
        self.replicas: list[Replica] = []
        self.routable: list[Replica] = []  # ready and not draining
        self.pending: list[Replica] = []  # created, waiting for a GPU
        self.heap: list = []
        self._names = 0
        self.held: deque[SimRequest] = deque()  # requests arriving while no replica is ready
        self.desired = 0
        self._gpu_changes: list[tuple[float, int]] = [(0.0, 0)]
        self._window_reset()
        self.timeline = {k: [] for k in ("time", "desired", "ready", "gpus", "max_num_seqs", "max_num_batched_tokens",
                                          "arrival_rate",
                                          "ttft_p90", "tpot_p90", "waiting")}
        self.decisions = self.batch_changes = 0
        self.reasons: dict[str, int] = {}
        self._last_startup: float | None = None
        self.now = 0.0  # the time of the control tick being run
        self.loop = ControlLoop(policy, self, self, expected_startup_s=config.startup_s)

    # --- replicas ------------------------------------------------------------------------------------

    def _new_replica(self, now: float, ready_now: bool = False) -> None:
        self._names += 1
        r = Replica(self._names, self.params, self.max_num_seqs, self.max_num_batched_tokens, now,
                    now if ready_now else INF, self.block_tokens)
        if r.cache is not None:  # the router learns a worker's KV capacity from its metrics
            self.balancer.index.set_capacity(r.name, r.cache.default_capacity)
        if self.config.gpu_quota is not None and self._gpus_held() >= self.config.gpu_quota:
            self.pending.append(r)
            return
        self._place(r, now, ready_now)

    def _place(self, r: Replica, now: float, ready_now: bool = False) -> None:
        r.created = r.t = now
        r.ready_at = now if ready_now else now + self.config.startup_s
        self.replicas.append(r)
        if ready_now:
            self.routable.append(r)
        else:
            heapq.heappush(self.heap, (r.ready_at, 0, r.index, -1, r))
        self._record_gpus(now)

    def _gpus_held(self) -> int:
        return len(self.replicas) * self.config.gpus_per_replica

    def _record_gpus(self, now: float) -> None:
        self._gpu_changes.append((now, self._gpus_held()))

    def _schedule(self, r: Replica) -> None:
        r.version += 1
        t = r.next_event()
        if t < INF:
            heapq.heappush(self.heap, (t, 1, r.index, r.version, r))

    def _ready(self, now: float) -> list[Replica]:
        return [r for r in self.replicas if r.ready_at <= now and not r.draining]

    def _route(self, req: SimRequest, now: float) -> None:
        """The router's choice among ready replicas that are not draining (held while there is none)."""
        if not self.routable:
            self.held.append(req)
            return
        if self.balancer.policy == "least-outstanding":  # the common case, without building load records
            best = min(self.routable, key=_by_outstanding)
        else:
            by_name = {r.name: r for r in self.routable}
            loads = [WorkerLoad(r.name, r.outstanding, r.queued_prefill_tokens, kv_usage=r.kv_usage)
                     for r in self.routable]
            choice = self.balancer.choose(loads, req.blocks or (), req.input_tokens)
            self.balancer.sent(choice, req.blocks or ())
            best = by_name[choice.worker]
        best.advance(now)
        best.admit(req, now)
        self._schedule(best)

    def _retire_if_drained(self, r: Replica, now: float) -> None:
        if r.draining and r.outstanding == 0 and r in self.replicas:
            self.replicas.remove(r)
            self._record_gpus(now)
            if self.pending:  # a GPU freed up: the oldest pending replica starts
                self._place(self.pending.pop(0), now)

    # --- the control loop ----------------------------------------------------------------------------

    def _window_reset(self) -> None:
        self.w_ttft: list[float] = []
        self.w_tpot: list[float] = []
        self.w_in: list[float] = []
        self.w_out: list[float] = []

    # The control loop is the product's (tideserve.autoscaler.control_loop); the simulation is its sensor and
    # actuator, and neither ever waits, so each tick runs to completion without an event loop.

    def _control(self, now: float) -> None:
        self.now = now  # the actuator's clock: its interface carries no time
        tick = self.loop.tick(now)
        try:
            tick.send(None)
        except StopIteration:
            return
        raise RuntimeError("the simulated sensor and actuator must not wait")

    async def fleet(self, now: float) -> Fleet:
        live = [ReplicaView(r.name, r.ready_at <= now, now - r.created, outstanding=r.outstanding,
                            limits=(r.max_num_seqs, r.max_num_batched_tokens))
                for r in self.replicas if not r.draining]
        # Replicas waiting for a GPU are what Pending pods are in a cluster: asked for, refused by the scheduler.
        live += [ReplicaView(r.name, False, now - r.created, unschedulable=True) for r in self.pending]
        return Fleet(live, self.desired, (self.max_num_seqs, self.max_num_batched_tokens))

    async def observe(self, now: float, fleet: Fleet, pending_replicas: int) -> Observation:
        steps = step_time = step_seqs = step_tokens = 0.0
        for r in self.replicas:
            r.advance(now)
            s = r.take_step_stats()
            steps, step_time, step_seqs, step_tokens = steps + s[0], step_time + s[1], step_seqs + s[2], step_tokens + s[3]
        ready = self._ready(now)
        obs = Observation(
            time=now, window_s=self.interval_s, desired_replicas=self.desired, ready_replicas=len(ready),
            pending_replicas=pending_replicas,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            ttft=Histogram.from_values(TTFT_EDGES, self.w_ttft),
            tpot=Histogram.from_values(TPOT_EDGES, self.w_tpot),
            prompt_tokens=Histogram.from_values(TOKEN_EDGES, self.w_in),
            generation_tokens=Histogram.from_values(TOKEN_EDGES, self.w_out),
            requests_finished=float(len(self.w_ttft)),
            running=float(sum(r.running for r in self.replicas)),
            waiting=float(sum(len(r.waiting) for r in self.replicas) + len(self.held)),
            held_requests=float(len(self.held)),
            kv_usage=max((r.kv_usage for r in ready), default=0.0),
            kv_capacity_tokens=float(self.params.kv_capacity_tokens) if ready else None,  # as workers export it
            steps=steps, step_s=step_time / steps if steps else None,
            step_seqs=step_seqs / steps if steps else None, step_tokens=step_tokens / steps if steps else None,
            replica_startup_s=self._last_startup,
            replicas=[ReplicaState(r.name, r.ready_at <= now, r.running, len(r.waiting), r.kv_usage, r.created)
                      for r in self.replicas if not r.draining],
        )
        self._last_startup = None
        return obs

    async def push_limits(self, limits: Limits, replicas: list[str]) -> None:
        if limits != (self.max_num_seqs, self.max_num_batched_tokens):
            self.batch_changes += 1
            self.max_num_seqs, self.max_num_batched_tokens = limits
        pushed = set(replicas)
        for r in self.replicas:
            if r.name in pushed:
                r.advance(self.now)
                r.set_limits(*limits, self.now)
                self._schedule(r)

    async def report(self, tick: Tick) -> None:
        decision, obs = tick.decision, tick.observation
        self.reasons[decision.action] = self.reasons.get(decision.action, 0) + 1
        tl = self.timeline
        tl["time"].append(obs.time)
        tl["desired"].append(self.desired)
        tl["ready"].append(obs.ready_replicas)
        tl["gpus"].append(self._gpus_held())
        tl["max_num_seqs"].append(self.max_num_seqs)
        tl["max_num_batched_tokens"].append(self.max_num_batched_tokens)
        tl["arrival_rate"].append(self._window_arrivals / self.interval_s)
        tl["ttft_p90"].append(np.percentile(self.w_ttft, 90) if self.w_ttft else np.nan)
        tl["tpot_p90"].append(np.percentile(self.w_tpot, 90) if self.w_tpot else np.nan)
        tl["waiting"].append(obs.waiting)
        self._window_reset()
        self._window_arrivals = 0

    async def scale(self, replicas: int, drain: list[str]) -> bool:
        now = self.now
        self.decisions += 1
        going = set(drain)
        self.pending = [r for r in self.pending if r.name not in going]  # what has no GPU yet is simply cancelled
        for r in self.replicas:
            if r.name in going and not r.draining:
                r.draining = True
                if r in self.routable:
                    self.routable.remove(r)
        for r in [r for r in self.replicas if r.name in going]:
            self._retire_if_drained(r, now)
        while len([r for r in self.replicas if not r.draining]) + len(self.pending) < replicas:
            self._new_replica(now)
        self.desired = replicas
        return True

    # --- the run -------------------------------------------------------------------------------------

    def run(self) -> SimResult:
        arrivals, inputs, outputs = self.arrivals.tolist(), self.inputs.tolist(), self.outputs.tolist()
        n = len(arrivals)
        requests: list[SimRequest] = []
        for _ in range(self.config.initial_replicas):
            self._new_replica(0.0, ready_now=True)
        self.desired = self.config.initial_replicas
        next_control = self.interval_s
        self._window_arrivals = 0
        i = 0
        heap = self.heap
        finished: list[SimRequest] = []
        in_flight = 0
        now = 0.0
        while i < n or in_flight:
            t_arrival = arrivals[i] if i < n else INF
            t_event = heap[0][0] if heap else INF
            if next_control <= t_arrival and next_control <= t_event:
                now = next_control
                self._control(now)
                next_control += self.interval_s
                continue
            if t_arrival <= t_event:
                now = t_arrival
                req = SimRequest(i, now, int(inputs[i]), int(outputs[i]),
                                 self.prefixes[i] if self.prefixes is not None else None)
                requests.append(req)
                i += 1
                in_flight += 1
                self._window_arrivals += 1
                self._route(req, now)
                continue
            now, kind, _, version, r = heapq.heappop(heap)
            if kind == 0:  # a replica finished starting up
                if r not in self.replicas or r.ready_at != now or r.draining:
                    continue
                self.routable.append(r)
                self._last_startup = now - r.created
                while self.held:
                    self._route(self.held.popleft(), now)
                continue
            if version != r.version:
                continue
            r.advance(now)
            r.process(now, finished)
            if finished:
                for req in finished:
                    self.w_ttft.append(req.first_token - req.arrival)
                    if req.output_tokens > 1:
                        self.w_tpot.append((req.finished - req.first_token) / (req.output_tokens - 1))
                    self.w_in.append(req.input_tokens)
                    self.w_out.append(req.output_tokens)
                in_flight -= len(finished)
                finished.clear()
                self._retire_if_drained(r, now)
            self._schedule(r)
        return self._result(requests, now)

    def _result(self, requests: list[SimRequest], end: float) -> SimResult:
        changes = self._gpu_changes + [(end, 0)]
        gpu_seconds = sum((t1 - t0) * g for (t0, g), (t1, _) in zip(changes, changes[1:]))
        arrival = np.array([r.arrival for r in requests])
        ttft = np.array([r.first_token - r.arrival for r in requests])
        tpot = np.array([(r.finished - r.first_token) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
                         for r in requests])
        return SimResult(
            policy=getattr(self.policy, "name", type(self.policy).__name__), arrival=arrival, ttft=ttft, tpot=tpot,
            output_tokens=np.array([r.output_tokens for r in requests]), gpu_seconds=gpu_seconds, duration_s=end,
            timeline={k: np.array(v, dtype=float) for k, v in self.timeline.items()}, decisions=self.decisions,
            batch_limit_changes=self.batch_changes, reasons=self.reasons,
            prefix_cache_hit_rate=sum(r.cached_tokens for r in requests) / max(1, sum(r.input_tokens for r in requests)),
        )
