"""The router in a cluster, against the strict kmock API emulator: the objects the operator reconciles for it,
the public Service in front of it, and the EndpointSlice discovery (ready and terminating pods) under the
router's own RBAC from the chart."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from kube_fixtures import api, eventually, operator, requests_as_rbac  # noqa: F401
from kube_tools import render, rules_by_kind
from test_operator_kmock import DEPLOYMENT, LLMD, NS, PDB, SERVICE, apply_minimal, request, settled, BASE
from tideserve.cli import build_parser
from tideserve.operator.manifests import ROUTER_LABEL, SELECTOR_LABEL
from tideserve.router.discovery import EndpointSliceDiscovery

pytestmark = pytest.mark.asyncio

SLICES = ("discovery.k8s.io", "v1", "endpointslices")
SLICES_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"


async def test_the_operator_runs_a_router_in_front_of_the_workers_and_removes_it_when_disabled(api, operator):
    llmd = await apply_minimal(api, operator)
    router = await eventually(lambda: api.get(*DEPLOYMENT, NS, "smollm2-router"))
    headless = await eventually(lambda: api.get(*SERVICE, NS, "smollm2-workers"))
    public = api.get(*SERVICE, NS, "smollm2")
    uid = llmd["metadata"]["uid"]
    for obj in (router, headless):
        assert [ref["uid"] for ref in obj["metadata"]["ownerReferences"]] == [uid]
    # The public Service selects the router pods; the headless one the workers, for their EndpointSlices.
    assert public["spec"]["selector"] == {ROUTER_LABEL: "smollm2"}
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == {SELECTOR_LABEL: "smollm2"}
    pod = router["spec"]["template"]
    assert SELECTOR_LABEL not in pod["metadata"]["labels"]  # router pods are no workers: not in status or metrics
    assert router["spec"]["selector"]["matchLabels"] == {ROUTER_LABEL: "smollm2"} and router["spec"]["replicas"] == 2
    assert pod["spec"]["serviceAccountName"] == "tideserve-router"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "tideserve-worker:test" and container["command"] == ["tideserve"]
    args = build_parser("router").parse_args(container["args"])  # what `tideserve router` really accepts
    assert (args.endpointslices, args.policy, args.hold_max_requests, args.hold_timeout_seconds, args.model_name) == (
        "smollm2-workers", "prefix", 256, 120.0, ["smollm2"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    # Two router pods: a budget keeps one through a node drain; one worker: none for the workers.
    budget = api.get(*PDB, NS, "smollm2-router")
    assert budget["spec"]["selector"]["matchLabels"] == {ROUTER_LABEL: "smollm2"} and api.get(*PDB, NS, "smollm2") is None
    # The status counts workers only.
    assert llmd["status"]["selector"] == f"{SELECTOR_LABEL}=smollm2"

    await request(api, "PATCH", f"{BASE}/smollm2", {"spec": {"router": {"enabled": False}}})
    await eventually(lambda: api.get(*DEPLOYMENT, NS, "smollm2-router") is None
                     and api.get(*SERVICE, NS, "smollm2-workers") is None and api.get(*PDB, NS, "smollm2-router") is None)
    await eventually(lambda: api.get(*SERVICE, NS, "smollm2")["spec"]["selector"] == {SELECTOR_LABEL: "smollm2"})
    await settled(api, operator, "smollm2")
    assert ("apps/deployments", "delete") in requests_as_rbac(api)  # granted by the chart, or the emulator refused


def endpoint_slice(name: str, service: str, endpoints: list[tuple[str, str, dict]]) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": conditions, "targetRef": {"kind": "Pod", "name": pod}}
                          for pod, ip, conditions in endpoints]}


async def test_endpointslice_discovery_follows_ready_and_terminating_pods_with_the_routers_rbac(api):
    # The router's requests are checked against its own Role from the chart, not the operator's.
    api.granted = rules_by_kind(render([]), "Role", router=True)["tideserve"]
    ready = {"ready": True, "serving": True, "terminating": False}
    await request(api, "POST", SLICES_PATH, endpoint_slice("chat-workers-a", "chat-workers", [
        ("chat-1", "10.0.0.1", ready), ("chat-2", "10.0.0.2", {"ready": False})]), content_type="application/json")
    await request(api, "POST", SLICES_PATH, endpoint_slice("other-workers-a", "other-workers", [
        ("other-1", "10.0.0.9", ready)]), content_type="application/json")
    seen: list[dict[str, bool]] = []
    async with httpx.AsyncClient(base_url=str(api.url), timeout=30) as client:
        discovery = EndpointSliceDiscovery(client, NS, "chat-workers", lambda eps: seen.append(
            {e.name: e.routable for e in eps}))
        task = asyncio.ensure_future(discovery.run())
        try:
            await eventually(lambda: seen and seen[-1] == {"chat-1": True, "chat-2": False})
            # chat-2 becomes ready; chat-1 starts to terminate (its pod is being deleted: draining).
            await request(api, "PATCH", f"{SLICES_PATH}/chat-workers-a", {"endpoints": endpoint_slice("x", "x", [
                ("chat-1", "10.0.0.1", {"ready": False, "serving": True, "terminating": True}),
                ("chat-2", "10.0.0.2", ready)])["endpoints"]})
            await eventually(lambda: seen[-1] == {"chat-1": False, "chat-2": True})
            # A second slice of the same Service adds its pods; deleting one removes its pods.
            await request(api, "POST", SLICES_PATH, endpoint_slice("chat-workers-b", "chat-workers", [
                ("chat-3", "10.0.0.3", ready)]), content_type="application/json")
            await eventually(lambda: seen[-1] == {"chat-1": False, "chat-2": True, "chat-3": True})
            response = await api.request("DELETE", f"{SLICES_PATH}/chat-workers-a")
            assert response.status == 200, await response.text()
            await eventually(lambda: seen[-1] == {"chat-3": True})
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert all("other-1" not in s for s in seen)  # another Service's pods are never routed to
