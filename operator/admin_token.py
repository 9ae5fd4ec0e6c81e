"""The workers' admin tokens, derived from one operator key, so the operator never reads a Secret.

Each LLMDeployment's tideserve workers guard their admin port (live batch limits) with a bearer token that the
pods mount from the Secret NAME-admin. The token is HMAC-SHA256(key, namespace, name, uid): the operator writes
it into that Secret and the autoscaler computes it again when it calls a worker, so neither needs `get` on
Secrets (a cluster-wide install would otherwise read every Secret of the cluster). The key is one Secret in the
operator's own namespace, mounted into the operator pod (no RBAC rule at all) and read again when it changes:
a new key rotates every deployment's token. Until the kubelet has brought a pod's volume up to date the pod
still expects the token of the previous key, which the autoscaler tries when the current one is refused.

Which token a Secret holds is recorded, as a digest, in an annotation of the Deployment that mounts it: the
operator rewrites the Secret only when that digest differs from the current key's (zero writes while idle).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets

from tideserve.secret_file import SecretFile

log = logging.getLogger("tideserve.operator")

TOKEN_ANNOTATION = "tideserve.io/admin-token"  # on the Deployment: "<Secret uid> <token digest>"


def derive_token(key: str, namespace: str, name: str, uid: str) -> str:
    """The admin token of one LLMDeployment (its uid: a recreated object of the same name gets another)."""
    message = "\0".join(("tideserve-admin-token/v1", namespace, name, uid)).encode()
    return base64.urlsafe_b64encode(hmac.new(key.encode(), message, hashlib.sha256).digest()).decode().rstrip("=")


def token_digest(token: str) -> str:
    """A short one-way fingerprint of a token, safe to keep in metadata."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def recorded(annotation: str | None) -> tuple[str, str] | None:
    """(Secret uid, token digest) from the Deployment's TOKEN_ANNOTATION, if it holds one."""
    parts = (annotation or "").split()
    return (parts[0], parts[1]) if len(parts) == 2 else None


class AdminKey:
    """The operator's key: a mounted file (--admin-key-file), re-read on change, else a random key for this
    process only (each restart then rotates every token: fine for a trial, not for peered replicas)."""

    def __init__(self, path: str | None = None):
        self._file = SecretFile(path) if path else None
        if self._file is None:
            log.warning("no --admin-key-file: the workers' admin tokens come from a random key that lasts as long as "
                        "this process (a restart rewrites every NAME-admin Secret)")
        self._current = self._file.value() if self._file else secrets.token_urlsafe(32)
        self._previous: str | None = None

    def refresh(self) -> bool:
        """Read the key file again; True when the key changed."""
        if self._file is None:
            return False
        fresh = self._file.value()
        if fresh == self._current:
            return False
        self._previous, self._current = self._current, fresh
        log.info("the admin key changed: every deployment's admin token rotates")
        return True

    def token(self, namespace: str, name: str, uid: str) -> str:
        return derive_token(self._current, namespace, name, uid)

    def tokens(self, namespace: str, name: str, uid: str) -> list[str]:
        """The current token, then the previous key's (pods whose Secret volume the kubelet has not synced yet)."""
        keys = [self._current] + ([self._previous] if self._previous else [])
        return [derive_token(key, namespace, name, uid) for key in keys]
