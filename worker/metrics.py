"""Prometheus metrics under vLLM's names (dashboards, KEDA recipes and routers work unchanged), plus
tideserve_ metrics for the live batch limits and per-step work."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tideserve.buckets import (E2E_BUCKETS, STEP_BUCKETS, TOKEN_COUNT_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS,
                               UTILIZATION_BUCKETS)


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def hist(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=r).labels(model_name)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token (arrival to first token).", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.", TPOT_BUCKETS)
        self.tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Per request: (e2e - ttft) / (output tokens - 1).",
            TPOT_BUCKETS,
        )
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Arrival to last token.", E2E_BUCKETS)
        self.queue_time = hist(
            "vllm:request_queue_time_seconds", "Arrival to first scheduled step.", TTFT_BUCKETS
        )
        self.prompt_len = hist("vllm:request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_COUNT_BUCKETS)
        self.output_len = hist(
            "vllm:request_generation_tokens", "Generated tokens per finished request.", TOKEN_COUNT_BUCKETS
        )
        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        # vLLM's names: prompt tokens looked up in the prefix cache at admission, and those found there.
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("vllm:num_preemptions", "Sequences preempted (recomputed later).")
        self._success = Counter(
            "vllm:request_success", "Finished requests by reason.", labels + ["finished_reason"], registry=r
        )
        self._model_name = model_name
        self.max_num_seqs = gauge("tideserve_max_num_seqs", "Current batch limit: running sequences.")
        self.max_num_batched_tokens = gauge(
            "tideserve_max_num_batched_tokens", "Current batch limit: tokens per step."
        )
        self.step_tokens = hist("tideserve_step_tokens", "Tokens computed per engine step.", TOKEN_COUNT_BUCKETS)
        self.step_seqs = hist("tideserve_step_sequences", "Sequences per engine step.", TOKEN_COUNT_BUCKETS)
        self.step_time = hist("tideserve_step_seconds", "Engine step wall time.", STEP_BUCKETS)
        self.draining = gauge("tideserve_draining", "1 while the worker drains before exit.")
        self.kv_capacity_tokens = gauge("tideserve_kv_cache_capacity_tokens",
                                        "Tokens the KV cache holds (blocks x block size): the autoscaler's KV bound.")
        step_kind = labels + ["kind"]
        self._mbu = Histogram("tideserve_mbu", "Per step: bytes read and written / step time / peak bandwidth, "
                              "by step kind (decode, prefill, mixed).", step_kind, buckets=UTILIZATION_BUCKETS,
                              registry=r)
        self._mfu = Histogram("tideserve_mfu", "Per step: FLOPs / step time / peak FLOP/s, by step kind.", step_kind,
                              buckets=UTILIZATION_BUCKETS, registry=r)
        self.peak_bandwidth = gauge("tideserve_device_peak_bytes_per_second",
                                    "The device bandwidth MBU is relative to (measured at start, or given).")
        self.peak_flops = gauge("tideserve_device_peak_flops", "The device FLOP/s MFU is relative to.")

    def step_utilization(self, kind: str, mbu: float, mfu: float) -> None:
        self._mbu.labels(self._model_name, kind).observe(mbu)
        self._mfu.labels(self._model_name, kind).observe(mfu)

    def request_finished(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()
