"""`tideserve operator`: run the LLMDeployment operator (kopf) against the cluster it is in, or a kubeconfig."""

from __future__ import annotations

import argparse
import logging
import os

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"


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
    parser.add_argument("--priority", type=int, default=0, help="peering priority; the highest one acts, others pause")
    parser.add_argument("--liveness-endpoint", default=DEFAULT_LIVENESS, help="health endpoint URL to serve ('' to disable)")
    parser.add_argument("--worker-image", default=defaults.tideserve_image, help="image for engine.kind tideserve")
    parser.add_argument("--vllm-image", default=defaults.vllm_image, help="image for engine.kind vllm")
    parser.add_argument("--s3-download-image", default=defaults.s3_download_image,
                        help="image of the init container that downloads s3:// models (entrypoint: aws)")
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import kopf

    from tideserve.operator.handlers import new_memo, registry
    from tideserve.operator.kube import load_configuration
    from tideserve.operator.manifests import OperatorConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = OperatorConfig(tideserve_image=args.worker_image, vllm_image=args.vllm_image,
                            s3_download_image=args.s3_download_image)
    kopf.run(
        registry=registry,
        memo=new_memo(load_configuration(args.kubeconfig), config),
        clusterwide=not args.namespaces,
        namespaces=args.namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness_endpoint or None,
    )
    return 0
