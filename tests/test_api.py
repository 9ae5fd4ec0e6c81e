"""The HTTP API against a real in-process worker: the openai SDK as client, every bad input, limits."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from conftest import run_worker


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion(client):
    r = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens > 0
    assert r.choices[0].text


def test_completion_streaming_matches_non_streaming(client):
    kwargs = dict(model="tiny", prompt="once upon a time", max_tokens=9, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_batch_of_prompts(client):
    r = client.completions.create(model="tiny", prompt=["alpha", "beta gamma"], max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 6


def test_chat(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens == 5


def test_chat_streaming(client):
    kwargs = dict(model="tiny", messages=[{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hello"}],
                  max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 6


async def _async_chat_stream(url: str) -> str:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def test_async_client_streams(worker):
    assert isinstance(asyncio.run(_async_chat_stream(worker.url)), str)


BAD_REQUESTS = [
    ({"prompt": "x", "max_tokens": 4}, "model"),  # missing model
    ({"model": "nope", "prompt": "x"}, "not served here"),
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "n": 2}, "n > 1"),
    ({"model": "tiny", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "tiny", "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": [1, 99999999]}, "token ids"),
    ({"model": "tiny", "prompt": "word " * 400}, "maximum context length"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 1000}, "maximum context length"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("body,expected", BAD_REQUESTS)
def test_bad_completion_requests_get_400(worker, body, expected):
    r = httpx.post(f"{worker.url}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert expected in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body,expected",
    [
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
         "tools"),
    ],
)
def test_bad_chat_requests_get_400(worker, body, expected):
    r = httpx.post(f"{worker.url}/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert expected in r.json()["error"]["message"]


def test_malformed_json_and_non_object_bodies_get_400(worker):
    r = httpx.post(f"{worker.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{worker.url}/v1/completions", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_oversized_body_gets_413(tiny_model_dir):
    with run_worker(tiny_model_dir, max_body_bytes=1000) as w:
        big = {"model": "tiny", "prompt": "x" * 5000}
        r = httpx.post(f"{w.url}/v1/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

        def chunked():  # no Content-Length: the limit applies while reading
            yield json.dumps(big).encode()

        r = httpx.post(f"{w.url}/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert httpx.get(f"{w.url}/health").status_code == 200


def test_server_stays_healthy_after_bad_inputs(worker, client):
    for body, _ in BAD_REQUESTS:
        httpx.post(f"{worker.url}/v1/completions", json=body)
    assert httpx.get(f"{worker.url}/health").status_code == 200
    assert httpx.get(f"{worker.url}/ready").status_code == 200
    assert client.completions.create(model="tiny", prompt="still fine", max_tokens=2).usage.completion_tokens >= 1
    assert worker.engine.block_manager.num_free_blocks == worker.engine.block_manager.num_blocks


def test_api_key_auth(tiny_model_dir):
    with run_worker(tiny_model_dir, api_keys={"secret-1"}) as w:
        good = openai.OpenAI(base_url=f"{w.url}/v1", api_key="secret-1", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
        bad = openai.OpenAI(base_url=f"{w.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert httpx.get(f"{w.url}/health").status_code == 200  # probes need no key
        assert httpx.get(f"{w.url}/metrics").status_code == 200


def test_admin_api_is_on_its_own_port_and_token_protected(tiny_model_dir):
    with run_worker(tiny_model_dir, admin_token="adm") as w:
        assert httpx.get(f"{w.url}/admin/batch-limits").status_code == 404  # not on the public port
        assert httpx.get(f"{w.admin_url}/admin/batch-limits").status_code == 401
        auth = {"Authorization": "Bearer adm"}
        r = httpx.put(f"{w.admin_url}/admin/batch-limits", json={"max_num_seqs": 3}, headers=auth)
        assert r.status_code == 200 and r.json()["max_num_seqs"] == 3
        r = httpx.put(f"{w.admin_url}/admin/batch-limits", json={"max_num_seqs": 5000}, headers=auth)
        assert r.status_code == 400 and "max_num_batched_tokens" in r.json()["error"]["message"]
        r = httpx.put(f"{w.admin_url}/admin/batch-limits", json={"max_num_seqs": "many"}, headers=auth)
        assert r.status_code == 400 and "max_num_seqs" in r.json()["error"]["message"]
        r = httpx.put(f"{w.admin_url}/admin/batch-limits", json={"max_batch": 3}, headers=auth)
        assert r.status_code == 400
        assert httpx.get(f"{w.admin_url}/admin/batch-limits", headers=auth).json()["max_num_seqs"] == 3


def _stream_completion(url: str, max_tokens: int, results: list, prompt: str = "go") -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            if r.status_code != 200:
                r.read()
                results.append((r.status_code, r.headers.get("retry-after"), None))
                return
            usage = None
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage") or usage
            results.append((200, None, usage))
    except httpx.HTTPError as exc:
        results.append((None, None, repr(exc)))


def _run_concurrently(n: int, fn) -> list:
    results: list = []
    threads = [threading.Thread(target=fn, args=(results,)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_queue_overflow_gets_429_and_accepted_requests_complete(tiny_model_dir):
    with run_worker(tiny_model_dir, max_num_seqs=1, max_num_batched_tokens=64, max_waiting_requests=2) as w:
        results = _run_concurrently(10, lambda res: _stream_completion(w.url, 40, res))
        statuses = sorted(r[0] for r in results)
        assert 429 in statuses and 200 in statuses, statuses
        assert all(r[1] == "1" for r in results if r[0] == 429)  # Retry-After
        for status, _, usage in results:
            if status == 200:
                assert usage["completion_tokens"] == 40  # every accepted request completed
        assert set(statuses) <= {200, 429}
        assert w.metric('vllm:request_success_total{finished_reason="length",model_name="tiny"}'.split("{")[0])


def test_live_max_num_seqs_change_shows_in_running_gauge(tiny_model_dir):
    with run_worker(tiny_model_dir, max_num_seqs=1, max_num_batched_tokens=64) as w:
        results: list = []
        threads = [threading.Thread(target=_stream_completion, args=(w.url, 200, results)) for _ in range(4)]
        for t in threads:
            t.start()
        _wait_for(lambda: w.metric("vllm:num_requests_waiting") == 3 and w.metric("vllm:num_requests_running") == 1)
        assert httpx.put(f"{w.admin_url}/admin/batch-limits", json={"max_num_seqs": 4}).status_code == 200
        _wait_for(lambda: w.metric("vllm:num_requests_running") == 4, timeout=2.0)
        assert w.metric("tideserve_max_num_seqs") == 4
        # Lowering below the current batch pauses sequences; none is dropped.
        assert httpx.put(f"{w.admin_url}/admin/batch-limits", json={"max_num_seqs": 2}).status_code == 200
        _wait_for(lambda: w.metric("vllm:num_requests_running") == 2, timeout=2.0)
        for t in threads:
            t.join(timeout=120)
        assert [r[0] for r in results] == [200] * 4
        assert all(r[2]["completion_tokens"] == 200 for r in results)


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def test_client_disconnect_cancels_request(tiny_model_dir):
    with run_worker(tiny_model_dir, max_num_seqs=4, max_model_len=2048) as w:
        body = {"model": "tiny", "prompt": "go", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{w.url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            next(lines)
        _wait_for(lambda: w.metric("vllm:num_requests_running") == 0, timeout=10)
        assert w.engine.block_manager.num_free_blocks == w.engine.block_manager.num_blocks
        # Non-streaming too: the client times out and goes away.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{w.url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
        _wait_for(lambda: w.metric("vllm:num_requests_running") == 0, timeout=10)
        aborted = httpx.get(f"{w.url}/metrics").text
        assert 'vllm:request_success_total{finished_reason="abort",model_name="tiny"} 2.0' in aborted


def test_metrics_use_vllm_names(worker, client):
    client.completions.create(model="tiny", prompt="metrics please", max_tokens=5, extra_body={"ignore_eos": True})
    text = httpx.get(f"{worker.url}/metrics").text
    for name in [
        "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
        "vllm:request_success_total", "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
        "tideserve_max_num_seqs", "tideserve_max_num_batched_tokens", "tideserve_step_tokens_bucket",
        "tideserve_step_seconds_bucket", "tideserve_kv_cache_capacity_tokens",
    ]:
        assert name in text, name
    # The KV capacity the autoscaler plans with is what the block manager holds.
    manager = worker.engine.block_manager
    assert f'tideserve_kv_cache_capacity_tokens{{model_name="tiny"}} {float(manager.num_blocks * manager.block_size)}' in text
    edges = [float(line.split('le="')[1].split('"')[0]) for line in text.splitlines()
             if line.startswith("vllm:time_to_first_token_seconds_bucket") and 'le="+Inf"' not in line]
    inside = [e for e in edges if 0.01 <= e <= 60]
    assert max(b / a for a, b in zip(inside, inside[1:])) < 1.15  # fine enough for p90/p99
    assert min(edges) <= 0.01 and max(edges) >= 60
