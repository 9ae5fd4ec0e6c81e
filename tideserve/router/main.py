"""`tideserve router`: the router in front of one LLMDeployment's workers, as its pods run it in a cluster.

Workers come from the EndpointSlices of a headless Service (`--endpointslices SERVICE`, in `--namespace` or the
pod's own namespace) or from a fixed list (`--workers URL,...`: for trying it by hand). On SIGTERM the router
stops accepting connections and lets every open stream finish (uvicorn's graceful shutdown), within the pod's
termination grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from tideserve.router.balancer import POLICIES

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--endpointslices", metavar="SERVICE",
                        help="discover workers from this headless Service's EndpointSlices")
    source.add_argument("--workers", help="comma-separated worker base URLs (every one routable)")
    parser.add_argument("--namespace", help="of the Service (default: the pod's namespace)")
    parser.add_argument("--kubeconfig", help="default: in-cluster credentials, else ~/.kube/config")
    parser.add_argument("--port-name", default="http", help="the worker port's name in the EndpointSlices")
    parser.add_argument("--policy", choices=POLICIES, default="prefix")
    parser.add_argument("--load-factor", type=float, default=1.25,
                        help="prefix policy: a worker stays a candidate while under this times the mean load")
    parser.add_argument("--hold-max-requests", type=int, default=256,
                        help="requests held while no worker is ready; beyond them 429")
    parser.add_argument("--hold-timeout-seconds", type=float, default=120.0,
                        help="a held request gets 503 with Retry-After after this long")
    parser.add_argument("--model-name", action="append", default=[],
                        help="served model name(s) /v1/models lists while no worker is ready")
    parser.add_argument("--log-level", default="info")


def _namespace(args: argparse.Namespace) -> str:
    if args.namespace:
        return args.namespace
    try:
        with open(NAMESPACE_FILE) as f:
            return f.read().strip()
    except OSError:
        return "default"


async def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from tideserve.router.discovery import EndpointSliceDiscovery, api_client
    from tideserve.router.server import Endpoint, HoldQueue, Router

    router = Router(args.policy, HoldQueue(args.hold_max_requests, args.hold_timeout_seconds), args.model_name,
                    load_factor=args.load_factor)
    tasks = []
    if args.workers:
        router.update([Endpoint(url.rstrip("/"), url.rstrip("/")) for url in args.workers.split(",") if url])
    else:
        from tideserve.operator.kube import load_configuration

        discovery = EndpointSliceDiscovery(api_client(load_configuration(args.kubeconfig)), _namespace(args),
                                           args.endpointslices, router.update, args.port_name)
        tasks.append(asyncio.ensure_future(discovery.run()))
    server = uvicorn.Server(uvicorn.Config(router, host=args.host, port=args.port, log_level="warning",
                                           lifespan="on"))
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from tideserve.router.server import HoldQueue

        HoldQueue(args.hold_max_requests, args.hold_timeout_seconds)
        if args.load_factor < 1:
            raise ValueError("--load-factor must be >= 1")
    except ValueError as exc:
        print(f"tideserve router: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(args))
    return 0
