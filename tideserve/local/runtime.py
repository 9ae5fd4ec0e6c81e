"""`tideserve up`: one LLMDeployment on this machine. Worker processes stand in for pods, the product's router
(tideserve.router, fed the replica list instead of EndpointSlices) for the Service, and the autoscaling loop is
the cluster's: the same metric windows
(tideserve.autoscaler.scrape), the same policy, the same spec mapping. Only the actuators differ: starting and
draining processes instead of patching spec.replicas, and admin calls to local ports instead of pod IPs.

Before the first decision the runtime measures a bootstrap performance profile on the first replica (a few
seconds of calibration requests at growing batch sizes, read back from the worker's own step-time metrics),
since the default profile describes an 8B model on an H100, not this machine.

The runtime exports the operator's own metrics (tideserve.operator.autoscaler_metrics: the decisions, the SLO,
the loop's conditions) on `metrics_port`; with `prometheus`, it also runs a real Prometheus server
(tideserve.monitoring.prometheus) that scrapes those and every worker under the labels the chart's PodMonitor
gives pods in a cluster, and evaluates the chart's rules, so the shipped dashboard's queries work here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import prometheus_client
import uvicorn

from tideserve.autoscaler.control_loop import ControlLoop, Fleet, Limits, ReplicaView, Tick, drain_order
from tideserve.autoscaler.observation import Decision, Observation
from tideserve.autoscaler.perf_model import StepTimeParams, fit_step_params
from tideserve.autoscaler.policy import TideservePolicy
from tideserve.autoscaler.scrape import (STEP_SECONDS, STEP_SEQUENCES, STEP_TOKENS, MetricsParseError,
                                         ReplicaSample, WindowAggregator, parse_exposition)
from tideserve.autoscaler.spec import initial_batch_limits, policy_config
from tideserve.bench.loadgen import make_prompt
from tideserve.local import deployment
from tideserve.local.replicas import WorkerProcess
from tideserve.monitoring.prometheus import RULES_FILE, PrometheusServer, PrometheusUnavailable, ScrapeJob, write_targets
from tideserve.operator import autoscaler_status as loop_status
from tideserve.operator.autoscaler_metrics import AutoscalerMetrics
from tideserve.operator.status import autoscaler_runs_batch_limits
from tideserve.ports import free_port
from tideserve.router.server import Endpoint, HoldQueue, Router

log = logging.getLogger("tideserve.local")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape drowns the view

# Calibration rounds: (concurrent requests, prompt tokens, output tokens). Decodes of one and of many sequences
# separate the per-step and per-sequence costs; prompts answered with one token are nearly pure prefill steps;
# long prompts decoded for a while add the cost of context. More rounds than costs, so that the fit averages
# out the noise of any one round instead of passing it on to every plan.
CALIBRATION_ROUNDS = ((1, 16, 32), (4, 16, 32), (8, 16, 32), (16, 16, 24), (4, 384, 1), (2, 256, 24),
                      (6, 384, 24))


class LocalRuntimeError(RuntimeError):
    """The local deployment cannot go on (a worker that never becomes ready, a port in use)."""


@dataclasses.dataclass
class TimelinePoint:
    time: float
    desired: int
    ready: int
    max_num_seqs: int
    max_num_batched_tokens: int
    ttft_p: float | None
    tpot_p: float | None
    attainment: float | None
    waiting: float
    running: float
    rate: float | None
    action: str
    reason: str
    stale: bool
    mbu: float | None = None
    details: dict = dataclasses.field(default_factory=dict)


class LocalRuntime:
    def __init__(self, llmd: dict[str, Any], port: int = 8000, host: str = "127.0.0.1",
                 log_dir: str | Path | None = None, calibrate: bool = True,
                 on_decision: Callable[[Decision, TimelinePoint], None] | None = None,
                 metrics_port: int | None = None, prometheus: bool = False, scrape_interval_s: float = 5.0):
        self.llmd = llmd
        self.spec = llmd["spec"]
        self.name = llmd["metadata"]["name"]
        self.namespace = llmd["metadata"].get("namespace") or "default"
        self.host, self.port = host, port
        self.config = policy_config(self.spec)
        self.policy = TideservePolicy(self.config)
        self.enabled = self.spec["autoscaling"]["mode"] != "off"
        self.limits = initial_batch_limits(self.spec)
        self.desired = max(self.config.min_replicas if self.enabled else 1, self.spec["replicas"])  # 0: start idle
        if self.enabled:
            self.desired = min(self.desired, self.config.max_replicas)
        self.threads = deployment.cpu_threads(self.spec)
        self.drain_timeout_s = float(self.spec["engine"]["drainTimeoutSeconds"])
        self.startup_timeout_s = float(self.spec["engine"]["startupTimeoutSeconds"])
        self._tmp = None if log_dir else tempfile.TemporaryDirectory(prefix="tideserve-up-")
        self.log_dir = Path(log_dir or self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.calibrate = calibrate
        self.on_decision = on_decision
        self.replicas: list[WorkerProcess] = []
        self.retired: list[tuple[str, int | None]] = []  # (name, exit code) of drained replicas
        self.timeline: list[TimelinePoint] = []
        self.decisions: list[Decision] = []
        self.profile: StepTimeParams | None = None
        self.aggregator = WindowAggregator(max_sample_age_s=3 * self.config.interval_s)
        router = self.spec["router"]
        self.router = Router(router["policy"], HoldQueue(router["holdQueue"]["maxRequests"],
                                                         router["holdQueue"]["timeoutSeconds"]),
                             [self.spec["model"]["name"]])
        self.client = httpx.AsyncClient(timeout=5.0)
        # The workers' admin port takes a bearer token, as in a cluster: other local users cannot change limits.
        token = secrets.token_urlsafe(32)
        self.admin_token_file = self.log_dir / "admin-token"
        descriptor = os.open(self.admin_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(token)
        self._admin_headers = {"Authorization": f"Bearer {token}"}
        self._serial = 0
        self._drains: set[asyncio.Task] = set()
        self._last_startup: float | None = None
        self._server: uvicorn.Server | None = None
        self.started = asyncio.Event()
        self.metrics = AutoscalerMetrics()
        self.conditions: list[dict[str, Any]] = []  # the loop's conditions, as a cluster's status would hold them
        self.metrics_port = metrics_port or (free_port() if prometheus else None)
        self._metrics_server = None
        self.prometheus: PrometheusServer | None = None
        if prometheus:
            self.prometheus = PrometheusServer(
                [ScrapeJob("tideserve-workers", targets_file=self.log_dir / "prometheus-workers.json"),
                 ScrapeJob("tideserve-autoscaler", static=[f"{host}:{self.metrics_port}"], honor_labels=True),
                 # The router as the chart's router PodMonitor labels its pods.
                 ScrapeJob("tideserve-routers", static=[f"{host}:{port}"],
                           labels={"namespace": self.namespace, "llmdeployment": self.name,
                                   "pod": f"{self.name}-router", "container": "router"})],
                scrape_interval_s=scrape_interval_s, rule_files=[RULES_FILE], directory=self.log_dir / "prometheus")
        self._targets_written: list | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then drain every replica."""
        self._server = uvicorn.Server(uvicorn.Config(self.router, host=self.host, port=self.port,
                                                     log_level="warning", lifespan="on"))
        self._server.install_signal_handlers = lambda: None  # the caller owns signals
        server_task = asyncio.ensure_future(self._server.serve())
        try:
            await self._start_monitoring()
            await self.scale_to(self.desired, [])
            if self.desired:  # from zero, the first replica starts for the first held request
                await self._wait_first_ready(stop)
                if self.calibrate and self.enabled:
                    await self._calibrate(self._routable()[0])
            self.started.set()
            await self._control_loop(stop)
        finally:
            await self.shutdown()
            self._server.should_exit = True
            await server_task

    async def shutdown(self) -> None:
        await asyncio.gather(*(self._drain(r) for r in self.replicas if not r.draining), *self._drains,
                             return_exceptions=True)
        await self.client.aclose()
        if self.prometheus is not None:
            await asyncio.to_thread(self.prometheus.stop)
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            server.server_close()
            thread.join()
            self._metrics_server = None

    async def _start_monitoring(self) -> None:
        if self.metrics_port:
            self._metrics_server = prometheus_client.start_http_server(self.metrics_port, addr=self.host,
                                                                       registry=self.metrics.registry)
            log.info("autoscaler metrics at http://%s:%d/metrics", self.host, self.metrics_port)
        if self.prometheus is not None:
            self._write_targets()
            try:
                await asyncio.to_thread(self.prometheus.start)
                log.info("Prometheus at %s (data and log in %s)", self.prometheus.url, self.prometheus.directory)
            except PrometheusUnavailable as exc:
                log.warning("no local Prometheus: %s", exc)
                self.prometheus = None

    def _write_targets(self) -> None:
        """The workers as a cluster's PodMonitor would label them; a replica is scraped until its process is
        gone (draining included), as a terminating pod is."""
        groups = [([f"127.0.0.1:{r.port}"], {"namespace": self.namespace, "llmdeployment": self.name,
                                              "pod": r.name, "container": "worker"})
                  for r in self.replicas if not r.exited]
        if self.prometheus is not None and groups != self._targets_written:
            write_targets(self.prometheus.jobs[0].targets_file, groups)
            self._targets_written = groups

    async def _wait_first_ready(self, stop: asyncio.Event) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._routable():
            await self._check_replicas()
            if stop.is_set():
                return
            if time.monotonic() > deadline:
                raise LocalRuntimeError(f"no replica became ready within {self.startup_timeout_s:.0f} s "
                                    f"(engine.startupTimeoutSeconds); logs in {self.log_dir}")
            await asyncio.sleep(0.25)

    def _routable(self) -> list[WorkerProcess]:
        return [r for r in self.replicas if r.routable]

    async def _check_replicas(self) -> None:
        """Readiness of starting replicas; a replica that died or never got ready is replaced."""
        for r in list(self.replicas):
            if r.draining:
                continue
            was_ready = r.ready_at is not None
            if await r.check_ready(self.client) and not was_ready:
                self._last_startup = r.ready_at - r.created_at
                log.info("%s ready after %.1f s", r.name, self._last_startup)
            if r.exited:
                log.error("%s exited with code %s; last log lines:\n%s", r.name, r.process.returncode, r.log_tail())
                self.replicas.remove(r)
                self.retired.append((r.name, r.process.returncode))
            elif r.ready_at is None and time.time() - r.created_at > self.startup_timeout_s:
                log.error("%s not ready after %.0f s; replacing it", r.name, self.startup_timeout_s)
                self.replicas.remove(r)
                self._start_drain(r)
        missing = self.desired - len([r for r in self.replicas if not r.draining])
        for _ in range(max(0, missing)):
            await self._start_replica()
        self._update_router()

    def _update_router(self) -> None:
        """What EndpointSlices are in a cluster: every live replica, routable while ready and not draining."""
        self.router.update([Endpoint(r.name, r.url, r.routable) for r in self.replicas])

    # --- actuators -------------------------------------------------------------------------------------

    async def _start_replica(self) -> None:
        self._serial += 1
        replica = WorkerProcess(f"{self.name}-{self._serial}", self.log_dir)
        args = deployment.worker_args(self.llmd, replica.port, replica.admin_port, *self.limits,
                                      admin_token_file=str(self.admin_token_file))
        await replica.start(args, self.threads)
        replica.limits_pushed = self.limits
        self.replicas.append(replica)
        self._write_targets()
        log.info("started %s (port %d, admin %d)", replica.name, replica.port, replica.admin_port)

    async def scale_to(self, target: int, drain_first: list[str]) -> None:
        live = [r for r in self.replicas if not r.draining]
        for _ in range(target - len(live)):
            await self._start_replica()
        excess = len(live) - target
        if excess > 0:
            by_name = {r.name: r for r in live}
            for view in drain_order(self._views(live, time.time()), drain_first)[:excess]:
                self._start_drain(by_name[view.name])
        self.desired = target

    def _in_flight(self, replica: WorkerProcess) -> int:
        load = self.router.loads.get(replica.name)
        return load.in_flight if load is not None else 0

    def _start_drain(self, replica: WorkerProcess) -> None:
        replica.draining = True
        self._update_router()  # the router stops sending it requests at once
        task = asyncio.ensure_future(self._drain(replica))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, replica: WorkerProcess) -> None:
        code = await replica.drain(self.drain_timeout_s)
        if replica in self.replicas:
            self.replicas.remove(replica)
            self._update_router()
        self.retired.append((replica.name, code))
        log.info("%s drained (exit code %s)", replica.name, code)

    # --- the loop --------------------------------------------------------------------------------------

    def _views(self, live: list[WorkerProcess], now: float) -> list[ReplicaView]:
        return [ReplicaView(r.name, r.ready, now - r.created_at, outstanding=self._in_flight(r),
                            limits=r.limits_pushed) for r in live]

    async def _sample(self, replica: WorkerProcess, now: float) -> ReplicaSample:
        metrics = None
        if replica.ready:
            try:
                response = await self.client.get(f"{replica.url}/metrics")
                response.raise_for_status()
                metrics = parse_exposition(response.text)
            except (httpx.HTTPError, MetricsParseError) as exc:
                log.warning("%s: metrics unavailable (%s)", replica.name, exc)
        return ReplicaSample(replica.name, now, replica.ready, replica.created_at, metrics)

    async def _control_loop(self, stop: asyncio.Event) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            next_at += self.config.interval_s
            while time.monotonic() < next_at and not stop.is_set():
                if self.router.held and not self.desired and self.enabled and not self.config.advisory:
                    break  # requests wait at zero replicas: decide now, not at the end of the interval
                await self._check_replicas()
                self._write_targets()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=min(1.0, max(0.0, next_at - time.monotonic())))
            if not stop.is_set():
                await self.control_once()

    async def control_once(self) -> Decision:
        """One tick of the product's control loop, with this runtime as its sensor and actuator."""
        loop = ControlLoop(self.policy, self, self, acting=self.enabled,
                           manages_limits=autoscaler_runs_batch_limits(self.spec))
        tick = await loop.tick(time.time())
        decision, obs = tick.decision, tick.observation
        details = decision.details
        # The point shows the state the decision left: replicas and limits as set, latency as observed.
        point = TimelinePoint(obs.time, self.desired, obs.ready_replicas, *self.limits, details.get("ttft_p"),
                              details.get("tpot_p"), details.get("window_attainment"), obs.waiting, obs.running,
                              details.get("rate"), decision.action, decision.reason, obs.stale, obs.mbu,
                              {k: v for k, v in details.items() if isinstance(v, (int, float, str, type(None)))})
        self.timeline.append(point)
        self.decisions.append(decision)
        if self.on_decision:
            self.on_decision(decision, point)
        return decision

    # The control loop's sensor and actuator (tideserve.autoscaler.control_loop).

    async def fleet(self, now: float) -> Fleet:
        self._live = [r for r in self.replicas if not r.draining]
        return Fleet(self._views(self._live, now), self.desired, self.limits)

    async def observe(self, now: float, fleet: Fleet, pending_replicas: int) -> Observation:
        self._samples = list(await asyncio.gather(*(self._sample(r, now) for r in self._live)))
        obs = self.aggregator.observe(now, self._samples, desired_replicas=self.desired,
                                      pending_replicas=pending_replicas, max_num_seqs=self.limits[0],
                                      max_num_batched_tokens=self.limits[1], replica_startup_s=self._last_startup,
                                      held_requests=self.router.held)
        self._last_startup = None
        return obs

    async def push_limits(self, limits: Limits, replicas: list[str]) -> None:
        self.limits = limits  # replicas started from now on get them on their command line
        body = {"max_num_seqs": limits[0], "max_num_batched_tokens": limits[1]}
        for r in self.replicas:
            if r.name not in replicas:
                continue
            try:
                response = await self.client.put(f"{r.admin_url}/admin/batch-limits", json=body,
                                                 headers=self._admin_headers)
                response.raise_for_status()
                r.limits_pushed = limits
            except httpx.HTTPError as exc:
                log.warning("%s: batch limits not applied (%s); retrying next interval", r.name, exc)

    async def report(self, tick: Tick) -> None:
        decision, obs = tick.decision, tick.observation
        self.conditions = loop_status.merge_conditions(
            self.conditions, loop_status.loop_conditions(decision, obs, self.config, self.conditions, None,
                                                         datetime.datetime.now(datetime.timezone.utc)))
        self.metrics.record(self.namespace, self.name, decision, obs,
                            sum(1 for s in self._samples if s.ready and s.metrics is None), self.config,
                            self.conditions)
        if decision.action != "hold" or obs.stale:
            log.info("%s: %s", decision.action, decision.reason)

    async def scale(self, replicas: int, drain: list[str]) -> bool:
        await self.scale_to(replicas, drain)
        return True

    # --- bootstrap profile -----------------------------------------------------------------------------

    async def _calibrate(self, replica: WorkerProcess) -> None:
        """Fit the step-time model on this machine: rounds of concurrent requests straight to one replica,
        each read back as a window of the worker's step statistics."""
        info = (await self.client.get(f"{replica.admin_url}/admin/batch-limits", headers=self._admin_headers)).json()
        points = []
        model = self.spec["model"]["name"]
        rng = random.Random(0)
        await self._calibration_round(replica, model, rng, *CALIBRATION_ROUNDS[0])  # warm-up: first calls are slow
        for batch, prompt_tokens, output_tokens in CALIBRATION_ROUNDS:
            window = await self._calibration_round(replica, model, rng, batch, prompt_tokens, output_tokens)
            if window is None:
                continue
            step_s, seqs, tokens = window
            # As the policy reads step windows: each sequence computes one token a step, the rest is prefill.
            context = seqs * (prompt_tokens + output_tokens / 2)
            points.append((step_s, seqs, context, max(0.0, tokens - seqs)))
        self.profile = fit_step_params(points, int(info.get("kv_cache_tokens", 10**6)),
                                       self.config.bootstrap.max_num_seqs, self.config.bootstrap.max_num_batched_tokens)
        self.config = dataclasses.replace(self.config, bootstrap=self.profile)
        self.policy = TideservePolicy(self.config)
        log.info("bootstrap profile: step = %.1f ms + %.2f ms/seq + %.3f us/context token + %.1f us/prefill token",
                 self.profile.base_s * 1e3, self.profile.per_seq_s * 1e3, self.profile.per_context_token_s * 1e6,
                 self.profile.per_prefill_token_s * 1e6)

    async def _calibration_round(self, replica: WorkerProcess, model: str, rng: random.Random, batch: int,
                                 prompt_tokens: int, output_tokens: int) -> tuple[float, float, float] | None:
        """`batch` concurrent requests; the window's mean step time, sequences and tokens per step."""
        before = await self._step_totals(replica)
        await asyncio.gather(*(self.client.post(
            f"{replica.url}/v1/completions", timeout=120.0,
            json={"model": model, "prompt": make_prompt(prompt_tokens, rng),
                  "max_tokens": output_tokens, "ignore_eos": True}) for _ in range(batch)))
        after = await self._step_totals(replica)
        steps = after[0] - before[0]
        if steps <= 0:
            return None
        return (after[1] - before[1]) / steps, (after[2] - before[2]) / steps, (after[3] - before[3]) / steps

    async def _step_totals(self, replica: WorkerProcess) -> tuple[float, float, float, float]:
        response = await self.client.get(f"{replica.url}/metrics")
        snapshot = parse_exposition(response.text)
        step, seqs, tokens = (snapshot.histograms[n] for n in (STEP_SECONDS, STEP_SEQUENCES, STEP_TOKENS))
        return step.count, step.total, seqs.total, tokens.total
