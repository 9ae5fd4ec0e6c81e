"""From workers' Prometheus metrics to the policy's Observation: parsing and windowing, without I/O.

The cluster loop (scraping pods or querying Prometheus), the local runtime (scraping worker processes) and
tests all hand this module one `ReplicaSample` per replica each interval; `WindowAggregator` keeps the
previous sample of every replica and turns the counters' growth into one window of deltas summed over
replicas. Both tideserve workers and vLLM workers are understood: they export the same vllm: names. vLLM has
no tideserve_ step statistics or live batch limits; its step statistics are read from what it does export
(`vllm_steps`) and its KV capacity from `vllm:cache_config_info` (blocks x block size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from tideserve.autoscaler.observation import Observation, ReplicaState
from tideserve.autoscaler.slo import Histogram

TTFT = "vllm:time_to_first_token_seconds"
ITL = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")  # new name, then vLLM < 0.11
TPOT = "vllm:request_time_per_output_token_seconds"
QUEUE_TIME = "vllm:request_queue_time_seconds"
E2E = "vllm:e2e_request_latency_seconds"
PROMPT_TOKENS = "vllm:request_prompt_tokens"
GENERATION_TOKENS = "vllm:request_generation_tokens"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
KV_CAPACITY = "tideserve_kv_cache_capacity_tokens"
CACHE_CONFIG = "vllm:cache_config_info"  # vLLM's cache configuration, in labels
CACHE_CONFIG_LABELS = ("num_gpu_blocks", "block_size")
ITERATION_TOKENS = "vllm:iteration_tokens_total"  # vLLM: tokens per engine step (a histogram, despite the name)
STEP_SECONDS = "tideserve_step_seconds"
STEP_SEQUENCES = "tideserve_step_sequences"
STEP_TOKENS = "tideserve_step_tokens"
MBU = "tideserve_mbu"  # per step, summed over step kinds by the parser
# Each entry: one histogram's names, the current one first. A worker's first exported name is read and pooled
# under the current one (vLLM 0.11 exports its inter-token latency under both names, the same samples).
COUNTER_HISTOGRAMS = ((TTFT,), ITL, (TPOT,), (QUEUE_TIME,), (E2E,), (PROMPT_TOKENS,), (GENERATION_TOKENS,),
                      (ITERATION_TOKENS,), (STEP_SECONDS,), (STEP_SEQUENCES,), (STEP_TOKENS,), (MBU,))


class MetricsParseError(ValueError):
    pass


@dataclass(frozen=True)
class MetricsSnapshot:
    """One scrape: histograms by family name and plain values by sample name, each summed over label sets
    (a worker serves one model, but vLLM labels some series per engine or per finish reason)."""

    histograms: dict[str, Histogram]
    values: dict[str, float]

    def value(self, *names: str) -> float | None:
        for name in names:
            if name in self.values:
                return self.values[name]
        return None

    def histogram(self, *names: str) -> Histogram | None:
        for name in names:
            if name in self.histograms:
                return self.histograms[name]
        return None


def parse_exposition(text: str) -> MetricsSnapshot:
    """Parse the Prometheus text format (what /metrics serves). Raises MetricsParseError on malformed text."""
    # A name's label sets are summed with math.fsum, which does not depend on their order: a direct scrape and
    # the same series through Prometheus (another order) give the same snapshot to the last bit.
    buckets: dict[str, dict[float, list[float]]] = {}
    sums: dict[str, list[float]] = {}
    values: dict[str, list[float]] = {}
    cache_capacities: list[float | None] = []  # one per engine: vLLM's data-parallel engines each have a pool
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, float(sample.value)
                if name.endswith("_created"):
                    continue
                if name == CACHE_CONFIG:
                    cache_capacities.append(_cache_config_tokens(labels))
                elif name.endswith("_bucket") and "le" in labels:
                    buckets.setdefault(name[: -len("_bucket")], {}).setdefault(float(labels["le"]), []).append(value)
                elif name.endswith("_sum"):
                    sums.setdefault(name[: -len("_sum")], []).append(value)
                else:
                    values.setdefault(name, []).append(value)
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsParseError(f"malformed Prometheus exposition: {exc}") from None
    histograms = {}
    for base, per_edge in buckets.items():
        edges = tuple(sorted(per_edge))
        if not edges or not math.isinf(edges[-1]):
            raise MetricsParseError(f"histogram {base} has no +Inf bucket")
        histograms[base] = Histogram(edges, tuple(math.fsum(per_edge[e]) for e in edges), math.fsum(sums.get(base, ())))
    # A share (KV usage) of several engines' equal pools is their mean, not their sum.
    totals = {name: math.fsum(parts) / (len(parts) if name in KV_USAGE else 1) for name, parts in values.items()}
    if cache_capacities and None not in cache_capacities:
        totals.setdefault(KV_CAPACITY, math.fsum(cache_capacities))
    return MetricsSnapshot(histograms, totals)


def _cache_config_tokens(labels: dict[str, str]) -> float | None:
    """vLLM's KV capacity in tokens from its cache configuration's labels (None when it does not say)."""
    try:
        blocks, block_size = (float(labels[k]) for k in CACHE_CONFIG_LABELS)
    except (KeyError, ValueError):
        return None
    return blocks * block_size if blocks > 0 and block_size > 0 else None


def vllm_steps(histograms: dict[str, Histogram]) -> tuple[float, float, float, float] | None:
    """(steps, mean step seconds, mean decode sequences per step, mean tokens per step) of a window, from the
    series vLLM exports: every running sequence gets one token per engine step, so each inter-token latency
    sample is one sequence's share of one step and lasts that step; `vllm:iteration_tokens_total` counts the
    steps and their tokens. The step time is the inter-token latency's mean, weighted by the batch each step
    decoded (exact while the batch is steady over the window). None without both series in the window."""
    itl, steps = histograms.get(ITL[0]), histograms.get(ITERATION_TOKENS)
    if itl is None or steps is None or not itl.count or not steps.count:
        return None
    return steps.count, itl.mean, itl.count / steps.count, steps.mean


def _restarted(before: ReplicaSample, now: ReplicaSample) -> bool:
    """The worker restarted between two samples: its process started after the earlier one, or a counter went
    down (a container restart keeps the pod's name). Then, as Prometheus's rate() and increase() read a
    counter reset, everything the new process counted is new."""
    if now.started_at > before.time:
        return True
    return any(h.count < before.metrics.histograms[name].count for name, h in now.metrics.histograms.items()
               if name in before.metrics.histograms)


@dataclass
class ReplicaSample:
    """What one replica showed at `time`. metrics None: it was due (ready) but could not be scraped."""

    name: str
    time: float
    ready: bool
    started_at: float
    metrics: MetricsSnapshot | None = None


@dataclass
class WindowAggregator:
    """Successive samples of a deployment's replicas -> one Observation per control interval.

    A ready replica that could not be scraped, or an interval where no ready replica has a previous sample to
    take a delta from (the first interval after a start or restart), makes the window stale: the policy then
    holds. A replica first seen after it started counts in full (its counters began at zero); one first seen
    long after start (an operator restart) only sets its baseline; one that restarted since its previous
    sample counts what its new process counted (a counter reset, read as Prometheus reads one).
    """

    max_sample_age_s: float = 60.0
    _previous: dict[str, ReplicaSample] = field(default_factory=dict)
    _last_time: float | None = None

    def observe(self, time: float, samples: list[ReplicaSample], *, desired_replicas: int, pending_replicas: int,
                max_num_seqs: int, max_num_batched_tokens: int, replica_startup_s: float | None = None,
                held_requests: float = 0.0) -> Observation:
        window_s = time - self._last_time if self._last_time is not None else 0.0
        ready = [s for s in samples if s.ready]
        problems = [f"{s.name}: no metrics" for s in ready if s.metrics is None]
        problems += [f"{s.name}: sample {time - s.time:.0f} s old" for s in ready
                     if s.metrics is not None and time - s.time > self.max_sample_age_s]
        histograms: dict[str, Histogram] = {}
        step_stats: dict[str, Histogram] = {}
        running = waiting = kv_usage = 0.0
        kv_capacity: float | None = None  # the smallest replica's: what one replica can be planned to hold
        with_delta = 0
        for s in ready:
            if s.metrics is None:
                continue
            m = s.metrics
            running += m.value(RUNNING) or 0.0
            waiting += m.value(WAITING) or 0.0
            kv_usage = max(kv_usage, m.value(*KV_USAGE) or 0.0)
            capacity = m.value(KV_CAPACITY)
            if capacity:
                kv_capacity = capacity if kv_capacity is None else min(kv_capacity, capacity)
            before = self._previous.get(s.name)
            if before is not None and before.metrics is not None:
                earlier = None if _restarted(before, s) else before.metrics
            elif self._last_time is not None and s.started_at >= self._last_time:
                earlier = None  # started within the window: everything it counted is new
            else:
                continue
            with_delta += 1
            for names in COUNTER_HISTOGRAMS:
                name = next((n for n in names if n in m.histograms), None)
                if name is None:
                    continue
                now_h = m.histograms[name]
                old_h = earlier.histograms.get(name) if earlier is not None else None
                delta = now_h.minus(old_h if old_h is not None and old_h.edges == now_h.edges else None)
                target = step_stats if name.startswith("tideserve_step") else histograms
                target[names[0]] = Histogram.pool(target.get(names[0]), delta)
        if ready and not with_delta and not problems:
            problems.append("no earlier sample to take a window from yet")
        if not ready and desired_replicas > 0:
            problems.append("no ready replica")
        # With no replica asked for there is nothing to measure: the router's held requests (fresh) are the
        # whole window, also in the first one.
        for s in samples:
            if s.metrics is not None:
                self._previous[s.name] = s
        for gone in set(self._previous) - {s.name for s in samples}:
            del self._previous[gone]
        self._last_time = time
        e2e = histograms.get(E2E)
        steps = step_stats.get(STEP_SECONDS)
        n_steps = steps.count if steps is not None else 0.0
        step_s, step_seqs, step_tokens = (step_stats[n].mean if n in step_stats and n_steps else None
                                          for n in (STEP_SECONDS, STEP_SEQUENCES, STEP_TOKENS))
        if not n_steps and (from_vllm := vllm_steps(histograms)) is not None:
            n_steps, step_s, step_seqs, step_tokens = from_vllm

        return Observation(
            time=time, window_s=window_s, desired_replicas=desired_replicas, ready_replicas=len(ready),
            pending_replicas=pending_replicas, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, stale=bool(problems) or (window_s <= 0 and bool(ready)),
            ttft=histograms.get(TTFT), itl=histograms.get(ITL[0]), tpot=histograms.get(TPOT),
            queue_time=histograms.get(QUEUE_TIME), prompt_tokens=histograms.get(PROMPT_TOKENS),
            generation_tokens=histograms.get(GENERATION_TOKENS), requests_finished=e2e.count if e2e is not None else 0.0,
            running=running, waiting=waiting, kv_usage=kv_usage, held_requests=held_requests,
            kv_capacity_tokens=kv_capacity, steps=n_steps,
            step_s=step_s, step_seqs=step_seqs, step_tokens=step_tokens,
            mbu=histograms[MBU].mean if MBU in histograms and histograms[MBU].count else None,
            replica_startup_s=replica_startup_s,
            replicas=[ReplicaState(s.name, s.ready,
                                   (s.metrics.value(RUNNING) or 0.0) if s.metrics else 0.0,
                                   (s.metrics.value(WAITING) or 0.0) if s.metrics else 0.0,
                                   (s.metrics.value(*KV_USAGE) or 0.0) if s.metrics else 0.0, s.started_at)
                      for s in samples],
            problems=problems,
        )
