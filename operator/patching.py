"""What to write: the JSON merge patch (RFC 7386) that brings an observed child object to its desired state.

Three-way, like `kubectl apply`: the desired manifest, the object as observed, and the manifest applied last
(kept in the child's LAST_APPLIED_ANNOTATION). A field the operator set before and no longer wants is removed;
a field someone else added (a `kubectl rollout restart` annotation, a load-balancer's allocated nodePort, API
server defaults) is left alone; a field the operator owns that someone changed is set back. An empty patch
means nothing to write.

Merge-patch semantics on the server: maps merge key by key, lists are replaced whole (never strategic merge,
which would merge containers and env by name and so keep entries the operator removed).
"""

from __future__ import annotations

import json
from decimal import InvalidOperation
from typing import Any

from kubernetes.utils import parse_quantity

LAST_APPLIED_ANNOTATION = "tideserve.io/last-applied"
_ABSENT = object()


def last_applied(observed: dict[str, Any]) -> dict[str, Any] | None:
    raw = observed.get("metadata", {}).get("annotations", {}).get(LAST_APPLIED_ANNOTATION)
    try:
        return json.loads(raw) if raw else None
    except ValueError:  # edited by hand into something unreadable: fall back to a two-way patch
        return None


def with_last_applied(desired: dict[str, Any]) -> dict[str, Any]:
    """The manifest to create or patch with: the desired one plus a record of itself."""
    record = json.dumps(desired, sort_keys=True, separators=(",", ":"))
    result = dict(desired)
    result["metadata"] = {**desired["metadata"],
                          "annotations": {**desired["metadata"].get("annotations", {}), LAST_APPLIED_ANNOTATION: record}}
    return result


def is_empty(value: Any) -> bool:
    """The API server omits empty lists and maps, so they read back as absent."""
    return value is _ABSENT or value is None or value == [] or value == {}


def _quantities_equal(a: Any, b: Any) -> bool:
    try:
        return parse_quantity(a) == parse_quantity(b)
    except (ValueError, TypeError, InvalidOperation):
        return False


def matches(desired: Any, observed: Any) -> bool:
    """Whether the observed value already is the desired one, ignoring what the server adds (defaults, extra
    map keys) and how it spells quantities ("1000m" reads back as "1")."""
    if is_empty(desired):
        return is_empty(observed)
    if isinstance(desired, dict):
        return isinstance(observed, dict) and all(matches(v, observed.get(k, _ABSENT)) for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(observed, list) and len(desired) == len(observed)
                and all(matches(d, o) for d, o in zip(desired, observed)))
    if desired == observed:
        return True
    if isinstance(desired, (str, int)) and isinstance(observed, (str, int)) and not isinstance(desired, bool):
        return _quantities_equal(desired, observed)
    return False


def three_way_patch(last: Any, desired: dict[str, Any], observed: dict[str, Any]) -> dict[str, Any]:
    """The merge patch for one map level; see the module docstring."""
    last = last if isinstance(last, dict) else {}
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        have = observed.get(key, _ABSENT)
        if isinstance(want, dict) and want and isinstance(have, dict):
            sub = three_way_patch(last.get(key), want, have)
            if sub:
                patch[key] = sub
        # Lists and scalars: rewrite when they drifted, or when the intent changed even though the observed
        # value still "matches" (an element lost a field: the list must be replaced to drop it).
        elif not matches(want, have) or (key in last and last[key] != want and not isinstance(want, dict)):
            patch[key] = want
    for key in last:
        if key not in desired and not is_empty(observed.get(key, _ABSENT)):
            patch[key] = None  # set by the operator before, no longer wanted
    return patch


def child_patch(desired: dict[str, Any], observed: dict[str, Any]) -> dict[str, Any]:
    """The merge patch for a child object, with the last-applied record refreshed whenever anything changes;
    {} when the object is as desired. Only metadata and spec are compared: status belongs to the server."""
    previous = last_applied(observed)
    scope = {key: desired[key] for key in ("metadata", "spec") if key in desired}
    patch = three_way_patch({k: previous[k] for k in ("metadata", "spec") if k in previous} if previous else None,
                            scope, observed)
    record = with_last_applied(desired)["metadata"]["annotations"][LAST_APPLIED_ANNOTATION]
    if patch or observed.get("metadata", {}).get("annotations", {}).get(LAST_APPLIED_ANNOTATION) != record:
        patch.setdefault("metadata", {}).setdefault("annotations", {})[LAST_APPLIED_ANNOTATION] = record
    return patch


def changed_paths(patch: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths a patch writes, for events ("spec.replicas", "spec.template"); the bookkeeping
    annotation is left out."""
    paths = []
    for key, value in patch.items():
        path = f"{prefix}.{key}" if prefix else key
        if key == LAST_APPLIED_ANNOTATION:
            continue
        if isinstance(value, dict) and value and path.count(".") < 2:
            paths += changed_paths(value, path)
        else:
            paths.append(path)
    return paths
