"""Access control: API keys from a file that may change, and TLS server credentials.

API keys (``--api-key-file``):
1. the file holds one key per line; blank lines and lines starting with ``#`` are skipped;
2. it is re-read when its identity changes (inode, size, mtime: a Kubernetes Secret volume swaps
   a symlink), checked at most once a second, so keys rotate without a restart;
3. a call carries ``authorization: Bearer <key>``; the key is hashed and compared with every
   accepted key's hash by ``hmac.compare_digest`` (constant time, no early exit), and no key is
   ever logged;
4. ``grpc.health.v1`` needs no key (probes); every other service, reflection included, does.
   A file that disappears or cannot be read keeps the keys last read (a rotation in progress
   must not lock everyone out) and logs an ERROR; an empty file accepts no key.

TLS (``--tls-cert-file``/``--tls-key-file``, optionally ``--tls-client-ca-file`` for mutual TLS)
is read at start, and read again on a handshake after the files change (certificate rotation).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_status import rpc_status

from quotient_service.errors import StartupError, Unauthenticated, to_status

__all__ = ["ApiKeys", "AuthInterceptor", "FileWatch", "server_credentials"]

log = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)  # probes must work without a key
_CHECK_EVERY_S = 1.0


class FileWatch:
    """Tells whether files changed since the last look (inode, size, mtime of each)."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self._seen = self._identity()

    def _identity(self) -> tuple[tuple[int, int, int] | None, ...]:
        out: list[tuple[int, int, int] | None] = []
        for p in self.paths:
            try:
                st = os.stat(p)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
        return tuple(out)

    def changed(self) -> bool:
        now = self._identity()
        if now == self._seen:
            return False
        self._seen = now
        return True


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _read_keys(path: Path) -> list[bytes]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [_digest(k) for k in (line.strip() for line in lines) if k and not k.startswith("#")]


class ApiKeys:
    """The accepted keys of ``path``, re-read when the file changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._digests = _read_keys(self.path)
        except (OSError, UnicodeError) as exc:
            raise StartupError(
                f"--api-key-file / QUOTIENT_API_KEY_FILE: cannot read {self.path}: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
        if not self._digests:
            raise StartupError(
                f"--api-key-file / QUOTIENT_API_KEY_FILE: {self.path} holds no key "
                "(one key per line; '#' starts a comment)"
            )
        self._watch = FileWatch(self.path)
        self._lock = threading.Lock()
        self._next_check = time.monotonic() + _CHECK_EVERY_S
        log.info("API keys required: %d key(s) from %s", len(self._digests), self.path)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + _CHECK_EVERY_S
            if not self._watch.changed():
                return
            try:
                digests = _read_keys(self.path)
            except (OSError, UnicodeError) as exc:
                why = getattr(exc, "strerror", None) or type(exc).__name__
                log.error(
                    "cannot re-read the API key file %s (%s); keeping its old keys", self.path, why
                )
                return
            if not digests:
                log.warning(
                    "the API key file %s holds no key now: every call is refused", self.path
                )
            else:
                log.info("API keys reloaded: %d key(s) from %s", len(digests), self.path)
            self._digests = digests

    def accepts(self, key: str) -> bool:
        """Whether ``key`` is one of the accepted keys; compares with every key, always."""
        self._maybe_reload()
        presented = _digest(key)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(presented, digest)
        return found


def _bearer(metadata: Any) -> str | None:
    """The value of the ``authorization`` metadata, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def check_authorization(keys: ApiKeys, header: str | None) -> Unauthenticated | None:
    """None if ``header`` carries an accepted key, else the error to answer with."""
    if header is None:
        return Unauthenticated(
            "this server needs an API key: send the metadata 'authorization: Bearer <key>'",
            reason="API_KEY_MISSING",
        )
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return Unauthenticated(
            "the authorization metadata must be 'Bearer <key>'", reason="API_KEY_MALFORMED"
        )
    if not keys.accepts(key.strip()):
        return Unauthenticated("the API key is not accepted", reason="API_KEY_INVALID")
    return None


Refused = Callable[[str, str], None]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health's without an accepted key (UNAUTHENTICATED); ``refused``
    is told (method, reason) of each refusal, for the metrics."""

    def __init__(self, keys: ApiKeys, refused: Refused | None = None) -> None:
        self.keys, self.refused = keys, refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        method: str = details.method  # type: ignore[attr-defined]
        handler = await continuation(details)
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        error = check_authorization(self.keys, _bearer(details.invocation_metadata))  # type: ignore[attr-defined]
        if error is None:
            return handler
        if self.refused:
            self.refused(method.rsplit("/", 1)[-1], error.reason)
        status = rpc_status.to_status(to_status(error))

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort_with_status(status)

        async def deny_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort_with_status(status)
            yield  # pragma: no cover - makes this an async generator

        if handler.unary_unary:
            return handler._replace(unary_unary=deny_unary)
        if handler.unary_stream:
            return handler._replace(unary_stream=deny_stream)
        if handler.stream_unary:
            return handler._replace(stream_unary=deny_unary)
        return handler._replace(stream_stream=deny_stream)


def _read_pem(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise StartupError(f"{flag}: {path} is not PEM (no '-----BEGIN' line)")
    return data


def _certificate_config(cert: str, key: str, ca: str) -> grpc.ServerCertificateConfiguration:
    pair = (
        _read_pem(key, "--tls-key-file / QUOTIENT_TLS_KEY_FILE"),
        _read_pem(cert, "--tls-cert-file / QUOTIENT_TLS_CERT_FILE"),
    )
    roots = _read_pem(ca, "--tls-client-ca-file / QUOTIENT_TLS_CLIENT_CA_FILE") if ca else None
    return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)


def server_credentials(cert: str, key: str, ca: str = "") -> grpc.ServerCredentials:
    """TLS credentials from PEM files (mutual TLS when ``ca`` is set); re-read on a handshake
    after any of the files changed, keeping the old ones if the new ones do not load."""
    initial = _certificate_config(cert, key, ca)
    watch = FileWatch(*(Path(p) for p in (cert, key, ca) if p))

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        if not watch.changed():
            return None
        try:
            config = _certificate_config(cert, key, ca)
        except StartupError as exc:
            log.error("TLS files changed but do not load (%s); keeping the previous ones", exc)
            return None
        log.info("TLS certificate reloaded from %s", cert)
        return config

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=bool(ca)
    )
