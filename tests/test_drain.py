"""Graceful drain of a real `tideserve serve` process on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx

from tideserve.ports import free_port


def start_worker(model_dir: str, tmp_path, *extra: str):
    port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tideserve", "serve", "--model", model_dir, "--served-model-name", "tiny",
         "--host", "127.0.0.1", "--port", str(port), "--admin-host", "127.0.0.1", "--admin-port", str(admin_port),
         "--max-model-len", "2048", "--num-kv-blocks", "1024", "--log-level", "warning", *extra],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("worker did not become ready")


def stream(url: str, max_tokens: int, first_chunk: threading.Event, results: list) -> None:
    body = {"model": "tiny", "prompt": "drain", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    usage, finish = None, None
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                first_chunk.set()
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    finish = choice["finish_reason"] or finish
        results.append((r.status_code, finish, usage))
    except httpx.HTTPError as exc:
        results.append((None, repr(exc), None))


def in_flight_streams(url: str, n: int, max_tokens: int):
    results: list = []
    started = [threading.Event() for _ in range(n)]
    threads = [threading.Thread(target=stream, args=(url, max_tokens, e, results)) for e in started]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60), "stream did not start"
    return threads, results


def test_sigterm_while_the_model_loads_exits_zero(tiny_model_dir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tideserve", "serve", "--model", tiny_model_dir, "--host", "127.0.0.1",
         "--port", str(free_port()), "--admin-port", str(free_port()), "--log-level", "info"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for line in proc.stdout:  # the worker says when it starts loading; serving comes only after
            if "loading" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert "serving" not in proc.stdout.read()


def test_sigterm_drains_in_flight_streams_then_exits_zero(tiny_model_dir, tmp_path):
    proc, url = start_worker(tiny_model_dir, tmp_path)
    try:
        threads, results = in_flight_streams(url, 3, 1500)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert httpx.get(f"{url}/ready").status_code == 503  # fails at once
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 2})
        assert r.status_code == 503 and "draining" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200  # liveness holds while draining
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 3
        for status, finish, usage in results:
            assert status == 200 and finish == "length" and usage["completion_tokens"] == 1500
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_drain_deadline_aborts_leftovers_and_exits_zero(tiny_model_dir, tmp_path):
    proc, url = start_worker(tiny_model_dir, tmp_path, "--drain-timeout", "0.5", "--max-num-seqs", "1")
    try:
        threads, results = in_flight_streams(url, 1, 2000)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
        for t in threads:
            t.join(timeout=30)
        status, finish, usage = results[0]
        assert finish == "abort" or status is None  # cut at the deadline, not silently completed
    finally:
        if proc.poll() is None:
            proc.kill()
