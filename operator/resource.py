"""What an LLMDeployment is to the operator: API coordinates, the CRD's schema, and schema defaulting.

The CRD (package tideserve.crds, the same file as crds/ and the chart's crds/) is the single source of the
spec's defaults. A real API server applies them before the operator reads an object; the operator applies
them again because Helm never upgrades CRDs it installed, so an older CRD in the cluster may lack a default
that this version of the operator relies on. Defaulting twice is harmless: it only fills absent fields.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
from typing import Any

import yaml

GROUP = "tideserve.io"
VERSION = "v1alpha1"
PLURAL = "llmdeployments"
KIND = "LLMDeployment"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_FILE = "tideserve.io_llmdeployments.yaml"


@functools.cache
def crd() -> dict[str, Any]:
    return yaml.safe_load(importlib.resources.files("tideserve.crds").joinpath(CRD_FILE).read_text())


def openapi_schema() -> dict[str, Any]:
    (version,) = [v for v in crd()["spec"]["versions"] if v["name"] == VERSION]
    return version["schema"]["openAPIV3Schema"]


def json_schema(node: Any) -> Any:
    """The CRD's OpenAPI v3 schema as plain JSON schema: the Kubernetes extensions dropped, and unknown fields
    refused as the API server's strict field validation (kubectl's default) does. The root's metadata only
    restricts its name: every other ObjectMeta field stays allowed."""
    result = _strict(node)
    metadata = result.get("properties", {}).get("metadata") if isinstance(result, dict) else None
    if metadata:
        metadata.pop("additionalProperties", None)
    return result


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        result = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            result.setdefault("additionalProperties", False)
        return result
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def schema_errors(llmdeployment: dict[str, Any]) -> list[str]:
    """What the API server's schema validation would refuse (CEL rules aside), one message per field."""
    import jsonschema

    validator = jsonschema.Draft7Validator(json_schema(openapi_schema()))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator.iter_errors(llmdeployment)]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: absent properties with a `default` get a copy of it
    (which is defaulted in turn), then defaulting recurses into objects and array items. Returns a new value."""
    if isinstance(value, dict) and "properties" in schema:
        result = dict(value)
        for key, sub_schema in schema["properties"].items():
            if key not in result and "default" in sub_schema:
                result[key] = copy.deepcopy(sub_schema["default"])
            if key in result:
                result[key] = apply_defaults(sub_schema, result[key])
        return result
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def defaulted(llmdeployment: dict[str, Any]) -> dict[str, Any]:
    """The LLMDeployment with every schema default filled in (the input is not modified)."""
    return apply_defaults(openapi_schema(), llmdeployment)
