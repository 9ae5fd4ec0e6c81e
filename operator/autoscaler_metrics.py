"""The autoscaler's own Prometheus metrics, per LLMDeployment (labels namespace and llmdeployment).

Served by `tideserve operator --metrics-port` (the chart: port `metrics`, 8090, /metrics) and by `tideserve up`.
Each instance has its own registry, so several can run in one process (tests); a deployment's series are
removed when its loop stops.

The labels are those the chart's PodMonitor gives the worker series (namespace, llmdeployment), so rules and
dashboards join the two on them. Besides what the policy saw and did, the deployment's SLO is exported for
such joins: its targets, its attainment target, each condition as 0/1, and for each target the worker
histogram bucket (`le`) up to which a request counts as within it (the largest bucket edge not above the
target: exact when the target is an edge, else conservative).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.utils import floatToGoString

from tideserve.autoscaler.observation import Decision, Observation
from tideserve.autoscaler.policy import PolicyConfig
from tideserve.autoscaler.slo import Histogram
from tideserve.operator.autoscaler_status import REASON_CODES, reason_code

LABELS = ("namespace", "llmdeployment")
ACTIONS = ("scale-up", "scale-down", "batch-limit", "hold")  # Decision.action


def within_bucket(histogram: Histogram | None, target_s: float) -> str | None:
    """The `le` label, as workers write it, of the largest finite bucket edge not above the target."""
    if histogram is None:
        return None
    edges = [e for e in histogram.edges if e <= target_s * (1 + 1e-9) and e != float("inf")]
    return floatToGoString(edges[-1]) if edges else None


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self._series: dict[tuple[str, str], set] = {}  # the label sets in use, to remove them

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"tideserve_autoscaler_{name}", doc, LABELS, registry=r)

        self.desired_replicas = gauge("desired_replicas", "Replicas the policy asks for (applied in mode active).")
        self.ready_replicas = gauge("ready_replicas", "Ready worker pods in the last window.")
        self.pending_replicas = gauge("pending_replicas", "Pods waiting for capacity (unschedulable or overdue).")
        self.max_num_seqs = gauge("max_num_seqs", "Batch limit chosen: running sequences per replica.")
        self.max_num_batched_tokens = gauge("max_num_batched_tokens", "Batch limit chosen: tokens per engine step.")
        self.request_rate = gauge("request_rate", "Observed arrivals in the last window, requests/s.")
        self.demand = gauge("demand", "Load planned for, requests/s: live envelope, queue drain and forecast.")
        self.predicted_rate = gauge("predicted_rate", "Forecast arrivals at now + replica start-up, requests/s.")
        self.capacity_per_replica = gauge("capacity_per_replica", "Predicted SLO capacity of one replica, requests/s.")
        self.ttft_seconds = gauge("ttft_seconds", "Observed TTFT at the SLO percentile in the last window.")
        self.tpot_seconds = gauge("tpot_seconds", "Observed TPOT at the SLO percentile in the last window.")
        self.attainment = gauge("slo_attainment", "Share of requests within both targets over the season.")
        self.predicted_attainment = gauge("predicted_attainment", "Share of requests the plan expects within SLO.")
        self.budget_remaining = gauge("error_budget_remaining", "Share of the error budget unspent (1 = untouched).")
        self.burn_rate = gauge("error_budget_burn_rate", "Error budget spent per budget allowed, recent windows.")
        self.infeasible_share = gauge("infeasible_share", "Share of recent requests whose prompt no replica prefills "
                                                          "within the TTFT target (SLOInfeasible).")
        self.slo_target_seconds = Gauge("tideserve_autoscaler_slo_target_seconds",
                                        "The deployment's latency target, by kind (ttft, tpot).",
                                        (*LABELS, "kind"), registry=r)
        self.slo_target_attainment = gauge("slo_target_attainment",
                                           "Share of requests to keep within both targets (spec targetAttainment).")
        self.slo_within_bucket = Gauge("tideserve_autoscaler_slo_within_bucket",
                                       "1 for the worker histogram bucket (le) up to which a request is within the "
                                       "target of its kind: join it with the workers' _bucket series.",
                                       (*LABELS, "kind", "le"), registry=r)
        self.condition = Gauge("tideserve_autoscaler_condition",
                               "1 while the LLMDeployment's condition of this type is True, else 0.",
                               (*LABELS, "condition"), registry=r)
        self._buckets: dict[tuple[str, str, str], str] = {}  # (namespace, name, kind) -> le exported
        self.decisions = Counter("tideserve_autoscaler_decisions", "Decisions by action and reason code.",
                                 (*LABELS, "action", "reason"), registry=r)
        self.stale_windows = Counter("tideserve_autoscaler_stale_windows", "Windows held for stale metrics.",
                                     LABELS, registry=r)
        self.scrape_errors = Counter("tideserve_autoscaler_scrape_errors", "Pods whose metrics could not be read.",
                                     LABELS, registry=r)
        self.batch_limit_pushes = Counter("tideserve_autoscaler_batch_limit_pushes",
                                          "Batch-limit PUTs to worker admin endpoints, by result.",
                                          (*LABELS, "result"), registry=r)

    def record(self, namespace: str, name: str, decision: Decision, obs: Observation, scrape_errors: int,
               config: PolicyConfig, conditions: list[dict[str, Any]]) -> None:
        """One interval: the decision, what it was taken on, the SLO it serves and the deployment's conditions
        as written (the loop's and reconcile's alike)."""
        key = (namespace, name)
        if key not in self._series:
            # Every (action, reason) series from 0: increase() cannot see the first decision of a series that
            # appears already at 1, and dashboards annotate decisions from increase().
            for action in ACTIONS:
                for reason in REASON_CODES:
                    self._labels(self.decisions, *key, action, reason)
        d = decision.details
        self._labels(self.decisions, *key, decision.action, reason_code(decision)).inc()
        for gauge, value in ((self.desired_replicas, decision.replicas), (self.ready_replicas, obs.ready_replicas),
                             (self.pending_replicas, obs.pending_replicas), (self.max_num_seqs, decision.max_num_seqs),
                             (self.max_num_batched_tokens, decision.max_num_batched_tokens)):
            self._labels(gauge, *key).set(value)
        self._labels(self.stale_windows, *key).inc(1 if obs.stale else 0)
        self._labels(self.scrape_errors, *key).inc(scrape_errors)
        values = {self.request_rate: d.get("rate"), self.demand: d.get("demand"),
                  self.predicted_rate: (decision.forecast or {}).get("rate"),
                  self.capacity_per_replica: d.get("capacity_per_replica"), self.ttft_seconds: d.get("ttft_p"),
                  self.tpot_seconds: d.get("tpot_p"), self.attainment: d.get("attainment"),
                  self.predicted_attainment: decision.predicted_attainment,
                  self.budget_remaining: d.get("budget_remaining"), self.burn_rate: d.get("burn_rate"),
                  self.infeasible_share: d.get("infeasible_share")}
        for gauge, value in values.items():
            if isinstance(value, (int, float)):
                self._labels(gauge, *key).set(value)
        self._labels(self.slo_target_attainment, *key).set(config.attainment_target)
        for kind, target, histogram in (("ttft", config.ttft, obs.ttft), ("tpot", config.tpot, obs.tpot)):
            self._labels(self.slo_target_seconds, *key, kind).set(target.target_s)
            le = within_bucket(histogram, target.target_s)
            before = self._buckets.get((*key, kind))
            if le is None or le == before:
                continue  # no histogram in this window: the edge found before still holds
            if before is not None:
                self.slo_within_bucket.remove(*key, kind, before)
                self._series[key].discard((self.slo_within_bucket, (kind, before)))
            self._buckets[(*key, kind)] = le
            self._labels(self.slo_within_bucket, *key, kind, le).set(1)
        for cond in conditions:
            if cond.get("type"):
                self._labels(self.condition, *key, cond["type"]).set(1 if cond.get("status") == "True" else 0)

    def pushed(self, namespace: str, name: str, ok: int, failed: int) -> None:
        for result, count in (("ok", ok), ("error", failed)):
            if count:
                self._labels(self.batch_limit_pushes, namespace, name, result).inc(count)

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of one deployment (its loop stopped)."""
        for kind in ("ttft", "tpot"):
            self._buckets.pop((namespace, name, kind), None)
        for metric, extra in self._series.pop((namespace, name), set()):
            try:
                metric.remove(namespace, name, *extra)
            except KeyError:
                pass

    def _labels(self, metric, namespace: str, name: str, *extra: str):
        self._series.setdefault((namespace, name), set()).add((metric, extra))
        return metric.labels(namespace, name, *extra)
