"""Tensor parallelism: one process per rank over torch.distributed (gloo on CPU, NCCL on CUDA).

Megatron-style sharding of the loaded Hugging Face model, in place: every attention layer keeps a contiguous
share of the KV heads (and the query heads of their groups): q/k/v projections split by output rows, the output
projection by input columns followed by one all-reduce; the MLP's gate/up split by rows and its down projection
by columns, one all-reduce. Two all-reduces per layer, nothing else is communicated inside the forward pass.
Embeddings, norms and the LM head stay whole on every rank (only rank 0 computes logits). Heads need not divide
evenly: SmolLM2's 3 KV heads over 2 ranks are 2 + 1. Each rank's paged KV cache holds its own KV heads.

Rank 0 is the engine: it schedules, samples and, before every forward pass, broadcasts the step (the batch's
token ids, positions, block tables and the rows to sample) to the other ranks, which run the same forward pass
and wait for the next one. A rank that dies is noticed by rank 0's watchdog (the engine fails, the worker exits
non-zero) and by a collective timeout inside every step (TIDESERVE_TP_COLLECTIVE_TIMEOUT_S, default 120 s), so
nothing hangs; between steps the other ranks wait for the next one without a limit (an idle worker keeps them).
"""

from __future__ import annotations

import datetime
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

STARTUP_TIMEOUT = datetime.timedelta(seconds=120)  # the longest rank 0 waits for the others to join
# The longest a rank waits for the others inside a step (the forward pass's all-reduces).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("TIDESERVE_TP_COLLECTIVE_TIMEOUT_S", "120")))
# Between steps a rank waits for rank 0's next one as long as the worker is idle (a worker without requests
# for two minutes must not lose its ranks); a rank 0 that dies closes its sockets, which ends the wait at once.
IDLE_TIMEOUT = datetime.timedelta(days=365)
_compute_group = None  # the all-reduces, with COLLECTIVE_TIMEOUT
_step_group = None  # the steps' broadcasts: gloo, with IDLE_TIMEOUT


def split(total: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's share of `total` items, as even as possible (the first ranks get one more)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class RowParallel(torch.nn.Module):
    """A linear layer holding some input columns: partial products summed over ranks, the bias added once."""

    def __init__(self, inner: torch.nn.Linear, bias: torch.nn.Parameter | None):
        super().__init__()
        self.inner, self.bias = inner, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        dist.all_reduce(y, group=_compute_group)
        return y if self.bias is None else y + self.bias


def _rows(linear: torch.nn.Linear, start: int, end: int) -> torch.nn.Linear:
    out = torch.nn.Linear(linear.in_features, end - start, bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        out.weight.copy_(linear.weight[start:end])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[start:end])
    return out


def _columns(linear: torch.nn.Linear, start: int, end: int) -> RowParallel:
    inner = torch.nn.Linear(end - start, linear.out_features, bias=False, dtype=linear.weight.dtype,
                            device=linear.weight.device)
    with torch.no_grad():
        inner.weight.copy_(linear.weight[:, start:end])
    return RowParallel(inner, linear.bias)


def shard_model(model: torch.nn.Module, config, rank: int, world: int) -> tuple[int, int]:
    """Keep this rank's share of every decoder layer; returns its (KV heads, query heads)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if kv_heads < world:
        raise ValueError(f"tensor-parallel-size {world} exceeds the model's {kv_heads} KV heads")
    group = heads // kv_heads
    kv_start, kv_end = split(kv_heads, world, rank)
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or not all(
                hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"tensor parallelism needs a Llama-style layer, not {type(layer).__name__}")
        q = (kv_start * group * head_dim, kv_end * group * head_dim)
        kv = (kv_start * head_dim, kv_end * head_dim)
        attention.q_proj = _rows(attention.q_proj, *q)
        attention.k_proj, attention.v_proj = _rows(attention.k_proj, *kv), _rows(attention.v_proj, *kv)
        attention.o_proj = _columns(attention.o_proj, *q)
        inter = split(mlp.gate_proj.out_features, world, rank)
        mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, *inter), _rows(mlp.up_proj, *inter)
        mlp.down_proj = _columns(mlp.down_proj, *inter)
    return kv_end - kv_start, (kv_end - kv_start) * group


def init_process_group(rank: int, world: int, port: int, device: torch.device) -> None:
    global _compute_group, _step_group
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=STARTUP_TIMEOUT)
    _compute_group = dist.new_group(timeout=COLLECTIVE_TIMEOUT)
    _step_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def leave_group() -> None:
    """Destroy every group of this process and drop the references that would keep their sockets open."""
    global _compute_group, _step_group
    dist.destroy_process_group()
    _compute_group = _step_group = None


@dataclass(frozen=True)
class StepMessage:
    """One forward pass, as rank 0 sends it: per sequence (token ids computed now, first position, block
    table), and the packed rows to sample. None in a broadcast means: stop."""

    seqs: list[tuple[list[int], int, list[int]]]
    sample_rows: list[int]


def broadcast(message: StepMessage | None) -> StepMessage | None:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=_step_group)
    return box[0]


def _rank_main() -> None:
    """A rank above 0, as its own process (`python -m tideserve.worker.parallel`, its start arguments pickled on
    stdin: no re-import of the parent's __main__): build its runner (the same model load and sharding), then run
    what rank 0 sends."""
    build_runner, rank, port, threads = pickle.load(sys.stdin.buffer)
    torch.set_num_threads(threads)
    runner = build_runner(rank, port)
    try:
        runner.follow()
    finally:
        leave_group()


class RankProcesses:
    """The processes of ranks 1..world-1, and the watchdog that fails the engine when one dies."""

    def __init__(self, world: int, port: int, build_runner: Callable, threads: int):
        self.processes = []
        for rank in range(1, world):
            process = subprocess.Popen([sys.executable, "-m", "tideserve.worker.parallel"], stdin=subprocess.PIPE)
            process.stdin.write(pickle.dumps((build_runner, rank, port, threads)))
            process.stdin.close()
            self.processes.append(process)
        self.dead: str | None = None
        self._stopping = False

    def watch(self, on_death: Callable[[str], None], every_s: float = 0.5) -> None:
        def loop() -> None:
            while not self._stopping:
                for rank, process in enumerate(self.processes, start=1):
                    if process.poll() is not None and not self._stopping:
                        self.dead = f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {process.returncode}"
                        on_death(self.dead)
                        return
                time.sleep(every_s)

        threading.Thread(target=loop, name="tideserve-tp-watchdog", daemon=True).start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Tell the ranks to stop (unless one died: the rest cannot take part in a broadcast) and wait for them;
        the watchdog stands down first, so that their exits are not taken for deaths."""
        self._stopping = True
        if self.dead is None:
            broadcast(None)
        for process in self.processes:
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def threads_per_rank(world: int) -> int:
    """Each rank's share of this process's compute threads (at least one)."""
    return max(1, torch.get_num_threads() // world)


if __name__ == "__main__":
    _rank_main()
