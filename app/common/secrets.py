"""Secrets: the one secret-file reader, bearer-token parsing and constant-time checks.

Every secret that lives in a file (the upstream bearer token, API tokens, the
/metrics token, vROps passwords) is read through :class:`SecretFile`, so they all
share one set of rules:

- rotation without restart: the file is stat()ed on each use and re-read only
  when its inode, size or mtime changed;
- never adopt a half-written file: content whose mtime is younger than a short
  settle time, that changed while being read, or that is empty, is not adopted;
  the last good value stays in force (a file rewritten in place is empty, then
  partial, for a moment: adopting that would lock valid callers out);
- read once when created (waiting, at start-up only, for a file being written
  right then to settle), so the first request never races a rotation;
- a file that cannot be read is a *local* error: one log line per episode and
  ``metrics_gateway_secret_file_errors_total{secret,reason}``, never mistaken for
  the failure of the service the secret is for;
- the file's contents never reach a log line, a metric or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import Counter

from app.common.episodes import FailureEpisode

log = logging.getLogger("gateway.secrets")

MAX_TOKEN_LENGTH = 4096

SECRET_FILE_ERRORS = Counter(
    "metrics_gateway_secret_file_errors_total",
    "Reads of a secret file that were not adopted (missing, unreadable, empty, changing), "
    "by secret and reason; the last good value stayed in force.",
    ["secret", "reason"],
)


class SecretUnavailable(Exception):
    """A secret file that has never been read successfully."""


class SecretFile:
    """A secret kept in a file, re-read on change, never adopted half-written.

    ``name`` is a bounded label (``upstream_bearer``, ``api_tokens`` ...), not a path.
    """

    def __init__(self, path: Path, name: str, *, settle_seconds: float = 0.2, prime: bool = True) -> None:
        self.path = Path(path)
        self.name = name
        self.settle_seconds = settle_seconds
        self._stamp: tuple[int, int, int] | None = None
        self._bad_stamp: tuple[tuple[int, int, int], str] | None = None
        self._value: str | None = None
        self._lock = threading.Lock()
        self.episode = FailureEpisode(f"secret file {name} ({self.path})", log)
        if prime:
            self.prime()

    @property
    def value(self) -> str | None:
        """The last adopted contents (stripped), or None when never read."""
        return self._value

    def prime(self) -> None:
        """First read, at start-up: waits (at most twice the settle time) for a file
        being written right now, so the first request does not meet a secret that
        was never read. Failures are recorded (metric, log line), not raised."""
        deadline = time.monotonic() + 2 * self.settle_seconds
        while True:
            try:
                st = os.stat(self.path)
            except OSError:
                break
            age = time.time() - st.st_mtime_ns / 1e9
            if age >= self.settle_seconds or time.monotonic() >= deadline:
                break
            time.sleep(min(self.settle_seconds - age, deadline - time.monotonic()) + 0.01)
        try:
            self.read()
        except SecretUnavailable:
            pass

    def read(self) -> str:
        """The current secret; the last good one while the file is missing, empty or moving.

        Raises SecretUnavailable only when no good value has ever been read (a file
        never read that is still being written is not adopted either: it may be a
        half).
        """
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return self._keep("missing" if isinstance(exc, FileNotFoundError) else "unreadable")
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp and self._value is not None:
            return self._value
        with self._lock:
            if stamp == self._stamp and self._value is not None:
                return self._value
            if time.time() - st.st_mtime_ns / 1e9 < self.settle_seconds:
                # Being written: adopt it once it has settled.
                if self._value is not None:
                    return self._value
                return self._keep("settling")
            if self._bad_stamp is not None and self._bad_stamp[0] == stamp:
                return self._keep(self._bad_stamp[1])  # the same bad file: no need to read it again
            try:
                text = self.path.read_text(encoding="utf-8")
                after = os.stat(self.path)
            except (OSError, UnicodeDecodeError) as exc:
                return self._keep("missing" if isinstance(exc, FileNotFoundError) else "unreadable")
            if (after.st_ino, after.st_size, after.st_mtime_ns) != stamp:
                return self._keep("changing")
            if not text.strip():
                self._bad_stamp = (stamp, "empty")
                return self._keep("empty")
            self._value = text.strip()
            self._stamp = stamp
            self._bad_stamp = None
            self.episode.success()
            return self._value

    def _keep(self, reason: str) -> str:
        SECRET_FILE_ERRORS.labels(self.name, reason).inc()
        if self._value is None:
            self.episode.failure(f"{reason}; no earlier value to keep")
            raise SecretUnavailable(f"secret file {self.name}: {reason}")
        self.episode.failure(f"{reason}; keeping the value from its last good read")
        return self._value

    def __repr__(self) -> str:
        return f"SecretFile({self.name}, {self.path})"


def lines_of(secret: str) -> list[str]:
    """Non-empty, non-comment lines of a secret file (token lists), stripped."""
    out: list[str] = []
    for line in secret.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and len(line) <= MAX_TOKEN_LENGTH:
            out.append(line)
    return out


def bearer_token(authorization: bytes | str | None) -> bytes | None:
    """The credentials of an ``Authorization: Bearer <token>`` header value, else None."""
    if not authorization:
        return None
    raw = authorization.encode() if isinstance(authorization, str) else authorization
    scheme, _, cred = raw.strip().partition(b" ")
    cred = cred.strip()
    if scheme.lower() != b"bearer" or not cred or b" " in cred:
        return None
    return bytes(cred)


def token_index(provided: bytes | None, tokens: list[bytes]) -> int | None:
    """Which configured token `provided` is, compared in constant time against every one.

    Hashes first so neither which token matched nor the tokens' lengths show in timing.
    """
    if provided is None:
        provided = b""
    if len(provided) > MAX_TOKEN_LENGTH:
        provided = b""  # still compared, so a huge header costs the same as a wrong one
    digest = hashlib.sha256(provided).digest()
    found: int | None = None
    for i, token in enumerate(tokens):
        if hmac.compare_digest(digest, hashlib.sha256(token).digest()) and found is None:
            found = i
    return found if provided else None


def token_matches(expected: str, authorization: str | None) -> bool:
    """Constant-time check of a request's bearer token against one expected token."""
    return token_index(bearer_token(authorization), [expected.encode()]) is not None


def redact_url(url: str) -> str:
    """The URL without user:password, for logs and messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, f"***@{netloc}", parts.path, parts.query, parts.fragment))
