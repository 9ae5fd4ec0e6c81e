"""The kopf handlers: thin, they only route events to reconcile.reconcile().

- The LLMDeployment's resume/create/update handlers reconcile it; API errors become kopf.TemporaryError, so
  kopf retries them with its backoff (retry state lives in status.kopf, never in metadata).
- Events of the owned Deployments, Services, PodDisruptionBudgets and pods (watched with a server-side label
  selector, so the operator never lists every pod of the cluster) reconcile their owner: a deleted or edited
  Deployment comes back, pod changes reach the status. These are best-effort, as kopf event handlers are:
  a failure is logged and the next event of the owner or any of its children retries.
- An asyncio lock per LLMDeployment keeps two reconciles of one object from interleaving; peering keeps two
  operator replicas from both acting.

- Every watch event of an LLMDeployment also reaches the autoscaler's supervisor (autoscaler_loop.py), which
  starts, keeps or stops that object's autoscaling loop: plain asyncio tasks, not kopf timers or daemons,
  because those put a finalizer on the object. kopf's cleanup stops every loop, each saving what its policy
  learned.

- The admin key (admin_token.py) is checked for a change every KEY_CHECK_SECONDS; a new key reconciles every
  LLMDeployment seen so far, which rewrites its NAME-admin Secret with the new token.

No finalizer: the children are deleted by garbage collection through their owner references.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from tideserve.operator import kube as kube_mod, reconcile as reconcile_mod
from tideserve.operator.admin_token import AdminKey
from tideserve.operator.autoscaler_loop import Autoscaler, AutoscalerOptions
from tideserve.operator.autoscaler_metrics import AutoscalerMetrics
from tideserve.operator.manifests import MANAGED_BY, MANAGED_BY_LABEL, SELECTOR_LABEL
from tideserve.operator.resource import GROUP, KIND, PLURAL, VERSION

log = logging.getLogger("tideserve.operator")
registry = kopf.OperatorRegistry()

LLMDEPLOYMENTS = (GROUP, VERSION, PLURAL)
OWNED = [("apps", "v1", "deployments"), ("", "v1", "services"), ("policy", "v1", "poddisruptionbudgets"),
         ("", "v1", "pods")]
MANAGED = {MANAGED_BY_LABEL: MANAGED_BY}
CONFLICT_RETRIES = 3  # a 409 means another writer got in between: re-read and go again at once
KEY_CHECK_SECONDS = 10.0  # the kubelet syncs a mounted Secret within about a minute; one stat per check


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.reporting_component = "tideserve-operator"
    settings.posting.event_name_prefix = "tideserve-"
    # kopf's own bookkeeping goes to status.kopf: the operator never writes an LLMDeployment's metadata or
    # spec, so GitOps tools see no drift.
    settings.persistence.progress_storage = kopf.StatusProgressStorage()
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage()
    for group, version, plural in OWNED:
        settings.watching.label_selectors[group, version, plural] = f"{MANAGED_BY_LABEL}={MANAGED_BY}"


@kopf.on.login(registry=registry)
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return kube_mod.connection_info(memo.kube_configuration)


@kopf.on.probe(id="reconciles", registry=registry)
def reconciles_probe(memo: kopf.Memo, **_: Any) -> int:
    """Reported on the liveness endpoint: how many reconciles ran, for a quick look at a live operator."""
    return memo.stats["reconciles"]


@kopf.on.cleanup(registry=registry)
async def stop_autoscaling(memo: kopf.Memo, **_: Any) -> None:
    for task in memo.background:
        task.cancel()
    await asyncio.gather(*memo.background, return_exceptions=True)
    await memo.autoscaler.shutdown()


async def _rotate_on_key_change(memo: kopf.Memo) -> None:
    while True:
        await asyncio.sleep(KEY_CHECK_SECONDS)
        if not memo.admin_key.refresh():
            continue
        for namespace, name in sorted(memo.known):
            try:
                await run_reconcile(memo, namespace, name)
            except Exception:  # the next event of that object, or the next key check, retries
                log.exception("%s/%s: rewriting the admin token after a key change", namespace, name)


def new_memo(kube_configuration, config, admin_key: AdminKey, autoscaler_options: AutoscalerOptions | None = None,
             metrics: AutoscalerMetrics | None = None) -> kopf.Memo:
    """Everything the handlers share: API credentials, the client, image settings, the admin key, per-object
    locks, counters, the LLMDeployments seen, the autoscaler's supervisor. kopf gives each object a shallow copy
    of this memo, so shared state lives in mutable containers."""
    kube = kube_mod.KubeClient(kube_configuration)
    return kopf.Memo(kube_configuration=kube_configuration, kube=kube, config=config, admin_key=admin_key,
                     locks=collections.defaultdict(asyncio.Lock), stats=collections.Counter(), known=set(),
                     background=[], autoscaler=Autoscaler(kube, admin_key, autoscaler_options, metrics))


async def run_reconcile(memo: kopf.Memo, namespace: str, name: str) -> None:
    async with memo.locks[(namespace, name)]:
        for attempt in range(CONFLICT_RETRIES):
            try:
                events = await asyncio.to_thread(reconcile_mod.reconcile, memo.kube, memo.config,
                                                memo.admin_key, namespace, name)
                break
            except ApiException as exc:
                if exc.status == 409 and attempt + 1 < CONFLICT_RETRIES:
                    continue
                raise
        memo.stats["reconciles"] += 1
    if events:
        ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"namespace": namespace, "name": name}}
        for event in events:
            kopf.event(ref, type=event.type, reason=event.reason, message=event.message)
            log.info("%s/%s: %s %s", namespace, name, event.reason, event.message)


@kopf.on.resume(*LLMDEPLOYMENTS, registry=registry)
@kopf.on.create(*LLMDEPLOYMENTS, registry=registry)
@kopf.on.update(*LLMDEPLOYMENTS, registry=registry)
async def reconcile_llmdeployment(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    try:
        await run_reconcile(memo, namespace, name)
    except ApiException as exc:
        # Throttling and server errors pass; a conflict outlived its retries. Both deserve another go soon.
        delay = 60 if exc.status in (401, 403) else 5
        raise kopf.TemporaryError(f"Kubernetes API error {exc.status} {exc.reason}", delay=delay) from exc


@kopf.on.event(*LLMDEPLOYMENTS, registry=registry)
async def llmdeployment_event(event: dict[str, Any], namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    # Async on purpose: a loop task started here inherits kopf's context, which kopf.event() needs.
    deleted = event["type"] == "DELETED"
    if deleted:
        memo.locks.pop((namespace, name), None)
        memo.known.discard((namespace, name))
    else:
        memo.known.add((namespace, name))
    if not memo.background:  # started here, not at startup, to inherit kopf's context (kopf.event needs it)
        memo.background.append(asyncio.get_running_loop().create_task(_rotate_on_key_change(memo)))
    memo.autoscaler.sync(namespace, name, event.get("object"), deleted=deleted)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED, registry=registry)
@kopf.on.event("", "v1", "services", labels=MANAGED, registry=registry)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED, registry=registry)
async def owned_object_changed(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    for ref in body.metadata.get("ownerReferences", []):
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            await run_reconcile(memo, namespace, ref["name"])


@kopf.on.event("", "v1", "pods", labels=MANAGED, registry=registry)
async def pod_changed(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    # Pods are owned by ReplicaSets, not by the LLMDeployment; the selector label names the LLMDeployment.
    owner = body.metadata.get("labels", {}).get(SELECTOR_LABEL)
    if owner:
        await run_reconcile(memo, namespace, owner)
