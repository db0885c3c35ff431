"""Settings of the service's own /metrics endpoint (environment variables).

Kept apart from ``app.gateway.settings.Settings`` so the monitoring package owns its knobs;
the names are plain environment variables:

- ``METRICS_TOKEN``: bearer token required on GET /metrics (unset: open).
- ``METRICS_TOKEN_FILE``: file holding that token (re-read when it changes).
- ``METRICS_APP_NAME``: value of the ``app_name`` label on HTTP metrics.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.common.secrets import SecretFile, SecretUnavailable


class MonitoringSettings(BaseSettings):
    """Each field is an environment variable of the same name (case-insensitive)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    metrics_token: SecretStr | None = None
    metrics_token_file: Path | None = None
    metrics_app_name: str = "metrics-gateway"

    def token_provider(self) -> Callable[[], str | None]:
        """The expected /metrics token, read now (variable) or on each scrape (file).

        A token file that was never readable fails closed: no token matches.
        """
        if self.metrics_token is not None and self.metrics_token.get_secret_value():
            fixed = self.metrics_token.get_secret_value()
            return lambda: fixed
        if self.metrics_token_file is None:
            return lambda: None
        source = SecretFile(self.metrics_token_file, "metrics_token")
        unguessable = secrets.token_hex(32)

        def from_file() -> str | None:
            try:
                return source.read()
            except SecretUnavailable:
                return unguessable
        return from_file
