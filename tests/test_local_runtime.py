"""The closed loop on this machine: `tideserve up`'s runtime with the demo model, real worker processes, the
router and the policy, under a load step and its fall. Slow (a few minutes of real load on CPU)."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys

import httpx
import pytest
import yaml

from tideserve.bench.loadgen import BenchConfig, run_benchmark
from tideserve.local import deployment
from tideserve.autoscaler.spec import initial_batch_limits
from tideserve.local.demo import DEMO_YAML, DemoLoad, single_replica_rate
from tideserve.local.replicas import WorkerProcess
from tideserve.ports import free_port
from tideserve.local.runtime import LocalRuntime
from tideserve.traces import TraceRequest, load_trace, scale_tokens

DEMO_FILE = "tideserve/data/" + DEMO_YAML


def step_workload(rate: float, duration_s: float, start_s: float = 0.0, seed: int = 0) -> list[TraceRequest]:
    """Evenly spaced arrivals (a deterministic step) with the demo's conversation lengths."""
    load = DemoLoad()
    lengths = scale_tokens(load_trace("azure-conv"), load.input_scale, load.output_scale, load.max_input,
                           load.max_output)
    n = int(rate * duration_s)
    return [TraceRequest(start_s + i / rate, lengths[seed + i].input_tokens, max(2, lengths[seed + i].output_tokens))
            for i in range(n)]


@pytest.mark.timeout(600)
def test_load_step_scales_up_changes_batch_limits_and_scales_down_without_losing_requests(tmp_path):
    llmd = deployment.load(DEMO_FILE)
    llmd["spec"]["autoscaling"]["scaleDownStabilizationSeconds"] = 10
    asyncio.run(_closed_loop(llmd, tmp_path))


async def saturated_rate(llmd, log_dir) -> float:
    """Requests per second that one worker of the deployment completes when it is never idle (a burst of one
    and a half batches of the step's requests), measured on this machine now, with nothing else running."""
    token_file = log_dir / "probe-token"
    token_file.write_text("probe-token")
    replica = WorkerProcess("probe", log_dir)
    spec = llmd["spec"]
    await replica.start(deployment.worker_args(llmd, replica.port, replica.admin_port, *initial_batch_limits(spec),
                                               admin_token_file=str(token_file)), deployment.cpu_threads(spec))
    try:
        async with httpx.AsyncClient() as client:
            while not await replica.check_ready(client):
                assert not replica.exited, replica.log_tail()
                await asyncio.sleep(0.5)
        burst = [TraceRequest(0.0, r.input_tokens, r.output_tokens)
                 for r in step_workload(1.0, 1.5 * spec["engine"]["maxNumSeqs"], seed=1000)]
        result = await run_benchmark(BenchConfig(base_url=replica.url, workload=burst, model="smollm2"))
        assert result.summary.failed == 0, result.summary.errors
        return result.summary.completed / result.summary.duration_s
    finally:
        assert await replica.drain(30.0) == 0


async def _closed_loop(llmd, tmp_path):
    saturated = await saturated_rate(llmd, tmp_path)
    runtime = LocalRuntime(llmd, port=free_port(), log_dir=tmp_path)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(runtime.run(stop))
    try:
        await asyncio.wait_for(runtime.started.wait(), 240)
        assert runtime.profile is not None and runtime.profile.per_prefill_token_s > 0
        assert single_replica_rate(runtime) > 0  # what the demo sizes its load from
        # The admin port takes only the runtime's token (kept in a file only this user can read).
        assert runtime.admin_token_file.stat().st_mode & 0o777 == 0o600
        async with httpx.AsyncClient() as client:
            refused = await client.put(f"{runtime.replicas[0].admin_url}/admin/batch-limits",
                                       json={"max_num_seqs": 1, "max_num_batched_tokens": 32})
        assert refused.status_code == 401
        # The step: more than one replica can serve at all, for 50 s, then a trickle while the deployment scales
        # back down, so that requests are in flight through the drain. Sized from a measurement of a worker's
        # throughput, not from the runtime's calibrated model: that model's SLO capacity swings by 3x between
        # runs of a busy machine (a step sized from it once fitted on one replica), and the policy refits it
        # online anyway. The burst's tail runs below a full batch, so the measured rate is 70-90% of the true one:
        # 1.6x it overloads one replica by at least 10% and stays within what two replicas serve.
        step = step_workload(1.6 * saturated, 50.0)
        trickle = step_workload(0.25, 60.0, start_s=55.0, seed=len(step))
        config = BenchConfig(base_url=runtime.url, workload=step + trickle, model="smollm2")
        bench = asyncio.ensure_future(run_benchmark(config))
        result = await bench
        for _ in range(60):  # the trickle has ended; give the scale-down its stabilization window
            if runtime.desired == 1 and not runtime._drains:
                break
            await asyncio.sleep(1.0)
    finally:
        stop.set()
        await serving
    timeline = runtime.timeline
    assert result.summary.failed == 0, result.summary.errors
    assert result.summary.completed == len(step) + len(trickle)
    assert max(p.desired for p in timeline) == 2, ("the load step did not scale the deployment up: "
                                                   f"{saturated:.2f} req/s saturated; {[(round(p.time), p.action, p.details.get('demand'), p.details.get('capacity_per_replica')) for p in timeline]}")
    up = next(i for i, p in enumerate(timeline) if p.desired == 2)
    assert any(p.desired == 1 for p in timeline[up:]), ("the deployment did not scale back down: "
                                                        f"{[(p.action, p.details) for p in timeline[up:]]}")
    limit_changes = [d for d in runtime.decisions if d.action == "batch-limit"
                     or (d.max_num_seqs, d.max_num_batched_tokens) != (32, 512)]
    assert limit_changes, "the batch limits never changed"
    assert any("TPOT stays within 250 ms" in d.reason for d in runtime.decisions)
    # Every replica that was drained exited cleanly (its in-flight requests finished), and the router's
    # retries, if any, hid the race between routing and draining.
    drained = [code for _, code in runtime.retired]
    assert len(drained) >= 2 and all(code == 0 for code in drained), runtime.retired


def test_up_refuses_a_deployment_it_cannot_run(tmp_path):
    with open(DEMO_FILE) as f:
        llmd = yaml.safe_load(f)
    remote = copy.deepcopy(llmd)
    remote["spec"]["model"]["source"] = {"uri": "hf://org/model"}
    bad_field = copy.deepcopy(llmd)
    bad_field["spec"]["autoscaling"]["maxReplicas"] = 0
    for name, obj, message in (("remote", remote, "cannot download uri sources"),
                               ("bad", bad_field, "spec.autoscaling.maxReplicas")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(obj))
        run = subprocess.run([sys.executable, "-c", "import sys; from tideserve.cli import main; sys.exit(main())", "up",
                              str(path)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert run.returncode == 2 and message in run.stderr, run.stderr
