"""The engine: requests in, one scheduled forward pass per step, tokens out.

`LLMEngine.step()` is synchronous and single-threaded. Other threads talk to it only through `submit`,
`abort` and `set_batch_limits`, which queue commands that the next step applies first, so the scheduler's
state is never touched concurrently. `AsyncEngine` runs the step loop in a thread for the HTTP server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tideserve.worker.block_manager import BlockManager
from tideserve.worker.config import EngineConfig, validate_batch_limits
from tideserve.worker.detokenizer import IncrementalDetokenizer
from tideserve.worker.metrics import EngineMetrics
from tideserve.worker.sampler import Sampler
from tideserve.worker.scheduler import ScheduledBatch, Scheduler
from tideserve.worker.sequence import FinishReason, SamplingParams, Sequence
from tideserve.worker.utilization import DevicePeak, ModelFootprint, step_kind

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full; the client should retry later."""


class PromptTooLongError(ValueError):
    pass


@dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since the previous output
    token_ids: list[int]  # new token ids since the previous output
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None


class _Request:
    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer):
        self.seq = seq
        self.detok = detok
        self.sent_tokens = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, metrics: EngineMetrics | None = None):
        from transformers import AutoTokenizer

        from tideserve.worker.builtin_models import resolve_model
        from tideserve.worker.model_runner import ModelRunner

        self.config = config
        model_dir = Path(resolve_model(config.model))
        self.model_name = config.served_model_name or (
            config.model if not Path(config.model).exists() else model_dir.name
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.runner = ModelRunner(config, model_dir)
        self.max_model_len = self._resolve_max_model_len(config.max_model_len)
        if self.runner.num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"KV cache holds {self.runner.num_blocks * config.block_size} tokens, fewer than max_model_len "
                f"({self.max_model_len}): raise kv_cache_memory_gb / num_kv_blocks or lower max_model_len"
            )
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.sampler = Sampler(config.seed)
        self.eos_token_ids = self._eos_ids()
        self.metrics = metrics or EngineMetrics(self.model_name)
        self.metrics.kv_capacity_tokens.set(self.runner.num_blocks * config.block_size)
        runner = self.runner
        self.footprint = ModelFootprint.of(runner.model, runner.num_layers, runner.hf_config.num_attention_heads,
                                           runner.kv_bytes_per_slot, runner.head_dim)
        self.peak = self._device_peak(config)
        self.metrics.peak_bandwidth.set(self.peak.bytes_per_s)
        self.metrics.peak_flops.set(self.peak.flops_per_s)
        self.requests: dict[str, _Request] = {}
        self._commands: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._pending_adds = 0
        self._preemptions_seen = 0
        self._publish_limits()

    # --- thread-safe entry points ---------------------------------------------------------------------

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Validate and queue a request; it joins the scheduler at the next step."""
        self.check_length(len(prompt_token_ids), params.max_tokens)
        seq = Sequence(list(prompt_token_ids), params, request_id=request_id)
        with self._lock:
            if len(self.scheduler.waiting) + self._pending_adds >= self.config.max_waiting_requests:
                raise QueueFullError(f"waiting queue is full ({self.config.max_waiting_requests} requests)")
            self._pending_adds += 1
            self._commands.append(lambda: self._add(seq))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._commands.append(lambda: self._finish_request(request_id, FinishReason.ABORT))

    def set_batch_limits(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        validate_batch_limits(max_num_seqs, max_num_batched_tokens)
        with self._lock:
            self._commands.append(lambda: self._apply_limits(max_num_seqs, max_num_batched_tokens))

    @property
    def batch_limits(self) -> dict:
        return {
            "max_num_seqs": self.scheduler.max_num_seqs,
            "max_num_batched_tokens": self.scheduler.max_num_batched_tokens,
        }

    def check_length(self, prompt_tokens: int, max_tokens: int | None) -> None:
        if prompt_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{prompt_tokens} tokens and leaves no room for output."
            )
        if max_tokens is not None and prompt_tokens + max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens; you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                "completion). Reduce the prompt or max_tokens."
            )

    # --- the step --------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._commands) or self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        outputs = self._apply_commands()
        batch = self.scheduler.schedule()
        if not batch:
            self._publish_queue_gauges()
            return outputs
        started = time.monotonic()
        for seq in batch.started:
            self.metrics.queue_time.observe(started - seq.arrival_time)
            self.metrics.prefix_cache_queries.inc(seq.num_prompt_tokens)
            self.metrics.prefix_cache_hits.inc(seq.num_cached_prompt_tokens)
        # A sequence samples a token when this step computes all of its pending tokens; its logits row is
        # the packed position of its last scheduled token.
        ready, rows, row = [], [], 0
        for seq, n in zip(batch.seqs, batch.num_tokens):
            row += n
            if n == seq.num_uncomputed_tokens:
                ready.append(seq)
                rows.append(row - 1)
        chunks = [(seq.num_computed_tokens, n) for seq, n in zip(batch.seqs, batch.num_tokens)]
        logits = self.runner.run(batch, rows)
        self.scheduler.postprocess(batch)
        now = time.monotonic()
        if ready:
            token_ids = self.sampler.sample(logits, [s.params for s in ready], [s.seq_id for s in ready])
            for seq, token_id in zip(ready, token_ids):
                outputs.append(self._append_token(seq, token_id, now))
        self._record_step(batch, now - started, chunks, len(rows))
        return outputs

    def _append_token(self, seq: Sequence, token_id: int, now: float) -> RequestOutput:
        m = self.metrics
        if seq.first_token_time is None:
            seq.first_token_time = now
            m.ttft.observe(now - seq.arrival_time)
        else:
            m.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        seq.append_token(token_id)
        m.generation_tokens.inc()
        request = self.requests[seq.request_id]
        if token_id in self.eos_token_ids and not seq.params.ignore_eos:
            return self._finish_request(seq.request_id, FinishReason.STOP)
        text = request.detok.update(seq.output_token_ids)
        if request.detok.stopped:
            return self._finish_request(seq.request_id, FinishReason.STOP, text)
        if seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len:
            return self._finish_request(seq.request_id, FinishReason.LENGTH, text)
        return self._output(request, text, finished=False)

    def _finish_request(self, request_id: str, reason: FinishReason, text: str = "", error: str | None = None):
        request = self.requests.pop(request_id, None)
        if request is None:  # already finished (an abort racing with completion)
            return None
        seq = request.seq
        self.scheduler.finish(seq, reason)
        self.sampler.release(seq.seq_id)
        text += request.detok.flush()
        m = self.metrics
        m.request_finished(reason.value)
        m.e2e.observe(seq.finished_time - seq.arrival_time)
        m.prompt_len.observe(seq.num_prompt_tokens)
        m.output_len.observe(seq.num_output_tokens)
        if seq.num_output_tokens > 1:
            m.tpot.observe((seq.last_token_time - seq.first_token_time) / (seq.num_output_tokens - 1))
        return self._output(request, text, finished=True, error=error)

    def _output(self, request: _Request, text: str, finished: bool, error: str | None = None) -> RequestOutput:
        seq = request.seq
        new_tokens = seq.output_token_ids[request.sent_tokens :]
        request.sent_tokens = seq.num_output_tokens
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=new_tokens,
            finished=finished,
            finish_reason=seq.finish_reason.value if finished and seq.finish_reason else None,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            cached_tokens=seq.num_cached_prompt_tokens,
            error=error,
        )

    def close(self) -> None:
        """Release what outlives the object: the other ranks of a tensor-parallel engine."""
        self.runner.close()

    def fail_all(self, error: str) -> list[RequestOutput]:
        """After an engine failure: end every request with an error instead of leaving clients hanging."""
        outputs = self._apply_commands()
        for request_id in list(self.requests):
            outputs.append(self._finish_request(request_id, FinishReason.ABORT, error=error))
        return outputs

    # --- internals -------------------------------------------------------------------------------------

    def _apply_commands(self) -> list[RequestOutput]:
        with self._lock:
            commands, self._commands = list(self._commands), deque()
        outputs = [out for command in commands if (out := command()) is not None]
        return outputs

    def _add(self, seq: Sequence) -> None:
        with self._lock:
            self._pending_adds -= 1
        self.requests[seq.request_id] = _Request(seq, IncrementalDetokenizer(self.tokenizer, seq.params.stop))
        self.scheduler.add(seq)
        self.metrics.prompt_tokens.inc(seq.num_prompt_tokens)

    def _apply_limits(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.scheduler.set_batch_limits(max_num_seqs, max_num_batched_tokens)
        self._publish_limits()

    def _publish_limits(self) -> None:
        self.metrics.max_num_seqs.set(self.scheduler.max_num_seqs)
        self.metrics.max_num_batched_tokens.set(self.scheduler.max_num_batched_tokens)

    def _publish_queue_gauges(self) -> None:
        m = self.metrics
        m.running.set(len(self.scheduler.running))
        m.waiting.set(len(self.scheduler.waiting))
        m.kv_usage.set(self.block_manager.usage)
        m.preemptions.inc(self.scheduler.num_preemptions - self._preemptions_seen)
        self._preemptions_seen = self.scheduler.num_preemptions

    def _record_step(self, batch: ScheduledBatch, seconds: float, chunks: list[tuple[int, int]],
                     sampled_rows: int) -> None:
        m = self.metrics
        m.step_tokens.observe(batch.total_tokens)
        m.step_seqs.observe(len(batch.seqs))
        m.step_time.observe(seconds)
        moved, flops = self.footprint.step_cost(chunks, sampled_rows)
        seconds = max(seconds, 1e-9)
        m.step_utilization(step_kind(batch.num_tokens), moved / seconds / self.peak.bytes_per_s,
                           flops / seconds / self.peak.flops_per_s)
        self._publish_queue_gauges()

    def _device_peak(self, config: EngineConfig) -> DevicePeak:
        """The peaks MBU and MFU are relative to: as given, else measured on the engine's device now."""
        if config.peak_bandwidth_gbps and config.peak_tflops:
            return DevicePeak(config.peak_bandwidth_gbps * 1e9, config.peak_tflops * 1e12, False)
        measured = DevicePeak.measure(self.runner.device, self.runner.dtype)
        return DevicePeak(config.peak_bandwidth_gbps * 1e9 if config.peak_bandwidth_gbps else measured.bytes_per_s,
                          config.peak_tflops * 1e12 if config.peak_tflops else measured.flops_per_s, True)

    def _resolve_max_model_len(self, requested: int | None) -> int:
        model_limit = getattr(self.runner.hf_config, "max_position_embeddings", None) or 8192
        if self.runner.attention_window is not None:
            model_limit = min(model_limit, self.runner.attention_window)
        if requested is None:
            return min(model_limit, 8192)
        if requested > model_limit:
            raise ValueError(f"max_model_len {requested} exceeds what the model supports ({model_limit} tokens: its "
                             "max_position_embeddings, or its sliding attention window)")
        return requested

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.runner.model, "generation_config", None)
        for value in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids
