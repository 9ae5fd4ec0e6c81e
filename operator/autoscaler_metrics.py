"""The autoscaler's own Prometheus metrics, per LLMDeployment (labels namespace and name).

Served by `tideserve operator --metrics-port` (the chart: port `metrics`, 8090, /metrics). Each operator
instance has its own registry, so several can run in one process (tests); a deployment's series are removed
when its loop stops.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from tideserve.autoscaler.observation import Decision, Observation
from tideserve.operator.autoscaler_status import reason_code

LABELS = ("namespace", "name")


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
        self.decisions = Counter("tideserve_autoscaler_decisions", "Decisions by action and reason code.",
                                 (*LABELS, "action", "reason"), registry=r)
        self.stale_windows = Counter("tideserve_autoscaler_stale_windows", "Windows held for stale metrics.",
                                     LABELS, registry=r)
        self.scrape_errors = Counter("tideserve_autoscaler_scrape_errors", "Pods whose metrics could not be read.",
                                     LABELS, registry=r)
        self.batch_limit_pushes = Counter("tideserve_autoscaler_batch_limit_pushes",
                                          "Batch-limit PUTs to worker admin endpoints, by result.",
                                          (*LABELS, "result"), registry=r)

    def record(self, namespace: str, name: str, decision: Decision, obs: Observation, scrape_errors: int) -> None:
        key = (namespace, name)
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

    def pushed(self, namespace: str, name: str, ok: int, failed: int) -> None:
        for result, count in (("ok", ok), ("error", failed)):
            if count:
                self._labels(self.batch_limit_pushes, namespace, name, result).inc(count)

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of one deployment (its loop stopped)."""
        for metric, extra in self._series.pop((namespace, name), set()):
            try:
                metric.remove(namespace, name, *extra)
            except KeyError:
                pass

    def _labels(self, metric, namespace: str, name: str, *extra: str):
        self._series.setdefault((namespace, name), set()).add((metric, extra))
        return metric.labels(namespace, name, *extra)
