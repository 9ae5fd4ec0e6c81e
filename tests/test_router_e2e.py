"""The router end to end on this machine: `tideserve up`'s runtime with the demo model and real worker
processes, from zero replicas and back, and a scale-down under streams. Slow (real workers on CPU)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tideserve.local import deployment
from tideserve.ports import free_port
from tideserve.local.runtime import LocalRuntime

DEMO_FILE = "tideserve/data/demo-llmdeployment.yaml"


async def until(check, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(interval_s)


@pytest.mark.timeout(600)
def test_from_zero_a_held_request_starts_a_replica_completes_and_idle_returns_the_deployment_to_zero(tmp_path):
    llmd = deployment.load(DEMO_FILE)
    llmd["spec"]["replicas"] = 0
    llmd["spec"]["autoscaling"].update(minReplicas=0, scaleToZeroAfterSeconds=6, intervalSeconds=2)
    assert not deployment.problems(llmd)  # the CRD's schema and rules admit it
    asyncio.run(_from_zero_and_back(llmd, tmp_path))


async def _from_zero_and_back(llmd, tmp_path):
    runtime = LocalRuntime(llmd, port=free_port(), log_dir=tmp_path, calibrate=False)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(runtime.run(stop))
    client = openai.AsyncOpenAI(base_url=f"{runtime.url}/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        await asyncio.wait_for(runtime.started.wait(), 60)
        assert runtime.replicas == [] and runtime.desired == 0
        request = asyncio.ensure_future(client.completions.create(model="smollm2", prompt="Count: one, two,",
                                                                  max_tokens=8))
        await until(lambda: runtime.router.held == 1 or request.done(), 30, "the request was not held")
        assert not request.done() and all(r.ready_at is None for r in runtime.replicas)
        answer = await asyncio.wait_for(request, 300)
        assert answer.choices[0].text and answer.usage.completion_tokens >= 1
        (started,) = [d for d in runtime.decisions if d.reason.startswith("scale from zero")]
        assert started.replicas == 1
        await until(lambda: runtime.desired == 0 and not runtime.replicas, 120, "the idle deployment stayed up")
        assert any(d.reason.startswith("scale to zero") for d in runtime.decisions)
        assert [code for _, code in runtime.retired] == [0]  # the replica drained and exited cleanly
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{runtime.url}/metrics")).text
        assert "tideserve_router_hold_seconds_count 1.0" in metrics
        assert 'tideserve_router_rejected_total{reason="hold-timeout"} 0.0' in metrics
    finally:
        stop.set()
        await asyncio.wait_for(serving, 120)
        await client.close()


@pytest.mark.timeout(600)
def test_a_scale_down_during_eight_streams_through_the_router_cuts_none_and_new_requests_succeed(tmp_path):
    llmd = deployment.load(DEMO_FILE)
    llmd["spec"]["replicas"] = 2
    llmd["spec"]["autoscaling"]["mode"] = "off"  # the test is the one deciding
    llmd["spec"]["router"]["policy"] = "least-outstanding"  # four streams on each replica
    asyncio.run(_scale_down_under_streams(llmd, tmp_path))


async def _stream(http: httpx.AsyncClient, url: str, first_chunk: asyncio.Event) -> tuple[int, bool]:
    """One streamed completion; returns (completion tokens the final usage chunk counts, saw [DONE])."""
    body = {"model": "smollm2", "prompt": "Write a long story about the sea.", "max_tokens": 48,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens, done = 0, False
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first_chunk.set()
    return tokens, done


async def _scale_down_under_streams(llmd, tmp_path):
    runtime = LocalRuntime(llmd, port=free_port(), log_dir=tmp_path, calibrate=False)
    stop = asyncio.Event()
    serving = asyncio.ensure_future(runtime.run(stop))
    try:
        await asyncio.wait_for(runtime.started.wait(), 240)
        await until(lambda: len(runtime._routable()) == 2, 240, "the second replica never got ready")
        async with httpx.AsyncClient(timeout=300) as http:
            firsts = [asyncio.Event() for _ in range(8)]
            streams = [asyncio.ensure_future(_stream(http, runtime.url, e)) for e in firsts]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 240)  # all eight are streaming
            in_flight = {r.name: runtime.router.loads[r.name].in_flight for r in runtime.replicas}
            assert sorted(in_flight.values()) == [4, 4], in_flight
            await runtime.scale_to(1, [])
            drained = next(r for r in runtime.replicas if r.draining)
            # Requests that arrive while the drained replica finishes its streams go to the other one.
            during = await asyncio.gather(*(http.post(f"{runtime.url}/v1/completions", json={
                "model": "smollm2", "prompt": f"Say {i}.", "max_tokens": 4}) for i in range(4)))
            assert [r.status_code for r in during] == [200] * 4
            assert drained in runtime.replicas  # still draining when they were answered
            results = await asyncio.wait_for(asyncio.gather(*streams), 300)
        assert results == [(48, True)] * 8  # no stream was cut: every token and the final [DONE]
        await until(lambda: drained not in runtime.replicas, 120, "the drained replica never exited")
        assert (drained.name, 0) in runtime.retired and len(runtime.replicas) == 1
    finally:
        stop.set()
        await asyncio.wait_for(serving, 120)
