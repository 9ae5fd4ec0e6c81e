"""An LLMDeployment YAML file as the local runtime (and the simulator) reads it: checked as the API server and
the operator would check it, then mapped onto worker processes on this machine."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from tideserve.operator import manifests
from tideserve.operator.resource import API_VERSION, KIND, defaulted, schema_errors
from tideserve.operator.validation import validate
from tideserve.worker.builtin_models import BUILTIN_MODELS


class DeploymentError(ValueError):
    """An LLMDeployment the local runtime cannot run; the message names the field."""


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Read, default and check one LLMDeployment as the API server and the operator would. Raises
    DeploymentError with every problem found."""
    try:
        with open(path) as f:
            documents = [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as exc:
        raise DeploymentError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise DeploymentError(f"{path} is not valid YAML: {exc}") from None
    found = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(found) != 1:
        raise DeploymentError(f"{path} must hold exactly one {KIND} (found {len(found)})")
    llmd = found[0]
    if llmd.get("apiVersion") != API_VERSION:
        raise DeploymentError(f"apiVersion must be {API_VERSION}, not {llmd.get('apiVersion')!r}")
    llmd = defaulted(llmd)
    found = problems(llmd)
    if found:
        raise DeploymentError(f"{path}: " + "; ".join(found))
    return llmd


def problems(llmd: dict[str, Any]) -> list[str]:
    """What the API server (schema) or the operator (validation) would refuse in a defaulted LLMDeployment."""
    return schema_errors(llmd) or [f"{e.field}: {e.message}" for e in validate(llmd)]


def load(path: str | os.PathLike) -> dict[str, Any]:
    """read(), and what this machine can run of it; a model directory is resolved next to the YAML file."""
    llmd = read(path)
    local = local_problems(llmd["spec"])
    if local:
        raise DeploymentError(f"{path}: " + "; ".join(local))
    source = llmd["spec"]["model"]["source"]
    if source["path"] not in BUILTIN_MODELS:  # a directory, relative to the YAML file
        source["path"] = str((Path(path).parent / source["path"]).resolve())
        if not Path(source["path"]).is_dir():
            raise DeploymentError(f"spec.model.source.path: no model directory at {source['path']}")
    return llmd


def local_problems(spec: dict[str, Any]) -> list[str]:
    """What a cluster can run but this machine cannot."""
    found = []
    source = spec["model"]["source"]
    if "path" not in source:
        found.append("spec.model.source: the local runtime needs a path (a built-in model name or a local "
                     "directory); it cannot download uri sources or mount a pvc")
    if spec["engine"]["kind"] != "tideserve":
        found.append("spec.engine.kind: the local runtime runs the tideserve engine only")
    if "apiKeySecret" in spec:
        found.append("spec.apiKeySecret: Secrets do not exist locally; set TIDESERVE_API_KEY in the "
                     "environment instead (the workers read it)")
    return found


def cpu_threads(spec: dict[str, Any]) -> int:
    """Torch threads per worker from resources.cpu (a Kubernetes quantity: 2, "1.5", "500m"); at least one."""
    value = str(spec["resources"]["cpu"])
    cores = float(value[:-1]) / 1000 if value.endswith("m") else float(value)
    return max(1, math.floor(cores))


def worker_args(llmd: dict[str, Any], port: int, admin_port: int, max_num_seqs: int,
                max_num_batched_tokens: int, admin_token_file: str) -> list[str]:
    """The pod's worker arguments with this machine's ports, admin token file and the batch limits the
    autoscaler set last (argparse keeps the last of a repeated option)."""
    spec = llmd["spec"]
    device = "auto" if spec["resources"]["gpus"] > 0 else "cpu"
    return manifests.worker_args(llmd) + [
        "--host", "127.0.0.1", "--port", str(port), "--admin-host", "127.0.0.1", "--admin-port", str(admin_port),
        "--admin-token-file", admin_token_file, "--device", device, "--max-num-seqs", str(max_num_seqs),
        "--max-num-batched-tokens", str(max_num_batched_tokens), "--log-level", "warning",
    ]
