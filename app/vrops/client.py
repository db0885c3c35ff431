"""Async vROps Suite API client: token auth, paging, batched latest stats.

- Token: `POST /suite-api/api/auth/token/acquire`, sent as
  `Authorization: vRealizeOpsToken <token>`; renewed `renew_margin` seconds before
  `validity` runs out, and once more (with one retry of the request) on a 401
  (vROps says apiErrorCode 1512 for an expired token).
- Every request has connect and read timeouts; transport errors, timeouts, 429
  and 5xx are retried at most `max_retries` times with exponential backoff.
- Latest stats are asked in batches of at most 1,000 resource ids, a few batches
  at a time.
- No password or token is ever logged: log lines name the target, path and status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from app.vrops.settings import VropsSettings, VropsTarget

log = logging.getLogger(__name__)

API = "/suite-api/api"
MAX_IDS_PER_STATS_CALL = 1000
EXPIRED_TOKEN_CODE = 1512


class VropsError(Exception):
    """The vROps request failed after retries; the message carries no secret."""


class VropsAuthError(VropsError):
    """Credentials were refused, or a fresh token was refused again."""


@dataclass
class Token:
    value: str
    validity_ms: int


@dataclass(frozen=True)
class Resource:
    identifier: str
    name: str
    kind: str


@dataclass(frozen=True)
class StatValue:
    resource_id: str
    stat_key: str
    timestamp_ms: int
    value: float


class TokenCache:
    """Per-process token store so consecutive tasks reuse a still-valid token."""

    def __init__(self) -> None:
        self._tokens: dict[str, Token] = {}

    def get(self, key: str) -> Token | None:
        return self._tokens.get(key)

    def put(self, key: str, token: Token | None) -> None:
        if token is None:
            self._tokens.pop(key, None)
        else:
            self._tokens[key] = token


class VropsClient:
    def __init__(
        self,
        target: VropsTarget,
        settings: VropsSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        token_cache: TokenCache | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.target = target
        self.settings = settings
        self._clock = clock
        self._sleep = sleep
        self._cache = token_cache or TokenCache()
        self._cache_key = f"{target.name}|{target.url}|{target.username}"
        self._lock = asyncio.Lock()
        timeout = httpx.Timeout(
            settings.vrops_read_timeout_seconds,
            connect=settings.vrops_connect_timeout_seconds,
        )
        self._http = httpx.AsyncClient(
            base_url=target.url,
            timeout=timeout,
            verify=target.verify_tls,
            transport=transport,
            headers={"Accept": "application/json"},
            limits=httpx.Limits(max_connections=settings.vrops_max_concurrency + 1),
        )
        self.requests = 0
        self.token_acquisitions = 0

    async def __aenter__(self) -> VropsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- authentication -------------------------------------------------------------

    def _token_fresh(self, token: Token | None) -> bool:
        if token is None:
            return False
        margin_ms = self.settings.vrops_token_renew_margin_seconds * 1000
        return self._clock() * 1000 < token.validity_ms - margin_ms

    async def _token(self, *, force: bool = False, stale: str | None = None) -> str:
        async with self._lock:
            current = self._cache.get(self._cache_key)
            # Another coroutine may have renewed while we waited for the lock.
            if current is not None and stale is not None and current.value != stale:
                return current.value
            if not force and current is not None and self._token_fresh(current):
                return current.value
            token = await self._acquire()
            self._cache.put(self._cache_key, token)
            return token.value

    async def _acquire(self) -> Token:
        body = {
            "username": self.target.username,
            "password": self.target.secret(self.settings.vrops_password_file),
            "authSource": self.target.auth_source,
        }
        resp = await self._send("POST", f"{API}/auth/token/acquire", json=body, token=None)
        if resp.status_code in (401, 403):
            raise VropsAuthError(
                f"vROps {self.target.name}: token acquire refused (HTTP {resp.status_code})"
            )
        if resp.status_code != 200:
            raise VropsError(
                f"vROps {self.target.name}: token acquire failed (HTTP {resp.status_code})"
            )
        data = resp.json()
        self.token_acquisitions += 1
        validity = int(data.get("validity") or (self._clock() + 1800) * 1000)
        log.info("vROps %s: token acquired", self.target.name)
        return Token(value=str(data["token"]), validity_ms=validity)

    # -- transport --------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        params: dict[str, Any] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        """One logical request with bounded retries on timeouts, transport errors, 429, 5xx."""
        headers = {"Authorization": f"vRealizeOpsToken {token}"} if token else None
        attempts = self.settings.vrops_max_retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                delay = self.settings.vrops_retry_backoff_seconds * (2 ** (attempt - 1))
                await self._sleep(min(delay, 30.0))
            try:
                self.requests += 1
                resp = await self._http.request(
                    method, path, params=params, json=json, headers=headers
                )
            except httpx.TimeoutException as exc:
                last = f"timeout ({type(exc).__name__})"
                continue
            except httpx.TransportError as exc:
                last = f"transport error ({type(exc).__name__})"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}"
                continue
            return resp
        raise VropsError(
            f"vROps {self.target.name}: {method} {path} failed after {attempts} attempts: {last}"
        )

    async def request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None
    ) -> Any:
        """Authenticated request; on 401 re-acquire the token and retry exactly once."""
        token = await self._token()
        resp = await self._send(method, path, token=token, params=params, json=json)
        if resp.status_code == 401:
            code = _api_error_code(resp)
            log.info(
                "vROps %s: 401 (apiErrorCode %s) on %s, renewing token",
                self.target.name, code, path,
            )
            token = await self._token(force=True, stale=token)
            resp = await self._send(method, path, token=token, params=params, json=json)
            if resp.status_code == 401:
                self._cache.put(self._cache_key, None)
                raise VropsAuthError(
                    f"vROps {self.target.name}: {path} unauthorized after token renewal"
                )
        if resp.status_code >= 400:
            raise VropsError(
                f"vROps {self.target.name}: {method} {path} answered HTTP {resp.status_code}"
            )
        return resp.json()

    # -- API calls -----------------------------------------------------------------

    async def list_resources(self, resource_kind: str) -> list[Resource]:
        """All resources of a kind, following pages."""
        out: list[Resource] = []
        page = 0
        size = self.settings.vrops_page_size
        while True:
            data = await self.request(
                "GET", f"{API}/resources",
                params={"resourceKind": resource_kind, "page": page, "pageSize": size},
            )
            items = data.get("resourceList") or []
            out.extend(_resource(r) for r in items)
            total = int((data.get("pageInfo") or {}).get("totalCount", len(out)))
            page += 1
            if not items or len(out) >= total:
                return out

    async def descendants(
        self, parent_ids: Sequence[str], kinds: Sequence[str]
    ) -> list[tuple[Resource, list[str]]]:
        """Resources of `kinds` below the parents, each with the parent ids it hangs under."""
        out: list[tuple[Resource, list[str]]] = []
        size = self.settings.vrops_page_size
        for start in range(0, len(parent_ids), MAX_IDS_PER_STATS_CALL):
            chunk = list(parent_ids[start:start + MAX_IDS_PER_STATS_CALL])
            page = 0
            got = 0
            while True:
                data = await self.request(
                    "POST", f"{API}/resources/bulk/relationships",
                    params={"page": page, "pageSize": size},
                    json={
                        "relationshipType": "DESCENDANT",
                        "resourceIds": chunk,
                        "hierarchyDepth": 10,
                        "resourceQuery": {"resourceKind": list(kinds)},
                    },
                )
                rels = data.get("resourcesRelations") or []
                for rel in rels:
                    related = [str(x.get("identifier", "")) if isinstance(x, dict) else str(x)
                               for x in rel.get("relatedResources") or []]
                    out.append((_resource(rel["resource"]), related))
                got += len(rels)
                total = int((data.get("pageInfo") or {}).get("totalCount", got))
                page += 1
                if not rels or got >= total:
                    break
        return out

    async def latest_stats(
        self, resource_ids: Sequence[str], stat_keys: Sequence[str]
    ) -> tuple[list[StatValue], list[str]]:
        """Latest values for every id, in batches of <= 1,000 ids, a few concurrently.

        Returns (values, errors): a failed batch is reported, not fatal for the others.
        """
        size = min(self.settings.vrops_batch_size, MAX_IDS_PER_STATS_CALL)
        batches = [list(resource_ids[i:i + size]) for i in range(0, len(resource_ids), size)]
        sem = asyncio.Semaphore(self.settings.vrops_max_concurrency)
        values: list[StatValue] = []
        errors: list[str] = []

        async def one(batch: list[str]) -> None:
            async with sem:
                try:
                    data = await self.request(
                        "POST", f"{API}/resources/stats/latest/query",
                        json={"resourceId": batch, "statKey": list(stat_keys),
                              "currentOnly": True},
                    )
                except VropsAuthError:
                    raise
                except VropsError as exc:
                    errors.append(str(exc))
                    return
            values.extend(parse_latest(data))

        await asyncio.gather(*(one(b) for b in batches))
        return values, errors


def _api_error_code(resp: httpx.Response) -> int | None:
    try:
        code = resp.json().get("apiErrorCode")
    except (ValueError, AttributeError):
        return None
    return int(code) if code is not None else None


def _resource(r: dict[str, Any]) -> Resource:
    key = r.get("resourceKey") or {}
    return Resource(
        identifier=str(r["identifier"]),
        name=str(key.get("name", r["identifier"])),
        kind=str(key.get("resourceKindKey", "")),
    )


def parse_latest(data: dict[str, Any]) -> list[StatValue]:
    """Flatten a stats/latest/query answer into (resource, key, timestamp, value) rows."""
    out: list[StatValue] = []
    for item in data.get("values") or []:
        rid = str(item.get("resourceId", ""))
        for stat in (item.get("stat-list") or {}).get("stat") or []:
            key = (stat.get("statKey") or {}).get("key")
            ts = stat.get("timestamps") or []
            vals = stat.get("data") or []
            if not key or not ts or not vals:
                continue
            # currentOnly answers carry one point; keep the newest if there are more.
            out.append(StatValue(rid, str(key), int(ts[-1]), float(vals[-1])))
    return out
