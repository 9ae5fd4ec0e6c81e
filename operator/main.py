"""`tideserve operator`: run the LLMDeployment operator (kopf) against the cluster it is in, or a kubeconfig."""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import time
import uuid

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
DEFAULT_METRICS_PORT = 8090


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tideserve.operator.manifests import OperatorConfig

    defaults = OperatorConfig()
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", default=[],
                       help="watch this namespace (repeatable; kopf glob patterns such as 'team-*' work)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"),
                        help="kubeconfig file (default: in-cluster service account, else $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--peering", metavar="NAME",
                        help="coordinate with other operator replicas through this kopf peering object "
                             "(required to exist); without it the operator runs standalone")
    parser.add_argument("--priority", type=peering_priority, default=0,
                        help="peering priority: an integer (the highest one acts, others pause; replicas that share "
                             "the highest all pause), or 'oldest': the replica that started first acts")
    parser.add_argument("--admin-key-file", metavar="PATH",
                        help="the key each LLMDeployment's worker admin token is derived from (a mounted Secret, read "
                             "again when it changes); without it a random key that lasts as long as this process")
    parser.add_argument("--liveness-endpoint", default=DEFAULT_LIVENESS, help="health endpoint URL to serve ('' to disable)")
    parser.add_argument("--worker-image", default=defaults.tideserve_image, help="image for engine.kind tideserve")
    parser.add_argument("--vllm-image", default=defaults.vllm_image, help="image for engine.kind vllm")
    parser.add_argument("--router-service-account", default=defaults.router_service_account,
                        help="the ServiceAccount router pods run as (the chart creates it with EndpointSlice read access)")
    parser.add_argument("--s3-download-image", default=defaults.s3_download_image,
                        help="image of the init container that downloads s3:// models (entrypoint: aws)")
    autoscaler = parser.add_argument_group("autoscaler (LLMDeployments with spec.autoscaling.mode advisory or active)")
    autoscaler.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                            help="serve the autoscaler's own Prometheus metrics on this port at /metrics (0 disables)")
    autoscaler.add_argument("--prometheus-url", default=os.environ.get("TIDESERVE_PROMETHEUS_URL") or None,
                            help="read the workers' metrics through this Prometheus HTTP API (e.g. "
                                 "http://prometheus.monitoring:9090) instead of scraping each ready pod's /metrics "
                                 "(default: $TIDESERVE_PROMETHEUS_URL, else scrape)")
    autoscaler.add_argument("--prometheus-namespace-label", default="namespace",
                            help="the label that carries a worker series' namespace in Prometheus")
    autoscaler.add_argument("--prometheus-pod-label", default="pod",
                            help="the label that carries a worker series' pod name in Prometheus")
    autoscaler.add_argument("--scrape-timeout", type=float, default=5.0,
                            help="seconds to wait for one pod's /metrics, a Prometheus query or an admin call")
    autoscaler.add_argument("--state-save-interval", type=float, default=300.0,
                            help="seconds between saves of what each deployment's policy learned to its "
                                 "ConfigMap NAME-autoscaler-state (also saved when its loop stops)")
    parser.add_argument("--log-level", default="info")


def peering_priority(value: str, now: float | None = None) -> int:
    """--priority: an integer, or 'oldest': a priority that falls with this process's start time (milliseconds,
    with three random digits below them against a tie), so the replica that started first acts and the others
    stand by. kopf freezes every operator that shares the top priority, so replicas of one Deployment cannot all
    run with the same number; and with 'oldest' a restarted or added replica never takes over from the one at
    work. Fits a JSON number exactly (below 2**53) until the year 2255."""
    if value == "oldest":
        started_ms = int((time.time() if now is None else now) * 1000)
        return -(started_ms * 1000 + random.randrange(1000))
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'oldest', got {value!r}") from None


def operator_identity() -> str:
    """This operator's peering identity: the pod's name (POD_ID, as kopf reads it) or host and a random part."""
    return os.environ.get("POD_ID") or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def run(args: argparse.Namespace) -> int:
    import kopf
    import prometheus_client

    from tideserve.operator.admin_token import AdminKey
    from tideserve.operator.autoscaler_loop import AutoscalerOptions, PeeringSettings
    from tideserve.operator.autoscaler_metrics import AutoscalerMetrics
    from tideserve.operator.handlers import new_memo, registry
    from tideserve.operator.kube import load_configuration
    from tideserve.operator.manifests import OperatorConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = OperatorConfig(tideserve_image=args.worker_image, vllm_image=args.vllm_image,
                            s3_download_image=args.s3_download_image,
                            router_service_account=args.router_service_account)
    identity = operator_identity()
    peering = None if args.peering is None else PeeringSettings(args.peering, identity, args.priority,
                                                                 clusterwide=not args.namespaces)
    options = AutoscalerOptions(prometheus_url=args.prometheus_url,
                                prometheus_namespace_label=args.prometheus_namespace_label,
                                prometheus_pod_label=args.prometheus_pod_label, scrape_timeout_s=args.scrape_timeout,
                                state_save_interval_s=args.state_save_interval, peering=peering)
    metrics = AutoscalerMetrics()
    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port, registry=metrics.registry)
    kopf.run(
        registry=registry,
        memo=new_memo(load_configuration(args.kubeconfig), config, AdminKey(args.admin_key_file), options, metrics),
        identity=identity,
        clusterwide=not args.namespaces,
        namespaces=args.namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness_endpoint or None,
    )
    return 0
