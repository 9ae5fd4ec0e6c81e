"""The `tideserve` console script: one entry point, one subcommand per job.

Each subcommand lives in the module that owns it and exposes `add_arguments(parser)` and `run(args) -> int`;
a module is imported only when its subcommand runs, so `tideserve bench` never imports torch and `tideserve
operator` never imports the worker.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "serve": ("tideserve.worker.server", "Run a worker: the continuous-batching engine behind an OpenAI-compatible API."),
    "bench": ("tideserve.bench.loadgen", "Load-test any OpenAI-compatible endpoint (Poisson rate or trace replay)."),
    "bench-engine": ("tideserve.bench.engine_configs", "Engine configurations at batch 1 (int8/fp8, FP8 KV cache, TP=2) against fp32: speed and quality, one run."),
    "bench-llamacpp": ("tideserve.bench.llamacpp", "tideserve serve against llama.cpp's llama-server on SmolLM2, alternating, one run (needs a llama-server build)."),
    "bench-routing": ("tideserve.bench.routing", "Compare the router's policies on the Mooncake shared-prefix trace, two local replicas."),
    "models": ("tideserve.worker.builtin_models", "Write the built-in models (tiny, smollm2) to local directories."),
    "up": ("tideserve.local.up", "Run an LLMDeployment YAML on this machine: worker processes, the router, the autoscaler."),
    "demo": ("tideserve.local.demo", "Run the demo model locally under a compressed real trace, autoscaled live; ends with a PNG."),
    "router": ("tideserve.router.main", "Run the router: prefix- and load-aware routing over one LLMDeployment's workers."),
    "operator": ("tideserve.operator.main", "Run the Kubernetes operator that turns LLMDeployments into worker Deployments."),
    "simulate": ("tideserve.sim.cli", "Replay a trace against the Tideserve autoscaler and the baselines."),
    "dashboard": ("tideserve.monitoring.dashboard", "Draw the shipped Grafana dashboard's panels from a Prometheus as one PNG."),
    "trace": ("tideserve.sim.convert", "Convert Azure 2023 or ServeGen data into a canonical per-request CSV."),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of `command` only: declaring them imports its module, and the others'
    modules may need what this install lacks (the operator image has no torch, the worker image no kopf)."""
    parser = argparse.ArgumentParser(prog="tideserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
