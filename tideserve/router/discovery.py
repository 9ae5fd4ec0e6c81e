"""Workers discovered from the EndpointSlices of the LLMDeployment's headless worker Service.

The API server keeps one or more EndpointSlices per Service (label kubernetes.io/service-name), listing every
pod the Service selects with its conditions. A pod is routable while it is ready and not terminating: a pod that
has begun to drain turns terminating (and not ready) at once, before its preStop sleep ends, so it gets no new
request while it finishes the ones it has. The discovery lists the slices, then watches them from the list's
resourceVersion; on any error or an expired resourceVersion (410) it lists again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Sequence

import httpx

from tideserve.router.server import Endpoint

log = logging.getLogger("tideserve.router.discovery")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WATCH_TIMEOUT_S = 300


def endpoints_from_slices(slices: Sequence[dict[str, Any]], port_name: str = "http") -> list[Endpoint]:
    """One Endpoint per address of every slice that has the named port. Per the EndpointSlice API, an unset
    `ready` means ready and an unset `terminating` means not terminating."""
    endpoints: dict[str, Endpoint] = {}
    for s in slices:
        port = next((p.get("port") for p in s.get("ports") or [] if p.get("name", "") == port_name), None)
        if port is None:
            continue
        for e in s.get("endpoints") or []:
            conditions = e.get("conditions") or {}
            routable = conditions.get("ready") is not False and conditions.get("terminating") is not True
            for address in (e.get("addresses") or [])[:1]:  # all addresses of an endpoint are one pod
                host = f"[{address}]" if ":" in address else address
                name = (e.get("targetRef") or {}).get("name") or address
                endpoints[name] = Endpoint(name, f"http://{host}:{port}", routable)
    return sorted(endpoints.values(), key=lambda e: e.name)


class ConfigurationAuth(httpx.Auth):
    """The bearer token as the kubernetes client holds it at each request: in a pod its refresh hook re-reads
    the projected service account token, which the kubelet rotates."""

    def __init__(self, configuration):
        self.configuration = configuration

    def auth_flow(self, request: httpx.Request):
        authorization = (self.configuration.get_api_key_with_prefix("BearerToken")
                         or self.configuration.get_api_key_with_prefix("authorization"))
        if authorization:
            request.headers["Authorization"] = authorization if " " in authorization else f"Bearer {authorization}"
        yield request


def api_client(configuration) -> httpx.AsyncClient:
    """An httpx client with a kubernetes.client.Configuration's server and credentials."""
    verify: Any = (configuration.ssl_ca_cert or True) if configuration.verify_ssl else False
    cert = (configuration.cert_file, configuration.key_file) if configuration.cert_file else None
    return httpx.AsyncClient(base_url=configuration.host, auth=ConfigurationAuth(configuration), verify=verify,
                             cert=cert, timeout=httpx.Timeout(30.0, read=WATCH_TIMEOUT_S + 30))


class EndpointSliceDiscovery:
    def __init__(self, client: httpx.AsyncClient, namespace: str, service: str,
                 on_update: Callable[[list[Endpoint]], None], port_name: str = "http"):
        self.client = client
        self.path = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        self.selector = f"{SERVICE_NAME_LABEL}={service}"
        self.on_update = on_update
        self.port_name = port_name
        self.slices: dict[str, dict[str, Any]] = {}

    def _publish(self) -> None:
        self.on_update(endpoints_from_slices(list(self.slices.values()), self.port_name))

    async def run(self) -> None:
        while True:
            try:
                await self._list_and_watch()
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                log.warning("EndpointSlice discovery: %s; listing again in 1 s", exc)
            await asyncio.sleep(1.0)

    async def _list_and_watch(self) -> None:
        response = await self.client.get(self.path, params={"labelSelector": self.selector})
        response.raise_for_status()
        listing = response.json()
        self.slices = {s["metadata"]["name"]: s for s in listing.get("items") or []}
        self._publish()
        version = listing["metadata"]["resourceVersion"]
        params = {"labelSelector": self.selector, "watch": "true", "resourceVersion": version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_TIMEOUT_S)}
        async with self.client.stream("GET", self.path, params=params) as stream:
            stream.raise_for_status()
            async for line in stream.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # 410 Gone: the resourceVersion expired
                    raise ValueError(f"watch error: {obj.get('message', obj)}")
                if kind == "BOOKMARK":
                    continue
                name = obj["metadata"]["name"]
                if kind == "DELETED":
                    self.slices.pop(name, None)
                else:
                    self.slices[name] = obj
                self._publish()
