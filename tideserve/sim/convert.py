"""`tideserve trace`: write a canonical per-request CSV (arrival_s,input_tokens,output_tokens) from the Azure
2023 traces or from ServeGen, with rate and time scaling."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=["azure", "servegen"])
    parser.add_argument("--input", default=None,
                        help="azure: a CSV or azure-conv/azure-code (default azure-conv); servegen: a .json.gz "
                             "extract or a shipped model name (default m-large)")
    parser.add_argument("--servegen-archives",
                        help="build the ServeGen extract from the published archives in this folder first")
    parser.add_argument("--model", default="m-large", help="ServeGen language model: m-large, m-mid, m-small")
    parser.add_argument("--days", type=float, help="ServeGen: only the first N days")
    parser.add_argument("--rate-scale", type=float, default=1.0)
    parser.add_argument("--time-scale", type=float, default=1.0, help="compress time: 48 plays a day in 30 min")
    parser.add_argument("--max-total-tokens", type=int, default=8192, help="clamp input+output to this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)


def run(args: argparse.Namespace) -> int:
    from tideserve.traces import load_trace, scale_rate, scale_time, scale_tokens, write_csv

    try:
        if args.source == "azure":
            requests = load_trace(args.input or "azure-conv")
            if args.rate_scale != 1.0:
                requests = scale_rate(requests, args.rate_scale, seed=args.seed)
            if args.time_scale != 1.0:
                requests = scale_time(requests, args.time_scale)
            requests = scale_tokens(requests, max_total=args.max_total_tokens)
        else:
            from tideserve.sim import servegen

            if args.servegen_archives:
                data = servegen.extract(args.servegen_archives, args.model)
            else:
                data = servegen.load_extract(args.input or args.model)
            requests = servegen.synthesize(data, rate_scale=args.rate_scale, time_scale=args.time_scale,
                                           days=args.days, seed=args.seed, max_total=args.max_total_tokens)
    except (OSError, ValueError) as exc:
        print(f"cannot convert: {exc}", file=sys.stderr)
        return 2
    write_csv(args.out, requests)
    span = requests[-1].arrival_s - requests[0].arrival_s if requests else 0.0
    print(f"wrote {len(requests)} requests over {span / 3600:.2f} h to {args.out}")
    return 0
