"""A real Prometheus server on this machine: `tideserve up --prometheus` and the test suite start one.

The server is the `prometheus` binary (Debian's package, 2.42 here; any 2.x takes this configuration) on a free
loopback port with its own data directory. Scrape jobs are written in Prometheus's own configuration format;
targets that come and go (worker processes) are file-based service discovery, which Prometheus re-reads when
the file changes, so adding a replica needs no reload. The rules shipped with the chart
(tideserve/data/monitoring/prometheus-rules.yaml) can be loaded as they are, so the local server evaluates the
same recording rules and alerts as a cluster's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tideserve.ports import free_port
from tideserve.operator.metrics_source import parse_time

DATA = Path(__file__).resolve().parent.parent / "data" / "monitoring"
RULES_FILE = DATA / "prometheus-rules.yaml"
DASHBOARD_FILE = DATA / "grafana-dashboard.json"


class PrometheusUnavailable(RuntimeError):
    """No prometheus binary here, or it would not start (the message says which, and how to get one)."""


@dataclass
class ScrapeJob:
    """One scrape job. `targets_file`: file-based discovery (see `write_targets`); else `static` targets with
    `labels`. `honor_labels` keeps the scraped series' own labels where they clash with the target's (an
    autoscaler's series carry the namespace of the deployment they describe, not of the process)."""

    name: str
    static: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    targets_file: Path | None = None
    relabel_configs: list[dict[str, Any]] = field(default_factory=list)
    honor_labels: bool = False
    metrics_path: str = "/metrics"

    def config(self) -> dict[str, Any]:
        job: dict[str, Any] = {"job_name": self.name, "metrics_path": self.metrics_path,
                               "honor_labels": self.honor_labels}
        if self.targets_file is not None:
            job["file_sd_configs"] = [{"files": [str(self.targets_file)], "refresh_interval": "5s"}]
        else:
            job["static_configs"] = [{"targets": self.static, "labels": self.labels}]
        if self.relabel_configs:
            job["relabel_configs"] = self.relabel_configs
        return job


def write_targets(path: Path, groups: list[tuple[list[str], dict[str, str]]]) -> None:
    """Replace a file_sd targets file atomically: Prometheus must never read half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": targets, "labels": labels} for targets, labels in groups]))
    os.replace(tmp, path)


class PrometheusServer:
    """Start with `start()`, stop with `stop()` (or use as a context manager)."""

    def __init__(self, jobs: list[ScrapeJob], scrape_interval_s: float = 5.0, rule_files: list[Path] = (),
                 evaluation_interval_s: float | None = None, directory: Path | None = None):
        self.jobs, self.rule_files = jobs, list(rule_files)
        self.scrape_interval_s = scrape_interval_s
        self.evaluation_interval_s = evaluation_interval_s or scrape_interval_s
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="tideserve-prometheus-")
        self.directory = Path(directory or self._tmp.name)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.api = PrometheusAPI(self.url)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.directory / "prometheus.yml"

    def write_config(self) -> None:
        seconds = lambda s: f"{max(1, round(s * 1000))}ms"  # noqa: E731
        config = {"global": {"scrape_interval": seconds(self.scrape_interval_s),
                             "scrape_timeout": seconds(min(self.scrape_interval_s, 10.0)),
                             "evaluation_interval": seconds(self.evaluation_interval_s)},
                  "rule_files": [str(f) for f in self.rule_files],
                  "scrape_configs": [job.config() for job in self.jobs]}
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self, timeout_s: float = 60.0) -> "PrometheusServer":
        path = shutil.which("prometheus")
        if path is None:
            raise PrometheusUnavailable("no `prometheus` binary on PATH (Debian/Ubuntu: apt-get install prometheus; "
                                        "or a release from prometheus.io)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.write_config()
        log = open(self.directory / "prometheus.log", "ab")
        try:
            self.process = subprocess.Popen(
                [path, f"--config.file={self.config_file}", f"--storage.tsdb.path={self.directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1d"],
                stdout=log, stderr=log, cwd=self.directory, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise PrometheusUnavailable(f"prometheus exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusUnavailable(f"prometheus not ready within {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        path = self.directory / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PrometheusAPI:
    """The parts of the HTTP API (/api/v1) that Tideserve reads: queries and the targets' scrape times."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=30.0)
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"Prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (a vector's series, or [time, value] for a scalar)."""
        params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
        data = self._get("/api/v1/query", params)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"metric": {}, "value": data["result"]}]

    def query_range(self, promql: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                                 "step": f"{step_s:g}"})["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets", {"state": "active"})["activeTargets"]

    def last_scrape(self, job: str) -> dict[str, float]:
        """scrapeUrl -> when each target of `job` was last scraped (seconds since the epoch; 0 before any)."""
        return {t["scrapeUrl"]: max(0.0, parse_time(t.get("lastScrape")) or 0.0) for t in self.targets()
                if t["labels"].get("job") == job}

    def wait_for_scrapes(self, job: str, after: float, timeout_s: float = 60.0) -> None:
        """Until every target of `job` has been scraped (successfully or not) after `after`."""
        deadline = time.monotonic() + timeout_s
        while True:
            scrapes = self.last_scrape(job)
            if scrapes and all(t > after for t in scrapes.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"targets of {job} not scraped after {after}: {scrapes}")
            time.sleep(0.2)
