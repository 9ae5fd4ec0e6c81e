"""Request traces: when requests arrive and how long their prompts and completions are.

The canonical form is one row per request, `arrival_s,input_tokens,output_tokens`, with arrivals in seconds from the
start of the trace. The load generator replays it against a live endpoint and the simulator replays it against a model
of the cluster, so everything here is pure: no I/O beyond reading and writing trace files, and all randomness seeded.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

CANONICAL_COLUMNS = ("arrival_s", "input_tokens", "output_tokens")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

_AZURE_DIR = Path(__file__).resolve().parent / "data" / "traces" / "azure2023"
# Traces shipped with the package (Azure LLM inference trace 2023, CC-BY 4.0), addressable by name.
BUILTIN_TRACES = {
    "azure-conv": _AZURE_DIR / "AzureLLMInferenceTrace_conv.csv",
    "azure-code": _AZURE_DIR / "AzureLLMInferenceTrace_code.csv",
}
_EPOCH = datetime(1970, 1, 1)


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int
    prompt_token_ids: tuple[int, ...] | None = None  # the exact prompt (shared-prefix workloads), else synthesised
    # Ids of the prompt's leading blocks, equal ids for equal prefixes (Mooncake's hash_ids, 512 tokens each).
    prefix_blocks: tuple[int, ...] | None = None


def resolve_trace(path_or_name: str | Path) -> Path:
    """The file behind a built-in trace name, or the path itself."""
    return BUILTIN_TRACES.get(str(path_or_name), Path(path_or_name))


MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")


def load_trace(path_or_name: str | Path) -> list[TraceRequest]:
    """Read a canonical or Azure 2023 trace CSV (detected from its header), or a Mooncake JSON-lines trace
    (`.jsonl`: timestamp in milliseconds, input_length, output_length), sorted by arrival.

    Azure timestamps become seconds since the earliest row, so every trace starts at 0.
    """
    path = resolve_trace(path_or_name)
    if path.suffix == ".jsonl":
        return _load_mooncake(path)
    # utf-8-sig: CSVs saved by spreadsheet tools often start with a byte-order mark that would corrupt the first column.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if columns.issuperset(CANONICAL_COLUMNS):
            requests = [_parse_row(path, reader.line_num, row, CANONICAL_COLUMNS, _parse_seconds) for row in reader]
        elif columns.issuperset(AZURE_COLUMNS):
            requests = [_parse_row(path, reader.line_num, row, AZURE_COLUMNS, _parse_timestamp) for row in reader]
            start = min((r.arrival_s for r in requests), default=0.0)
            # Floats of seconds since 1970 resolve ~0.2 us; rounding to whole microseconds hides that noise.
            requests = [replace(r, arrival_s=round(r.arrival_s - start, 6)) for r in requests]
        else:
            raise ValueError(
                f"{path}: unrecognised trace header {sorted(columns)}; expected columns "
                f"{','.join(CANONICAL_COLUMNS)} (canonical) or {','.join(AZURE_COLUMNS)} (Azure 2023)"
            )
    if not requests:
        raise ValueError(f"{path}: trace has no requests")
    # A stable sort keeps the file order of simultaneous arrivals.
    return sorted(requests, key=lambda r: r.arrival_s)


def _load_mooncake(path: Path) -> list[TraceRequest]:
    requests = []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                blocks = row.get("hash_ids")
                requests.append(TraceRequest(float(row["timestamp"]) / 1000.0, int(row["input_length"]),
                                             int(row["output_length"]),
                                             prefix_blocks=tuple(int(h) for h in blocks) if blocks else None))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line}: expected a JSON object with {', '.join(MOONCAKE_FIELDS)} "
                                 f"({exc.__class__.__name__}: {exc})") from None
    if not requests:
        raise ValueError(f"{path}: trace has no requests")
    start = min(r.arrival_s for r in requests)
    return sorted((replace(r, arrival_s=r.arrival_s - start) for r in requests), key=lambda r: r.arrival_s)


def _parse_row(path: Path, line: int, row: dict, columns: tuple[str, str, str], parse_arrival) -> TraceRequest:
    arrival_col, input_col, output_col = columns
    try:
        request = TraceRequest(
            arrival_s=parse_arrival(row[arrival_col]),
            input_tokens=int(row[input_col]),
            output_tokens=int(row[output_col]),
        )
    except (TypeError, ValueError) as e:
        # TypeError: a short row gives None for its missing columns.
        raise ValueError(f"{path}, line {line}: cannot parse row {row}: {e}") from None
    if request.input_tokens < 1 or request.output_tokens < 1:
        raise ValueError(f"{path}, line {line}: token counts must be at least 1, got {row}")
    return request


def _parse_seconds(text: str) -> float:
    seconds = float(text)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"arrival must be a finite number of seconds >= 0, got {text!r}")
    return seconds


def _parse_timestamp(text: str) -> float:
    """Seconds since the epoch of a naive `YYYY-MM-DD HH:MM:SS[.fffffff]` timestamp.

    The Azure files carry 7 fractional digits, which datetime.fromisoformat rejects before Python 3.11,
    so the fraction is parsed separately.
    """
    whole, _, fraction = text.strip().partition(".")
    if fraction and not fraction.isdigit():
        raise ValueError(f"bad fractional seconds in timestamp {text!r}")
    # Counted from a fixed naive epoch: .timestamp() would apply the local time zone and its DST jumps.
    seconds = (datetime.fromisoformat(whole) - _EPOCH).total_seconds()
    return seconds + (float("0." + fraction) if fraction else 0.0)


def write_csv(path: str | Path, requests: list[TraceRequest]) -> None:
    """Write requests as a canonical trace CSV that load_trace reads back unchanged."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CANONICAL_COLUMNS)
        for r in requests:
            # repr() round-trips floats exactly.
            writer.writerow((repr(float(r.arrival_s)), r.input_tokens, r.output_tokens))


def scale_time(requests: list[TraceRequest], factor: float) -> list[TraceRequest]:
    """Replay the trace `factor` times as fast: factor 2 halves every arrival time, 0.5 doubles it."""
    if not factor > 0 or math.isinf(factor):
        raise ValueError(f"time scale factor must be a positive finite number, got {factor}")
    return [replace(r, arrival_s=r.arrival_s / factor) for r in requests]


def scale_rate(requests: list[TraceRequest], factor: float, seed: int = 0) -> list[TraceRequest]:
    """Multiply the request rate while keeping the trace's shape over time and its length mix.

    The integer part of `factor` overlays whole copies of the trace, each shifted by its own random offset of
    up to one mean inter-arrival time (so copies do not arrive in lockstep); the fractional part keeps a random
    share of one more copy. factor < 1 thins the trace.
    """
    if factor <= 0:
        raise ValueError(f"rate factor must be positive, got {factor}")
    if not requests:
        return []
    rng = random.Random(seed)
    span = requests[-1].arrival_s - requests[0].arrival_s
    mean_gap = span / max(1, len(requests) - 1)
    whole, fraction = int(factor), factor - int(factor)
    out = list(requests) if whole >= 1 else []
    for copy in range(1, whole + (1 if fraction > 0 else 0)):
        offset = rng.uniform(0, mean_gap)
        keep = 1.0 if copy < whole else fraction
        out.extend(replace(r, arrival_s=r.arrival_s + offset) for r in requests if keep >= 1 or rng.random() < keep)
    if whole == 0:
        out = [r for r in requests if rng.random() < fraction]
    out.sort(key=lambda r: r.arrival_s)
    return out


def scale_tokens(
    requests: list[TraceRequest],
    input_scale: float = 1.0,
    output_scale: float = 1.0,
    max_input: int | None = None,
    max_output: int | None = None,
    max_total: int | None = None,
) -> list[TraceRequest]:
    """Scale prompt and completion lengths, then clamp them to at least 1 and to the given limits.

    max_total bounds input + output (a model's max_model_len); the prompt is shortened first, because the
    completion length is what the decode-time metrics (TPOT, ITL) are measured on.
    """
    if input_scale <= 0 or output_scale <= 0:
        raise ValueError(f"token scales must be positive, got input {input_scale}, output {output_scale}")
    if max_total is not None and max_total < 2:
        raise ValueError(f"max_total must leave room for 1 input and 1 output token, got {max_total}")
    scaled = []
    for r in requests:
        input_tokens = _clamp(round(r.input_tokens * input_scale), max_input)
        output_tokens = _clamp(round(r.output_tokens * output_scale), max_output)
        if max_total is not None:
            output_tokens = min(output_tokens, max_total - 1)
            input_tokens = min(input_tokens, max_total - output_tokens)
        scaled.append(replace(r, input_tokens=input_tokens, output_tokens=output_tokens))
    return scaled


def _clamp(tokens: int, limit: int | None) -> int:
    return max(1, tokens if limit is None else min(tokens, limit))


def sample_lengths(requests: list[TraceRequest], n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Draw n (input_tokens, output_tokens) pairs from the trace, with replacement.

    Pairs are drawn whole so the correlation between prompt and completion length in the trace is kept.
    """
    if not requests:
        raise ValueError("cannot sample lengths from an empty trace")
    rng = random.Random(seed)
    return [(r.input_tokens, r.output_tokens) for r in rng.choices(requests, k=n)]


def poisson_arrivals(n: int, rate: float, seed: int = 0, burstiness: float = 1.0) -> list[float]:
    """Arrival times of n requests at `rate` requests/s on average, the first at 0.

    Inter-arrival gaps are gamma-distributed with shape `burstiness` and mean 1/rate, as in `vllm bench serve`:
    burstiness 1 is a Poisson process, below 1 is burstier, above 1 is more regular. rate=inf sends everything at 0.
    """
    if not rate > 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return arrivals
