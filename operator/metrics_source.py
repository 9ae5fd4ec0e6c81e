"""Where the autoscaling loop gets its numbers: the worker pods' own /metrics, or the Prometheus HTTP API.

Pure helpers read pods (readiness, start times, where to scrape, the admin endpoint) and Prometheus query
results; the two async collectors fetch. Both collectors answer the same thing: one `MetricsSnapshot` per pod
that answered (tideserve_ and vllm: names alike, see tideserve.autoscaler.scrape), so the policy cannot tell
where its numbers came from.

Scrape address: the pod's IP with the `prometheus.io/port` and `prometheus.io/path` annotations that the
operator puts on every worker pod template (port 8000, /metrics, the public API port serves /metrics);
the admin endpoint is the pod's container port named `admin` (8001). Reading both from the pod itself keeps one
source of truth with manifests.py and lets tests point them at a local server.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import httpx

from tideserve.autoscaler.control_loop import ReplicaView
from tideserve.autoscaler.scrape import (CACHE_CONFIG, CACHE_CONFIG_LABELS, RUNNING, WAITING, MetricsParseError, MetricsSnapshot,
                                         parse_exposition)
from tideserve.operator.manifests import ADMIN_PORT, API_PORT, CONTAINER_NAME

BATCH_LIMITS_PATH = "/admin/batch-limits"
UNAUTHORIZED = "admin endpoint answered 401"
# The worker's live limits, as it exports them; compared with the stored ones to find pods to update.
LIMIT_SEQS, LIMIT_TOKENS = "tideserve_max_num_seqs", "tideserve_max_num_batched_tokens"


def parse_time(value: str | None) -> float | None:
    """An RFC 3339 timestamp as the API server (or Prometheus's API, with nanoseconds) writes it -> seconds since
    the epoch. Digits past microseconds are dropped: Python before 3.11 refuses them."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00")))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return calendar.timegm(parsed.utctimetuple()) + parsed.microsecond / 1e6


def _condition(pod: dict[str, Any], ctype: str) -> dict[str, Any]:
    for cond in pod.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == ctype:
            return cond
    return {}


def _controller_uid(obj: dict[str, Any]) -> str | None:
    return next((ref.get("uid") for ref in obj.get("metadata", {}).get("ownerReferences", [])
                 if ref.get("controller")), None)


def owned_pods(pods: list[dict[str, Any]], replicasets: list[dict[str, Any]],
               deployment: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The pods the LLMDeployment's own Deployment runs: controlled by a ReplicaSet that the Deployment controls.
    Anyone who may create pods in the namespace can copy the worker labels; such a pod must get neither the admin
    token nor a say in scaling."""
    if deployment is None:
        return []
    uid = deployment["metadata"].get("uid")
    sets = {rs["metadata"].get("uid") for rs in replicasets if _controller_uid(rs) == uid}
    return [p for p in pods if _controller_uid(p) in sets]


def is_terminating(pod: dict[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def is_ready(pod: dict[str, Any]) -> bool:
    """Serving traffic: the Ready condition holds, the pod has an IP and is not on its way out."""
    return (not is_terminating(pod) and bool(pod.get("status", {}).get("podIP"))
            and _condition(pod, "Ready").get("status") == "True")


def started_at(pod: dict[str, Any]) -> float:
    """When the worker process (and so its counters) started: the container's start, else the pod's."""
    status = pod.get("status", {})
    for container in status.get("containerStatuses", []) or []:
        if container.get("name") == CONTAINER_NAME:
            running = parse_time(container.get("state", {}).get("running", {}).get("startedAt"))
            if running is not None:
                return running
    return parse_time(status.get("startTime")) or parse_time(pod["metadata"].get("creationTimestamp")) or 0.0


def is_unschedulable(pod: dict[str, Any]) -> bool:
    cond = _condition(pod, "PodScheduled")
    return cond.get("status") == "False" and cond.get("reason") == "Unschedulable"


def replica_view(pod: dict[str, Any], now: float, snapshot: MetricsSnapshot | None) -> ReplicaView:
    """A worker pod as the control loop sees it (its pending rule: tideserve.autoscaler.control_loop)."""
    created = parse_time(pod["metadata"].get("creationTimestamp"))
    outstanding = sum(snapshot.value(name) or 0.0 for name in (RUNNING, WAITING)) if snapshot is not None else 0.0
    return ReplicaView(pod["metadata"]["name"], is_ready(pod), now - created if created is not None else 0.0,
                       is_unschedulable(pod), outstanding, reported_limits(snapshot))


def newest_startup_s(pods: list[dict[str, Any]], since: float | None) -> float | None:
    """Creation-to-ready time of the pod that most recently became ready after `since` (None: none did)."""
    best: tuple[float, float] | None = None
    for pod in pods:
        if not is_ready(pod):
            continue
        became_ready = parse_time(_condition(pod, "Ready").get("lastTransitionTime"))
        created = parse_time(pod["metadata"].get("creationTimestamp"))
        if became_ready is None or created is None or (since is not None and became_ready <= since):
            continue
        if best is None or became_ready > best[0]:
            best = (became_ready, max(0.0, became_ready - created))
    return best[1] if best else None


def _host(pod: dict[str, Any]) -> str:
    ip = pod["status"]["podIP"]
    return f"[{ip}]" if ":" in ip else ip


def _container_port(pod: dict[str, Any], port_name: str, default: int) -> int:
    for container in pod.get("spec", {}).get("containers", []) or []:
        if container.get("name") != CONTAINER_NAME:
            continue
        for port in container.get("ports", []) or []:
            if port.get("name") == port_name and port.get("containerPort"):
                return int(port["containerPort"])
    return default


def metrics_url(pod: dict[str, Any]) -> str:
    annotations = pod["metadata"].get("annotations", {}) or {}
    port = annotations.get("prometheus.io/port") or str(API_PORT)
    path = annotations.get("prometheus.io/path") or "/metrics"
    return f"http://{_host(pod)}:{port}/{path.lstrip('/')}"


def admin_url(pod: dict[str, Any]) -> str:
    return f"http://{_host(pod)}:{_container_port(pod, 'admin', ADMIN_PORT)}{BATCH_LIMITS_PATH}"


def reported_limits(snapshot: MetricsSnapshot | None) -> tuple[int, int] | None:
    """The batch limits a tideserve worker says it runs (None for vLLM, or without metrics)."""
    if snapshot is None:
        return None
    seqs, tokens = snapshot.value(LIMIT_SEQS), snapshot.value(LIMIT_TOKENS)
    if seqs is None or tokens is None:
        return None
    return int(seqs), int(tokens)


# --- Prometheus query results -------------------------------------------------------------------------------


def _promql_string(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def prometheus_selector(namespace: str, pods: list[str], namespace_label: str, pod_label: str) -> str:
    """Label matchers for the worker series of these pods (pod names are DNS labels: only '.' needs escaping)."""
    regex = "|".join(p.replace(".", "\\\\.") for p in sorted(pods))
    return f'{namespace_label}="{_promql_string(namespace)}",{pod_label}=~"{regex}"'


def prometheus_queries(namespace: str, pods: list[str], namespace_label: str = "namespace",
                       pod_label: str = "pod") -> tuple[str, str]:
    """(every worker series of the pods, the time each pod was last scraped)."""
    selector = prometheus_selector(namespace, pods, namespace_label, pod_label)
    return (f'{{__name__=~"vllm:.+|tideserve_.+",{selector}}}',
            f'max by ({pod_label}) (timestamp(vllm:num_requests_running{{{selector}}}))')


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def snapshots_from_prometheus(result: list[dict[str, Any]], pod_label: str = "pod") -> dict[str, MetricsSnapshot]:
    """An instant-vector query result (`data.result` of /api/v1/query) -> one snapshot per pod.

    Each series is rendered in the text format, one line with the labels the parser reads, and read by the same
    parser as a direct scrape (which sums a name's label sets), so both ways of collecting agree to the last bit.
    A pod whose series do not parse (a histogram without its +Inf bucket, say) is left out, as an unscrapable pod
    would be."""
    per_pod: dict[str, list[str]] = defaultdict(list)
    for series in result:
        labels = series.get("metric", {})
        pod, name = labels.get(pod_label), labels.get("__name__")
        try:
            value = float(series["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        # The labels the parser reads: a histogram's le, and the KV cache size vLLM gives in labels.
        kept = ("le",) if name != CACHE_CONFIG else CACHE_CONFIG_LABELS
        rendered = ",".join(f'{k}="{_promql_string(labels[k])}"' for k in kept if k in labels)
        if pod and name:
            per_pod[pod].append(f"{name}{{{rendered}}} {_format_value(value)}" if rendered
                                else f"{name} {_format_value(value)}")
    snapshots = {}
    for pod, lines in per_pod.items():
        try:
            snapshots[pod] = parse_exposition("\n".join(lines) + "\n")
        except MetricsParseError:
            continue
    return snapshots


def scrape_times_from_prometheus(result: list[dict[str, Any]], pod_label: str = "pod") -> dict[str, float]:
    times: dict[str, float] = {}
    for series in result:
        pod = series.get("metric", {}).get(pod_label)
        try:
            value = float(series["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if pod:
            times[pod] = max(times.get(pod, value), value)
    return times


# --- collectors ---------------------------------------------------------------------------------------------


@dataclass
class Collected:
    """One collection round: a snapshot and its time per pod that answered; why the others did not."""

    snapshots: dict[str, MetricsSnapshot]
    times: dict[str, float]
    errors: dict[str, str]


async def scrape_pods(client: httpx.AsyncClient, pods: list[dict[str, Any]], timeout_s: float) -> Collected:
    """GET every pod's /metrics at once."""

    async def one(pod: dict[str, Any]) -> tuple[str, MetricsSnapshot | None, float, str | None]:
        name = pod["metadata"]["name"]
        try:
            response = await client.get(metrics_url(pod), timeout=timeout_s)
            if response.status_code != 200:
                return name, None, 0.0, f"/metrics answered {response.status_code}"
            return name, parse_exposition(response.text), time.time(), None
        except (httpx.HTTPError, MetricsParseError) as exc:
            return name, None, 0.0, f"{type(exc).__name__}: {exc}".rstrip(": ")

    collected = Collected({}, {}, {})
    for name, snapshot, at, error in await asyncio.gather(*(one(p) for p in pods)):
        if snapshot is not None:
            collected.snapshots[name], collected.times[name] = snapshot, at
        else:
            collected.errors[name] = error or "no metrics"
    return collected


async def query_prometheus(client: httpx.AsyncClient, url: str, namespace: str, pods: list[dict[str, Any]],
                           timeout_s: float, namespace_label: str = "namespace", pod_label: str = "pod") -> Collected:
    """The same series through the Prometheus HTTP API (two instant queries for all pods of a deployment)."""
    names = [p["metadata"]["name"] for p in pods]
    if not names:
        return Collected({}, {}, {})
    series_query, times_query = prometheus_queries(namespace, names, namespace_label, pod_label)

    async def query(promql: str) -> list[dict[str, Any]]:
        response = await client.get(f"{url.rstrip('/')}/api/v1/query", params={"query": promql}, timeout=timeout_s)
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"Prometheus: {body.get('error', body.get('status'))}")
        return body["data"]["result"]

    try:
        series, times = await asyncio.gather(query(series_query), query(times_query))
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Collected({}, {}, {name: f"Prometheus query failed: {exc}" for name in names})
    snapshots = snapshots_from_prometheus(series, pod_label)
    scraped = scrape_times_from_prometheus(times, pod_label)
    collected = Collected({}, {}, {})
    for name in names:
        if name in snapshots and name in scraped:
            collected.snapshots[name], collected.times[name] = snapshots[name], scraped[name]
        else:
            collected.errors[name] = "no series in Prometheus"
    return collected


async def put_batch_limits(client: httpx.AsyncClient, pod: dict[str, Any], max_num_seqs: int,
                           max_num_batched_tokens: int, timeout_s: float, token: str | None = None) -> str | None:
    """PUT the limits to one pod's admin endpoint; None on success, else why not."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = await client.put(admin_url(pod), json={"max_num_seqs": max_num_seqs,
                                                          "max_num_batched_tokens": max_num_batched_tokens},
                                    headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}".rstrip(": ")
    if response.status_code == 401:
        return UNAUTHORIZED
    return None if response.status_code == 200 else f"admin endpoint answered {response.status_code}"
