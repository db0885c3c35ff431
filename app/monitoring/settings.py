"""Settings of the service's own /metrics endpoint (environment variables).

Kept apart from ``app.config.Settings`` so the monitoring package owns its knobs;
the names are plain environment variables:

- ``METRICS_TOKEN``: bearer token required on GET /metrics (unset: open).
- ``METRICS_TOKEN_FILE``: file holding that token (re-read on every scrape).
- ``METRICS_APP_NAME``: value of the ``app_name`` label on HTTP metrics.
- ``PROMETHEUS_MULTIPROC_DIR``: prometheus_client's multiprocess directory.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class MonitoringSettings(BaseSettings):
    """Each field is an environment variable of the same name (case-insensitive)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    metrics_token: SecretStr | None = None
    metrics_token_file: Path | None = None
    metrics_app_name: str = "metrics-gateway"
    prometheus_multiproc_dir: Path | None = None

    def token(self) -> str | None:
        """The token from the variable, else from the file; empty means no token."""
        if self.metrics_token is not None and self.metrics_token.get_secret_value():
            return self.metrics_token.get_secret_value()
        if self.metrics_token_file is not None:
            value = self.metrics_token_file.read_text().strip()
            return value or None
        return None
