"""The router (tideserve.router): routing policies, EndpointSlice conversion, and the HTTP front against fake
workers served by uvicorn on free ports: holding with no worker, 429 and 503 from the hold queue, retries of a
draining worker's 503, streams passed through chunk by chunk."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
import uvicorn

from tideserve.ports import free_port
from tideserve.router.balancer import Balancer, Choice, PrefixIndex, WorkerLoad, block_hashes
from tideserve.router.discovery import endpoints_from_slices
from tideserve.router.server import Endpoint, HoldQueue, Router, routing_key


# --- policies --------------------------------------------------------------------------------------------

def test_block_hashes_chain_so_a_shared_prefix_shares_its_leading_hashes_and_nothing_after():
    system = list(range(64))
    a, b = block_hashes(system + [1] * 32), block_hashes(system + [2] * 32)
    assert len(a) == len(b) == 6 and a[:4] == b[:4] and a[4] != b[4]
    # A change in the first block changes every hash after it (chained), and a partial block is not hashed.
    assert block_hashes([9] + system[1:])[3] != block_hashes(system)[3]
    assert len(block_hashes(list(range(31)))) == 1
    text = "You are a helpful assistant. " * 10
    assert block_hashes(text + "Question one?")[:4] == block_hashes(text + "Another question")[:4]
    assert block_hashes("x" * 63) == [] and block_hashes(list(range(15))) == []
    assert block_hashes("a" * 64) != block_hashes([ord("a")] * 16)  # text and token chains never collide


def test_prefix_index_remembers_per_worker_and_evicts_the_least_recently_used_tail_first_beyond_its_capacity():
    index = PrefixIndex(default_capacity=4)
    first, second = block_hashes(list(range(64))), block_hashes(list(range(100, 164)))
    index.record("w1", first)
    assert index.matched("w1", first) == 4 and index.matched("w2", first) == 0
    index.record("w1", second)  # four more blocks: the first prompt's are evicted
    assert index.size("w1") == 4 and index.matched("w1", first) == 0 and index.matched("w1", second) == 4
    index.set_capacity("w1", 2)
    assert index.matched("w1", second) == 2 and index.size("w1") == 2  # the chain's tail went first, its head stays
    index.forget("w1")
    assert index.size("w1") == 0


def test_prefix_policy_sticks_a_hot_prefix_to_one_worker_until_its_load_bound_spills_it():
    balancer = Balancer("prefix", load_factor=1.25)
    workers = [WorkerLoad("a"), WorkerLoad("b"), WorkerLoad("c")]
    hot = block_hashes(list(range(256)))
    first = balancer.choose(workers, hot)
    assert first.reason == "least-loaded" and first.worker == "a"  # a miss goes to the least-loaded (ties: name)
    assert balancer.choose(workers, hot) == first  # nothing is remembered until the worker took the request
    balancer.sent(first, hot)
    load = {w.name: w for w in workers}
    reasons = []
    for _ in range(8):  # each request stays in flight
        choice = balancer.choose(workers, hot)
        balancer.sent(choice, hot)
        load[choice.worker].in_flight += 1
        reasons.append((choice.worker, choice.reason))
    # The hot prefix stays on a while its load is within 1.25x the mean, then spills, and the spill target
    # becomes a second home for the prefix (it now holds it too).
    assert reasons[0] == ("a", "prefix")
    assert ("a", "prefix") in reasons and any(r == "prefix-spill" for _, r in reasons)
    assert max(w.in_flight for w in workers) - min(w.in_flight for w in workers) <= 2
    # A cold prompt goes to the least-loaded worker; a worker with a nearly full KV cache is avoided.
    cold = balancer.choose(workers, block_hashes(list(range(1000, 1064))))
    assert cold.reason == "least-loaded" and load[cold.worker].in_flight == min(w.in_flight for w in workers)
    for w in workers:
        w.in_flight = 0
    load["a"].kv_usage = 0.99
    assert balancer.choose(workers, hot).worker != "a"


def test_reported_load_counts_other_routers_requests_and_round_robin_and_least_outstanding_stay_selectable():
    busy, idle = WorkerLoad("busy", in_flight=1), WorkerLoad("idle", in_flight=1)
    busy.reported(9.0)  # eight more than this router sent: another router's
    idle.reported(0.0)  # finished since: never below what is in flight now
    assert (busy.load, idle.load) == (9.0, 1.0)
    assert Balancer("least-outstanding").choose([busy, idle], []).worker == "idle"
    rr = Balancer("round-robin")
    assert [rr.choose([busy, idle], []).worker for _ in range(4)] == ["busy", "idle", "busy", "idle"]
    assert Balancer("prefix").choose([], []) is None
    with pytest.raises(ValueError, match="routing policy"):
        Balancer("random")
    with pytest.raises(ValueError, match="load_factor"):
        Balancer("prefix", load_factor=0.5)


def test_routing_key_reads_completions_and_chat_bodies_and_ignores_the_rest():
    tokens = list(range(40))
    hashes, length = routing_key("/v1/completions", json.dumps({"prompt": tokens, "max_tokens": 8}).encode())
    assert hashes == block_hashes(tokens) and length == 40
    chat = {"messages": [{"role": "system", "content": "s" * 200}, {"role": "user", "content": "hi"}]}
    hashes, _ = routing_key("/v1/chat/completions", json.dumps(chat).encode())
    other = {"messages": [{"role": "system", "content": "s" * 200}, {"role": "user", "content": "bye"}]}
    assert hashes[:3] == routing_key("/v1/chat/completions", json.dumps(other).encode())[0][:3]
    assert routing_key("/v1/completions", b"{not json") == ([], 0)
    assert routing_key("/v1/models", b"") == ([], 0)


def test_endpoint_slices_route_to_ready_pods_only_and_never_to_terminating_ones():
    slices = [
        {"ports": [{"name": "http", "port": 8000}], "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": "w-1"}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "serving": True, "terminating": True},
             "targetRef": {"name": "w-2"}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": False}, "targetRef": {"name": "w-3"}},
            {"addresses": ["10.0.0.4"], "targetRef": {"name": "w-4"}},  # unset conditions: ready
        ]},
        {"ports": [{"name": "http", "port": 8000}], "endpoints": [
            {"addresses": ["fd00::5"], "conditions": {"ready": True, "terminating": False}}]},
        {"ports": [{"name": "metrics", "port": 9000}], "endpoints": [{"addresses": ["10.0.0.9"]}]},
    ]
    endpoints = {e.name: e for e in endpoints_from_slices(slices)}
    assert set(endpoints) == {"w-1", "w-2", "w-3", "w-4", "fd00::5"}
    assert {n for n, e in endpoints.items() if e.routable} == {"w-1", "w-4", "fd00::5"}
    assert endpoints["w-1"].url == "http://10.0.0.1:8000" and endpoints["fd00::5"].url == "http://[fd00::5]:8000"


# --- the HTTP front --------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def serving(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    server.install_signal_handlers = lambda: None
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def read_request(scope, receive, send) -> bool:
    """A fake worker's ASGI prologue: answers the lifespan protocol (False), or reads a request's body (True)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return False
    while (await receive()).get("more_body"):
        pass
    return True


class FakeWorker:
    """Answers completions as `name`; `refuse` answers 503 like a draining worker; `gate`, when set, holds the
    stream after its first chunk until the test has read that chunk through the router."""

    def __init__(self, name: str, refuse: bool = False):
        self.name, self.refuse, self.calls = name, refuse, 0
        self.gate: asyncio.Event | None = None

    async def __call__(self, scope, receive, send):
        if not await read_request(scope, receive, send):
            return
        self.calls += 1
        if scope["path"] == "/metrics":
            body = b"vllm:num_requests_running 2\nvllm:kv_cache_usage_perc 0.5\ntideserve_kv_cache_capacity_tokens 64\n"
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": body})
            return
        if self.refuse:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": "draining"}'})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream"),
                                                                              (b"x-worker", self.name.encode())]})
        await send({"type": "http.response.body", "body": f"data: {self.name}-1\n\n".encode(), "more_body": True})
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), 10)
        await send({"type": "http.response.body", "body": f"data: {self.name}-2\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


BODY = {"model": "m", "prompt": list(range(64)), "max_tokens": 4, "stream": True}


def test_a_draining_workers_503_is_retried_on_another_worker_and_streams_pass_through_chunk_by_chunk():
    async def scenario():
        draining, ready = FakeWorker("a", refuse=True), FakeWorker("b")
        ready.gate = asyncio.Event()
        router = Router("round-robin", load_refresh_s=0)
        async with serving(draining) as a, serving(ready) as b, serving(router) as front:
            router.update([Endpoint("a", a), Endpoint("b", b)])  # round-robin tries a first
            async with httpx.AsyncClient(timeout=20) as client:
                async with client.stream("POST", f"{front}/v1/completions", json=BODY) as response:
                    assert response.status_code == 200 and response.headers["x-worker"] == "b"
                    chunks = response.aiter_text()
                    first = await chunks.__anext__()
                    assert "b-1" in first
                    ready.gate.set()  # the worker sends the rest only now: the router did not buffer
                    rest = "".join([c async for c in chunks])
                assert "b-2" in rest and "[DONE]" in rest
                metrics = (await client.get(f"{front}/metrics")).text
        assert draining.calls == 1 and router.retried == 1
        assert "tideserve_router_retries_total 1.0" in metrics
        assert 'tideserve_router_decisions_total{reason="round-robin"} 1.0' in metrics  # once per request, retries apart

    asyncio.run(scenario())


def test_with_no_worker_requests_are_held_then_served_when_one_appears_and_the_queue_is_bounded():
    async def scenario():
        worker = FakeWorker("w")
        router = Router("prefix", HoldQueue(max_requests=1, timeout_s=30), model_names=["m"], load_refresh_s=0)
        async with serving(worker) as w, serving(router) as front:
            async with httpx.AsyncClient(timeout=40) as client:
                assert (await client.get(f"{front}/ready")).json()["routable_workers"] == 0
                models = (await client.get(f"{front}/v1/models")).json()  # answered by the router itself
                assert [m["id"] for m in models["data"]] == ["m"]
                held = asyncio.ensure_future(client.post(f"{front}/v1/completions", json=BODY))
                while router.held < 1:
                    await asyncio.sleep(0.01)
                refused = await client.post(f"{front}/v1/completions", json=BODY)  # the queue holds one
                assert refused.status_code == 429 and "retry-after" in refused.headers
                metrics = (await client.get(f"{front}/metrics")).text
                assert "tideserve_router_queue_requests 1.0" in metrics
                router.update([Endpoint("w", w)])
                answered = await held
                assert answered.status_code == 200 and "[DONE]" in answered.text and router.held == 0
                metrics = (await client.get(f"{front}/metrics")).text
        assert "tideserve_router_queue_requests 0.0" in metrics
        assert 'tideserve_router_rejected_total{reason="queue-full"} 1.0' in metrics
        assert "tideserve_router_hold_seconds_count 1.0" in metrics  # the held one (the refused one never waited)

    asyncio.run(scenario())


def test_a_held_request_gets_503_with_retry_after_when_no_worker_appears_in_time():
    async def scenario():
        router = Router("prefix", HoldQueue(max_requests=8, timeout_s=0.3), load_refresh_s=0)
        async with serving(router) as front:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.post(f"{front}/v1/completions", json=BODY)
                metrics = (await client.get(f"{front}/metrics")).text
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert "no worker became ready" in response.json()["error"]["message"]
        assert 'tideserve_router_rejected_total{reason="hold-timeout"} 1.0' in metrics

    asyncio.run(scenario())


def test_worker_metrics_feed_the_load_and_bound_the_prefix_index_by_the_workers_kv_capacity():
    async def scenario():
        worker = FakeWorker("w")
        router = Router("prefix", load_refresh_s=0)
        async with serving(worker) as w:
            router.update([Endpoint("w", w), Endpoint("gone", "http://127.0.0.1:1", routable=False)])
            await router.refresh_loads()
            await router.aclose()
        load = router.loads["w"]
        assert load.load == 2.0 and load.kv_usage == 0.5
        router.balancer.index.record("w", block_hashes(list(range(16 * 10))))
        assert router.balancer.index.size("w") == 4  # 64 tokens of KV / 16-token blocks
        router.update([])
        assert router.loads == {} and router.balancer.index.size("w") == 0

    asyncio.run(scenario())


def test_only_a_substantial_hit_takes_a_request_to_a_busier_worker_and_queued_prefill_breaks_ties():
    prompt = list(range(160))  # ten blocks

    def route(held_blocks: int, busy: int, queued: tuple[int, int] = (0, 0)) -> Choice:
        balancer = Balancer("prefix")
        balancer.index.record("a", block_hashes(prompt[:16 * held_blocks]))
        a = WorkerLoad("a", in_flight=busy, prefill_tokens=queued[0])
        b = WorkerLoad("b", in_flight=0, prefill_tokens=queued[1])
        return balancer.choose([a, b], block_hashes(prompt), len(prompt))

    assert route(6, busy=1) == Choice("a", "prefix", 6)  # 6 of 10 blocks: worth one more request in flight
    assert route(3, busy=1) == Choice("b", "prefix-spill", 0)  # under half the prompt: load decides
    assert route(10, busy=2) == Choice("b", "prefix-spill", 0)  # beyond the slack: even a full hit spills
    assert route(3, busy=0) == Choice("a", "prefix", 3)  # equally loaded: any hit decides
    assert route(0, busy=0, queued=(300, 0)).worker == "b"  # no hit, equal load: the shorter prefill queue


def test_tideserve_router_runs_from_the_command_line_and_refuses_bad_settings(tmp_path):
    import signal
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "tideserve", "router", "--workers", "http://127.0.0.1:1",
                          "--hold-max-requests", "-1"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "maxRequests" in bad.stderr

    async def scenario():
        worker = FakeWorker("w")
        async with serving(worker) as url:
            port = free_port()
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tideserve", "router", "--workers", url, "--host", "127.0.0.1",
                "--port", str(port), "--policy", "least-outstanding", cwd=tmp_path,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            try:
                async with httpx.AsyncClient(timeout=20) as client:
                    for _ in range(300):
                        with contextlib.suppress(httpx.HTTPError):
                            if (await client.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
                                break
                        assert process.returncode is None, (await process.stderr.read()).decode()
                        await asyncio.sleep(0.1)
                    answer = await client.post(f"http://127.0.0.1:{port}/v1/completions", json=BODY)
                    assert answer.status_code == 200 and "w-2" in answer.text
                    metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                    assert 'tideserve_router_decisions_total{reason="least-outstanding"} 1.0' in metrics
            finally:
                process.terminate()
                # uvicorn shuts down gracefully, then re-raises the signal it caught: exit by SIGTERM, not a crash.
                assert await asyncio.wait_for(process.wait(), 30) in (0, -signal.SIGTERM)

    asyncio.run(scenario())


def test_a_held_request_whose_client_leaves_frees_its_slot_and_never_reaches_a_worker():
    async def scenario():
        worker = FakeWorker("w")
        router = Router("prefix", HoldQueue(max_requests=1, timeout_s=60), load_refresh_s=0)
        async with serving(worker) as w, serving(router) as front:
            async with httpx.AsyncClient(timeout=0.5) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await impatient.post(f"{front}/v1/completions", json=BODY)
            for _ in range(200):
                if router.held == 0:
                    break
                await asyncio.sleep(0.01)
            assert router.held == 0  # the slot is free again: the next request is held, not refused
            async with httpx.AsyncClient(timeout=20) as client:
                held = asyncio.ensure_future(client.post(f"{front}/v1/completions", json=BODY))
                while router.held < 1:
                    await asyncio.sleep(0.01)
                router.update([Endpoint("w", w)])
                assert (await held).status_code == 200
        assert worker.calls == 1  # only the second request reached the worker

    asyncio.run(scenario())


def test_the_mooncake_workload_turns_equal_hash_ids_into_equal_token_blocks_and_keeps_what_fits(tmp_path):
    from tideserve.bench.routing import mooncake_prefix_workload

    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 1000, "input_length": 1024, "output_length": 64, "hash_ids": [1, 2]},
            {"timestamp": 1500, "input_length": 40000, "output_length": 10, "hash_ids": list(range(100, 179))},
            {"timestamp": 3000, "input_length": 1300, "output_length": 320, "hash_ids": [1, 2, 3]}]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    workload, shared = mooncake_prefix_workload(trace, count=10)
    assert len(workload) == 2  # the 79-block prompt does not fit 512 tokens once scaled
    first, third = workload
    assert (first.arrival_s, third.arrival_s) == (0.0, 2.0)
    assert first.prompt_token_ids == third.prompt_token_ids[:32] and len(third.prompt_token_ids) == 32 + 9
    assert (first.output_tokens, third.output_tokens) == (2, 10)
    assert shared == pytest.approx(2 / 4)  # blocks 1, 2 again out of 1, 2, then 1, 2 (the partial 3 is not cached)
    with pytest.raises(ValueError, match="fits"):
        mooncake_prefix_workload(trace, max_context=8)


def test_discovery_sends_the_token_the_kubernetes_client_holds_at_each_request():
    import kubernetes

    from tideserve.router.discovery import ConfigurationAuth

    configuration = kubernetes.client.Configuration()
    configuration.api_key = {"authorization": "Bearer first"}
    auth = ConfigurationAuth(configuration)
    request = httpx.Request("GET", "https://api/apis")
    assert next(auth.auth_flow(request)).headers["Authorization"] == "Bearer first"
    configuration.api_key = {"authorization": "Bearer rotated"}  # what the in-cluster refresh hook does
    assert next(auth.auth_flow(httpx.Request("GET", "https://api/apis"))).headers["Authorization"] == "Bearer rotated"


def test_a_client_that_leaves_before_the_worker_answers_cancels_the_request_in_the_worker():
    class SlowWorker:
        """Answers nothing until its client (the router) goes away; records that it went."""

        def __init__(self):
            self.disconnected = asyncio.Event()

        async def __call__(self, scope, receive, send):
            if not await read_request(scope, receive, send):
                return
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()

    async def scenario():
        worker = SlowWorker()
        router = Router("least-outstanding", load_refresh_s=0)
        async with serving(worker) as w, serving(router) as front:
            router.update([Endpoint("w", w)])
            async with httpx.AsyncClient(timeout=0.5) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await impatient.post(f"{front}/v1/completions", json={**BODY, "stream": False})
            await asyncio.wait_for(worker.disconnected.wait(), 10)  # the router closed its upstream request
            for _ in range(200):
                if router.loads["w"].in_flight == 0:
                    break
                await asyncio.sleep(0.01)
            assert router.loads["w"].in_flight == 0 and router.loads["w"].prefill_tokens == 0

    asyncio.run(scenario())
