"""The one settings root: every feature's settings, read from the environment once.

``create_app()`` (and the Celery factory for the workers' part) builds an
``AppSettings`` once and passes each feature only its own narrow settings object;
no module reads the environment at import or per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.gateway.settings import GatewaySettings
from app.monitoring.settings import MonitoringSettings
from app.security.settings import SecuritySettings
from app.vrops.settings import VropsSettings


class OpsSettings(BaseSettings):
    """Process-wide knobs: logging and readiness."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    ready_timeout_seconds: float = Field(default=1.5, ge=0.05, le=5.0)


@dataclass(frozen=True)
class AppSettings:
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    vrops: VropsSettings = field(default_factory=VropsSettings)
    ops: OpsSettings = field(default_factory=OpsSettings)

    def __post_init__(self) -> None:
        # The gateway's shared tier uses the deployment's Redis unless told otherwise:
        # GATEWAY_CACHE_URL unset and REDIS_URL set means "share through REDIS_URL".
        # Wired here, where both features' settings meet, so neither reads the other's.
        gw = self.gateway
        if "gateway_cache_url" not in gw.model_fields_set and "redis_url" in self.vrops.model_fields_set:
            shared = gw.model_copy(update={"gateway_cache_url": self.vrops.redis_url})
            object.__setattr__(self, "gateway", shared)
