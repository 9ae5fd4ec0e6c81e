"""The CRD's cross-field rules (its CEL x-kubernetes-validations), restated in Python.

A real API server enforces the CEL rules on every write, so a spec that breaks them never gets stored. The
operator checks them again before building anything because Helm never upgrades a CRD it installed: a
cluster may run an older CRD without a rule this operator depends on. tests/test_crd.py evaluates the CRD's
own CEL rules and this module on the same cases and requires them to agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tideserve.operator.manifests import router_enabled, worker_service_name

MAX_NAME = 63 - len(worker_service_name(""))  # the longest Service name derived from it stays a DNS-1035 label
# spec.model.quantization: the modes the tideserve engine applies at load (worker/quantization.py); the first two
# vLLM has no method for (its fp8 quantizes at load too, the rest name a checkpoint's format).
TIDESERVE_QUANTIZATIONS = ("int8", "int4", "fp8")
LOAD_TIME_ONLY = ("int8", "int4")

DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class FieldError:
    field: str  # a path from the object's root, e.g. "spec.autoscaling.minReplicas"
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def validate(llmdeployment: dict[str, Any]) -> list[FieldError]:
    """Cross-field errors of a defaulted LLMDeployment (see resource.defaulted); empty when it is valid."""
    errors = []
    name = llmdeployment.get("metadata", {}).get("name", "")
    if len(name) > MAX_NAME or not DNS_1035_LABEL.match(name):
        errors.append(FieldError("metadata.name", f"must be a DNS-1035 label of at most {MAX_NAME} characters: it "
                                                  "also names the Services (NAME-workers: at most 63)"))

    spec = llmdeployment["spec"]
    model, source, engine = spec["model"], spec["model"]["source"], spec["engine"]
    resources, autoscaling, seasonality = spec["resources"], spec["autoscaling"], spec["seasonality"]
    if sum(key in source for key in ("path", "pvc", "uri")) != 1:
        errors.append(FieldError("spec.model.source", "needs exactly one of path, pvc or uri"))
    if "credentialsSecret" in source and "uri" not in source:
        errors.append(FieldError("spec.model.source.credentialsSecret", "applies to uri sources only"))
    if "revision" in model and not source.get("uri", "").startswith("hf://"):
        errors.append(FieldError("spec.model.revision", "applies to hf:// sources only"))
    quantization = model["quantization"]
    if quantization != "none" and ((quantization in LOAD_TIME_ONLY) if engine["kind"] == "vllm"
                                   else quantization not in TIDESERVE_QUANTIZATIONS):
        errors.append(FieldError("spec.model.quantization",
                                 "the tideserve engine quantizes at load to int8, int4 or fp8; awq, gptq and "
                                 "bitsandbytes checkpoints need engine.kind vllm, which has no int8 or int4 method"))
    if engine["maxNumBatchedTokens"] < engine["maxNumSeqs"]:
        errors.append(FieldError("spec.engine.maxNumBatchedTokens",
                                 "must be at least engine.maxNumSeqs: every running sequence needs one token per step"))
    if engine["kind"] == "vllm" and resources["gpus"] < 1:
        errors.append(FieldError("spec.resources.gpus",
                                 "engine.kind vllm needs at least 1: the vllm/vllm-openai image has no CPU backend"))
    if resources["gpus"] < 1 and resources["gpuType"] != "any":
        errors.append(FieldError("spec.resources.gpuType", "needs resources.gpus of at least 1"))
    if autoscaling["minReplicas"] > autoscaling["maxReplicas"]:
        errors.append(FieldError("spec.autoscaling.minReplicas", "must not exceed autoscaling.maxReplicas"))
    if autoscaling["scaleToZeroAfterSeconds"] > 0 and autoscaling["minReplicas"] != 0:
        errors.append(FieldError("spec.autoscaling.scaleToZeroAfterSeconds", "needs autoscaling.minReplicas 0"))
    if autoscaling["minReplicas"] == 0 and not router_enabled(spec):
        errors.append(FieldError("spec.autoscaling.minReplicas",
                                 "0 needs the router (router.enabled): only it holds requests while no worker runs"))
    if autoscaling["maxStep"] > autoscaling["maxReplicas"]:
        errors.append(FieldError("spec.autoscaling.maxStep", "must not exceed autoscaling.maxReplicas"))
    slo = spec.get("slo", {})
    if autoscaling["mode"] != "off" and "ttft" not in slo and "tpot" not in slo:
        errors.append(FieldError("spec.slo", "autoscaling.mode advisory or active needs an SLO: set slo.ttft or slo.tpot"))
    if seasonality["leadTimeSeconds"] >= seasonality["periodSeconds"]:
        errors.append(FieldError("spec.seasonality.leadTimeSeconds", "must be shorter than seasonality.periodSeconds"))
    if seasonality["enabled"] and autoscaling["mode"] == "off":
        errors.append(FieldError("spec.seasonality.enabled", "needs autoscaling.mode advisory or active"))
    return errors
