"""`tideserve up FILE.yaml`: run an LLMDeployment on this machine, autoscaled by the cluster's policy."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="an LLMDeployment YAML, as for kubectl apply")
    parser.add_argument("--host", default="127.0.0.1", help="the router listens here")
    parser.add_argument("--port", type=int, default=8000, help="the router's port: the deployment's one endpoint")
    parser.add_argument("--log-dir", help="worker logs go here (default: a temporary directory)")
    parser.add_argument("--no-calibration", action="store_true",
                        help="plan on the spec's default profile instead of measuring one on this machine first")
    parser.add_argument("--metrics-port", type=int,
                        help="serve the autoscaler's own metrics (the operator's tideserve_autoscaler_*) here")
    parser.add_argument("--prometheus", action="store_true",
                        help="also run a local Prometheus (the `prometheus` binary, where installed) that scrapes the "
                             "workers and the autoscaler and evaluates the chart's rules")
    parser.add_argument("--scrape-interval", type=float, default=5.0, help="the local Prometheus's, in seconds")
    parser.add_argument("--log-level", default="info")


async def serve_until_signal(runtime) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await runtime.run(stop)


def run(args: argparse.Namespace) -> int:
    from tideserve.local.deployment import DeploymentError, load
    from tideserve.local.runtime import LocalRuntime, LocalRuntimeError
    from tideserve.local.view import LiveView

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        llmd = load(args.file)
    except DeploymentError as exc:
        print(f"tideserve up: {exc}", file=sys.stderr)
        return 2
    view = LiveView(f"tideserve up {llmd['metadata']['name']}: http://{args.host}:{args.port}/v1", rows=30)
    runtime = LocalRuntime(llmd, port=args.port, host=args.host, log_dir=args.log_dir,
                           calibrate=not args.no_calibration, on_decision=lambda _, point: view.update(point),
                           metrics_port=args.metrics_port, prometheus=args.prometheus,
                           scrape_interval_s=args.scrape_interval)
    print(f"serving {llmd['spec']['model']['name']} at {runtime.url}/v1 (worker logs in {runtime.log_dir}); "
          "Ctrl-C drains and stops", flush=True)
    if runtime.prometheus is not None:
        print(f"Prometheus at {runtime.prometheus.url} once started; the dashboard's panels as a PNG: tideserve dashboard "
              f"--prometheus-url {runtime.prometheus.url} --namespace {runtime.namespace} --llmdeployment {runtime.name} "
              "--since 15m", flush=True)
    try:
        asyncio.run(serve_until_signal(runtime))
    except (LocalRuntimeError, OSError) as exc:
        print(f"tideserve up: {exc}", file=sys.stderr)
        return 1
    return 0
