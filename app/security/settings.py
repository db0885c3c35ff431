"""Settings of the API's access control and request limits (environment variables).

- ``API_TOKENS``: bearer tokens accepted on /prometheus/... and /vrops/...; several
  at once (rotation: add the new one, roll clients, remove the old one), given as
  a comma-separated list (``a,b``) or a JSON list (``["a","b"]``).
- ``API_TOKENS_FILE``: a file of tokens, one per line (blank lines and lines
  starting with ``#`` ignored); re-read when it changes, so rotating the file
  needs no restart. Both may be set; the union is accepted.
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

import json
import logging
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.common.secrets import MAX_TOKEN_LENGTH, SecretFile, SecretUnavailable, lines_of

log = logging.getLogger("gateway.security")


def _split(value: Any) -> Any:
    """A comma-separated string or a JSON list, to a list of stripped, non-empty strings."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                # Never echo the raw value: it may hold tokens.
                raise ValueError("not a valid JSON list") from None
        else:
            value = text.split(",")
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
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

    @field_validator("api_tokens", "cors_allow_origins", mode="before")
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


class TokenSource:
    """The accepted tokens, as bytes: the settings' list plus the file's current lines.

    The file is read through the one secret-file reader (``app.common.secrets``):
    re-read when it changes, never adopted while empty, half-written or missing
    (the last good list stays in force: a rotation mid-write must neither lock
    valid callers out nor let everyone in). A file that was never readable means
    no token from the file: fail closed.
    """

    def __init__(self, settings: SecuritySettings) -> None:
        self._static = [t.get_secret_value().encode() for t in settings.api_tokens]
        self._file = SecretFile(settings.api_tokens_file, "api_tokens") if settings.api_tokens_file else None
        self._parsed_from: str | None = None
        self._from_file: list[bytes] = []
        self.enabled = settings.auth_enabled

    def tokens(self) -> list[bytes]:
        if self._file is None:
            return self._static
        try:
            text = self._file.read()
        except SecretUnavailable:
            return self._static
        if text is not self._parsed_from:
            self._from_file = [line.encode() for line in lines_of(text)]
            self._parsed_from = text
        return self._static + self._from_file

    def __repr__(self) -> str:
        return f"TokenSource(enabled={self.enabled}, file={self._file!r})"
