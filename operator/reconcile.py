"""One reconcile of one LLMDeployment: read, compare with the desired state, write only the differences.

Level-based: whatever triggered it (a spec change, an edited or deleted child, a pod event), it reads the
LLMDeployment and its children fresh and converges them, so running it again with nothing changed sends no
write at all. Synchronous (the official client is); handlers.py runs it in a thread, one at a time per
LLMDeployment. The decisions are the pure functions of manifests.py, patching.py and status.py. Children are
written with server-side apply (patching.FIELD_MANAGER), so what a mutating webhook adds stays and converges.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from tideserve.operator import admin_token, manifests, patching, status as status_mod
from tideserve.operator.resource import GROUP, PLURAL, VERSION, defaulted
from tideserve.operator.status import Problem
from tideserve.operator.validation import validate

# Rejections that retrying will not fix until someone changes something: report them in status instead.
REJECTED = {400, 403, 422}
STATUS_RETRIES = 5


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Child:
    kind: str
    collection: str  # path to POST to
    path: str  # path of the object


def llmdeployment_path(namespace: str, name: str, subresource: str = "") -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
    return f"{path}/{subresource}" if subresource else path


def children(namespace: str, name: str) -> dict[str, Child]:
    def child(kind: str, base: str, plural: str, object_name: str = name) -> Child:
        collection = f"{base}/namespaces/{namespace}/{plural}"
        return Child(kind, collection, f"{collection}/{object_name}")

    # The Secret first: pods of a new Deployment mount it.
    return {"Secret": child("Secret", "/api/v1", "secrets", manifests.admin_secret_name(name)),
            "Deployment": child("Deployment", "/apis/apps/v1", "deployments"),
            "Service": child("Service", "/api/v1", "services"),
            "PodDisruptionBudget": child("PodDisruptionBudget", "/apis/policy/v1", "poddisruptionbudgets"),
            "WorkerService": child("Service", "/api/v1", "services", manifests.worker_service_name(name)),
            "RouterDeployment": child("Deployment", "/apis/apps/v1", "deployments", manifests.router_name(name)),
            "RouterPodDisruptionBudget": child("PodDisruptionBudget", "/apis/policy/v1", "poddisruptionbudgets",
                                               manifests.router_name(name))}


def _with_precondition(patch: dict[str, Any], observed: dict[str, Any]) -> dict[str, Any]:
    # A resourceVersion in a patch makes the server refuse it (409) if the object changed since it was read.
    return {**patch, "metadata": {**patch.get("metadata", {}),
                                  "resourceVersion": observed["metadata"]["resourceVersion"]}}


def reconcile(kube, config: manifests.OperatorConfig, admin_key: admin_token.AdminKey, namespace: str, name: str,
              now: datetime.datetime | None = None) -> list[Event]:
    """Converge one LLMDeployment; returns the events to post on it. Raises ApiException on API errors that
    are worth retrying (conflicts, server errors, throttling)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    raw = kube.get(llmdeployment_path(namespace, name))
    if raw is None or raw["metadata"].get("deletionTimestamp"):
        return []  # gone or going: garbage collection removes the children through their owner references
    llmd = defaulted(raw)
    events: list[Event] = []
    problems = [Problem("InvalidSpec", str(error)) for error in validate(llmd)]
    paths = children(namespace, name)
    deployment = kube.get(paths["Deployment"].path)
    decision = None
    if not problems:
        try:
            secret, event, problem = _converge_admin_secret(kube, llmd, paths["Secret"], deployment, admin_key)
        except ApiException as exc:
            if exc.status not in REJECTED:
                raise
            secret, event, problem = None, None, Problem("ApplyRejected", f"Secret {paths['Secret'].path.rsplit('/', 1)[1]}: "
                                                                          f"{exc.status} {_api_message(exc)}")
        events += [event] if event else []
        problems += [problem] if problem else []
        annotations = {admin_token.TOKEN_ANNOTATION: " ".join(secret)} if secret else None
        desired = {"Deployment": manifests.build_deployment(llmd, config, annotations),
                   "Service": manifests.build_service(llmd),
                   "PodDisruptionBudget": manifests.build_pod_disruption_budget(llmd),
                   "WorkerService": manifests.build_worker_service(llmd),
                   "RouterDeployment": manifests.build_router_deployment(llmd, config),
                   "RouterPodDisruptionBudget": manifests.build_router_pod_disruption_budget(llmd)}
        if problem is not None:  # pods must not start against a Secret that is not this deployment's
            del desired["Deployment"]
        for kind, child_desired in desired.items():
            child = paths[kind]
            observed = deployment if kind == "Deployment" else kube.get(child.path)
            try:
                result, event, decision_here = _converge_child(kube, llmd, child, child_desired, observed, now)
            except ApiException as exc:
                if exc.status not in REJECTED:
                    raise
                problems.append(Problem("ApplyRejected", f"{child.kind} {child.path.rsplit('/', 1)[1]}: "
                                                         f"{exc.status} {_api_message(exc)}"))
                continue
            if isinstance(result, Problem):
                problems.append(result)
                if kind == "Deployment":
                    deployment = None  # someone else's: its replicas say nothing about this LLMDeployment
                continue
            if kind == "Deployment":
                deployment = result
            if event:
                events.append(event)
            decision = decision or decision_here
    pods = kube.list(f"/api/v1/namespaces/{namespace}/pods", manifests.label_selector(name))
    return events + _write_status(kube, raw, llmd, deployment, pods, problems, decision, now)


def _write_status(kube, raw, llmd, deployment, pods, problems, decision, now) -> list[Event]:
    """Patch the owned status fields. The autoscaling loop writes status too: when its write gets in between
    (409), re-read and recompute from the fresh status rather than redo the whole reconcile, which would find
    the children converged and lose this reconcile's events and scaling decision. A changed spec (generation)
    gives up: the update handler reconciles it anew."""
    namespace, name = raw["metadata"]["namespace"], raw["metadata"]["name"]
    for attempt in range(STATUS_RETRIES):
        new_status = status_mod.compute_status(llmd, deployment, pods, problems, decision, now)
        patch = status_mod.status_patch(raw.get("status", {}), new_status)
        if not patch:
            break
        try:
            kube.merge_patch(llmdeployment_path(namespace, name, "status"), _with_precondition({"status": patch}, raw))
            break
        except ApiException as exc:
            fresh = kube.get(llmdeployment_path(namespace, name)) if exc.status == 409 else None
            if fresh is None or attempt + 1 == STATUS_RETRIES or \
                    fresh["metadata"].get("generation") != raw["metadata"].get("generation"):
                raise
            raw, llmd = fresh, {**llmd, "status": fresh.get("status", {}), "metadata": fresh["metadata"]}
    return [Event(*e) for e in status_mod.condition_events(raw.get("status", {}).get("conditions", []),
                                                          new_status["conditions"])]


def _converge_child(kube, llmd, child: Child, desired: dict[str, Any] | None, observed: dict[str, Any] | None,
                    now: datetime.datetime):
    """Create, patch or delete one child. Returns (the object as it now is or a Problem, an event or None,
    a scaling decision or None)."""
    name = child.path.rsplit("/", 1)[1]
    if observed is not None and not manifests.is_owned_by(observed, llmd):
        return Problem("NameConflict", f"{child.kind} {name} exists and is not owned by this LLMDeployment; "
                                       "rename or delete it"), None, None
    if desired is None:
        if observed is None:
            return None, None, None
        kube.delete(child.path, observed["metadata"]["uid"], observed["metadata"]["resourceVersion"])
        return None, Event("Normal", "Deleted", f"{child.kind} {name} deleted"), None
    if observed is None or patching.needs_apply(desired, observed):
        body = patching.with_last_applied(desired)
        if observed is not None:  # the apply holds only if the object is still the one compared with
            body["metadata"]["resourceVersion"] = observed["metadata"]["resourceVersion"]
        updated = kube.apply(child.path, body, patching.FIELD_MANAGER)
    else:
        updated = observed
    if observed is None:
        return updated, Event("Normal", "Created", f"{child.kind} {name} created"), None
    if updated is observed:
        return observed, None, None
    changed = patching.changed_paths(desired, observed)
    workers = child.kind == "Deployment" and name == llmd["metadata"]["name"]
    if workers and desired["spec"]["replicas"] != observed["spec"].get("replicas", 1):
        decision = status_mod.scaling_decision(llmd, observed["spec"].get("replicas", 1), desired["spec"]["replicas"], now)
        changed = [c for c in changed if c != "spec.replicas"]
        message = f"Deployment {name} scaled from {decision['from']} to {decision['to']}: {decision['reason']}"
        if changed:
            message += f"; also updated {', '.join(changed)}"
        return updated, Event("Normal", "Scaled", message), decision
    what = ", ".join(changed) or "bookkeeping annotation"
    return updated, Event("Normal", "Updated", f"{child.kind} {name} updated: {what}"), None


def _converge_admin_secret(kube, llmd, child: Child, deployment: dict[str, Any] | None,
                           admin_key: admin_token.AdminKey):
    """Write the Secret NAME-admin without ever reading a Secret: the owned Deployment's TOKEN_ANNOTATION says
    which Secret (uid) holds which token (digest), and the Secret is applied only when the key's token differs.
    Returns ((Secret uid, token digest) to record, or None; an event or None; a Problem or None)."""
    if deployment is not None and not manifests.is_owned_by(deployment, llmd):
        return None, None, None  # the Deployment's NameConflict is reported; its pods are someone else's
    meta = llmd["metadata"]
    secret_name = child.path.rsplit("/", 1)[1]
    record = admin_token.recorded(((deployment or {}).get("metadata", {}).get("annotations") or {})
                                  .get(admin_token.TOKEN_ANNOTATION))
    token = admin_key.token(meta["namespace"], meta["name"], meta["uid"])
    desired = manifests.build_admin_secret(llmd, token)
    if desired is None:
        if record is None:
            return None, None, None
        try:  # only the Secret this operator wrote: a same-named one created since has another uid (409)
            kube.delete(child.path, uid=record[0])
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
            return None, None, None
        return None, Event("Normal", "Deleted", f"Secret {secret_name} deleted"), None
    digest = admin_token.token_digest(token)
    if record is not None and record[1] == digest:
        return record, None, None
    # No last-applied record: it would put the token into metadata. Without a record, create: that fails (409)
    # rather than write into a Secret that exists. Then apply, which a same-named Secret with another controller
    # refuses (two controller references: 422).
    if record is None:
        try:
            created = kube.create(child.collection, desired, patching.FIELD_MANAGER)
            return (created["metadata"]["uid"], digest), Event("Normal", "Created", f"Secret {secret_name} created"), None
        except ApiException as exc:
            if exc.status != 409:
                raise
    applied = kube.apply(child.path, desired, patching.FIELD_MANAGER)
    return (applied["metadata"]["uid"], digest), \
        Event("Normal", "Updated", f"Secret {secret_name} updated: the admin token of the current admin key"), None


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message", exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason)
