"""The closed loop in the cluster: one asyncio task per LLMDeployment with spec.autoscaling.mode advisory or active.

Each interval (spec.autoscaling.intervalSeconds) the loop reads the LLMDeployment and its pods, collects the
ready pods' metrics (their /metrics, or Prometheus when --prometheus-url is set), turns them into one
Observation (tideserve.autoscaler.scrape.WindowAggregator), asks the policy, and in mode active applies the
Decision: new batch limits are PUT to every ready tideserve pod whose reported limits differ (so a new pod gets
them within one interval of becoming ready, with no restart of the others and no change to the pod template);
a replica change drains first (the pods the policy chose get a low controller.kubernetes.io/pod-deletion-cost,
so the ReplicaSet deletes those) and then writes spec.replicas through the scale subresource, under a
resourceVersion precondition, after the decision and its reason are in status. Everything lands in status (autoscaler_status.py), in Events on changes, and in
the operator's own metrics (autoscaler_metrics.py); what the policy learned is saved to a ConfigMap
(autoscaler_state.py) every few minutes and when the loop stops, and loaded when it starts.

Why not a kopf timer or daemon: kopf puts a finalizer on every object a timer or daemon serves (it must see
the deletion to stop the task), and this operator never blocks an LLMDeployment's deletion. The loops are
plain tasks instead, started and stopped from the LLMDeployment's watch events (handlers.py): an event with mode
advisory/active starts one, mode off or DELETED stops it, and a loop that finds its object gone exits by itself.
kopf's peering does not pause tasks it did not start, so with --peering the loop acts only while no live peer
has a priority at least as high as this operator's (kopf's own rule, read from the peering object).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import kopf
from kubernetes.client.exceptions import ApiException

from tideserve.autoscaler.control_loop import ControlLoop, Fleet, Tick
from tideserve.autoscaler.observation import Decision, Observation
from tideserve.autoscaler.policy import PolicyConfig, TideservePolicy
from tideserve.autoscaler.scrape import ReplicaSample, WindowAggregator
from tideserve.autoscaler.spec import autoscaling_mode, initial_batch_limits, policy_config
from tideserve.operator.admin_token import AdminKey
from tideserve.operator import autoscaler_state, autoscaler_status as loop_status, manifests, metrics_source as source
from tideserve.operator.autoscaler_metrics import AutoscalerMetrics
from tideserve.operator.manifests import is_owned_by, label_selector
from tideserve.operator.reconcile import children, llmdeployment_path
from tideserve.operator.resource import API_VERSION, KIND, defaulted
from tideserve.operator.status import autoscaler_runs_batch_limits, batch_limits
from tideserve.operator.validation import validate

log = logging.getLogger("tideserve.operator.autoscaler")

MODES = ("advisory", "active")
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
DRAIN_ANNOTATION = "tideserve.io/drain"  # marks the deletion costs this operator set, to take them back
DRAIN_DELETION_COST = "-1000"
CONFLICT_RETRIES = 3
# At zero replicas the only signal is the router's hold queue: read it this often, whatever the interval, so
# that a held request starts the first replica within seconds.
ZERO_POLL_SECONDS = 5.0
HELD = "tideserve_router_queue_requests"


@dataclass(frozen=True)
class PeeringSettings:
    name: str
    identity: str
    priority: int = 0
    clusterwide: bool = True


@dataclass(frozen=True)
class AutoscalerOptions:
    """Operator-wide settings of the loops (flags of `tideserve operator`)."""

    prometheus_url: str | None = None
    prometheus_namespace_label: str = "namespace"
    prometheus_pod_label: str = "pod"
    scrape_timeout_s: float = 5.0
    state_save_interval_s: float = 300.0
    peering: PeeringSettings | None = None


def peering_allows(peers: dict[str, Any], identity: str, priority: int, now: datetime.datetime) -> bool:
    """kopf's pausing rule on a peering object's status ({identity: {priority, lifetime, lastseen}}): act only
    while no other live peer has a higher or the same priority."""
    for other, info in peers.items():
        if other == identity or not isinstance(info, dict):
            continue
        lastseen = source.parse_time(info.get("lastseen"))
        if lastseen is None or lastseen + float(info.get("lifetime", 60)) <= now.timestamp():
            continue  # dead
        if int(info.get("priority", 0)) >= priority:
            return False
    return True


class PeeringGate:
    """Reads the kopf peering object (cached a few seconds) and applies peering_allows."""

    def __init__(self, kube, settings: PeeringSettings, cache_s: float = 5.0):
        self.kube, self.settings, self.cache_s = kube, settings, cache_s
        self._cache: dict[str | None, tuple[float, bool]] = {}

    def _path(self, namespace: str) -> str:
        if self.settings.clusterwide:
            return f"/apis/kopf.dev/v1/clusterkopfpeerings/{self.settings.name}"
        return f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/{self.settings.name}"

    async def allows(self, namespace: str) -> bool:
        key = None if self.settings.clusterwide else namespace
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached and now - cached[0] < self.cache_s:
            return cached[1]
        try:
            body = await asyncio.to_thread(self.kube.get, self._path(namespace))
        except ApiException as exc:
            log.warning("cannot read the peering object %s: %s", self._path(namespace), exc.status)
            body = None
        allowed = body is not None and peering_allows(body.get("status", {}) or {}, self.settings.identity,
                                                      self.settings.priority, datetime.datetime.now(datetime.timezone.utc))
        self._cache[key] = (now, allowed)
        return allowed


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def _limits_dict(limits: tuple[int, int] | None) -> dict[str, int] | None:
    return dict(zip(("maxNumSeqs", "maxNumBatchedTokens"), limits)) if limits else None


def replace_patch(current: Any, desired: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that makes a map equal to `desired`: keys it no longer has are removed (null)."""
    patch: dict[str, Any] = {key: None for key in (current if isinstance(current, dict) else {}) if key not in desired}
    for key, value in desired.items():
        old = current.get(key) if isinstance(current, dict) else None
        if isinstance(value, dict) and isinstance(old, dict):
            sub = replace_patch(old, value)
            if sub:
                patch[key] = sub
        elif old != value:
            patch[key] = value
    return patch


@dataclass
class _Memory:
    """What one loop remembers between intervals besides the policy."""

    last_tick: float | None = None
    recommendation: int | None = None
    saved_text: str | None = None
    saved_at: float = 0.0
    persist: bool = True
    loaded: bool = False
    restored: list[str] = field(default_factory=list)


@dataclass
class _Interval:
    """One interval of the loop: what it read first, and what its sensing found, for its actuation."""

    llmd: dict[str, Any]
    mode: str
    interval: float
    runs_limits: bool
    now: float = 0.0
    pods: list[dict[str, Any]] = field(default_factory=list)
    ready: list[dict[str, Any]] = field(default_factory=list)
    collected: source.Collected | None = None


class DeploymentLoop:
    def __init__(self, autoscaler: "Autoscaler", namespace: str, name: str, after: asyncio.Task | None = None):
        self.autoscaler, self.namespace, self.name = autoscaler, namespace, name
        self.after = after  # a stopping loop of the same object, to let finish first
        self.policy: TideservePolicy | None = None
        self.config: PolicyConfig | None = None
        self.aggregator = WindowAggregator()
        self.memory = _Memory()
        self.stopping = asyncio.Event()
        self.release_on_stop = False  # mode turned off: give the pods the spec's limits back
        self.gone = False
        self.task: asyncio.Task | None = None
        self.ticks = 0
        self._interval: _Interval | None = None

    @property
    def kube(self):
        return self.autoscaler.kube

    def _path(self, subresource: str = "") -> str:
        return llmdeployment_path(self.namespace, self.name, subresource)

    def _event(self, llmd: dict[str, Any], event: loop_status.LoopEvent) -> None:
        meta = llmd["metadata"]
        ref = {"apiVersion": API_VERSION, "kind": KIND,
               "metadata": {"namespace": self.namespace, "name": self.name, "uid": meta.get("uid")}}
        try:
            kopf.event(ref, type=event.type, reason=event.reason, message=event.message)
        except LookupError:  # outside kopf's context (unit tests): the log still has it
            pass
        log.info("%s/%s: %s %s", self.namespace, self.name, event.reason, event.message)

    # --- the task -----------------------------------------------------------------------------------------

    async def run(self) -> None:
        if self.after is not None:
            await asyncio.wait([self.after])
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                interval = await self._tick_safely()
                if interval is None:
                    break
                remaining = interval - (time.monotonic() - started)
                if remaining > 0:
                    try:
                        await asyncio.wait_for(self.stopping.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
        finally:
            await self._finish()

    async def _tick_safely(self) -> float | None:
        try:
            return await self.tick()
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad interval must not end the loop
            log.exception("%s/%s: autoscaling interval failed", self.namespace, self.name)
            return 5.0

    async def _finish(self) -> None:
        try:
            if not self.gone:
                raw = await asyncio.to_thread(self.kube.get, self._path())
                if raw is not None and not raw["metadata"].get("deletionTimestamp"):
                    llmd = defaulted(raw)
                    await self.save(llmd, force=True)
                    if self.release_on_stop:
                        await self.release(llmd)
        except Exception:
            log.exception("%s/%s: stopping the autoscaling loop", self.namespace, self.name)
        finally:
            self.autoscaler.metrics.forget(self.namespace, self.name)

    # --- one interval ---------------------------------------------------------------------------------------

    async def tick(self) -> float | None:
        """One interval; returns the seconds until the next one, or None when the loop should end."""
        raw = await asyncio.to_thread(self.kube.get, self._path())
        if raw is None or raw["metadata"].get("deletionTimestamp"):
            self.gone = True
            return None
        llmd = defaulted(raw)
        spec = llmd["spec"]
        mode = autoscaling_mode(spec)
        if mode not in MODES:
            self.release_on_stop = True
            return None
        interval = float(spec["autoscaling"]["intervalSeconds"])
        if validate(llmd):
            return interval  # reconcile reports InvalidSpec; nothing to decide on
        gate = self.autoscaler.peering_gate
        if gate is not None and not await gate.allows(self.namespace):
            # A standby keeps no learned state of its own: when it takes over it reads what the active operator
            # saved, and it can never save (save() needs a policy) what it knew when it started over that.
            self.policy = None
            return interval
        if not await self._ensure_policy(llmd):
            return interval
        runs_limits = autoscaler_runs_batch_limits(spec)
        self._interval = _Interval(llmd, mode, interval, runs_limits)
        loop = ControlLoop(self.policy, self, self, acting=mode == "active", manages_limits=runs_limits)
        tick = await loop.tick(time.time())
        self.ticks += 1
        llmd, decision, obs = self._interval.llmd, tick.decision, tick.observation
        before = _limits_dict(tick.fleet.limits) if runs_limits else None
        after = _limits_dict(tick.actuation.limits) if runs_limits else None
        for event in loop_status.decision_events(decision, mode, spec["replicas"], tick.actuation.scaled,
                                                 self.memory.recommendation, before, after):
            self._event(llmd, event)
        self.memory.recommendation = decision.replicas
        collected = self._interval.collected
        self.autoscaler.metrics.record(self.namespace, self.name, decision, obs,
                                       len([p for p in self._interval.ready
                                            if p["metadata"]["name"] in collected.errors]),
                                       self.config, llmd.get("status", {}).get("conditions", []))
        await self.save(llmd)
        return min(interval, ZERO_POLL_SECONDS) if decision.replicas == 0 else interval

    # --- the control loop's sensor and actuator (tideserve.autoscaler.control_loop), for one interval -------

    async def fleet(self, now: float) -> Fleet:
        """The worker pods and what they report (their metrics are read here: the limits they run decide
        which need a push)."""
        state, llmd = self._interval, self._interval.llmd
        spec = llmd["spec"]
        pods = [p for p in await self._owned_pods() if not source.is_terminating(p)]
        ready = [p for p in pods if source.is_ready(p)]
        collected = await self.autoscaler.collect(self.namespace, ready, state.interval)
        state.pods, state.ready, state.collected, state.now = pods, ready, collected, now
        limits = None  # vLLM, or the spec's limits that the pods started with: nothing to push
        if state.runs_limits:
            limits = batch_limits(llmd)
        elif spec["engine"]["kind"] == "tideserve" and llmd.get("status", {}).get("autoscaling", {}).get("batchLimits"):
            limits = dict(zip(("maxNumSeqs", "maxNumBatchedTokens"), initial_batch_limits(spec)))  # after active
        views = [source.replica_view(p, now, collected.snapshots.get(p["metadata"]["name"])) for p in pods]
        return Fleet(views, spec["replicas"], (limits["maxNumSeqs"], limits["maxNumBatchedTokens"]) if limits else None)

    async def observe(self, now: float, fleet: Fleet, pending_replicas: int) -> Observation:
        state, spec = self._interval, self._interval.llmd["spec"]
        collected = state.collected
        samples = [ReplicaSample(p["metadata"]["name"], collected.times.get(p["metadata"]["name"], now),
                                 source.is_ready(p), source.started_at(p),
                                 collected.snapshots.get(p["metadata"]["name"])) for p in state.pods]
        seqs, tokens = fleet.limits or initial_batch_limits(spec)
        obs = self.aggregator.observe(
            now, samples, desired_replicas=spec["replicas"], pending_replicas=pending_replicas,
            max_num_seqs=seqs, max_num_batched_tokens=tokens,
            replica_startup_s=source.newest_startup_s(state.pods, self.memory.last_tick),
            held_requests=await self._held_requests(spec))
        self.memory.last_tick = now
        return obs

    async def push_limits(self, limits: tuple[int, int], replicas: list[str]) -> None:
        await self._push_limits(self._interval.llmd, [p for p in self._interval.ready
                                                         if p["metadata"]["name"] in replicas], limits)

    async def report(self, tick: Tick) -> None:
        """The reasoning goes to status first, so that reconcile finds it when it carries the new replicas to
        the Deployment (status.lastScalingDecision, the Scaled event)."""
        state = self._interval
        limits = _limits_dict(tick.actuation.limits) if state.runs_limits else None
        state.llmd = await self._write_status(state.llmd, tick.decision, tick.observation, state.mode,
                                                 limits, _utc(state.now))

    async def scale(self, replicas: int, drain: list[str]) -> bool:
        return await self._scale(self._interval.llmd, replicas, drain, self._interval.pods)

    async def _held_requests(self, spec: dict[str, Any]) -> float:
        """Requests the router pods hold for lack of a ready worker (read from each ready router pod of the
        router Deployment directly, also when worker metrics come from Prometheus: this must not wait for a
        scrape)."""
        if not manifests.router_enabled(spec):
            return 0.0
        selector = ",".join(f"{k}={v}" for k, v in manifests.router_selector_labels(self.name).items())
        ready = [p for p in await self._pods_of("RouterDeployment", selector) if source.is_ready(p)]
        if not ready:
            return 0.0
        collected = await source.scrape_pods(await self.autoscaler.http(), ready,
                                             self.autoscaler.options.scrape_timeout_s)
        return sum(snapshot.value(HELD) or 0.0 for snapshot in collected.snapshots.values())

    async def _owned_pods(self) -> list[dict[str, Any]]:
        """The worker pods, as far as the Deployment's own ReplicaSets vouch for them (see source.owned_pods)."""
        return await self._pods_of("Deployment", label_selector(self.name))

    async def _pods_of(self, child: str, selector: str) -> list[dict[str, Any]]:
        """The pods of one of the LLMDeployment's Deployments (children() key `child`), as far as that
        Deployment's own ReplicaSets vouch for them: a pod that only copies the labels has no say."""
        pods, replicasets, deployment = await asyncio.gather(
            asyncio.to_thread(self.kube.list, f"/api/v1/namespaces/{self.namespace}/pods", selector),
            asyncio.to_thread(self.kube.list, f"/apis/apps/v1/namespaces/{self.namespace}/replicasets", selector),
            asyncio.to_thread(self.kube.get, children(self.namespace, self.name)[child].path))
        return source.owned_pods(pods, replicasets, deployment)

    async def _ensure_policy(self, llmd: dict[str, Any]) -> bool:
        """Build the policy from the spec, or rebuild it when the spec's autoscaling settings changed, keeping
        what it learned (loaded from the ConfigMap the first time)."""
        try:
            config = policy_config(llmd["spec"])
        except ValueError as exc:
            log.warning("%s/%s: cannot autoscale: %s", self.namespace, self.name, exc)
            return False
        if self.policy is not None and config == self.config:
            return True
        saved = self.policy.state_dict() if self.policy is not None else await self._load(llmd)
        self.policy, self.config = TideservePolicy(config), config
        if saved is not None:
            dropped = autoscaler_state.restore(self.policy, saved)
            self.memory.loaded, self.memory.restored = True, dropped
            if dropped:
                log.info("%s/%s: autoscaler state restored without %s", self.namespace, self.name, ", ".join(dropped))
        return True

    # --- actuation ------------------------------------------------------------------------------------------

    async def _push_limits(self, llmd: dict[str, Any], targets: list[dict[str, Any]], limits: tuple[int, int]) -> None:
        """PUT the limits to these pods. A pod that refuses the current key's token gets the previous key's
        (its Secret volume is not synced yet)."""
        if not targets:
            return
        client = await self.autoscaler.http()
        timeout_s = self.autoscaler.options.scrape_timeout_s
        tokens = self.autoscaler.admin_key.tokens(self.namespace, self.name, llmd["metadata"]["uid"])
        results: list[str | None] = [source.UNAUTHORIZED] * len(targets)
        for token in tokens:
            refused = [i for i, error in enumerate(results) if error == source.UNAUTHORIZED]
            if not refused:
                break
            pushed = await asyncio.gather(*(source.put_batch_limits(client, targets[i], *limits, timeout_s, token)
                                            for i in refused))
            for i, error in zip(refused, pushed):
                results[i] = error
        failed = [(pod["metadata"]["name"], error) for pod, error in zip(targets, results) if error]
        for pod, error in failed:
            log.warning("%s/%s: batch limits not applied to pod %s: %s", self.namespace, self.name, pod, error)
        self.autoscaler.metrics.pushed(self.namespace, self.name, len(targets) - len(failed), len(failed))

    async def _mark_drain(self, pods: list[dict[str, Any]], drain: list[str]) -> None:
        """Lowest deletion cost on the pods chosen to go; marks from earlier decisions are taken back."""
        for pod in pods:
            name = pod["metadata"]["name"]
            annotations = pod["metadata"].get("annotations", {}) or {}
            if name in drain and annotations.get(DELETION_COST_ANNOTATION) != DRAIN_DELETION_COST:
                patch = {DELETION_COST_ANNOTATION: DRAIN_DELETION_COST, DRAIN_ANNOTATION: "true"}
            elif name not in drain and DRAIN_ANNOTATION in annotations:
                patch = {DELETION_COST_ANNOTATION: None, DRAIN_ANNOTATION: None}
            else:
                continue
            try:
                await asyncio.to_thread(self.kube.merge_patch, f"/api/v1/namespaces/{self.namespace}/pods/{name}",
                                        {"metadata": {"annotations": patch}})
            except ApiException as exc:
                if exc.status != 404:  # a pod that is already gone needs no mark
                    raise

    async def _scale(self, llmd: dict[str, Any], replicas: int, drain: list[str], pods: list[dict[str, Any]]) -> bool:
        """spec.replicas through the scale subresource (what `kubectl scale` and an HPA use: the only field this
        write can touch), under a resourceVersion precondition; a conflict re-reads and goes again only while
        spec.replicas is still what the decision was made from."""
        based_on = llmd["spec"]["replicas"]
        if replicas < based_on:
            await self._mark_drain(pods, drain)
        raw = llmd
        for _ in range(CONFLICT_RETRIES):
            patch = {"metadata": {"resourceVersion": raw["metadata"]["resourceVersion"]},
                     "spec": {"replicas": replicas}}
            try:
                await asyncio.to_thread(self.kube.merge_patch, self._path("scale"), patch)
                return True
            except ApiException as exc:
                if exc.status != 409:
                    raise
            raw = await asyncio.to_thread(self.kube.get, self._path())
            if raw is None or raw["spec"].get("replicas", 1) != based_on:
                break
        return False

    # --- status ---------------------------------------------------------------------------------------------

    async def _patch_status(self, llmd: dict[str, Any], build) -> dict[str, Any]:
        """Patch status with what build(llmd) returns (None: nothing to write) under a resourceVersion
        precondition; a conflict (reconcile or kopf wrote in between) re-reads and builds again. Returns the
        LLMDeployment as written, or as last read."""
        for _ in range(CONFLICT_RETRIES):
            patch = build(llmd)
            if not patch:
                return llmd
            body = {"metadata": {"resourceVersion": llmd["metadata"]["resourceVersion"]}, "status": patch}
            try:
                return defaulted(await asyncio.to_thread(self.kube.merge_patch, self._path("status"), body))
            except ApiException as exc:
                if exc.status != 409:
                    raise
            raw = await asyncio.to_thread(self.kube.get, self._path())
            if raw is None:
                return llmd
            llmd = defaulted(raw)
        log.info("%s/%s: status kept changing under the autoscaler; next interval", self.namespace, self.name)
        return llmd

    async def _write_status(self, llmd: dict[str, Any], decision: Decision, obs: Observation, mode: str,
                            limits: dict[str, int] | None, now: datetime.datetime) -> dict[str, Any]:
        """The loop's status fields, merged into the status as it is (see autoscaler_status), with events for
        the conditions that turned."""
        autoscaling = loop_status.autoscaling_status(decision, obs, self.config, mode, limits, now)
        latency = loop_status.latency_p90(obs, now)
        turned: list[loop_status.LoopEvent] = []

        def build(current: dict[str, Any]) -> dict[str, Any]:
            status = current.get("status", {})
            previous = status.get("conditions", [])
            ours = loop_status.loop_conditions(decision, obs, self.config, previous,
                                               current["metadata"].get("generation"), now)
            turned[:] = loop_status.condition_events(previous, ours)
            conditions = loop_status.merge_conditions(previous, ours)
            patch: dict[str, Any] = {}
            auto_patch = replace_patch(status.get("autoscaling"), autoscaling)
            if auto_patch:
                patch["autoscaling"] = auto_patch
            if latency and latency != status.get("metrics"):
                patch["metrics"] = latency
            if conditions != previous:
                patch["conditions"] = conditions
            expected = batch_limits({**current, "status": {**status, "autoscaling": autoscaling}})
            if status.get("batchLimits") != expected:
                patch["batchLimits"] = expected
            return patch

        written = await self._patch_status(llmd, build)
        for event in turned:
            self._event(written, event)
        return written

    async def release(self, llmd: dict[str, Any]) -> None:
        """Autoscaling turned off: the pods get the spec's batch limits back, the loop's status goes."""
        limits = llmd.get("status", {}).get("autoscaling", {}).get("batchLimits")
        spec = dict(zip(("maxNumSeqs", "maxNumBatchedTokens"), initial_batch_limits(llmd["spec"])))
        if limits and limits != spec and llmd["spec"]["engine"]["kind"] == "tideserve":
            pods = await self._owned_pods()
            await self._push_limits(llmd, [p for p in pods if source.is_ready(p)],
                                    (spec["maxNumSeqs"], spec["maxNumBatchedTokens"]))

        def build(current: dict[str, Any]) -> dict[str, Any]:
            status = current.get("status", {})
            patch: dict[str, Any] = {}
            if "autoscaling" in status:
                patch["autoscaling"] = None
            if status.get("batchLimits") != spec:
                patch["batchLimits"] = spec
            conditions = loop_status.without_loop_conditions(status.get("conditions", []))
            if conditions != status.get("conditions", []):
                patch["conditions"] = conditions
            return patch

        await self._patch_status(llmd, build)

    # --- persistence ----------------------------------------------------------------------------------------

    def _configmap_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/configmaps/{autoscaler_state.configmap_name(self.name)}"

    async def _load(self, llmd: dict[str, Any]) -> dict[str, Any] | None:
        configmap = await asyncio.to_thread(self.kube.get, self._configmap_path())
        if configmap is None:
            return None
        if not is_owned_by(configmap, llmd):
            self.memory.persist = False
            self._event(llmd, loop_status.LoopEvent(
                "Warning", "StateNotPersisted", f"ConfigMap {configmap['metadata']['name']} exists and is not owned "
                "by this LLMDeployment: the autoscaler will not read or write it"))
            return None
        text = (configmap.get("data") or {}).get(autoscaler_state.STATE_KEY)
        try:
            saved = autoscaler_state.loads(text) if text else None
        except ValueError as exc:
            log.warning("%s/%s: ignoring unreadable autoscaler state: %s", self.namespace, self.name, exc)
            return None
        self.memory.saved_text = text
        return saved

    async def save(self, llmd: dict[str, Any], force: bool = False) -> None:
        if self.policy is None or not self.memory.persist:
            return
        now = time.monotonic()
        if not force and now - self.memory.saved_at < self.autoscaler.options.state_save_interval_s:
            return
        self.memory.saved_at = now
        text = autoscaler_state.dumps(self.policy.state_dict())
        if text == self.memory.saved_text:
            return
        try:
            await asyncio.to_thread(self.kube.merge_patch, self._configmap_path(), {"data": {autoscaler_state.STATE_KEY: text}})
        except ApiException as exc:
            if exc.status != 404:
                raise
            await asyncio.to_thread(self.kube.create, f"/api/v1/namespaces/{self.namespace}/configmaps",
                                    autoscaler_state.state_configmap(llmd, text))
        self.memory.saved_text = text


class Autoscaler:
    """The supervisor: one DeploymentLoop per LLMDeployment that wants one; shared HTTP client, admin key and
    metrics."""

    def __init__(self, kube, admin_key: AdminKey, options: AutoscalerOptions | None = None,
                 metrics: AutoscalerMetrics | None = None):
        self.kube = kube
        self.admin_key = admin_key
        self.options = options or AutoscalerOptions()
        self.metrics = metrics or AutoscalerMetrics()
        self.loops: dict[tuple[str, str], DeploymentLoop] = {}
        self.peering_gate = PeeringGate(kube, self.options.peering) if self.options.peering else None
        self._client: httpx.AsyncClient | None = None

    async def http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient()
        return self._client

    async def collect(self, namespace: str, ready: list[dict[str, Any]], interval: float) -> source.Collected:
        timeout = min(self.options.scrape_timeout_s, max(0.5, 0.8 * interval))
        client = await self.http()
        if self.options.prometheus_url:
            return await source.query_prometheus(client, self.options.prometheus_url, namespace, ready, timeout,
                                                 self.options.prometheus_namespace_label,
                                                 self.options.prometheus_pod_label)
        return await source.scrape_pods(client, ready, timeout)

    def sync(self, namespace: str, name: str, body: dict[str, Any] | None, deleted: bool = False) -> None:
        """Called on every watch event of an LLMDeployment: start, keep or stop its loop."""
        key = (namespace, name)
        meta = (body or {}).get("metadata", {})
        wanted = (not deleted and body is not None and not meta.get("deletionTimestamp")
                  and autoscaling_mode((body or {}).get("spec", {})) in MODES)
        loop = self.loops.get(key)
        if loop is not None and loop.task is not None and loop.task.done():
            self.loops.pop(key)
            loop = None
        if wanted and (loop is None or loop.stopping.is_set()):
            loop = self.loops[key] = DeploymentLoop(self, namespace, name, after=loop.task if loop else None)
            loop.task = asyncio.get_running_loop().create_task(loop.run(), name=f"autoscaler {namespace}/{name}")
        elif not wanted and loop is not None and not loop.stopping.is_set():
            loop.gone = loop.gone or deleted
            loop.release_on_stop = not deleted
            loop.stopping.set()

    async def shutdown(self, timeout_s: float = 20.0) -> None:
        """Stop every loop (each saves its state) and close the HTTP client."""
        loops = list(self.loops.values())
        for loop in loops:
            loop.stopping.set()
        tasks = [loop.task for loop in loops if loop.task is not None]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
        self.loops.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
