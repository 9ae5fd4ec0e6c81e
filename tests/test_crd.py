"""The LLMDeployment CRD: structural, every example valid, invalid resources rejected naming the field.

A real API server validates a custom resource in three steps, emulated here in the same order: structural
defaulting, the OpenAPI schema (checked with jsonschema), then the CEL x-kubernetes-validations rules
(evaluated with cel-python, the CRD's own expressions). The operator's Python restatement of the CEL rules
(validation.py) must reach the same verdict on every case.
"""

from __future__ import annotations

import copy
import filecmp
import glob
from typing import Any

import celpy
import pytest
import yaml

from apiserver_crd import crd_creation_errors
from tideserve.operator.resource import CRD_FILE, apply_defaults, crd, openapi_schema, schema_errors
from tideserve.operator.validation import validate

EXAMPLES = sorted(glob.glob("examples/*.yaml"))


def cel_errors(schema: dict, value: Any, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule on the value its schema node describes."""
    errors = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            field = (path + rule.get("fieldPath", "")).lstrip(".")
            errors.append(f"{field or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += cel_errors(sub, value[key], f"{path}.{key}")
    return errors


def admit(obj: dict) -> list[str]:
    """What a real API server answers to a create: defaults, then schema, then CEL (only on a valid schema)."""
    defaulted = apply_defaults(openapi_schema(), obj)
    return schema_errors(defaulted) or cel_errors(openapi_schema(), defaulted)


def load(path: str) -> dict:
    with open(path) as f:
        obj = yaml.safe_load(f)
    obj["metadata"].setdefault("namespace", "default")
    return obj


def minimal() -> dict:
    return load("examples/minimal.yaml")


def test_chart_and_package_ship_the_same_crd():
    assert filecmp.cmp(f"crds/{CRD_FILE}", f"charts/tideserve/crds/{CRD_FILE}", shallow=False)
    assert crd() == yaml.safe_load(open(f"crds/{CRD_FILE}"))


SHIPPED_CRDS = [f"crds/{CRD_FILE}", *sorted(glob.glob("charts/tideserve/crds/*.yaml"))]


@pytest.mark.parametrize("path", SHIPPED_CRDS)
def test_a_real_api_server_would_accept_the_crd(path):
    """Structural schema, defaults valid and every CEL rule holding on them, fieldPaths, root-rule access and
    cost bounds: the checks kube-apiserver runs when the CRD is created."""
    for document in yaml.safe_load_all(open(path)):
        assert crd_creation_errors(document) == []


def _broken(edit) -> list[str]:
    document = copy.deepcopy(crd())
    edit(document["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return crd_creation_errors(document)


def test_the_api_server_rules_reject_what_real_api_servers_rejected():
    """Each of the defects real API servers (v1.28, v1.32) found in an earlier CRD, put back one at a time."""
    spec = lambda schema: schema["properties"]["spec"]["properties"]  # noqa: E731

    def typed_branch(schema):
        cpu = spec(schema)["resources"]["properties"]["cpu"]
        cpu["anyOf"] = [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": cpu.pop("pattern")}]

    def metadata_field_path(schema):
        del schema["properties"]["metadata"]["properties"]
        schema["x-kubernetes-validations"] = [{"rule": "size(self.metadata.name) <= 63", "message": "m",
                                               "fieldPath": ".metadata.name"}]

    def unguarded_rule(schema):
        spec(schema)["autoscaling"]["x-kubernetes-validations"] = [
            {"rule": "self.minReplicas <= self.maxStep", "message": "m"}]
        del spec(schema)["autoscaling"]["properties"]["maxStep"]["default"]

    def unbounded_match(schema):
        del spec(schema)["model"]["properties"]["source"]["properties"]["uri"]["maxLength"]
        spec(schema)["model"]["x-kubernetes-validations"][0]["rule"] = "!has(self.source.uri) || self.source.uri.matches('^hf://')"

    def unknown_field_in_default(schema):
        spec(schema)["service"]["default"] = {"typ": "ClusterIP"}

    cases = [(typed_branch, "properties[cpu].anyOf[0].type: Forbidden: must be empty to be structural"),
             (metadata_field_path, "fieldPath: Invalid value: \".metadata.name\": fieldPath must be a valid path"),
             (unguarded_rule, "properties[autoscaling].default: Invalid value: \"object\": no such key: maxStep"),
             (unbounded_match, "self.source.uri (string) needs maxLength"),
             (unknown_field_in_default, "properties[service].default: Invalid value: Additional properties are not allowed ('typ'")]
    for edit, message in cases:
        errors = _broken(edit)
        assert any(message in e for e in errors), (edit.__name__, errors)


def test_schema_is_structural_and_described():
    missing = []

    def walk(node: dict, path: str, named: bool) -> None:
        if "type" not in node and not node.get("x-kubernetes-int-or-string"):
            missing.append(f"{path}: no type")
        if named and "description" not in node:
            missing.append(f"{path}: no description")
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}", True)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]", False)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}", False)

    for key in ("spec", "status"):
        walk(openapi_schema()["properties"][key], f".{key}", True)
    assert not missing, missing


def test_crd_declares_scale_status_printer_columns_and_short_name():
    (version,) = crd()["spec"]["versions"]
    assert version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Model"] == ".spec.model.name" and columns["Ready"].startswith(".status.conditions")
    assert {"Desired", "Ready-Replicas", "TTFT-P90-ms", "TPOT-P90-ms", "Max-Seqs", "Age"} <= set(columns)
    assert crd()["spec"]["names"]["shortNames"] == ["llmd"]


@pytest.mark.parametrize("path", EXAMPLES)
def test_every_example_is_admitted(path):
    obj = load(path)
    assert admit(obj) == []
    assert validate(apply_defaults(openapi_schema(), obj)) == []


def test_there_is_a_minimal_a_full_and_a_vllm_example():
    assert {"examples/minimal.yaml", "examples/full.yaml", "examples/vllm.yaml"} <= set(EXAMPLES)
    assert load("examples/vllm.yaml")["spec"]["engine"]["kind"] == "vllm"


def test_the_full_example_sets_every_spec_field():
    unset = []

    def walk(schema: dict, value: Any, path: str) -> None:
        for key, sub in schema.get("properties", {}).items():
            if key not in value:
                if key not in ("path", "pvc") or path != "spec.model.source":  # one source only
                    unset.append(f"{path}.{key}")
            elif isinstance(value[key], dict) and "properties" in sub:
                walk(sub, value[key], f"{path}.{key}")

    walk(openapi_schema()["properties"]["spec"], load("examples/full.yaml")["spec"], "spec")
    assert not unset, unset


def with_change(change: dict) -> dict:
    obj = minimal()

    def merge(target: dict, patch: dict) -> None:
        for key, value in patch.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                merge(target[key], value)
            elif value is None:
                target.pop(key, None)
            else:
                target[key] = copy.deepcopy(value)

    merge(obj, change)
    return obj


# (change to the minimal example, the field the rejection must name)
SCHEMA_CASES = [
    ({"spec": {"replicas": -1}}, "spec.replicas"),
    ({"spec": {"engine": {"kind": "tgi"}}}, "spec.engine.kind"),
    ({"spec": {"engine": {"maxNumSeqs": 0}}}, "spec.engine.maxNumSeqs"),
    ({"spec": {"resources": {"gpus": 17}}}, "spec.resources.gpus"),
    ({"spec": {"resources": {"memory": "lots"}}}, "spec.resources.memory"),
    ({"spec": {"model": {"source": {"path": None, "uri": "ftp://models/x"}}}}, "spec.model.source.uri"),
    ({"spec": {"model": {"name": None}}}, "spec.model"),
    ({"spec": {"autoscaling": {"mode": "on"}}}, "spec.autoscaling.mode"),
    ({"spec": {"slo": {"ttft": {"percentile": 99.99, "targetMs": 500}}}}, "spec.slo.ttft.percentile"),
    ({"spec": {"service": {"type": "ExternalName"}}}, "spec.service.type"),
    ({"spec": {"engine": {"kvCacheDtype": "int4"}}}, "spec.engine.kvCacheDtype"),
    ({"spec": {"unknownField": 1}}, "spec"),
    ({"metadata": {"name": "9-starts-with-a-digit"}}, "metadata.name"),
    ({"metadata": {"name": "a" * 64}}, "metadata.name"),
    ({"metadata": {"name": "a" * 56}}, "metadata.name"),  # NAME-workers would be 64 characters
]
CEL_CASES = [
    ({"spec": {"model": {"source": {"uri": "hf://org/model"}}}}, "spec.model.source"),
    ({"spec": {"model": {"source": {"path": None}}}}, "spec.model.source"),
    ({"spec": {"model": {"source": {"credentialsSecret": {"name": "s"}}}}}, "spec.model.source.credentialsSecret"),
    ({"spec": {"model": {"revision": "main"}}}, "spec.model.revision"),
    ({"spec": {"model": {"quantization": "awq"}}}, "spec.model.quantization"),
    ({"spec": {"model": {"quantization": "int8"}, "engine": {"kind": "vllm"}, "resources": {"gpus": 1}}},
     "spec.model.quantization"),
    ({"spec": {"model": {"quantization": "int4"}, "engine": {"kind": "vllm"}, "resources": {"gpus": 1}}},
     "spec.model.quantization"),
    ({"spec": {"engine": {"kind": "vllm"}}}, "spec.resources.gpus"),
    ({"spec": {"resources": {"gpuType": "nvidia-h100-80gb"}}}, "spec.resources.gpuType"),
    ({"spec": {"engine": {"maxNumSeqs": 256, "maxNumBatchedTokens": 128}}}, "spec.engine.maxNumBatchedTokens"),
    ({"spec": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "spec.autoscaling.minReplicas"),
    ({"spec": {"autoscaling": {"maxStep": 5, "maxReplicas": 2}}}, "spec.autoscaling.maxStep"),
    ({"spec": {"autoscaling": {"scaleToZeroAfterSeconds": 600}}}, "spec.autoscaling.scaleToZeroAfterSeconds"),
    ({"spec": {"autoscaling": {"minReplicas": 0}, "router": {"enabled": False}}}, "spec.autoscaling.minReplicas"),
    ({"spec": {"autoscaling": {"minReplicas": 0}, "engine": {"kind": "vllm"}, "resources": {"gpus": 1}}},
     "spec.autoscaling.minReplicas"),
    ({"spec": {"autoscaling": {"mode": "active"}}}, "spec.slo"),
    ({"spec": {"seasonality": {"enabled": True}}}, "spec.seasonality.enabled"),
    ({"spec": {"seasonality": {"periodSeconds": 3600, "leadTimeSeconds": 3600}}}, "spec.seasonality.leadTimeSeconds"),
]


@pytest.mark.parametrize("change,field", SCHEMA_CASES)
def test_schema_rejects_naming_the_field(change, field):
    errors = admit(with_change(change))
    assert errors, "admitted"
    assert any(e.split(":")[0] == field for e in errors), errors


@pytest.mark.parametrize("change,field", CEL_CASES)
def test_cel_rules_reject_naming_the_field_and_the_operator_agrees(change, field):
    obj = with_change(change)
    defaulted = apply_defaults(openapi_schema(), obj)
    assert schema_errors(defaulted) == []  # the schema alone lets it through
    cel = cel_errors(openapi_schema(), defaulted)
    assert [e.split(":")[0] for e in cel] == [field], cel
    assert [e.field for e in validate(defaulted)] == [field]


@pytest.mark.parametrize("kind,quantization", [
    ("tideserve", "int8"), ("tideserve", "int4"), ("tideserve", "fp8"),
    ("vllm", "awq"), ("vllm", "gptq"), ("vllm", "fp8"), ("vllm", "bitsandbytes"),
])
def test_each_engine_is_admitted_with_the_quantizations_it_has(kind, quantization):
    obj = with_change({"spec": {"model": {"quantization": quantization}, "engine": {"kind": kind},
                                "resources": {"gpus": 1}}})
    defaulted = apply_defaults(openapi_schema(), obj)
    assert admit(obj) == [] and validate(defaulted) == []


def test_every_cel_rule_has_a_case():
    rules = []

    def walk(node: dict) -> None:
        rules.extend(r["rule"] for r in node.get("x-kubernetes-validations", []))
        for sub in node.get("properties", {}).values():
            walk(sub)

    walk(openapi_schema())
    fired = set()
    for change, _ in CEL_CASES:
        defaulted = apply_defaults(openapi_schema(), with_change(change))
        for rule in rules:
            single = _only_rule(openapi_schema(), rule)
            if cel_errors(single, defaulted):
                fired.add(rule)
    assert set(rules) == fired, set(rules) - fired


def _only_rule(schema: dict, rule: str) -> dict:
    """The schema with every CEL rule removed except one."""
    result = {k: v for k, v in schema.items() if k not in ("properties", "x-kubernetes-validations")}
    result["x-kubernetes-validations"] = [r for r in schema.get("x-kubernetes-validations", []) if r["rule"] == rule]
    if "properties" in schema:
        result["properties"] = {k: _only_rule(v, rule) for k, v in schema["properties"].items()}
    return result


def test_the_operator_refuses_names_whose_headless_service_name_would_be_too_long():
    longest = with_change({"metadata": {"name": "a" * 55}})
    assert admit(longest) == [] and validate(apply_defaults(openapi_schema(), longest)) == []
    too_long = apply_defaults(openapi_schema(), with_change({"metadata": {"name": "a" * 56}}))
    assert [e.field for e in validate(too_long)] == ["metadata.name"]
