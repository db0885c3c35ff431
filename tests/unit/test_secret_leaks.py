"""Upstream credentials never in settings reprs, log lines or answers (issue 5 audit).

Leaks found here were fixed by their owners (b65bcb0); these tests keep them fixed.
"""

from __future__ import annotations

import logging
import socket

import pytest
from pydantic import SecretStr

from app.gateway.settings import GatewaySettings
from app.gateway.upstream.answers import UpstreamError
from app.gateway.upstream.client import PrometheusClient
from app.vrops.settings import VropsSettings

SECRET = "pw-S3CRET-value"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_secretstr_fields_are_hidden_in_reprs() -> None:
    s = GatewaySettings(prometheus_url="http://127.0.0.1:1", prometheus_bearer_token=SecretStr(SECRET),
                 prometheus_username="u", prometheus_password=SecretStr(SECRET))
    assert SECRET not in repr(s) and SECRET not in str(s) and SECRET not in s.model_dump_json()


async def test_bearer_and_password_not_logged_on_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = GatewaySettings(prometheus_url=f"http://127.0.0.1:{_closed_port()}", prometheus_bearer_token=SecretStr(SECRET),
                 prometheus_username="u", prometheus_password=SecretStr(SECRET))
    c = PrometheusClient(s)
    try:
        with pytest.raises(UpstreamError) as err:
            await c.query("up", timeout=1, category="t")
    finally:
        await c.aclose()
    assert SECRET not in caplog.text and SECRET not in str(err.value)


async def test_userinfo_in_prometheus_url_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = GatewaySettings(prometheus_url=f"http://user:{SECRET}@127.0.0.1:{_closed_port()}")
    c = PrometheusClient(s)
    try:
        with pytest.raises(UpstreamError):
            await c.query("up", timeout=1, category="t")
    finally:
        await c.aclose()
    assert SECRET not in caplog.text


def test_settings_repr_hides_header_values_and_url_userinfo() -> None:
    s = GatewaySettings(prometheus_url=f"http://user:{SECRET}@127.0.0.1:1",
                 prometheus_headers={"Authorization": f"Bearer {SECRET}"})
    assert SECRET not in repr(s)


def test_vrops_settings_repr_hides_redis_password() -> None:
    s = VropsSettings(redis_url=f"redis://:{SECRET}@127.0.0.1:1/0")
    assert SECRET not in repr(s)
