"""A thin, synchronous Kubernetes API client for the reconciler, on the official `kubernetes` package.

Objects travel as plain JSON dicts, exactly as the API server sends them, so the pure modules (manifests,
patching, status) never see client model classes. Every write states its content type: the official client
would otherwise send a dict PATCH as strategic-merge-patch, which custom resources reject (415). Children are
written with server-side apply, status and small edits with merge patches.
"""

from __future__ import annotations

import json
from typing import Any

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply; JSON is YAML
JSON = "application/json"


def load_configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """In-cluster service account credentials, else the kubeconfig file (explicit path or ~/.kube/config)."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        return configuration
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    return configuration


def connection_info(configuration: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """The same credentials for kopf's own API client (watches, kopf's status bookkeeping, events)."""
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").partition(" ")
    if header and not token:  # a bare token without a scheme
        scheme, token = "", header
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


class KubeClient:
    def __init__(self, configuration: kubernetes.client.Configuration, timeout_seconds: float = 30.0):
        self.api = kubernetes.client.ApiClient(configuration)
        self.timeout_seconds = timeout_seconds

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None,
                body: Any = None, content_type: str | None = None) -> Any:
        headers = {"Accept": JSON}
        if content_type:
            headers["Content-Type"] = content_type
        method, url, headers, body, post_params = self.api.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"])
        response = self.api.call_api(method, url, headers, body, post_params, _request_timeout=self.timeout_seconds)
        response.read()
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return json.loads(response.data) if response.data else None

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, path: str, label_selector: str) -> list[dict[str, Any]]:
        return self.request("GET", path, query={"labelSelector": label_selector})["items"]

    def create(self, collection_path: str, body: dict[str, Any], field_manager: str | None = None) -> dict[str, Any]:
        """POST: fails with 409 when an object of that name exists."""
        query = {"fieldManager": field_manager} if field_manager else None
        return self.request("POST", collection_path, query=query, body=body, content_type=JSON)

    def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)

    def apply(self, path: str, body: dict[str, Any], field_manager: str) -> dict[str, Any]:
        """Server-side apply of `body` (the whole intent) as `field_manager`; creates the object if absent.
        force: the operator's fields are its own, a conflicting manager's value is taken over."""
        return self.request("PATCH", path, query={"fieldManager": field_manager, "force": "true"},
                            body=body, content_type=APPLY_PATCH)

    def delete(self, path: str, uid: str, resource_version: str | None = None) -> None:
        """Delete exactly the object that was observed (a recreated one, or with a resource version a changed
        one, fails with 409)."""
        preconditions = {"uid": uid} | ({"resourceVersion": resource_version} if resource_version else {})
        self.request("DELETE", path, content_type=JSON, body={
            "apiVersion": "v1", "kind": "DeleteOptions", "preconditions": preconditions})
