"""A per-deployment performance model of one replica running continuous batching.

One engine step costs
    step = base + per_seq * decode_seqs + per_context_token * context_tokens + per_prefill_token * prefill_tokens
(weights read once per step; per-sequence work; KV reads grow with context; prefill is compute-bound).
From it, for a query mix (mean input I, mean output O) at a per-replica request rate lam, steady state gives
(Little's law: decode_seqs = lam * O * step, prefill per step = lam * I * step):
    step(lam) = base / (1 - lam * k),   k = per_seq*O + per_context_token*O*(I + O/2) + per_prefill_token*I
so the mean TPOT is step(lam), and the capacity of a replica at a TPOT target T is lam <= (1 - base/T) / k.

The coefficients start from a bootstrap profile and are refit online (recursive least squares with a prior
and forgetting) from the step-time windows that workers export (tideserve_step_* metrics).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class StepTimeParams:
    base_s: float
    per_seq_s: float
    per_context_token_s: float
    per_prefill_token_s: float
    kv_capacity_tokens: int
    max_num_batched_tokens: int = 2048  # vLLM's OpenAI-server token budget on GPUs under 70 GiB (8192 on H100s)
    max_num_seqs: int = 256  # the engine's hard ceiling for the batch-limit knob

    def step_time(self, decode_seqs: float, context_tokens: float, prefill_tokens: float) -> float:
        return (self.base_s + self.per_seq_s * decode_seqs + self.per_context_token_s * context_tokens
                + self.per_prefill_token_s * prefill_tokens)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StepTimeParams":
        return cls(**data)


# Llama-3-8B-class model in bf16 on one H100 SXM (3.35 TB/s, ~990 dense bf16 TFLOPS), estimated from published
# figures: ~150 tok/s single-stream decode (16 GB of weights per step: ~6.5 ms), a per-sequence cost of ~80 us
# (sampling, activations, scheduling), 128 KiB of KV per token (32 layers x 8 KV heads x 128 x 2 x 2 B) read
# at bandwidth (~40 ns/token), prefill at ~28k tokens/s (~16 GFLOP/token at ~45% MFU); 80 GB minus weights and
# activations leaves ~55 GB of KV, ~430k tokens.
H100_8B = StepTimeParams(
    base_s=0.0065,
    per_seq_s=80e-6,
    per_context_token_s=40e-9,
    per_prefill_token_s=36e-6,
    kv_capacity_tokens=430_000,
)


def fit_step_params(points: list[tuple[float, float, float, float]], kv_capacity_tokens: int,
                    max_num_seqs: int, max_num_batched_tokens: int) -> StepTimeParams:
    """A bootstrap profile measured on the real worker: least squares over windows of
    (mean step s, decode sequences, context tokens, prefill tokens), with every cost kept non-negative (a cost
    the windows cannot separate from the others is set to zero and the rest refit)."""
    if len(points) < 2:
        raise ValueError("need at least two step-time windows to fit a profile")
    y = np.array([p[0] for p in points])
    x = np.array([[1.0, p[1], p[2], p[3]] for p in points])
    active = list(range(4))
    while True:
        theta = np.zeros(4)
        theta[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        negative = [i for i in active if theta[i] < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda i: theta[i]))
    return StepTimeParams(max(float(theta[0]), 1e-5), float(theta[1]), float(theta[2]), float(theta[3]),
                          kv_capacity_tokens, max_num_batched_tokens, max_num_seqs)


@dataclass(frozen=True)
class QueryMix:
    mean_input: float
    mean_output: float
    # The prompt length at the planning quantile among the requests the TTFT target can hold (None: the tail
    # of TTFT is the mean's times the observed tail factor). With long prompts the tail is the prompt's own
    # prefill, which more replicas cannot shorten; only the queueing part scales with the tail factor.
    tail_input: float | None = None

    def __post_init__(self):
        if self.mean_input < 1 or self.mean_output < 1:
            raise ValueError("mean input and output must be >= 1 token")

    @property
    def mean_context(self) -> float:
        return self.mean_input + self.mean_output / 2


@dataclass(frozen=True)
class BatchLimits:
    max_num_seqs: int
    max_num_batched_tokens: int


# Candidate per-step token budgets (prefill chunk sizes) the policy chooses from; the small ones are for slow
# replicas (CPUs), where one 256-token chunk alone outlasts a TPOT target.
TOKEN_BUDGETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class ReplicaCapacity:
    rate: float  # requests/s one replica sustains within the SLOs (before headroom)
    limited_by: str  # tpot | ttft | batch | kv
    step_s: float  # predicted mean step time at that rate


class PerformanceModel:
    """The step-time coefficients of one deployment, refit online, and what follows from them."""

    FEATURES = ("base_s", "per_seq_s", "per_context_token_s", "per_prefill_token_s")

    def __init__(self, bootstrap: StepTimeParams = H100_8B, prior_weight: float = 50.0, forgetting: float = 0.995):
        self.params = bootstrap
        self.forgetting = forgetting
        self._theta = np.array([getattr(bootstrap, f) for f in self.FEATURES], dtype=float)
        # Prior precision per coefficient, scaled so each counts like `prior_weight` typical observations.
        scale = np.array([1.0, 32.0, 32.0 * 1000, 256.0])
        self._precision = np.diag((prior_weight * scale**2))
        self._xty = self._precision @ self._theta
        self.samples = 0

    def observe(self, step_s: float, decode_seqs: float, context_tokens: float, prefill_tokens: float,
                steps: float = 1.0) -> None:
        """One window's mean step (weighted by its number of steps): refit the coefficients."""
        if step_s <= 0 or steps <= 0 or not math.isfinite(step_s):
            return
        x = np.array([1.0, decode_seqs, context_tokens, prefill_tokens])
        w = min(steps, 1000.0)
        self._precision = self.forgetting * self._precision + w * np.outer(x, x)
        self._xty = self.forgetting * self._xty + w * x * step_s
        theta = np.linalg.solve(self._precision, self._xty)
        theta = np.maximum(theta, [1e-5, 0.0, 0.0, 1e-8])  # physical: every cost is non-negative
        self._theta = theta
        self.params = StepTimeParams(*theta, self.params.kv_capacity_tokens, self.params.max_num_batched_tokens,
                                     self.params.max_num_seqs)
        self.samples += 1

    def set_kv_capacity(self, tokens: int) -> None:
        """What the workers report their KV cache holds replaces the bootstrap profile's guess."""
        if tokens > 0 and tokens != self.params.kv_capacity_tokens:
            self.params = replace(self.params, kv_capacity_tokens=int(tokens))

    def load_coefficient(self, mix: QueryMix) -> float:
        """k: seconds of step time added per (request/s) of this mix."""
        p = self.params
        return (p.per_seq_s * mix.mean_output + p.per_context_token_s * mix.mean_output * mix.mean_context
                + p.per_prefill_token_s * mix.mean_input)

    def step_time_at(self, rate: float, mix: QueryMix) -> float:
        """Mean step time (= mean TPOT) of one replica at `rate` requests/s; inf when overloaded."""
        load = rate * self.load_coefficient(mix)
        return self.params.base_s / (1 - load) if load < 1 else math.inf

    def decode_batch_at(self, rate: float, mix: QueryMix, max_num_seqs: int) -> float:
        """Running decodes in steady state (Little's law), capped by the batch limit."""
        return min(float(max_num_seqs), rate * mix.mean_output * self.step_time_at(rate, mix))

    def busy_step(self, decode_seqs: float, mix: QueryMix, max_num_batched_tokens: int) -> float:
        """A step that carries a full prefill chunk next to the decodes: what every step costs while prompts
        queue up (a burst), so it bounds the TPOT of requests decoding through one."""
        chunk = max(0.0, max_num_batched_tokens - decode_seqs)
        return self.params.step_time(decode_seqs, decode_seqs * mix.mean_context, chunk)

    def tpot_tail_at(self, rate: float, mix: QueryMix, limits: BatchLimits, tail: float) -> float:
        """Predicted tail TPOT: the mean step inflated by the observed tail factor, but never beyond the busy
        step that the token budget allows (chunked prefill bounds the step)."""
        mean = self.step_time_at(rate, mix)
        if not math.isfinite(mean):
            return math.inf
        busy = self.busy_step(self.decode_batch_at(rate, mix, limits.max_num_seqs), mix, limits.max_num_batched_tokens)
        return max(mean, min(busy, mean * tail))

    def prefill_service(self, prompt_tokens: float, limits: BatchLimits, decodes: float = 0.0,
                        mix: QueryMix | None = None) -> float:
        """A prompt's own time to first token without queueing: its full chunks, each a busy step, then a step
        with the rest of it (a prompt shorter than the budget costs one step of its own tokens, not of the
        whole budget)."""
        mix = mix or QueryMix(max(1.0, prompt_tokens), 1.0)
        chunk = max(1.0, limits.max_num_batched_tokens - decodes)
        full = math.floor(prompt_tokens / chunk)
        rest = prompt_tokens - full * chunk
        step = lambda tokens: self.params.step_time(decodes, decodes * mix.mean_context, tokens)  # noqa: E731
        return full * step(chunk) + (step(rest) if rest > 0 or not full else 0.0)

    def max_feasible_prompt(self, ttft_target_s: float, limits: BatchLimits) -> float:
        """The longest prompt whose own prefill on an idle replica fits the TTFT target: a longer one misses it
        whatever the number of replicas (0 when not even one chunk fits)."""
        lo, hi = 0, 1
        while self.prefill_service(hi, limits) <= ttft_target_s and hi < 1 << 26:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.prefill_service(mid, limits) <= ttft_target_s else (lo, mid)
        return float(lo)

    def _ttft_parts(self, rate: float, mix: QueryMix, limits: BatchLimits) -> tuple[float, float, float]:
        """(mean prefill service, mean queueing wait, decodes): the prompt's chunks, each a busy step, and the
        wait of an M/M/1-like server whose utilization is the share of the per-step token budget prompts use."""
        if not math.isfinite(self.step_time_at(rate, mix)):
            return math.inf, math.inf, 0.0
        decodes = self.decode_batch_at(rate, mix, limits.max_num_seqs)
        chunk = max(1.0, limits.max_num_batched_tokens - decodes)
        busy = self.busy_step(decodes, mix, limits.max_num_batched_tokens)
        utilization = rate * mix.mean_input * busy / chunk
        service = self.prefill_service(mix.mean_input, limits, decodes, mix)
        if utilization >= 1:
            return service, math.inf, decodes
        return service, service * utilization / (1 - utilization), decodes

    def ttft_at(self, rate: float, mix: QueryMix, limits: BatchLimits) -> float:
        """Mean TTFT: prefill service plus queueing."""
        service, wait, _ = self._ttft_parts(rate, mix, limits)
        return service + wait

    def ttft_tail_at(self, rate: float, mix: QueryMix, limits: BatchLimits, tail: float) -> float:
        """Tail TTFT: the tail prompt's own prefill (the mean's times `tail` when the mix names none) plus the
        queueing wait times `tail`."""
        service, wait, decodes = self._ttft_parts(rate, mix, limits)
        if mix.tail_input is None:
            return tail * (service + wait)
        return self.prefill_service(mix.tail_input, limits, decodes, mix) + tail * wait

    def capacity(self, mix: QueryMix, tpot_target_s: float, ttft_target_s: float, limits: BatchLimits,
                 tpot_tail: float = 1.0, ttft_tail: float = 1.0) -> ReplicaCapacity:
        """Highest request rate one replica sustains under these batch limits with the predicted tail TPOT
        and tail TTFT within their targets, the running batch within max_num_seqs and KV within capacity."""
        p = self.params
        k = self.load_coefficient(mix)
        b = limits.max_num_seqs
        # Batch: decode_seqs = lam * O * step(lam) <= B  ->  lam * (O*base + B*k) <= B; the same for KV.
        found = {"batch": b / (mix.mean_output * p.base_s + b * k)}
        kv_seqs = 0.9 * p.kv_capacity_tokens / mix.mean_context
        found["kv"] = kv_seqs / (mix.mean_output * p.base_s + kv_seqs * k)
        upper = min(found.values())
        found["tpot"] = self._bisect(lambda lam: self.tpot_tail_at(lam, mix, limits, tpot_tail) <= tpot_target_s,
                                     upper)
        found["ttft"] = self._bisect(lambda lam: self.ttft_tail_at(lam, mix, limits, ttft_tail) <= ttft_target_s,
                                     upper)
        limited_by = min(found, key=found.get)
        rate = found[limited_by]
        return ReplicaCapacity(rate, limited_by, self.step_time_at(rate, mix))

    @staticmethod
    def _bisect(ok, upper: float, iterations: int = 40) -> float:
        lo, hi = 0.0, upper
        if ok(hi):
            return hi
        for _ in range(iterations):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return lo

    def choose_limits(self, mix: QueryMix, tpot_target_s: float, ttft_target_s: float, tpot_tail: float = 1.0,
                      ttft_tail: float = 1.0, token_budgets: tuple[int, ...] = TOKEN_BUDGETS,
                      ) -> tuple[BatchLimits, ReplicaCapacity]:
        """The batch limits that give one replica the most SLO capacity under this mix. For each token budget,
        max_num_seqs is the largest batch whose busy step (a full prefill chunk next to it) still fits the TPOT
        target, so TPOT stays inside the SLO even when load exceeds the plan and requests queue instead."""
        best: tuple[BatchLimits, ReplicaCapacity] | None = None
        for budget in token_budgets:
            seqs = self.largest_batch(mix, tpot_target_s, budget)
            if seqs < 1:
                continue
            limits = BatchLimits(seqs, max(budget, seqs))
            cap = self.capacity(mix, tpot_target_s, ttft_target_s, limits, tpot_tail, ttft_tail)
            # A larger budget must be clearly better; with no capacity anywhere, the larger (faster prefill).
            if best is None or cap.rate > best[1].rate * 1.02 or cap.rate == best[1].rate == 0:
                best = (limits, cap)
        if best is None:  # even one sequence misses the target: run the smallest batch and report its capacity
            limits = BatchLimits(1, token_budgets[0])
            best = (limits, self.capacity(mix, tpot_target_s, ttft_target_s, limits, tpot_tail, ttft_tail))
        return best

    def largest_batch(self, mix: QueryMix, tpot_target_s: float, budget: int) -> int:
        """The largest batch whose busy step with this token budget fits the TPOT target (0: none does)."""
        lo, hi = 0, self.params.max_num_seqs
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.busy_step(mid, mix, budget) <= tpot_target_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def to_dict(self) -> dict:
        return {"params": self.params.to_dict(), "precision": self._precision.tolist(), "xty": self._xty.tolist(),
                "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict, forgetting: float = 0.995) -> "PerformanceModel":
        model = cls(StepTimeParams.from_dict(data["params"]), forgetting=forgetting)
        model._precision = np.array(data["precision"])
        model._xty = np.array(data["xty"])
        model._theta = np.array([getattr(model.params, f) for f in cls.FEATURES])
        model.samples = data["samples"]
        return model
