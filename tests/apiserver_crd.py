"""What a real kube-apiserver checks when a CustomResourceDefinition is created, emulated for the tests.

kmock and `kubernetes-validate` accept any CRD; a real API server rejects one that breaks these rules (see
`apiextensions-apiserver`: pkg/apiserver/schema/validation.go for the structural rules, pkg/apis/apiextensions/
validation/validation.go for defaults and fieldPath, pkg/apiserver/schema/cel for CEL compilation and cost).
`crd_creation_errors` returns one line per violation, worded like the API server's own errors.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import celpy
import jsonschema

from tideserve.operator.resource import apply_defaults, json_schema

# Keys that may not appear inside anyOf/allOf/oneOf/not branches of a structural schema.
FORBIDDEN_IN_JUNCTORS = ("type", "description", "default", "additionalProperties", "nullable",
                         "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
                         "x-kubernetes-embedded-resource")
JUNCTORS = ("anyOf", "allOf", "oneOf", "not")
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
ROOT_METADATA_FIELDS = {"name", "generateName"}
# CEL calls whose cost grows with the size of the value they run on: the API server's estimator needs a bound.
STRING_CALLS = ("matches", "startsWith", "endsWith", "contains", "indexOf", "lastIndexOf", "split", "replace",
                "lowerAscii", "upperAscii", "trim", "substring")
LIST_MACROS = ("all", "exists", "exists_one", "map", "filter")
SELF_PATH = r"self((?:\.[A-Za-z_][A-Za-z0-9_]*)+)"


def crd_creation_errors(crd: dict[str, Any]) -> list[str]:
    errors = []
    for index, version in enumerate(crd["spec"]["versions"]):
        schema = version["schema"]["openAPIV3Schema"]
        base = f"spec.versions[{index}].schema.openAPIV3Schema"
        errors += structural_errors(schema, base, root=True)
        errors += default_errors(schema, base)
        errors += cel_rule_errors(schema, base, root=True)
    return errors


# --- structural schema --------------------------------------------------------------------------------------

def _children(node: dict[str, Any], path: str) -> Iterator[tuple[dict[str, Any], str]]:
    for key, sub in node.get("properties", {}).items():
        yield sub, f"{path}.properties[{key}]"
    if isinstance(node.get("items"), dict):
        yield node["items"], f"{path}.items"
    if isinstance(node.get("additionalProperties"), dict):
        yield node["additionalProperties"], f"{path}.additionalProperties"


def structural_errors(node: dict[str, Any], path: str, root: bool = False) -> list[str]:
    errors = []
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    if not node.get("type") and not int_or_string and not node.get("x-kubernetes-preserve-unknown-fields"):
        errors.append(f"{path}.type: Required value: must not be empty for specified object fields")
    if int_or_string:
        any_of, all_of = node.get("anyOf"), node.get("allOf")
        exact = any_of == INT_OR_STRING or (any_of is None and isinstance(all_of, list) and all_of
                                            and all_of[0] == {"anyOf": INT_OR_STRING})
        if not exact:
            errors.append(f"{path}: Forbidden: x-kubernetes-int-or-string needs exactly anyOf: [{{type: integer}}, "
                          "{type: string}] (or that anyOf first in allOf)")
    for junctor in JUNCTORS:
        branches = node.get(junctor)
        if branches is None:
            continue
        for i, branch in enumerate(branches if isinstance(branches, list) else [branches]):
            branch_path = f"{path}.{junctor}[{i}]" if isinstance(branches, list) else f"{path}.{junctor}"
            allowed_type = int_or_string and junctor == "anyOf" and branches == INT_OR_STRING
            errors += _junctor_errors(branch, branch_path, allowed_type, node)
    if root and "metadata" in node.get("properties", {}):
        metadata = node["properties"]["metadata"]
        extra = set(metadata.get("properties", {})) - ROOT_METADATA_FIELDS
        extra_keys = set(metadata) - {"type", "properties", "description"}
        if extra or extra_keys:
            errors.append(f"{path}.properties[metadata]: Forbidden: must not specify anything other than name and "
                          f"generateName, but metadata is implicitly specified ({sorted(extra | extra_keys)})")
    for sub, sub_path in _children(node, path):
        errors += structural_errors(sub, sub_path)
    return errors


def _junctor_errors(branch: dict[str, Any], path: str, allowed_type: bool, parent: dict[str, Any]) -> list[str]:
    errors = []
    for key in FORBIDDEN_IN_JUNCTORS:
        if key in branch and not (allowed_type and key == "type"):
            errors.append(f"{path}.{key}: Forbidden: must be empty to be structural")
    if allowed_type and set(branch) != {"type"}:
        errors.append(f"{path}: Forbidden: the int-or-string branches take nothing but their type: "
                      f"{sorted(set(branch) - {'type'})} belong outside the anyOf")
    for key in branch.get("properties", {}):
        if key not in parent.get("properties", {}):
            errors.append(f"{path}.properties[{key}]: Forbidden: must be declared outside the junctors too")
    for junctor in JUNCTORS:
        nested = branch.get(junctor)
        for i, sub in enumerate(nested if isinstance(nested, list) else [nested] if nested else []):
            errors += _junctor_errors(sub, f"{path}.{junctor}[{i}]", False, parent)
    return errors


# --- defaults -----------------------------------------------------------------------------------------------

def default_errors(node: dict[str, Any], path: str) -> list[str]:
    """Each default is pruned (unknown fields fail), validated against its own schema, and every CEL rule of
    its node and below is evaluated on it, once as written and once with the nested defaults applied."""
    errors = []
    if "default" in node:
        default = node["default"]
        for variant in (default, apply_defaults(node, default)):
            # json_schema refuses unknown fields, as pruning a default that has some fails the CRD.
            for exc in jsonschema.Draft7Validator(json_schema(node)).iter_errors(variant):
                errors.append(f"{path}.default: Invalid value: {exc.message}")
            for problem in evaluate_rules(node, variant):
                errors.append(f"{path}.default: Invalid value: \"object\": {problem}")
    for sub, sub_path in _children(node, path):
        errors += default_errors(sub, sub_path)
    return sorted(set(errors), key=errors.index)


def evaluate_rules(node: dict[str, Any], value: Any) -> list[str]:
    """Every rule of `node` and of the nodes below it that `value` reaches: a failed rule, or one that cannot be
    evaluated (CEL's "no such key"), is a problem."""
    problems = []
    env = celpy.Environment()
    for rule in node.get("x-kubernetes-validations", []):
        try:
            result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as exc:
            problems.append(f"no such key: {_missing_key(exc)} evaluating rule: {rule.get('message', rule['rule'])}")
            continue
        if not result:
            problems.append(f"{rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        for key, sub in node.get("properties", {}).items():
            if key in value:
                problems += evaluate_rules(sub, value[key])
    return problems


def _missing_key(exc: Exception) -> str:
    match = re.search(r"no such member in mapping: \\?'([^'\\]+)", str(exc))
    return match.group(1) if match else str(exc)


# --- CEL rules: compilation, fieldPath, what a root rule may read, cost bounds ------------------------------

def _resolve(node: dict[str, Any], fields: list[str]) -> dict[str, Any] | None:
    for name in fields:
        node = node.get("properties", {}).get(name)
        if node is None:
            return None
    return node


def _field_path(path: str) -> list[str] | None:
    """`.a.b` or `.a['b']` as a list of field names; None when it is not of that form."""
    if not path.startswith((".", "[")):
        return None
    tokens = re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\['([^']+)'\]", path)
    rebuilt = "".join(f".{a}" if a else f"['{b}']" for a, b in tokens)
    return [a or b for a, b in tokens] if rebuilt == path and tokens else None


def cel_rule_errors(node: dict[str, Any], path: str, root: bool = False) -> list[str]:
    errors = []
    env = celpy.Environment()
    for i, rule in enumerate(node.get("x-kubernetes-validations", [])):
        rule_path = f"{path}.x-kubernetes-validations[{i}]"
        try:
            env.compile(rule["rule"])
        except celpy.CELParseError as exc:
            errors.append(f"{rule_path}.rule: Invalid value: compilation failed: {exc}")
        if "fieldPath" in rule:
            fields = _field_path(rule["fieldPath"])
            if fields is None or _resolve(node, fields) is None:
                errors.append(f"{rule_path}.fieldPath: Invalid value: \"{rule['fieldPath']}\": fieldPath must be a "
                              "valid path")
        if rule.get("reason", "FieldValueInvalid") not in ("FieldValueRequired", "FieldValueDuplicate",
                                                            "FieldValueInvalid", "FieldValueForbidden"):
            errors.append(f"{rule_path}.reason: Unsupported value: \"{rule['reason']}\"")
        for match in re.finditer(SELF_PATH, rule["rule"]):
            fields = match.group(1).lstrip(".").split(".")
            if root and fields[0] == "metadata" and (len(fields) < 2 or fields[1] not in ROOT_METADATA_FIELDS):
                errors.append(f"{rule_path}.rule: Invalid value: only metadata.name and metadata.generateName are "
                              f"accessible to a root rule, not self.{'.'.join(fields)}")
        errors += _cost_errors(node, rule["rule"], rule_path)
    for sub, sub_path in _children(node, path):
        errors += cel_rule_errors(sub, sub_path)
    return errors


def _cost_errors(node: dict[str, Any], rule: str, path: str) -> list[str]:
    """A string a rule matches or a list it iterates must be bounded, or the estimated cost is unbounded."""
    errors = []
    used = [(m.group(1), m.group(2)) for m in re.finditer(SELF_PATH + r"\.(\w+)\(", rule)]
    used += [(m.group(1), "size") for m in re.finditer(r"size\(" + SELF_PATH + r"\)", rule)]
    for dotted, call in used:
        fields = dotted.lstrip(".").split(".")
        target = _resolve(node, fields)
        if target is None:
            continue
        kind = target.get("type")
        bound = {"string": "maxLength", "array": "maxItems", "object": "maxProperties"}.get(kind)
        if call in STRING_CALLS + LIST_MACROS + ("size",) and bound and bound not in target:
            errors.append(f"{path}.rule: Forbidden: estimated rule cost exceeds budget: self.{'.'.join(fields)} "
                          f"({kind}) needs {bound} for {call}()")
    return errors
