"""Histogram bucket edges shared by the worker's metrics and the autoscaler's simulator."""

from __future__ import annotations


def geometric(start: float, stop: float, per_decade: int) -> list[float]:
    """Log-spaced bucket edges: `per_decade` edges per factor of 10, so any percentile between start and stop
    is read to within about 10**(1/per_decade) (about 12% with 20 per decade). The last edge is >= stop."""
    edges = [start]
    while edges[-1] < stop:
        edges.append(float(f"{start * 10 ** (len(edges) / per_decade):.4g}"))
    return edges


TTFT_BUCKETS = geometric(0.001, 60.0, 20)  # 1 ms .. 60 s
TPOT_BUCKETS = geometric(0.001, 2.5, 20)  # 1 ms .. 2.5 s
E2E_BUCKETS = geometric(0.01, 600.0, 10)
STEP_BUCKETS = geometric(0.0005, 10.0, 10)
UTILIZATION_BUCKETS = geometric(0.001, 1.5, 10)  # MBU/MFU: 0.1% .. 150% (a peak probe can under-read)
TOKEN_COUNT_BUCKETS = sorted({float(2**i) for i in range(18)} | {float(3 * 2**i) for i in range(16)})
