"""A bearer token kept in a file (a mounted Kubernetes Secret), read again whenever the file changes.

The kubelet rotates a Secret volume by swapping a symlink, so a changed token shows as a new inode or mtime at
the same path: comparing them on each use costs one stat, and a running worker accepts the new token within
the kubelet's sync period without a restart. A file that turns empty or unreadable keeps the last token (fail
closed: a half-written update never opens the port).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class SecretFileError(ValueError):
    pass


class SecretFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._value = self._read()
        if not self._value:
            raise SecretFileError(f"{self.path} is empty: a token file must hold the token")

    def _read(self) -> str:
        try:
            stat = os.stat(self.path)
            value = self.path.read_text().strip()
        except OSError as exc:
            raise SecretFileError(f"cannot read {self.path}: {exc.strerror}") from None
        self._stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        return value

    def value(self) -> str:
        try:
            stat = os.stat(self.path)
        except OSError:
            return self._value
        if (stat.st_ino, stat.st_mtime_ns, stat.st_size) != self._stamp:
            try:
                fresh = self._read()
            except SecretFileError as exc:
                log.warning("%s; keeping the current token", exc)
                return self._value
            if fresh:
                if fresh != self._value:
                    log.info("%s changed: the new token applies from now on", self.path)
                self._value = fresh
            else:
                log.warning("%s is empty; keeping the current token", self.path)
        return self._value
