"""ServeGen (Alibaba Model Studio, Apache-2.0) to per-request traces.

ServeGen publishes, per client, the request rate and inter-arrival CV of every 10-minute window over 14 days, and
the input and output length distributions of every 6-hour block; no individual requests. `extract` compacts the
published archives into one small JSON (rates per window; 33 quantiles of each length distribution per block),
and `synthesize` turns that into canonical requests: per client and window, a Gamma renewal process with the
window's rate (times rate_scale) and inter-arrival CV; lengths drawn from the client's distributions of that
block (the pooled distribution of the block when a client's length file was not published). Time can be
compressed: time_scale=48 plays a day in 30 minutes, keeping every window's request count.
"""

from __future__ import annotations

import gzip
import json
import re
import tarfile
from pathlib import Path

import numpy as np

from tideserve.traces import TraceRequest

WINDOW_S = 600.0
BLOCK_S = 21600.0
QUANTILES = np.linspace(0, 1, 33)
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "traces" / "servegen"


def _pdf_quantiles(text: str) -> list[int]:
    """A published PDF string "{tokens: probability, ...}" -> token counts at QUANTILES."""
    pairs = re.findall(r"(\d+)\s*:\s*([0-9.eE+-]+)", text)
    if not pairs:
        return []
    tokens = np.array([int(k) for k, _ in pairs], dtype=float)
    probs = np.array([float(v) for _, v in pairs])
    order = np.argsort(tokens)
    tokens, cdf = tokens[order], np.cumsum(probs[order])
    cdf /= cdf[-1]
    return [int(max(1, tokens[min(len(tokens) - 1, np.searchsorted(cdf, q))])) for q in QUANTILES]


def extract(archive_dir: str | Path, model: str = "m-large") -> dict:
    """Read the published archives (servegen_rate_traces.tar.xz, servegen_length_datasets.tar.xz)."""
    archive_dir = Path(archive_dir)
    prefix = f"data/language/{model}/chunk-"
    clients: dict[str, dict] = {}
    with tarfile.open(archive_dir / "servegen_rate_traces.tar.xz") as tar:
        for member in tar:
            if member.name.startswith(prefix) and member.name.endswith("-trace.csv"):
                client = member.name[len(prefix):-len("-trace.csv")]
                rows = []
                for line in tar.extractfile(member).read().decode().splitlines():
                    cols = line.split(",")
                    rate = float(cols[1])
                    if rate > 0:
                        rows.append([int(float(cols[0])), round(rate, 5), round(float(cols[2] or 1.0), 3)])
                clients[client] = {"windows": rows, "blocks": {}}
    if not clients:
        raise ValueError(f"no rate traces for model {model!r} in {archive_dir}")
    with tarfile.open(archive_dir / "servegen_length_datasets.tar.xz") as tar:
        for member in tar:
            if member.name.startswith(prefix) and member.name.endswith("-dataset.json"):
                client = member.name[len(prefix):-len("-dataset.json")]
                data = json.load(tar.extractfile(member))
                for block, fields in data.items():
                    q_in = _pdf_quantiles(fields.get("input_tokens", ""))
                    q_out = _pdf_quantiles(fields.get("output_tokens", ""))
                    if q_in and q_out and client in clients:
                        clients[client]["blocks"][str(int(float(block)))] = [q_in, q_out]
    return {"model": model, "window_s": WINDOW_S, "block_s": BLOCK_S, "clients": clients,
            "source": "alibaba/ServeGen data/language (Apache-2.0)"}


def save_extract(extract_data: dict, path: str | Path) -> None:
    with gzip.open(path, "wt") as f:
        json.dump(extract_data, f, separators=(",", ":"))


def load_extract(path_or_model: str | Path) -> dict:
    path = Path(path_or_model)
    if not path.exists():
        path = SHIPPED / f"{path_or_model}.json.gz"
    if not path.exists():
        raise ValueError(f"no ServeGen extract {path_or_model!r} (a .json.gz file or a shipped model: "
                         f"{', '.join(p.name.split('.')[0] for p in SHIPPED.glob('*.json.gz'))})")
    with gzip.open(path, "rt") as f:
        return json.load(f)


def _pooled_blocks(clients: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per block, the length quantiles pooled over clients, weighted by their requests in that block."""
    pooled: dict[str, list] = {}
    for c in clients.values():
        volume: dict[str, float] = {}
        for start, rate, _ in c["windows"]:
            key = str(int(start // BLOCK_S * BLOCK_S))
            volume[key] = volume.get(key, 0.0) + rate * WINDOW_S
        for key, (q_in, q_out) in c["blocks"].items():
            pooled.setdefault(key, []).append((volume.get(key, 0.0), q_in, q_out))
    out = {}
    for key, entries in pooled.items():
        weights = np.array([w for w, _, _ in entries]) + 1e-9
        # Mixture sampling: pick a client by weight, then a quantile; here kept as (weights, quantile table).
        out[key] = (weights / weights.sum(), np.array([[q_in, q_out] for _, q_in, q_out in entries], dtype=float))
    return out


def synthesize(data: dict, rate_scale: float = 0.01, time_scale: float = 1.0, days: float | None = None,
               seed: int = 0, max_input: int = 8192, max_output: int = 4096, max_total: int = 8192) -> list[TraceRequest]:
    if rate_scale <= 0 or time_scale <= 0:
        raise ValueError("rate_scale and time_scale must be positive")
    rng = np.random.default_rng(seed)
    horizon = None if days is None else days * 86400.0
    pooled = _pooled_blocks(data["clients"])
    arrivals, inputs, outputs = [], [], []
    for name in sorted(data["clients"], key=lambda n: int(n) if n.isdigit() else n):
        client = data["clients"][name]
        for start, rate, cv in client["windows"]:
            if horizon is not None and start >= horizon:
                continue
            mean_gap = 1.0 / (rate * rate_scale)
            if mean_gap > 50 * WINDOW_S:  # far below one request per window: Bernoulli thinning
                times = rng.uniform(0, WINDOW_S, size=int(rng.random() < WINDOW_S / mean_gap))
            else:
                shape = 1.0 / max(cv, 0.05) ** 2
                count = int(WINDOW_S / mean_gap * 2 + 20)
                gaps = rng.gamma(shape, mean_gap / shape, size=count)
                times = np.cumsum(gaps) - rng.uniform(0, gaps[0])  # a random phase of the renewal process
                times = times[(times >= 0) & (times < WINDOW_S)]
            if not len(times):
                continue
            key = str(int(start // BLOCK_S * BLOCK_S))
            q = client["blocks"].get(key)
            n = len(times)
            if q is not None:
                table = np.array(q, dtype=float)[None]
                pick = np.zeros(n, dtype=int)
            elif key in pooled:
                weights, table = pooled[key]
                pick = rng.choice(len(weights), size=n, p=weights)
            else:
                continue  # no length information for this block at all
            # Inverse-CDF sampling between the stored quantiles (input and output drawn independently: ServeGen
            # publishes marginals only).
            u_in, u_out = rng.random(n) * (len(QUANTILES) - 1), rng.random(n) * (len(QUANTILES) - 1)
            ins = _interp(table[pick, 0], u_in)
            outs = _interp(table[pick, 1], u_out)
            arrivals.append((start + times) / time_scale)
            inputs.append(np.clip(np.rint(ins), 1, max_input))
            outputs.append(np.clip(np.rint(outs), 1, max_output))
    if not arrivals:
        raise ValueError("the extract produced no requests (check days and rate_scale)")
    a, i, o = np.concatenate(arrivals), np.concatenate(inputs), np.concatenate(outputs)
    order = np.argsort(a, kind="stable")
    a, i, o = a[order], i[order].astype(int), o[order].astype(int)
    o = np.minimum(o, max_total - 1)
    i = np.minimum(i, max_total - o)
    return [TraceRequest(float(t), int(x), int(y)) for t, x, y in zip(a, i, o)]


def _interp(quantile_rows: np.ndarray, position: np.ndarray) -> np.ndarray:
    lo = np.floor(position).astype(int)
    frac = position - lo
    hi = np.minimum(lo + 1, quantile_rows.shape[1] - 1)
    rows = np.arange(len(position))
    return quantile_rows[rows, lo] * (1 - frac) + quantile_rows[rows, hi] * frac
