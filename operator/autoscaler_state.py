"""What the autoscaler learned, kept in the cluster across operator restarts: a ConfigMap per LLMDeployment.

`<name>-autoscaler-state`, owned by the LLMDeployment (garbage-collected with it; never a finalizer), holds the
policy's state_dict() as compact JSON under `state.json`: the seasonal profiles, the calibrated performance
model, the error budget, headroom and tail factors. Pure functions: compaction to a bounded size, the
ConfigMap, and loading into a policy whose configuration may have changed since the state was saved.

Size: the error budget keeps one entry per control window over the whole season (a week at a 5 s interval is
120 960 entries, ~3 MB of JSON), so older windows are merged into at most BUDGET_BUCKETS time buckets (sums of
requests and good requests, so the attainment over the horizon is unchanged) and the most recent ones, which the
burn rate reads, are kept as they are. Profiles are rounded to six significant digits. The worst case (weekly
season, every slot filled) stays under MAX_STATE_BYTES, far below the 1 MiB a ConfigMap can hold.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import kopf

from tideserve.autoscaler.policy import TideservePolicy
from tideserve.operator.manifests import MANAGED_BY, MANAGED_BY_LABEL, SELECTOR_LABEL

STATE_KEY = "state.json"
STATE_FORMAT = 1
BUDGET_BUCKETS = 256
RECENT_WINDOWS = 16  # kept as they are: ErrorBudget.burn_rate reads the last 8
MAX_STATE_BYTES = 256 * 1024
PROFILES = ("daily", "weekly", "input", "output")


def configmap_name(llmdeployment_name: str) -> str:
    return f"{llmdeployment_name}-autoscaler-state"


def _round(value: Any, digits: int = 6) -> Any:
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def compact_budget(budget: dict[str, Any], buckets: int = BUDGET_BUCKETS, recent: int = RECENT_WINDOWS) -> dict[str, Any]:
    """Merge all but the `recent` newest windows into at most `buckets` buckets of equal time span; each bucket
    keeps its newest time and the sums of its requests and good requests."""
    windows = budget["windows"]
    if len(windows) <= buckets + recent:
        return budget
    old, new = windows[:-recent], windows[-recent:]
    start, end = old[0][0], old[-1][0]
    width = max((end - start) / buckets, 1e-9)
    merged: dict[int, list[float]] = {}
    for t, total, good in old:
        index = min(buckets - 1, int((t - start) / width))
        entry = merged.setdefault(index, [t, 0.0, 0.0])
        entry[0] = max(entry[0], t)
        entry[1] += total
        entry[2] += good
    compacted = [[t, total, min(good, total)] for t, total, good in (merged[i] for i in sorted(merged))]
    return {**budget, "windows": compacted + [list(w) for w in new]}


def compact_state(state: dict[str, Any]) -> dict[str, Any]:
    """A bounded copy of a policy's state_dict() (the input is not modified)."""
    state = copy.deepcopy(state)
    state["budget"] = compact_budget(state["budget"])
    for key in PROFILES:
        profile = state["forecaster"][key]
        profile["values"] = [_round(v) for v in profile["values"]]
    return state


def dumps(state: dict[str, Any]) -> str:
    return json.dumps({"format": STATE_FORMAT, "policy": compact_state(state)}, separators=(",", ":"),
                      allow_nan=False)


def loads(text: str) -> dict[str, Any]:
    """The policy state saved by dumps(); ValueError when it is not one."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or not isinstance(data.get("policy"), dict):
        raise ValueError("not an autoscaler state of a known format")
    return data["policy"]


def restore(policy: TideservePolicy, saved: dict[str, Any]) -> list[str]:
    """Load a saved state into a freshly built policy, keeping only what still fits its configuration (the
    spec may have changed while the operator was down). Returns what was left out, for the log."""
    fresh = policy.state_dict()
    merged = dict(fresh)
    dropped = []
    config = policy.config
    forecaster = saved.get("forecaster", {})
    daily = forecaster.get("daily", {})
    if daily.get("period_s") == fresh["forecaster"]["daily"]["period_s"] and \
            daily.get("slot_s") == fresh["forecaster"]["daily"]["slot_s"]:
        merged["forecaster"] = forecaster
    else:
        dropped.append("seasonal profiles (season period or slot changed)")
    if "model" in saved:
        # The spec's batch limits are the model's ceilings: take them from the current configuration.
        model = copy.deepcopy(saved["model"])
        for key in ("max_num_seqs", "max_num_batched_tokens"):
            model["params"][key] = fresh["model"]["params"][key]
        merged["model"] = model
    if "budget" in saved:
        merged["budget"] = {"target": config.attainment_target, "horizon_s": config.season_period_s,
                            "windows": saved["budget"].get("windows", [])}
    for key in ("headroom", "tpot_tail", "ttft_tail", "startup_s"):
        if isinstance(saved.get(key), (int, float)):
            merged[key] = saved[key]
    merged["headroom"] = min(config.max_headroom, max(config.min_headroom, merged["headroom"]))
    try:
        policy.load_state_dict(merged)
    except (KeyError, TypeError, ValueError) as exc:
        policy.load_state_dict(fresh)
        return [f"everything ({type(exc).__name__}: {exc})"]
    return dropped


def state_configmap(llmd: dict[str, Any], text: str) -> dict[str, Any]:
    meta = llmd["metadata"]
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": configmap_name(meta["name"]), "namespace": meta["namespace"],
                     "labels": {MANAGED_BY_LABEL: MANAGED_BY, SELECTOR_LABEL: meta["name"],
                                "app.kubernetes.io/component": "autoscaler-state"}},
        "data": {STATE_KEY: text},
    }
    kopf.append_owner_reference(configmap, owner=llmd)
    return configmap
