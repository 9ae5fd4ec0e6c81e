"""A stricter Kubernetes API emulator on top of kmock, and a fixture that runs the real operator against it.

kmock's KubernetesEmulator stores objects and streams watch events, but it is lenient where the operator
could go wrong against a real API server. StrictKubernetesEmulator closes those gaps the way the API server
behaves, so that a mistake fails here instead of in a cluster:

- metadata.uid, resourceVersion (one counter across all objects), generation (bumped when anything but
  metadata and status changes) and creationTimestamp are stamped on every write; a write that changes
  nothing is a no-op (same resourceVersion, no watch event), as on a real server;
- PATCH needs a real patch content type: application/json-patch+json with a list body,
  application/merge-patch+json with an object; strategic-merge-patch is refused (415,
  as custom resources do), so the operator cannot silently depend on semantics kmock does not have;
- a resourceVersion in a merge patch, a failing JSON-patch `test` op and DeleteOptions preconditions give
  409/422, which is how optimistic concurrency fails on a real server;
- the status subresource is isolated: the main resource ignores status changes, /status ignores the rest;
- /scale reads and writes an autoscaling/v1 Scale mapped onto spec.replicas (the CRD's scale subresource);
- labelSelector is honoured by list and watch; a watch with a resourceVersion replays only newer events;
- deleting an object deletes its dependents (owner references by uid), as the garbage collector does;
- server-side apply (application/apply-patch+yaml, fieldManager required) merges the applied intent with the
  object (keyed lists item by item) and removes the fields the same manager applied before and applies no more;
  it creates the object when absent, and a resourceVersion in it is a precondition;
- an optional mutating step (`mutate`) changes objects after every write, as a mutating admission webhook does;
- PUT is refused (405): the operator never replaces whole objects;
- OwnerReferencesPermissionEnforcement admission: an owner reference with blockOwnerDeletion is refused (403)
  unless the caller's RBAC (the chart's own rules, given as `granted`) allows update on the owner's finalizers;
  more than one controller owner reference is invalid (422);
- RBAC: an operator request the chart's rules (`granted`) do not allow is refused (403), e.g. any read of a Secret.

Not emulated: server-side defaulting and schema/CEL validation (tests/test_crd.py covers the schema),
other admission, the Deployment/ReplicaSet controllers and the scheduler (tests drive their effects through the
API, as those controllers would), field selectors, timeoutSeconds.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import functools
import itertools
import json
import pathlib
import secrets
import threading
import uuid
from collections import defaultdict
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import kopf
import pytest
import pytest_asyncio
from kmock._internal import enums

from kube_tools import render, rules_by_kind
from tideserve.operator import handlers
from tideserve.operator.admin_token import AdminKey
from tideserve.operator.autoscaler_loop import AutoscalerOptions
from tideserve.operator.kube import load_configuration
from tideserve.operator.manifests import OperatorConfig

BUILTIN_GROUPS = {"", "apps", "policy", "apiextensions.k8s.io", "autoscaling", "batch"}
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
# The API server's merge keys (x-kubernetes-list-map-keys / patchMergeKey) of the lists in the objects the operator
# applies; every other list is atomic. Server-side apply merges keyed lists item by item.
SERVER_LIST_KEYS = {"containers": ("name",), "initContainers": ("name",), "env": ("name",), "volumes": ("name",),
                    "volumeMounts": ("mountPath",), "imagePullSecrets": ("name",), "ownerReferences": ("uid",),
                    "ports": ("containerPort", "port")}


def _list_key(field: str, *lists: list) -> str | None:
    for key in SERVER_LIST_KEYS.get(field, ()):
        items = [item for values in lists for item in values]
        if all(isinstance(item, dict) and key in item for item in items):
            return key
    return None


def _apply_merge(observed: Any, applied: Any, field: str = "") -> Any:
    """Server-side apply's merge: maps key by key, keyed lists item by item, anything else replaced."""
    if isinstance(applied, dict) and isinstance(observed, dict):
        result = dict(observed)
        for key, value in applied.items():
            result[key] = _apply_merge(observed.get(key), value, key)
        return result
    if isinstance(applied, list) and isinstance(observed, list) and (key := _list_key(field, applied, observed)):
        merged = [dict(item) for item in observed]
        for item in applied:
            index = next((i for i, o in enumerate(merged) if o[key] == item[key]), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = _apply_merge(merged[index], item)
        return merged
    return copy.deepcopy(applied)


def _apply_remove(observed: Any, previous: Any, applied: Any, field: str = "") -> Any:
    """Drop what the manager applied before and applies no more (it owned those fields; nobody else does here)."""
    if isinstance(previous, dict) and isinstance(observed, dict):
        applied = applied if isinstance(applied, dict) else {}
        result = dict(observed)
        for key, value in previous.items():
            if key not in applied:
                result.pop(key, None)
            elif key in result:
                result[key] = _apply_remove(result[key], value, applied[key], key)
        return result
    if isinstance(previous, list) and isinstance(observed, list) and isinstance(applied, list) and \
            (key := _list_key(field, previous, applied, observed)):
        kept = {item[key] for item in applied}
        gone = {item[key] for item in previous} - kept
        before = {item[key]: item for item in previous}
        after = {item[key]: item for item in applied}
        return [_apply_remove(item, before[item[key]], after[item[key]]) if item[key] in before and item[key] in after
                else item for item in observed if item[key] not in gone]
    return observed


def _resource(group: str, version: str, plural: str) -> kmock.resource:
    return kmock.resource(group=group, version=version, plural=plural)


RESOURCES = {
    ("tideserve.io", "v1alpha1", "llmdeployments"): dict(kind="LLMDeployment", namespaced=True, subresources={"status", "scale"}),
    ("apps", "v1", "deployments"): dict(kind="Deployment", namespaced=True, subresources={"status", "scale"}),
    ("apps", "v1", "replicasets"): dict(kind="ReplicaSet", namespaced=True, subresources={"status", "scale"}),
    ("", "v1", "services"): dict(kind="Service", namespaced=True, subresources={"status"}),
    ("policy", "v1", "poddisruptionbudgets"): dict(kind="PodDisruptionBudget", namespaced=True, subresources={"status"}),
    ("", "v1", "pods"): dict(kind="Pod", namespaced=True, subresources={"status"}),
    ("", "v1", "events"): dict(kind="Event", namespaced=True, subresources=set()),
    ("", "v1", "configmaps"): dict(kind="ConfigMap", namespaced=True, subresources=set()),
    ("", "v1", "namespaces"): dict(kind="Namespace", namespaced=False, subresources={"status"}),
    ("kopf.dev", "v1", "clusterkopfpeerings"): dict(kind="ClusterKopfPeering", namespaced=False, subresources=set()),
    ("apiextensions.k8s.io", "v1", "customresourcedefinitions"): dict(kind="CustomResourceDefinition", namespaced=False, subresources={"status"}),
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


class ApiError(kmock.KubernetesError):
    pass


def _fail(status: int, reason: str, message: str) -> ApiError:
    return ApiError(status=status, reason=reason, message=message, details={})


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _matches_selector(labels: dict[str, str], selector: str | None) -> bool:
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _content_type(request: kmock.Request) -> str:
    return request.headers.get("Content-Type", "").split(";")[0].strip().lower()


class StrictKubernetesEmulator(kmock.KubernetesEmulator):
    granted: set[tuple[str, str]] | None = None  # (group/resource, verb) the operator's RBAC allows
    mutate = None  # a callable(kind, obj) that edits a written object in place: a mutating webhook

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._revision = itertools.count(1)
        self._current_revision = 0
        self._history: dict[kmock.resource, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
        self._applied: dict[tuple, dict[str, Any]] = {}  # (object key, field manager) -> its last applied intent
        self._watchers: dict[kmock.resource, list[asyncio.Queue]] = defaultdict(list)
        for (group, version, plural), info in RESOURCES.items():
            self.resources[_resource(group, version, plural)] = kmock.ResourceInfo(verbs=VERBS, **info)

    # ---- bookkeeping ------------------------------------------------------------------------------------

    def _next_revision(self) -> str:
        self._current_revision = next(self._revision)
        return str(self._current_revision)

    def _has_subresource(self, resource: kmock.resource, name: str) -> bool:
        return resource in self.resources and name in self.resources[resource].subresources

    def _notify(self, resource: kmock.resource, event_type: str, obj: dict[str, Any]) -> None:
        event = {"type": event_type, "object": copy.deepcopy(obj)}
        self._history[resource].append((int(obj["metadata"]["resourceVersion"]), event))
        for queue in self._watchers[resource]:
            queue.put_nowait(event)

    def _live(self, key) -> dict[str, Any] | None:
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def _store(self, key, obj: dict[str, Any]) -> None:
        if key in self._objects:
            self._objects[key].history.append(obj)
        else:
            self._objects[key] = obj

    # ---- request handling -------------------------------------------------------------------------------

    def _authorize(self, request: kmock.Request) -> None:
        """RBAC, for the operator's requests (not the test's own): what the chart does not grant is refused."""
        asked = rbac_request(request)
        if self.granted is not None and asked is not None and asked not in self.granted:
            resource, verb = asked
            raise _fail(403, "Forbidden", f'{resource} is forbidden: User "system:serviceaccount:tideserve:tideserve" '
                                          f'cannot {verb} resource {resource!r}')

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        self._authorize(request)
        if request.resource is None or request.action in (enums.action.LIST, enums.action.WATCH):
            return await super()._handle(request)
        if request.method == enums.method.PUT:
            raise _fail(405, "MethodNotAllowed", "PUT (replace) is not emulated; the operator only patches")
        async with self._lock:
            if request.action == enums.action.FETCH:
                result = self._fetch(request)
            elif request.action == enums.action.CREATE:
                result = self._create(request)
            elif request.action == enums.action.UPDATE and _content_type(request) == APPLY_PATCH:
                result = self._apply(request)
            elif request.action == enums.action.UPDATE:
                result = self._patch(request)
            elif request.action == enums.action.DELETE:
                result = self._delete(request)
            else:
                raise _fail(405, "MethodNotAllowed", f"{request.method} is not emulated")
        return aiohttp.web.json_response(result)

    def _fetch(self, request: kmock.Request) -> dict[str, Any]:
        obj = self._live((request.resource, request.namespace, request.name))
        if obj is None:
            raise _fail(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        if request.subresource == "scale":
            return self._as_scale(obj)
        return obj

    def _create(self, request: kmock.Request) -> dict[str, Any]:
        if _content_type(request) != "application/json" or not isinstance(request.data, dict):
            raise _fail(415, "UnsupportedMediaType", "create needs an application/json object")
        obj = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        if meta.get("resourceVersion"):
            raise _fail(422, "Invalid", "metadata.resourceVersion must not be set on create")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace:
            meta["namespace"] = request.namespace
        key = (request.resource, meta.get("namespace"), meta["name"])
        if self._live(key) is not None:
            raise _fail(409, "AlreadyExists", f"{request.resource.plural} {meta['name']!r} already exists")
        if self._has_subresource(request.resource, "status"):
            obj.pop("status", None)  # the status subresource is the only way to write status
        meta.update(uid=str(uuid.uuid4()), generation=1, resourceVersion=self._next_revision(),
                    creationTimestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self._admit_owner_references(request, obj)
        self._mutated(request, obj)
        self._store(key, obj)
        self._notify(request.resource, "ADDED", obj)
        return obj

    def _mutated(self, request: kmock.Request, obj: dict[str, Any]) -> dict[str, Any]:
        if self.mutate is not None and request.resource in self.resources:
            self.mutate(self.resources[request.resource].kind, obj)
        return obj

    def _apply(self, request: kmock.Request) -> dict[str, Any]:
        manager = request.params.get("fieldManager")
        if not manager:
            raise _fail(400, "BadRequest", "PATCH with apply-patch+yaml requires the fieldManager parameter")
        if request.subresource or not isinstance(request.data, dict):
            raise _fail(400, "BadRequest", "apply an object to the main resource")
        key = (request.resource, request.namespace, request.name)
        intent = copy.deepcopy(request.data)
        wanted_version = intent.get("metadata", {}).pop("resourceVersion", None)
        old = self._live(key)
        if old is None:
            if wanted_version:
                raise _fail(409, "Conflict", "the object has been modified (it is gone)")
            obj = copy.deepcopy(intent)
            meta = obj.setdefault("metadata", {})
            meta["namespace"], meta["name"] = request.namespace, request.name
            meta.update(uid=str(uuid.uuid4()), generation=1, resourceVersion=self._next_revision(),
                        creationTimestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            obj.pop("status", None)
            self._admit_owner_references(request, obj)
            self._mutated(request, obj)
            self._applied[key, manager] = intent
            self._store(key, obj)
            self._notify(request.resource, "ADDED", obj)
            return obj
        if wanted_version is not None and wanted_version != old["metadata"]["resourceVersion"]:
            raise _fail(409, "Conflict", "the object has been modified; please apply your changes to the latest version")
        previous = self._applied.get((key, manager), {})
        base = _apply_remove(old, {k: v for k, v in previous.items() if k != "status"}, intent)
        new = self._mutated(request, _apply_merge(base, {k: v for k, v in intent.items() if k != "status"}))
        for field in ("uid", "creationTimestamp", "generation", "resourceVersion", "namespace", "name"):
            if field in old["metadata"]:
                new["metadata"][field] = old["metadata"][field]
        self._applied[key, manager] = intent
        if new == old:
            return old
        if {k: v for k, v in new.items() if k not in ("metadata", "status")} != \
                {k: v for k, v in old.items() if k not in ("metadata", "status")}:
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if new["metadata"].get("ownerReferences") != old["metadata"].get("ownerReferences"):
            self._admit_owner_references(request, new)
        new["metadata"]["resourceVersion"] = self._next_revision()
        self._store(key, new)
        self._notify(request.resource, "MODIFIED", new)
        return new

    def _admit_owner_references(self, request: kmock.Request, obj: dict[str, Any]) -> None:
        """Validation (one controller reference at most), then OwnerReferencesPermissionEnforcement, for the
        operator's requests (not the test's own)."""
        if sum(1 for ref in obj.get("metadata", {}).get("ownerReferences", []) if ref.get("controller")) > 1:
            raise _fail(422, "Invalid", "metadata.ownerReferences: Invalid value: only one reference can have "
                                        "Controller set to true")
        if self.granted is None or request.headers.get("User-Agent", "").startswith("kmock/"):
            return
        for ref in obj.get("metadata", {}).get("ownerReferences", []):
            if not ref.get("blockOwnerDeletion"):
                continue
            group = ref["apiVersion"].rpartition("/")[0]
            plurals = [p for (g, _, p), info in RESOURCES.items() if g == group and info["kind"] == ref["kind"]]
            if not any((f"{group or 'core'}/{p}/finalizers", "update") in self.granted for p in plurals):
                raise _fail(403, "Forbidden", f"{request.resource.plural} \"{obj['metadata'].get('name')}\" is "
                            "forbidden: cannot set blockOwnerDeletion if an ownerReference refers to a resource you "
                            "can't set finalizers on: , <nil>")

    def _patch(self, request: kmock.Request) -> dict[str, Any]:
        key = (request.resource, request.namespace, request.name)
        old = self._live(key)
        if old is None:
            raise _fail(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        content_type, body = _content_type(request), request.data
        subject = self._as_scale(old) if request.subresource == "scale" else old
        if content_type == JSON_PATCH:
            if not isinstance(body, list):
                raise _fail(400, "BadRequest", "a JSON patch must be a list of operations")
            try:
                patched = jsonpatch.apply_patch(subject, body)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise _fail(422, "Invalid", f"the JSON patch test failed: {exc}")
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise _fail(422, "Invalid", str(exc))
        elif content_type == MERGE_PATCH:
            if not isinstance(body, dict):
                raise _fail(400, "BadRequest", "a merge patch must be a JSON object")
            wanted = body.get("metadata", {}).get("resourceVersion")
            if wanted is not None and wanted != old["metadata"]["resourceVersion"]:
                raise _fail(409, "Conflict", "the object has been modified; please apply your changes to the latest version")
            patched = _merge_patch(subject, body)
        elif content_type == "application/strategic-merge-patch+json":
            custom = request.resource.group not in BUILTIN_GROUPS
            raise _fail(415, "UnsupportedMediaType", "strategic merge patch is not supported for custom resources"
                        if custom else "strategic merge patch is not emulated; use a merge or JSON patch")
        else:
            raise _fail(415, "UnsupportedMediaType", f"the patch content type {content_type!r} is not supported")

        if request.subresource == "scale":
            new = copy.deepcopy(old)
            new.setdefault("spec", {})["replicas"] = patched["spec"]["replicas"]
        elif request.subresource == "status":
            new = copy.deepcopy(old)
            new["status"] = patched.get("status", {})
        elif self._has_subresource(request.resource, "status"):
            new = patched
            new["status"] = copy.deepcopy(old.get("status", {}))
            if not new["status"]:
                new.pop("status")
        else:
            new = patched
        if not request.subresource:
            self._mutated(request, new)
        for field in ("uid", "creationTimestamp", "generation", "resourceVersion", "namespace", "name"):
            if field in old["metadata"]:
                new.setdefault("metadata", {})[field] = old["metadata"][field]
        if new == old:
            return self._as_scale(old) if request.subresource == "scale" else old  # a no-op write
        if {k: v for k, v in new.items() if k not in ("metadata", "status")} != \
                {k: v for k, v in old.items() if k not in ("metadata", "status")}:
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        new["metadata"]["resourceVersion"] = self._next_revision()
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(request.resource, key, new)
            return new
        if new["metadata"].get("ownerReferences") != old["metadata"].get("ownerReferences"):
            self._admit_owner_references(request, new)
        self._store(key, new)
        self._notify(request.resource, "MODIFIED", new)
        return self._as_scale(new) if request.subresource == "scale" else new

    def _delete(self, request: kmock.Request) -> dict[str, Any]:
        key = (request.resource, request.namespace, request.name)
        old = self._live(key)
        if old is None:
            raise _fail(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        preconditions = (request.data or {}).get("preconditions", {}) if isinstance(request.data, dict) else {}
        for field in ("uid", "resourceVersion"):
            if field in preconditions and preconditions[field] != old["metadata"].get(field):
                raise _fail(409, "Conflict", f"precondition failed: {field} does not match")
        if old["metadata"].get("finalizers"):
            if not old["metadata"].get("deletionTimestamp"):
                old["metadata"]["deletionTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                old["metadata"]["resourceVersion"] = self._next_revision()
                self._store(key, old)
                self._notify(request.resource, "MODIFIED", old)
            return old
        old["metadata"]["resourceVersion"] = self._next_revision()
        self._remove(request.resource, key, old)
        return old

    def _remove(self, resource: kmock.resource, key, obj: dict[str, Any]) -> None:
        """Delete, then garbage-collect the dependents (background propagation, done at once)."""
        self._objects[key].delete()
        self._notify(resource, "DELETED", obj)
        uid = obj["metadata"]["uid"]
        for dependent_key in list(self._objects):
            dependent = self._live(dependent_key)
            if dependent and any(ref.get("uid") == uid for ref in dependent["metadata"].get("ownerReferences", [])):
                dependent["metadata"]["resourceVersion"] = self._next_revision()
                self._remove(dependent_key[0], dependent_key, dependent)

    def _as_scale(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta},
                "spec": {"replicas": obj.get("spec", {}).get("replicas", 0)},
                "status": {"replicas": obj.get("status", {}).get("replicas", 0),
                           "selector": obj.get("status", {}).get("selector", "")}}

    # ---- reads with label selectors and resource versions -------------------------------------------------

    def _selected(self, request: kmock.Request) -> list[dict[str, Any]]:
        selector = request.params.get("labelSelector")
        found = []
        for (resource, namespace, _name), obj in self._objects.items():
            if resource != request.resource or obj.deleted:
                continue
            if request.namespace is not None and namespace != request.namespace:
                continue
            if _matches_selector(obj.raw.get("metadata", {}).get("labels", {}), selector):
                found.append(copy.deepcopy(obj.raw))
        return found

    async def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        async with self._lock:
            return {"apiVersion": "v1", "kind": "List", "items": self._selected(request),
                    "metadata": {"resourceVersion": str(self._current_revision)}}

    async def _serve_watch(self, request: kmock.Request):
        yield b""  # send the headers at once
        selector = request.params.get("labelSelector")
        since = request.params.get("resourceVersion")
        queue: asyncio.Queue = asyncio.Queue()
        async with self._lock:
            if since and since.isdigit():
                backlog = [event for rv, event in self._history[request.resource] if rv > int(since)]
            else:
                backlog = [{"type": "ADDED", "object": obj} for obj in self._selected(request)]
            self._watchers[request.resource].append(queue)
        try:
            for event in backlog:
                queue.put_nowait(event)
            while True:
                event = await queue.get()
                meta = event["object"]["metadata"]
                if request.namespace is not None and meta.get("namespace") != request.namespace:
                    continue
                if _matches_selector(meta.get("labels", {}), selector):
                    yield event
        finally:
            self._watchers[request.resource].remove(queue)

    # ---- test helpers ---------------------------------------------------------------------------------

    def writes(self) -> list[kmock.Request]:
        """Requests that change state (kopf's and the operator's), in order."""
        return [r for r in self._requests if r.method in (enums.method.POST, enums.method.PATCH,
                                                          enums.method.PUT, enums.method.DELETE)]

    def get(self, group: str, version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._live((_resource(group, version, plural), namespace, name))


def write_kubeconfig(path, server: str) -> str:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
    }))
    return str(path)


@functools.cache
def chart_rbac(*values: str) -> frozenset[tuple[str, str]]:
    """What the chart's cluster-wide install (with these `--set` values) grants the operator's ServiceAccount."""
    args = ["--set", "clusterWide=true"]
    for value in values:
        args += ["--set", value]
    return frozenset(rules_by_kind(render(args), "ClusterRole")[""])


@pytest_asyncio.fixture
async def api():
    emulator = StrictKubernetesEmulator()
    emulator.granted = set(chart_rbac())
    async with emulator, kmock.Server(emulator):
        yield emulator


class RunningOperator:
    """The real operator (handlers.registry under kopf.operator), standalone and cluster-wide, as
    `tideserve operator` runs it, in a thread with its own event loop: kopf's shutdown cancels every task of
    its loop that it did not see at startup, which must not hit the test's tasks or the emulator's."""

    def __init__(self, kubeconfig: str, autoscaler_options: AutoscalerOptions | None = None):
        # The admin key file next to the kubeconfig, as the chart mounts one: an operator restarted in the same
        # test directory keeps the key (and so every token).
        self.admin_key_file = pathlib.Path(kubeconfig).parent / "admin-key"
        if not self.admin_key_file.exists():
            self.admin_key_file.write_text(secrets.token_hex(32))
        self.memo = handlers.new_memo(load_configuration(kubeconfig),
                                      OperatorConfig(tideserve_image="tideserve-worker:test"),
                                      AdminKey(str(self.admin_key_file)), autoscaler_options)
        self.stop, self.ready = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._main, name="operator", daemon=True)

    def _main(self) -> None:
        settings = kopf.OperatorSettings()
        settings.watching.reconnect_backoff = 0.05
        try:
            asyncio.run(kopf.operator(registry=handlers.registry, settings=settings, memo=self.memo,
                                      clusterwide=True, standalone=True, stop_flag=self.stop, ready_flag=self.ready))
        except BaseException as exc:  # surfaced by shutdown()
            self.errors.append(exc)

    async def start(self) -> "RunningOperator":
        self.thread.start()
        assert await asyncio.to_thread(self.ready.wait, 30), "the operator did not start"
        return self

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.to_thread(self.thread.join, 30)  # the emulator keeps serving meanwhile
        assert not self.thread.is_alive(), "the operator did not stop"
        assert not self.errors, self.errors


@pytest.fixture
def fast_key_checks(monkeypatch):
    """Check the admin key file for a change every 0.1 s (request it before `operator`)."""
    monkeypatch.setattr(handlers, "KEY_CHECK_SECONDS", 0.1)


@pytest_asyncio.fixture
async def operator(api, tmp_path):
    running = await RunningOperator(write_kubeconfig(tmp_path / "kubeconfig", str(api.url))).start()
    try:
        yield running
    finally:
        await running.shutdown()


def rbac_request(r: kmock.Request) -> tuple[str, str] | None:
    """(resource, verb) of one of the operator's or kopf's API requests, as RBAC rules name them; None for the
    test's own requests and for discovery (allowed to every authenticated user)."""
    if r.headers.get("User-Agent", "").startswith("kmock/") or r.resource is None or r.resource.plural is None:
        return None
    resource = f"{r.resource.group or 'core'}/{r.resource.plural}" + (f"/{r.subresource}" if r.subresource else "")
    verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}.get(r.method.value) or (
        "watch" if r.params.get("watch") == "true" else "get" if r.name else "list")
    return resource, verb


def requests_as_rbac(api) -> set[tuple[str, str]]:
    """The (resource, verb) pairs of every API request the operator and kopf made."""
    return {asked for r in api._requests if (asked := rbac_request(r)) is not None}


async def eventually(check, timeout: float = 10.0, interval: float = 0.02):
    """Wait until check() returns something truthy (and return it); fail with the last value otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)
