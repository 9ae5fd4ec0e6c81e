"""When to write a child object, and what: server-side apply with the operator's field manager.

The operator sends its whole intent (the desired manifest) as an apply patch; the API server merges it with what
others own. A field the operator applied before and no longer wants is removed by the server (it owns it through
its managedFields); a field someone else added (a mutating webhook's env var or sidecar, a `kubectl rollout
restart` annotation, an allocated nodePort, defaults) stays theirs and is never fought over.

A write happens only when it would change something: the intent changed since the last apply (the manifest is
recorded in the child's LAST_APPLIED_ANNOTATION, which the apply itself sets) or the observed object no longer
holds every desired field (drift). Lists the API server merges by key (containers and env by name, ...) are
compared item by item by that key, so an item another writer added is not drift; other lists are atomic.
"""

from __future__ import annotations

import json
from decimal import InvalidOperation
from typing import Any

from kubernetes.utils import parse_quantity

FIELD_MANAGER = "tideserve-operator"
LAST_APPLIED_ANNOTATION = "tideserve.io/last-applied"
# The merge keys of the lists the operator writes (x-kubernetes-list-map-keys in the Kubernetes API): items are
# matched by these, and items of other writers are left alone.
LIST_MAP_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
                 "volumeMounts": "mountPath", "imagePullSecrets": "name", "ownerReferences": "uid",
                 "ports": ("containerPort", "port")}
_ABSENT = object()


def last_applied(observed: dict[str, Any]) -> str | None:
    return observed.get("metadata", {}).get("annotations", {}).get(LAST_APPLIED_ANNOTATION)


def _record(desired: dict[str, Any]) -> str:
    return json.dumps(desired, sort_keys=True, separators=(",", ":"))


def with_last_applied(desired: dict[str, Any]) -> dict[str, Any]:
    """The manifest to apply: the desired one plus a record of itself."""
    result = dict(desired)
    result["metadata"] = {**desired["metadata"],
                          "annotations": {**desired["metadata"].get("annotations", {}),
                                          LAST_APPLIED_ANNOTATION: _record(desired)}}
    return result


def is_empty(value: Any) -> bool:
    """The API server omits empty lists and maps, so they read back as absent."""
    return value is _ABSENT or value is None or value == [] or value == {}


def _quantities_equal(a: Any, b: Any) -> bool:
    try:
        return parse_quantity(a) == parse_quantity(b)
    except (ValueError, TypeError, InvalidOperation):
        return False


def list_key(field: str | None, items: list[Any]) -> str | None:
    """The merge key of a list, when it is one the API server merges by key and every item has it."""
    keys = LIST_MAP_KEYS.get(field or "")
    for key in (keys,) if isinstance(keys, str) else keys or ():
        if items and all(isinstance(item, dict) and key in item for item in items):
            return key
    return None


def matches(desired: Any, observed: Any, field: str | None = None) -> bool:
    """Whether the observed value holds the desired one, ignoring what others add (defaults, extra map keys, extra
    items of keyed lists) and how the server spells quantities ("1000m" reads back as "1")."""
    if is_empty(desired):
        return is_empty(observed)
    if isinstance(desired, dict):
        return isinstance(observed, dict) and all(matches(v, observed.get(k, _ABSENT), k) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(observed, list):
            return False
        key = list_key(field, desired)
        if key is not None:
            by_key = {item.get(key): item for item in observed if isinstance(item, dict)}
            return all(matches(item, by_key.get(item[key], _ABSENT), None) for item in desired)
        return len(desired) == len(observed) and all(matches(d, o) for d, o in zip(desired, observed))
    if desired == observed:
        return True
    if isinstance(desired, (str, int)) and isinstance(observed, (str, int)) and not isinstance(desired, bool):
        return _quantities_equal(desired, observed)
    return False


def drifted(desired: dict[str, Any], observed: dict[str, Any], prefix: str = "", depth: int = 2) -> list[str]:
    """Dotted paths (to `depth` levels) where the observed object does not hold the desired value."""
    paths = []
    for key, want in desired.items():
        path = f"{prefix}.{key}" if prefix else key
        have = observed.get(key, _ABSENT) if isinstance(observed, dict) else _ABSENT
        if isinstance(want, dict) and want and isinstance(have, dict) and path.count(".") < depth:
            paths += drifted(want, have, path, depth)
        elif not matches(want, have, key):
            paths.append(path)
    return paths


def needs_apply(desired: dict[str, Any], observed: dict[str, Any]) -> bool:
    """Whether an apply would change anything: a new intent, or drift. Only metadata and spec are compared:
    status belongs to the server."""
    scope = {key: desired[key] for key in ("metadata", "spec") if key in desired}
    return last_applied(observed) != _record(desired) or not matches(scope, observed)


def changed_paths(desired: dict[str, Any], observed: dict[str, Any]) -> list[str]:
    """What an apply changes, for events ("spec.replicas", "spec.template"): drifted fields, or, when only the
    intent changed (a field dropped), the parts whose intent changed."""
    scope = {key: desired[key] for key in ("metadata", "spec") if key in desired}
    paths = drifted(scope, observed)
    if paths:
        return paths
    try:
        before = json.loads(last_applied(observed) or "{}")
    except ValueError:
        before = {}
    return [f"{part}.{key}" for part in ("metadata", "spec") for key in set(before.get(part, {})) | set(scope.get(part, {}))
            if before.get(part, {}).get(key) != scope.get(part, {}).get(key)]
