"""Tests for tideserve.traces and `tideserve bench`, against a fake OpenAI-compatible server started in-process."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tideserve import traces
from tideserve.bench import loadgen
from tideserve.traces import TraceRequest

# ---------------------------------------------------------------------------------------------------------------------
# Traces


@pytest.mark.parametrize("name, rows", [("azure-conv", 19366), ("azure-code", 8819)])
def test_shipped_azure_traces_load_by_name(name, rows):
    trace = traces.load_trace(name)
    assert len(trace) == rows
    assert trace[0].arrival_s == 0.0
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals)
    assert 3400 < arrivals[-1] < 3600  # each trace spans about an hour
    assert min(min(r.input_tokens, r.output_tokens) for r in trace) >= 1


def test_azure_timestamps_become_seconds_since_the_first_row():
    conv = traces.load_trace("azure-conv")
    # The first rows are 18:15:46.6805900 (374, 44) and 18:15:50.9951690 (396, 109).
    assert conv[:2] == [TraceRequest(0.0, 374, 44), TraceRequest(4.314579, 396, 109)]


def test_azure_timestamps_across_midnight(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.9000000,10,2\n"
        "2023-11-17 00:00:00.1500000,20,3\n"
        "2023-11-17 00:00:02,30,4\n"
    )
    assert traces.load_trace(path) == [TraceRequest(0.0, 10, 2), TraceRequest(0.25, 20, 3), TraceRequest(2.1, 30, 4)]


def test_canonical_csv_round_trip_and_sorting(tmp_path):
    requests = [TraceRequest(0.0, 5, 7), TraceRequest(0.1 + 0.2, 1, 1), TraceRequest(12.5, 4096, 300)]
    path = tmp_path / "trace.csv"
    traces.write_csv(path, requests)
    assert path.read_text().splitlines()[0] == "arrival_s,input_tokens,output_tokens"
    assert traces.load_trace(path) == requests  # floats round-trip exactly
    traces.write_csv(path, requests[::-1])
    assert traces.load_trace(path) == requests


@pytest.mark.parametrize(
    "text, message",
    [
        ("time,input,output\n1,2,3\n", "unrecognised trace header"),
        ("arrival_s,input_tokens\n0,5\n", "unrecognised trace header"),
        ("arrival_s,input_tokens,output_tokens\n", "no requests"),
        ("arrival_s,input_tokens,output_tokens\n0,5,5\n1,0,5\n", "line 3: token counts must be at least 1"),
        ("arrival_s,input_tokens,output_tokens\n0,5,-2\n", "line 2: token counts must be at least 1"),
        ("arrival_s,input_tokens,output_tokens\n0,5,5\n0.5,five,5\n", "line 3: cannot parse"),
        ("arrival_s,input_tokens,output_tokens\n0,5\n", "line 2: cannot parse"),
        ("arrival_s,input_tokens,output_tokens\n-1,5,5\n", "line 2: cannot parse"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,5,5\nyesterday,5,5\n", "line 3: cannot parse"),
    ],
)
def test_bad_trace_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        traces.load_trace(path)


def test_scale_time():
    requests = [TraceRequest(0.0, 1, 1), TraceRequest(3.0, 2, 2)]
    assert [r.arrival_s for r in traces.scale_time(requests, 2)] == [0.0, 1.5]
    assert [r.arrival_s for r in traces.scale_time(requests, 0.5)] == [0.0, 6.0]
    assert traces.scale_time(requests, 2)[1].input_tokens == 2
    with pytest.raises(ValueError, match="time scale"):
        traces.scale_time(requests, 0)


def test_scale_tokens_scales_then_clamps():
    requests = [TraceRequest(1.0, 1000, 100), TraceRequest(2.0, 10, 1000), TraceRequest(3.0, 3, 3)]
    assert [(r.input_tokens, r.output_tokens) for r in traces.scale_tokens(requests, 0.5, 2)] == [
        (500, 200), (5, 2000), (2, 6)
    ]
    # Tiny scales still leave one token each.
    assert [(r.input_tokens, r.output_tokens) for r in traces.scale_tokens(requests, 0.001, 0.001)] == [(1, 1)] * 3
    clamped = traces.scale_tokens(requests, max_input=256, max_output=64)
    assert [(r.input_tokens, r.output_tokens) for r in clamped] == [(256, 64), (10, 64), (3, 3)]
    # max_total shortens the prompt first, down to one token, and only then the completion.
    fitted = traces.scale_tokens(requests, max_total=512)
    assert [(r.input_tokens, r.output_tokens) for r in fitted] == [(412, 100), (1, 511), (3, 3)]
    assert [r.arrival_s for r in fitted] == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        traces.scale_tokens(requests, max_total=1)


def test_sample_lengths_draws_whole_pairs_reproducibly():
    trace = [TraceRequest(float(i), 10 + i, 100 + i) for i in range(50)]
    sample = traces.sample_lengths(trace, 200, seed=3)
    assert len(sample) == 200
    assert all(output == input_ + 90 for input_, output in sample)  # pairs are never mixed
    assert len(set(sample)) > 30
    assert traces.sample_lengths(trace, 200, seed=3) == sample
    assert traces.sample_lengths(trace, 200, seed=4) != sample


def test_poisson_arrivals():
    arrivals = traces.poisson_arrivals(20000, rate=10.0, seed=1)
    assert arrivals[0] == 0.0
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps) >= 0
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.03)
    # Gamma gaps with shape k have a coefficient of variation of 1/sqrt(k).
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.05)
    bursty = traces.poisson_arrivals(20000, rate=10.0, seed=1, burstiness=0.25)
    bursty_gaps = [b - a for a, b in zip(bursty, bursty[1:])]
    assert statistics.mean(bursty_gaps) == pytest.approx(0.1, rel=0.05)
    assert statistics.stdev(bursty_gaps) / statistics.mean(bursty_gaps) == pytest.approx(2.0, rel=0.1)
    assert traces.poisson_arrivals(50, 3.0, seed=7) == traces.poisson_arrivals(50, 3.0, seed=7)
    assert traces.poisson_arrivals(4, float("inf")) == [0.0] * 4
    with pytest.raises(ValueError):
        traces.poisson_arrivals(4, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# A fake OpenAI-compatible server


@dataclass
class FakeBehaviour:
    """What the fake server does; tests change it and the `fake` fixture resets it."""

    token_delay_s: float = 0.002  # between streamed tokens
    prefill_s_per_token: float = 0.0  # before the first token, per prompt word
    fail_statuses: list[int] = field(default_factory=list)  # the next requests answer with these statuses
    send_usage: bool = True
    bodies: list[dict] = field(default_factory=list)  # every completion request received


def make_fake_app(behaviour: FakeBehaviour) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def complete(request: Request, chat: bool):
        body = await request.json()
        behaviour.bodies.append(body)
        if behaviour.fail_statuses:
            status = behaviour.fail_statuses.pop(0)
            return JSONResponse({"error": {"message": f"injected {status}"}}, status_code=status)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        prompt_tokens = len(prompt.split())  # the prompts are words meant to be one token each
        max_tokens = body["max_tokens"]

        def chunk(text=None, usage=None):
            if chat:
                choices = [] if text is None else [{"index": 0, "delta": {"content": text}}]
            else:
                choices = [] if text is None else [{"index": 0, "text": text}]
            return f"data: {json.dumps({'choices': choices, 'usage': usage})}\n\n"

        async def stream():
            if chat:  # a role-only first chunk, which must not count as the first token
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
            await asyncio.sleep(behaviour.prefill_s_per_token * prompt_tokens)
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(behaviour.token_delay_s)
                yield chunk(text=" tok")
            if behaviour.send_usage:
                yield chunk(usage={"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server():
    behaviour = FakeBehaviour()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from the start so nothing can take it
    server = uvicorn.Server(
        uvicorn.Config(make_fake_app(behaviour), log_level="warning", access_log=False, lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", behaviour
    server.should_exit = True
    thread.join(5)
    sock.close()


@pytest.fixture
def fake(fake_server):
    url, behaviour = fake_server
    behaviour.__init__()  # a fresh behaviour for every test; the app keeps its reference
    return url, behaviour


def bench(config: loadgen.BenchConfig) -> loadgen.BenchResult:
    return asyncio.run(loadgen.run_benchmark(config))


def poisson_workload(n, rate, input_tokens, output_tokens, seed=0):
    return [TraceRequest(t, input_tokens, output_tokens) for t in traces.poisson_arrivals(n, rate, seed)]


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    return loadgen.run(parser.parse_args([*argv, "--no-progress"]))


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


def test_poisson_run_measures_consistent_latencies(fake):
    url, behaviour = fake
    result = bench(loadgen.BenchConfig(base_url=url + "/v1", workload=poisson_workload(30, 40.0, 20, 16)))
    s = result.summary
    assert result.model == "fake-model"  # discovered from /v1/models
    assert (s.completed, s.failed) == (30, 0)
    for stats in (s.ttft, s.tpot, s.itl, s.e2e):
        assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert s.ttft.p50_ms < s.e2e.p50_ms
    # 15 gaps of at least 2 ms after the first token.
    assert s.tpot.p50_ms >= 2.0
    assert s.e2e.p50_ms >= 30.0
    for record in result.records:
        assert record.success and record.status == 200
        assert 0 < record.ttft_s < record.e2e_s
        assert (record.prompt_tokens, record.output_tokens) == (20, 16)  # the synthetic prompt is 20 words
        assert len(record.itl_s) == 15
        assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 15)
        assert record.sent_s >= record.scheduled_s
    assert s.duration_s >= max(r.sent_s + r.e2e_s for r in result.records)
    assert s.request_throughput == pytest.approx(30 / s.duration_s)
    assert s.output_throughput == pytest.approx(30 * 16 / s.duration_s)
    assert s.input_throughput == pytest.approx(30 * 20 / s.duration_s)
    assert s.goodput is None
    body = behaviour.bodies[0]
    assert body["model"] == "fake-model" and body["max_tokens"] == 16
    assert body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert len({b["prompt"] for b in behaviour.bodies}) == 30  # prompts differ, so no prefix-cache hits


def test_chat_endpoint_without_usage_counts_chunks(fake):
    url, behaviour = fake
    behaviour.send_usage = False
    config = loadgen.BenchConfig(
        base_url=url, endpoint="/v1/chat/completions", model="chosen", workload=poisson_workload(4, 100.0, 8, 5)
    )
    result = bench(config)
    assert result.summary.completed == 4
    assert behaviour.bodies[0]["messages"][0]["role"] == "user"
    assert behaviour.bodies[0]["model"] == "chosen"
    for record in result.records:
        assert (record.prompt_tokens, record.output_tokens) == (None, 5)
        assert len(record.itl_s) == 4  # the role-only chunk is not a token
    assert result.summary.input_throughput == pytest.approx(4 * 8 / result.summary.duration_s)


def finished(index, ttft_s, tpot_s, output_tokens):
    """A successful request record with the given timings."""
    e2e_s = ttft_s + tpot_s * (output_tokens - 1)
    return loadgen.RequestRecord(
        index, 0.0, 10, output_tokens, sent_s=0.0, output_tokens=output_tokens, success=True, status=200,
        ttft_s=ttft_s, e2e_s=e2e_s,
    )


def test_goodput_counts_only_requests_within_slo():
    records = [
        finished(0, ttft_s=0.05, tpot_s=0.010, output_tokens=10),  # meets both
        finished(1, ttft_s=0.20, tpot_s=0.010, output_tokens=10),  # misses TTFT
        finished(2, ttft_s=0.05, tpot_s=0.030, output_tokens=10),  # misses TPOT
        finished(3, ttft_s=0.05, tpot_s=0.0, output_tokens=1),  # one token: no TPOT to miss
        loadgen.RequestRecord(4, 0.0, 10, 10, status=500, error="HTTP 500: boom"),
    ]
    both = loadgen.summarize(records, 2.0, slo_ttft_ms=100, slo_tpot_ms=20)
    assert (both.completed, both.failed) == (4, 1)
    assert both.goodput == pytest.approx(2 / 2.0)
    assert both.goodput_output_throughput == pytest.approx((10 + 1) / 2.0)
    ttft_only = loadgen.summarize(records, 2.0, slo_ttft_ms=100)
    assert ttft_only.goodput == pytest.approx(3 / 2.0)
    assert loadgen.summarize(records, 2.0).goodput is None
    assert both.tpot.p50_ms == pytest.approx(10.0)  # of the three requests with a TPOT
    assert both.errors == {"HTTP 500: boom": 1}


def test_goodput_of_a_live_run(fake):
    url, behaviour = fake
    behaviour.prefill_s_per_token = 0.001  # 400-word prompts wait 400 ms for their first token, 10-word ones 10 ms
    workload = [TraceRequest(0.02 * i, 400 if i % 2 else 10, 6) for i in range(10)]
    result = bench(loadgen.BenchConfig(base_url=url, workload=workload, slo_ttft_ms=200.0, slo_tpot_ms=1000.0))
    s = result.summary
    assert s.completed == 10
    met = [r for r in result.records if r.ttft_s < 0.2]
    assert all(r.input_tokens == 10 for r in met)  # every long prompt misses; a busy machine may slow short ones too
    assert s.goodput * s.duration_s == pytest.approx(len(met))
    assert s.goodput_output_throughput * s.duration_s == pytest.approx(6 * len(met))


def test_failed_requests_are_counted_with_their_errors(fake):
    url, behaviour = fake
    behaviour.fail_statuses = [500, 429, 500]
    result = bench(loadgen.BenchConfig(base_url=url, workload=poisson_workload(10, 50.0, 5, 4)))
    s = result.summary
    assert (s.completed, s.failed) == (7, 3)
    assert sorted(r.status for r in result.records if not r.success) == [429, 500, 500]
    assert s.errors == {
        'HTTP 500: {"error":{"message":"injected 500"}}': 2,
        'HTTP 429: {"error":{"message":"injected 429"}}': 1,
    }
    assert s.request_throughput == pytest.approx(7 / s.duration_s)
    assert s.output_throughput == pytest.approx(7 * 4 / s.duration_s)


def test_slow_requests_time_out(fake):
    url, behaviour = fake
    behaviour.prefill_s_per_token = 0.001
    workload = [TraceRequest(0.0, 5, 3), TraceRequest(0.0, 1000, 3)]  # the second waits 1 s for its first token
    result = bench(loadgen.BenchConfig(base_url=url, workload=workload, timeout_s=0.3))
    assert [r.success for r in result.records] == [True, False]
    assert result.records[1].error == "timed out after 0.3 s"


def test_max_concurrency_queues_requests(fake):
    url, _ = fake
    workload = [TraceRequest(0.0, 5, 10) for _ in range(6)]  # all arriving at once
    result = bench(loadgen.BenchConfig(base_url=url, workload=workload, max_concurrency=2))
    assert result.summary.completed == 6
    # Walk the send and finish times: never more than two requests in flight, and two at the peak.
    events = sorted((t, delta) for r in result.records for t, delta in ((r.sent_s, 1), (r.sent_s + r.e2e_s, -1)))
    in_flight = [0]
    for _, delta in events:
        in_flight.append(in_flight[-1] + delta)
    assert max(in_flight) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_json(fake, tmp_path, capsys):
    url, _ = fake
    out = tmp_path / "result.json"
    rc = run_cli(
        "--base-url", url, "--num-requests", "8", "--request-rate", "50", "--input-len", "8", "--output-len", "4",
        "--slo-ttft-ms", "1000", "--api-key", "secret", "--json", str(out),
    )
    assert rc == 0
    assert "Successful requests:" in capsys.readouterr().out
    document = json.loads(out.read_text())
    assert document["model"] == "fake-model"
    assert document["summary"]["completed"] == 8
    assert document["summary"]["goodput"] == pytest.approx(8 / document["summary"]["duration_s"])
    assert set(document["summary"]["ttft"]) == {"mean_ms", "p50_ms", "p90_ms", "p99_ms"}
    assert len(document["requests"]) == 8
    first = document["requests"][0]
    assert first["success"] and first["output_tokens"] == 4 and len(first["itl_s"]) == 3
    assert first["tpot_s"] > 0
    assert document["args"]["request_rate"] == 50.0
    assert "api_key" not in document["args"]  # never write secrets to result files


def test_cli_replays_a_trace_at_its_arrival_times(fake, tmp_path):
    url, _ = fake
    trace = tmp_path / "trace.csv"
    traces.write_csv(trace, [TraceRequest(0.0, 4, 2), TraceRequest(0.2, 6, 3), TraceRequest(0.4, 8, 4)])
    out = tmp_path / "replay.json"
    assert run_cli("--base-url", url, "--trace", str(trace), "--time-scale", "2", "--json", str(out)) == 0
    records = json.loads(out.read_text())["requests"]
    assert [r["scheduled_s"] for r in records] == [0.0, 0.1, 0.2]
    assert [(r["prompt_tokens"], r["output_tokens"]) for r in records] == [(4, 2), (6, 3), (8, 4)]
    for r in records:
        assert r["scheduled_s"] <= r["sent_s"] < r["scheduled_s"] + 0.05


def test_cli_sweep_writes_plot_and_runs(fake, tmp_path, capsys):
    url, _ = fake
    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    rc = run_cli(
        "--base-url", url, "--sweep-rates", "25,inf", "--num-requests", "10", "--trace", "azure-code",
        "--max-input-tokens", "64", "--max-output-tokens", "8", "--plot", str(plot), "--json", str(out),
    )
    assert rc == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT p99" in capsys.readouterr().out  # the sweep table
    runs = json.loads(out.read_text())["runs"]
    assert [run["label"] for run in runs] == ["25 req/s", "inf req/s"]
    for run in runs:
        assert run["summary"]["completed"] == 10
        assert all(r["input_tokens"] <= 64 and 1 <= r["output_tokens"] <= 8 for r in run["requests"])
    # Lengths sampled from the trace with the same seed: every rate runs the same requests.
    assert [r["input_tokens"] for r in runs[0]["requests"]] == [r["input_tokens"] for r in runs[1]["requests"]]
    assert max(r["scheduled_s"] for r in runs[1]["requests"]) == 0.0


def test_cli_exit_codes(fake, capsys):
    url, behaviour = fake
    behaviour.fail_statuses = [500] * 3
    assert run_cli("--base-url", url, "--num-requests", "3", "--output-len", "2") == 1  # every request failed
    assert run_cli("--base-url", url, "--plot", "x.png") == 2
    assert run_cli("--base-url", "http://127.0.0.1:9", "--num-requests", "1") == 2  # nothing listens there
    assert "cannot list models" in capsys.readouterr().err


def test_bench_engine_sweeps_batch_sizes_and_rates(tiny_model_dir, tmp_path):
    from tideserve.bench import engine_configs

    parser = argparse.ArgumentParser()
    engine_configs.add_arguments(parser)
    args = parser.parse_args(["--model", tiny_model_dir, "--configs", "fp32", "--rounds", "1", "--prompt-tokens", "24",
                              "--output-tokens", "6", "--batch-sizes", "1,3", "--rates", "4", "--rate-requests", "3",
                              "--json", str(tmp_path / "out.json"), "--png", str(tmp_path / "chart")])
    assert engine_configs.run(args) == 0
    (fp32,) = json.loads((tmp_path / "out.json").read_text())["configs"]
    assert [(row["batch"], row["requests"]) for row in fp32["batch_sweep"]] == [(1, 1), (3, 3)]
    # A static batch starts together: its output tokens over its wall time.
    batch = fp32["batch_sweep"][1]
    assert batch["output_tok_s"] == pytest.approx(3 * 6 / batch["seconds"])
    (rate,) = fp32["rate_sweep"]
    assert rate["rate"] == 4 and rate["requests"] == 3 and rate["ttft_p90_ms"] >= rate["ttft_p50_ms"] > 0
    assert {p.name for p in tmp_path.glob("chart-*.png")} == {"chart-batch1.png", "chart-batch-sweep.png",
                                                             "chart-rates.png"}
