"""A free TCP port on loopback, for whatever this package starts locally (worker processes, Prometheus, a
tensor-parallel group's rendezvous) and for the tests: never a fixed port."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
