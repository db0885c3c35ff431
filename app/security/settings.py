"""Settings of the API's access control and request limits (environment variables).

- ``API_TOKENS``: bearer tokens accepted on /prometheus/..., /api/... and /vrops/...;
  several at once (rotation: add the new one, roll clients, remove the old one), given
  as a comma-separated list (``a,b``) or a JSON list (``["a","b"]``) of unconfined
  tokens, or as a JSON object mapping each token to the tenant it is confined to
  (``{"tok-staging": {"env": "staging"}, "tok-ops": {}}``; the full form
  ``{"tok": {"labels": {...}, "upstream_headers": {"X-Scope-OrgID": "a"}}}``; see
  ``app.common.tenancy`` and docs/tenants.md).
- ``API_TOKENS_FILE``: a file of tokens, one per line (blank lines and lines
  starting with ``#`` ignored), or the same JSON object as ``API_TOKENS``; re-read
  when it changes, so rotating the file needs no restart. Both may be set; the union
  is accepted (a token in both gets the scope ``API_TOKENS`` gives it).
  Neither set: the API is open (the default, for a gateway behind a private network).
- ``CORS_ALLOW_ORIGINS``: origins allowed to call the API from a browser
  (comma-separated or JSON list); empty (default) allows none. ``*`` is refused
  when tokens are configured (a wildcard plus credentials is never wanted).
- ``MAX_REQUEST_BODY_BYTES`` (default 16384): larger bodies get 413.
- ``MAX_QUERY_STRING_BYTES`` (default 4096) / ``MAX_PATH_BYTES`` (default 2048):
  longer ones get 414.

Every token is a ``SecretStr``: the settings' repr, str and JSON dump never show it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.common.clients import Client, ClientConfigError, make_client
from app.common.episodes import FailureEpisode
from app.common.secrets import (
    MAX_TOKEN_LENGTH,
    SECRET_FILE_ERRORS,
    SecretFile,
    SecretUnavailable,
    lines_of,
)
from app.common.tenancy import UNCONFINED, Tenant, TenantConfigError, tenant_from_config

log = logging.getLogger("gateway.security")


class ScopedToken(SecretStr):
    """An API token, the tenant it is confined to and the client it is.

    A ``SecretStr`` so that every existing rule about tokens holds for it unchanged:
    its repr, str and JSON dump show only asterisks.
    """

    def __init__(self, secret_value: str, tenant: Tenant = UNCONFINED, client: Client | None = None) -> None:
        super().__init__(secret_value)
        self.tenant = tenant
        self.client = client or unnamed_client(secret_value)


# Keys of a token's object that say who the client is, not what it may see.
CLIENT_KEYS = ("name", "limits")


def unnamed_client(token: str) -> Client:
    """The client of a token configured without a name: keyed by a hash of the token (never
    shown: its metric label is ``unnamed``), so each such token still queues on its own."""
    return Client(key="token:" + hashlib.sha256(token.encode()).hexdigest()[:16])


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook refusing a repeated token (json.loads would keep the last silently)."""
    out: dict[str, Any] = {}
    for i, (key, value) in enumerate(pairs, 1):
        if key in out:
            raise ValueError(f"entry #{i} repeats an earlier token")
        out[key] = value
    return out


def parse_token_object(text: str) -> list[ScopedToken]:
    """The JSON object form of API_TOKENS (or of the file): token -> scope."""
    try:
        parsed = json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError as exc:
        # Never echo the raw value (it holds tokens): only our own messages pass.
        detail = str(exc) if "repeats an earlier token" in str(exc) else "not a valid JSON object"
        raise ValueError(detail) from None
    return scoped_tokens(parsed)


def scoped_tokens(mapping: Any) -> list[ScopedToken]:
    """Token -> scope pairs as ScopedTokens (see ``app.common.tenancy.tenant_from_config``).

    Errors name the entry by position, never by its token.
    """
    if not isinstance(mapping, dict):
        raise ValueError("not a JSON object")
    out: list[ScopedToken] = []
    for i, (token, scope) in enumerate(mapping.items(), 1):
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"entry #{i}: the token must be a non-empty string")
        token = token.strip()
        if len(token) > MAX_TOKEN_LENGTH or any(c.isspace() or ord(c) < 0x21 for c in token):
            raise ValueError(f"entry #{i}: tokens must be printable, without spaces, "
                             f"at most {MAX_TOKEN_LENGTH} characters")
        name = limits = None
        if isinstance(scope, dict) and any(k in scope for k in CLIENT_KEYS):
            name, limits = scope.get("name"), scope.get("limits")
            scope = {k: v for k, v in scope.items() if k not in CLIENT_KEYS}
        try:
            tenant = tenant_from_config(scope)
            client = make_client(name, limits, unnamed_client(token).key)
        except (TenantConfigError, ClientConfigError) as exc:
            raise ValueError(f"entry #{i}: {exc}") from None
        out.append(ScopedToken(token, tenant, client))
    return out


def _split(value: Any, *, objects: bool = False) -> Any:
    """A comma-separated string or a JSON list to a list of stripped, non-empty strings;
    with `objects`, also a JSON object of token -> scope (to ScopedTokens)."""
    if isinstance(value, SecretStr) and not isinstance(value, ScopedToken):
        value = value.get_secret_value()
    if objects and isinstance(value, dict):
        return scoped_tokens(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if objects and text.startswith("{"):
            return parse_token_object(text)
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                # Never echo the raw value: it may hold tokens.
                raise ValueError("not a valid JSON list") from None
        else:
            value = text.split(",")
    if isinstance(value, (list, tuple)):
        out: list[str | ScopedToken] = []
        for v in value:
            if isinstance(v, ScopedToken):
                out.append(v)
                continue
            s = v.get_secret_value() if isinstance(v, SecretStr) else str(v)
            if s.strip():
                out.append(s.strip())
        return out
    return value


class SecuritySettings(BaseSettings):
    """Each field is an environment variable of the same name (case-insensitive)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False,
                                      hide_input_in_errors=True)

    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_tokens_file: Path | None = None
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_request_body_bytes: int = Field(default=16384, ge=0)
    max_query_string_bytes: int = Field(default=4096, ge=64)
    max_path_bytes: int = Field(default=2048, ge=64)

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        return _split(v, objects=True)

    @field_validator("cors_allow_origins", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split(v)

    @field_validator("api_tokens")
    @classmethod
    def _token_shape(cls, v: list[SecretStr]) -> list[SecretStr]:
        for t in v:
            s = t.get_secret_value()
            if len(s) > MAX_TOKEN_LENGTH or any(c.isspace() or ord(c) < 0x21 for c in s):
                raise ValueError("API_TOKENS entries must be printable, without spaces, "
                                 f"at most {MAX_TOKEN_LENGTH} characters")
        return v

    @model_validator(mode="after")
    def _no_wildcard_with_tokens(self) -> SecuritySettings:
        if "*" in self.cors_allow_origins and self.auth_enabled:
            raise ValueError("CORS_ALLOW_ORIGINS='*' is refused when API tokens are configured; "
                             "list the origins")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_tokens) or self.api_tokens_file is not None

    def token_tenants(self) -> list[Tenant]:
        """The tenant of each API_TOKENS entry, in order (UNCONFINED for the list forms)."""
        return [t.tenant if isinstance(t, ScopedToken) else UNCONFINED for t in self.api_tokens]

    def token_clients(self) -> list[Client]:
        """The client of each API_TOKENS entry, in order (unnamed for the list forms)."""
        return [t.client if isinstance(t, ScopedToken) else unnamed_client(t.get_secret_value())
                for t in self.api_tokens]


class TokenSource:
    """The accepted tokens, as bytes, and the tenant of each: the settings' entries plus
    the file's current ones.

    The file is read through the one secret-file reader (``app.common.secrets``):
    re-read when it changes, never adopted while empty, half-written or missing
    (the last good list stays in force: a rotation mid-write must neither lock
    valid callers out nor let everyone in). A file that was never readable means
    no token from the file: fail closed. A file whose JSON object does not parse
    (or names a scope that cannot be enforced) is not adopted either: its last good
    contents stay in force, with one log line per episode and
    ``metrics_gateway_secret_file_errors_total{secret="api_tokens",reason="invalid"}``.
    """

    def __init__(self, settings: SecuritySettings) -> None:
        self._static = [t.get_secret_value().encode() for t in settings.api_tokens]
        self._static_tenants = settings.token_tenants()
        self._static_clients = settings.token_clients()
        self._file_clients: list[Client] = []
        self._file = SecretFile(settings.api_tokens_file, "api_tokens") if settings.api_tokens_file else None
        self._parsed_from: str | None = None
        self._from_file: list[bytes] = []
        self._file_tenants: list[Tenant] = []
        self._invalid = FailureEpisode(f"API tokens file {settings.api_tokens_file}", log)
        self.enabled = settings.auth_enabled

    def tokens(self) -> list[bytes]:
        return self.grants()[0]

    def grants(self) -> tuple[list[bytes], list[Tenant]]:
        """Every accepted token and, at the same index, its tenant (API_TOKENS first)."""
        if self._file is None:
            return self._static, self._static_tenants
        try:
            text = self._file.read()
        except SecretUnavailable:
            return self._static, self._static_tenants
        if text is not self._parsed_from:
            self._parse_file(text)
        return self._static + self._from_file, self._static_tenants + self._file_tenants

    def client_at(self, index: int) -> Client:
        """The client of the token at `index` of the last grants() (API_TOKENS first)."""
        static = len(self._static_clients)
        if index < static:
            return self._static_clients[index]
        return self._file_clients[index - static]

    def _parse_file(self, text: str) -> None:
        if text.lstrip().startswith("{"):
            try:
                entries = parse_token_object(text)
            except ValueError as exc:
                SECRET_FILE_ERRORS.labels("api_tokens", "invalid").inc()
                self._invalid.failure(f"not adopted ({exc}); keeping its last good contents")
                self._parsed_from = text  # judged once per version of the file
                return
            self._from_file = [t.get_secret_value().encode() for t in entries]
            self._file_tenants = [t.tenant for t in entries]
            self._file_clients = [t.client for t in entries]
        else:
            lines = lines_of(text)
            self._from_file = [line.encode() for line in lines]
            self._file_tenants = [UNCONFINED] * len(self._from_file)
            self._file_clients = [unnamed_client(line) for line in lines]
        self._parsed_from = text
        self._invalid.success()

    def __repr__(self) -> str:
        return f"TokenSource(enabled={self.enabled}, file={self._file!r})"
