"""vROps collection settings (pydantic-settings; each field is an env var of the same name).

Separate from app.gateway.settings.Settings so workers can start without the gateway's knobs.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.common.secrets import SecretFile, SecretUnavailable

_PASSWORD_FILES: dict[Path, SecretFile] = {}
_TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

DEFAULT_STAT_KEYS = [
    "cpu|usage_average",
    "mem|usage_average",
    "diskspace|used",
    "diskspace|total_capacity",
    "badge|health",
]


class VropsTarget(BaseModel):
    """One vROps / Aria Operations instance to collect from."""

    name: str
    url: str
    username: str
    password: SecretStr | None = None
    password_file: Path | None = None
    auth_source: str = "Local"
    verify_tls: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TARGET_NAME.match(v):
            raise ValueError("target name must match [A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip()
        if not v.startswith(("http://", "https://")):
            raise ValueError("target url must start with http:// or https://")
        return v.rstrip("/")

    def secret(self, fallback_file: Path | None = None) -> str:
        """The password: inline, else this target's file, else VROPS_PASSWORD_FILE.

        Files go through the one secret-file reader: a rotated secret is picked
        up, a half-written one is not adopted.
        """
        if self.password is not None:
            return self.password.get_secret_value()
        path = self.password_file or fallback_file
        if path is not None:
            source = _PASSWORD_FILES.get(path)
            if source is None:
                source = _PASSWORD_FILES[path] = SecretFile(path, "vrops_password")
            try:
                return source.read()
            except SecretUnavailable as exc:
                raise ValueError(f"password file of vROps target {self.name} unreadable: {exc}") from None
        raise ValueError(f"no password configured for vROps target {self.name}")


class VropsSettings(BaseSettings):
    """Background collection knobs; see docs/vrops.md for the table."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # repr=False: a Redis URL may carry a password.
    redis_url: str = Field(default="redis://localhost:6379/0", repr=False)
    celery_broker_url: str | None = Field(default=None, repr=False)

    vrops_targets: list[VropsTarget] = Field(default_factory=list)
    vrops_password_file: Path | None = None
    vrops_stat_keys: list[str] = Field(default_factory=lambda: list(DEFAULT_STAT_KEYS))
    vrops_object_kinds: list[str] = Field(
        default_factory=lambda: ["HostSystem", "VirtualMachine", "Datastore"]
    )

    # Schedules: inventory is slow-moving, statistics are the fast cycle.
    vrops_inventory_interval_seconds: float = Field(default=900.0, gt=0)
    vrops_stats_interval_seconds: float = Field(default=60.0, gt=0)
    vrops_worker_ping_interval_seconds: float = Field(default=15.0, gt=0)

    # Redis retention.
    vrops_sample_ttl_seconds: int = Field(default=3600, ge=1)
    vrops_latest_ttl_seconds: int = Field(default=86400, ge=1)
    vrops_stale_after_seconds: float = Field(default=900.0, gt=0)

    # vROps HTTP.
    vrops_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    vrops_read_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    vrops_max_retries: int = Field(default=2, ge=0, le=10)
    vrops_retry_backoff_seconds: float = Field(default=0.5, ge=0, le=30)
    vrops_batch_size: int = Field(default=1000, ge=1, le=1000)
    vrops_page_size: int = Field(default=1000, ge=1, le=5000)
    vrops_max_concurrency: int = Field(default=4, ge=1, le=32)
    vrops_token_renew_margin_seconds: float = Field(default=300.0, ge=0)
    vrops_collection_timeout_seconds: float = Field(default=120.0, gt=0)

    # Redis client timeouts: the API must answer fast, workers write bigger pipelines.
    vrops_redis_timeout_seconds: float = Field(default=0.5, gt=0, le=30)
    vrops_worker_redis_timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    # Jobs: rolling window for the success ratio and the queues whose depth is exported.
    vrops_job_window_seconds: float = Field(default=300.0, gt=0)
    vrops_queues: list[str] = Field(default_factory=lambda: ["celery"])

    @model_validator(mode="after")
    def _unique_targets(self) -> VropsSettings:
        names = [t.name for t in self.vrops_targets]
        if len(names) != len(set(names)):
            raise ValueError("VROPS_TARGETS names must be unique")
        return self

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    def target(self, name: str) -> VropsTarget:
        for t in self.vrops_targets:
            if t.name == name:
                return t
        raise KeyError(name)


@lru_cache(maxsize=1)
def get_vrops_settings() -> VropsSettings:
    return VropsSettings()
