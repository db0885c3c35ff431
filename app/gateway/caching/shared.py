"""The shared tier: one figure cache, one fetch in flight and one set of last good
values for every worker of every replica, in Redis.

Without it each process caches and coalesces alone: N workers x M replicas ask
Prometheus N x M times per figure per TTL window, and the last good values die
with the process that held them. With it (``GATEWAY_CACHE_URL``, or ``REDIS_URL``)
the engine looks up figures local tier -> shared tier -> fleet-wide single
flight -> upstream:

- fresh: one entry per figure, expiring at the end of its TTL grid step on the
  wall clock (``PXAT``), so every process of every replica expires and refetches
  the figure at the same instant;
- lock: ``SET NX PX`` with an owner token, claimed in the same atomic step that
  found no fresh entry (a Lua script, one round trip for a whole batch); the
  holder renews it while its fetch runs, so a holder that dies or hangs blocks
  the others for at most one lease, after which one of them takes over;
- res: the holder's outcome (answer or failure) tagged with its token, handed to
  the processes that waited on *that* flight only; a failure is never stored as
  an answer, so the next request simply tries again (no poisoned retries);
- good: the last good answer with its ``fetched_at``, kept ``STALE_MAX_AGE_SECONDS``,
  so a replica started during an outage serves stale values with their true age.

Keys are namespaced and versioned, ``<prefix>:v<format>:<catalog hash>:{<tag>}:<kind>:<sha>``
(the sha of the cache key): a changed catalog or format reads none of the old
entries. The braces hold the Redis Cluster hash tag, chosen by what must stay
together: a figure's keys carry its tenant's tag (per tenant and catalog), so one
script call serves a request's whole batch; range extents, remembered answers and
their flights carry their own key's, so they spread over every master of a cluster.
Values are compact JSON, zlib-compressed when that pays, never pickle, and
bounded in size (a larger answer is not shared, only kept locally).

Redis down, slow or full never fails a request: every command is bounded by
``GATEWAY_CACHE_TIMEOUT_SECONDS`` and by the request deadline, a breaker of the
tier's own stops asking while it fails, and the engine then works as a single
process does (local tier, local single flight, upstream). One log line per
episode, and metrics (``metrics_gateway_shared_cache_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.common.episodes import FailureEpisode
from app.common.redis import AsyncRedis, make_redis_client
from app.common.redis_topology import TopologyWatch
from app.gateway import metrics as gm
from app.gateway.caching.clock import to_monotonic, to_wall
from app.gateway.caching.codec import _BIG, Codec, CodecError
from app.gateway.catalog.model import Catalog
from app.gateway.result import Fetched, UpstreamFailure
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.breaker import CircuitBreaker

log = logging.getLogger("gateway.shared")

FORMAT_VERSION: Final = 2  # 2: hash tags per tenant (figures) and per key (ranges)
_T = TypeVar("_T")


# -- keys ---------------------------------------------------------------------------------

def catalog_fingerprint(catalog: Catalog) -> str:
    """A short hash of everything in the catalog that shapes a cached answer.

    Part of every key: a deployment with another catalog (a changed expression,
    kept labels, or batching) shares nothing with one running the old catalog.
    """
    doc = [[q.id, q.expr, list(q.labels), q.batchable, q.kind]
           for q in sorted(catalog.queries.values(), key=lambda q: q.id)]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class FigureKeys:
    fresh: str
    good: str
    lock: str
    res: str
    tag: str  # the Redis Cluster hash tag: keys of one tag may meet in one script call


class KeySpace:
    """``<prefix>:v<format>:<catalog hash>:{<tag>}:<kind>:<sha256 of the cache key>``.

    The braces hold the Redis Cluster hash tag, so the tag decides the slot (and the
    master). `of(key)` tags a key by its own hash: keys that are read one at a time
    (range extents, remembered answers, their flights) spread over every slot.
    `of(key, together=group)` tags it by the group's hash (and the catalog's): every
    key of a group shares one slot, so one script call can serve a batch of them.
    """

    def __init__(self, prefix: str, catalog_hash: str, version: int = FORMAT_VERSION) -> None:
        self.catalog_hash = catalog_hash
        self.namespace = f"{prefix}:v{version}:{catalog_hash}"
        self._memo: dict[tuple[str, str | None], FigureKeys] = {}

    def of(self, key: str, together: str | None = None) -> FigureKeys:
        keys = self._memo.get((key, together))
        if keys is None:
            sha = hashlib.sha256(key.encode()).hexdigest()[:32]
            if together is None:
                tag = sha[:16]
            else:
                tag = "g" + hashlib.sha256(f"{self.catalog_hash}|{together}".encode()).hexdigest()[:15]
            ns = f"{self.namespace}:{{{tag}}}"
            keys = FigureKeys(f"{ns}:fresh:{sha}", f"{ns}:good:{sha}", f"{ns}:lock:{sha}", f"{ns}:res:{sha}", tag)
            if len(self._memo) >= 8192:  # keys come from the catalog and bounded filters
                self._memo.clear()
            self._memo[(key, together)] = keys
        return keys

    def figure(self, key: str) -> FigureKeys:
        """A figure's keys, tagged by its tenant: the engine's figure keys lead with the
        tenant id and ``|``, and one request (one tenant) claims its batch in one call."""
        return self.of(key, together=key.partition("|")[0])

    def pick(self, key: str, figures: bool) -> FigureKeys:
        return self.figure(key) if figures else self.of(key)


# -- codec --------------------------------------------------------------------------------


# -- scripts: one call (one round trip, one command) per batch of figures ------------------
# A script's keys share one Redis Cluster slot (one hash tag: a tenant's figures, or
# one range key's four keys); a batch spanning tags runs one call per tag. Run by
# EVALSHA (redis-py loads them on NOSCRIPT, also on a replica promoted by a failover).

# KEYS: (fresh, lock, good) per figure. ARGV: token, lease ms, then "1"/"0" per figure
# (also return its last good value).
# -> per figure: {1, fresh} | {2, "", good} (lock taken) | {3, holder, good} (another fetches)
_CLAIM: Final = """
local out = {}
for i = 1, #KEYS / 3 do
  local fresh, lock, good = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local v = redis.call('GET', fresh)
  if v then
    out[i] = {1, v}
  else
    local g = ''
    if ARGV[2 + i] == '1' then g = redis.call('GET', good) or '' end
    if redis.call('SET', lock, ARGV[1], 'NX', 'PX', ARGV[2]) then
      out[i] = {2, '', g}
    else
      out[i] = {3, redis.call('GET', lock) or '', g}
    end
  end
end
return out
"""

# KEYS: (res, lock, fresh) per figure. ARGV: own token, lease ms, then the awaited token
# per figure.
# -> per figure: {0} still in flight | {1, res} its outcome | {2, fresh} answered by another
#    flight | {3, holder} another holder took over | {4} the holder vanished: the lock is ours
_POLL: Final = """
local out = {}
for i = 1, #KEYS / 3 do
  local res, lock, fresh = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local awaited = ARGV[2 + i]
  local r = redis.call('GET', res)
  if r and string.sub(r, 1, string.len(awaited)) == awaited then
    out[i] = {1, string.sub(r, string.len(awaited) + 1)}
  else
    local holder = redis.call('GET', lock)
    if holder == awaited then
      out[i] = {0}
    else
      local v = redis.call('GET', fresh)
      if v then
        out[i] = {2, v}
      elseif holder then
        out[i] = {3, holder}
      else
        redis.call('SET', lock, ARGV[1], 'PX', ARGV[2])
        out[i] = {4}
      end
    end
  end
end
return out
"""

# KEYS: (fresh, good, res, lock) per figure. ARGV: token, res PX ms, good PX ms, then per
# figure: entry, fresh PXAT ms ("0": not fresh), "1"/"0" (keep as last good), res body
# ("" = the entry itself).
_PUBLISH: Final = """
for i = 1, #KEYS / 4 do
  local fresh, good, res, lock = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i]
  local entry, fresh_at, keep, body = ARGV[4 * i], ARGV[4 * i + 1], ARGV[4 * i + 2], ARGV[4 * i + 3]
  if fresh_at ~= '0' then redis.call('SET', fresh, entry, 'PXAT', fresh_at) end
  if keep == '1' and ARGV[3] ~= '0' then redis.call('SET', good, entry, 'PX', ARGV[3]) end
  if body == '' then body = entry end
  redis.call('SET', res, ARGV[1] .. body, 'PX', ARGV[2])
  if redis.call('GET', lock) == ARGV[1] then redis.call('DEL', lock) end
end
return 1
"""

# KEYS: locks. ARGV: token, lease ms.
_RENEW: Final = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
return 1
"""


# -- the tier -----------------------------------------------------------------------------

class Lead:
    """Wait outcome: the awaited holder vanished and this process holds the lock now."""


class Alone:
    """Wait outcome: the shared tier cannot help (Redis failed, answer too large to
    share): fetch without it."""


LEAD: Final = Lead()
ALONE: Final = Alone()
WaitOutcome = Fetched | UpstreamFailure | Lead | Alone


@dataclass(slots=True)
class Claim:
    """What one claim of a batch of keys found."""

    token: str
    hits: dict[str, Fetched] = field(default_factory=dict)  # fresh answers (expires_at: this process's clock)
    led: list[str] = field(default_factory=list)  # locks won: fetch these and publish
    awaited: dict[str, str] = field(default_factory=dict)  # key -> the holder's token
    good: dict[str, Fetched] = field(default_factory=dict)  # last good values found on the way


def _local(fetched: Fetched, wall_expiry: float) -> Fetched:
    """The answer as this process keeps it: fresh until the wall-clock expiry, on its own clock."""
    return dataclasses.replace(fetched, expires_at=to_monotonic(wall_expiry))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RedisTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    if isinstance(exc, OutOfMemoryError):
        return "oom"
    if isinstance(exc, CodecError):
        return "corrupt"
    return "response"


class SharedTier:
    """Store, lock/lease and codec of the shared tier. The engine decides who fetches;
    this class only says what Redis holds and hands outcomes between processes."""

    POLL_FIRST: Final = 0.001
    POLL_GROWTH: Final = 1.5
    POLL_MAX: Final = 0.025

    def __init__(self, settings: GatewaySettings, client: AsyncRedis, catalog_hash: str) -> None:
        self.settings = settings
        self.client = client
        self.keys = KeySpace(settings.gateway_cache_prefix, catalog_hash)
        self.codec = Codec(settings.gateway_cache_max_entry_bytes, settings.gateway_cache_compress_min_bytes)
        self.timeout = settings.gateway_cache_timeout_seconds
        self.lease_ms = max(1, round(settings.gateway_cache_lock_lease_seconds * 1000))
        self.breaker = CircuitBreaker(settings.gateway_cache_breaker_threshold,
                                      settings.gateway_cache_breaker_reset_seconds,
                                      on_change=gm.set_shared_breaker_state)
        # A Redis Cluster whose one master is down answers on the others meanwhile: its
        # episode ends after a breaker period of successes without a failure, not at the
        # first command a healthy master answers.
        self.episode = FailureEpisode(
            "shared cache tier (Redis)", log,
            settle_seconds=settings.gateway_cache_breaker_reset_seconds if isinstance(client, RedisCluster) else 0.0)
        # A Redis Cluster's failovers and slot migrations: redirects redis-py follows;
        # one log line per episode (or a note in the closing line of a failure episode).
        self.topology = TopologyWatch(client, "shared cache tier (Redis)", log, on_change=gm.shared_topology_change,
                                      quiet_while=lambda: self.episode.failing)
        self.claim_script = client.register_script(_CLAIM)
        self.poll_script = client.register_script(_POLL)
        self.publish_script = client.register_script(_PUBLISH)
        self.renew_script = client.register_script(_RENEW)

    @classmethod
    def from_settings(cls, settings: GatewaySettings, catalog: Catalog) -> SharedTier | None:
        """The tier when a URL is configured, else None (the gateway works per process)."""
        url = settings.shared_cache_url
        if url is None:
            return None
        # One retry: after a Redis restart each pooled connection fails once, and a
        # failed publish would leave its locks to block the fleet for a lease.
        client = make_redis_client(url, settings.gateway_cache_timeout_seconds,
                                   max_connections=settings.gateway_cache_max_connections, retries=1)
        tier = cls(settings, client, catalog_fingerprint(catalog))
        log.info("shared cache tier on (namespace %s)", tier.keys.namespace)
        return tier

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # -- guarded execution ----------------------------------------------------------------

    @property
    def available(self) -> bool:
        """May the tier be asked now? False while its breaker is open."""
        return self.breaker.allow()

    async def guarded(self, op: Callable[[], Awaitable[_T]], budget: float | None = None) -> _T | None:
        """Run one Redis operation within min(timeout, budget); None on any failure
        (counted, fed to the breaker, logged once per episode)."""
        limit = self.timeout if budget is None else min(self.timeout, budget)
        if limit <= 0:
            return None
        try:
            async with asyncio.timeout(limit):
                result = await op()
        except (RedisError, RedisClusterException, OSError, TimeoutError, CodecError) as exc:
            self.topology.check()
            reason = _reason(exc)
            gm.shared_error(reason)
            self.breaker.failure()
            # A pipeline's error quotes the command (our script): keep only Redis' words.
            said = str(exc).rsplit("caused error: ", 1)[-1][:200]
            self.episode.failure(f"{reason}: {type(exc).__name__}: {said}")
            return None
        self.breaker.success()
        self.topology.check()
        if self.episode.failing and self.episode.success(self.topology.note):
            self.topology.note = ""
        gm.shared_ok()
        return result

    async def script(self, script: Any, keys: Sequence[str], args: Sequence[str | bytes | int],
                      budget: float | None) -> Any:
        return await self.guarded(lambda: script(keys=keys, args=args), budget)

    async def per_tag(self, script: Any, items: Sequence[tuple[FigureKeys, Sequence[str], Sequence[Any]]],
                      head: Sequence[str | bytes | int], budget: float | None) -> list[Any] | None:
        """Run `script` once per hash tag (a Redis Cluster slot) over `items` (keys, their
        script keys, their script args), concurrently; each item's reply in order (None
        where the script returns no list), or None when any call failed. A request's
        batch has one tag (its tenant's): one call."""
        groups: dict[str, list[int]] = {}
        for i, (k, _, _) in enumerate(items):
            groups.setdefault(k.tag, []).append(i)

        async def one(idx: list[int]) -> Any:
            rkeys = [rk for i in idx for rk in items[i][1]]
            return await self.script(script, rkeys, [*head, *(a for i in idx for a in items[i][2])], budget)

        replies = await asyncio.gather(*(one(idx) for idx in groups.values()))
        if any(r is None for r in replies):
            return None
        out: list[Any] = [None] * len(items)
        for idx, reply in zip(groups.values(), replies, strict=True):
            if isinstance(reply, list):
                for i, r in zip(idx, reply, strict=True):
                    out[i] = r
        return out

    # -- operations -----------------------------------------------------------------------

    async def claim(self, keys: Sequence[str], want_good: Sequence[bool], budget: float) -> Claim | None:
        """For each key: its fresh entry, else its lock (won, or who holds it), and
        its last good value where asked. One round trip. None when the tier failed."""
        token = secrets.token_hex(8)
        items = []
        for key, good in zip(keys, want_good, strict=True):
            k = self.keys.figure(key)
            items.append((k, (k.fresh, k.lock, k.good), ("1" if good else "0",)))
        replies = await self.per_tag(self.claim_script, items, [token, self.lease_ms], budget)
        if replies is None:
            return None
        claim = Claim(token)
        for key, reply in zip(keys, replies, strict=True):
            code = int(reply[0])
            if code == 1:
                decoded = self._decode(reply[1])
                if decoded is not None:
                    claim.hits[key] = _local(*decoded)
                    continue
                claim.led.append(key)  # corrupt entry: refetch it (without the lock)
                continue
            if len(reply) > 2 and reply[2]:
                last = self._decode(reply[2])
                if last is not None:
                    claim.good[key] = last[0]
            if code == 2:
                claim.led.append(key)
            elif reply[1]:
                claim.awaited[key] = _text(reply[1])
            else:
                claim.led.append(key)  # the holder released between the two reads: fetch
        return claim

    def _decode(self, data: bytes) -> tuple[Fetched, float] | None:
        try:
            return self.codec.decode(data)
        except CodecError as exc:
            gm.shared_error("corrupt")
            log.debug("undecodable shared entry ignored: %s", exc)
            return None

    async def poll(self, awaited: Mapping[str, str], token: str, deadline: float,
                   *, figures: bool = True) -> tuple[dict[str, tuple[int, bytes]], bool]:
        """The one poll loop of the fleet's flights (figures and ranges): poll the flights
        other processes lead (backoff 1 ms .. 25 ms) until each has a final reply (1: an
        outcome, 2: a fresh entry, 4: its holder vanished and the lock is now `token`'s),
        or `deadline` (event-loop time) passes. Returns the final replies by key and
        whether the tier failed (then the keys without a reply were left pending).
        `figures`: figure keys (tagged by tenant), else keys tagged by themselves."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        pending = dict(awaited)
        final: dict[str, tuple[int, bytes]] = {}
        failed = False
        delay = self.POLL_FIRST
        try:
            while pending and (remaining := deadline - loop.time()) > 0:
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * self.POLL_GROWTH, self.POLL_MAX)
                order = list(pending)
                items = [(k, (k.res, k.lock, k.fresh), (pending[key],))
                         for key in order for k in (self.keys.pick(key, figures),)]
                replies = await self.per_tag(self.poll_script, items, [token, self.lease_ms], deadline - loop.time())
                if replies is None:
                    failed = True
                    break
                for key, reply in zip(order, replies, strict=True):
                    code = int(reply[0])
                    if code == 3:  # another process holds it now: wait for that one
                        pending[key] = _text(reply[1])
                    elif code != 0:
                        del pending[key]
                        final[key] = (code, bytes(reply[1]) if code != 4 else b"")
        finally:
            gm.shared_lock_wait(loop.time() - started)
        return final, failed

    async def wait(self, awaited: Mapping[str, str], token: str, deadline: float) -> dict[str, WaitOutcome]:
        """The figures' outcomes of flights other processes lead (``poll``): answers,
        failures, LEAD (taken over), ALONE (tier failed or corrupt), or a timeout."""
        final, failed = await self.poll(awaited, token, deadline)
        out: dict[str, WaitOutcome] = {}
        for key in awaited:
            if key not in final:
                out[key] = ALONE if failed else UpstreamFailure(
                    "timeout", "request deadline reached while another process fetched")
                continue
            code, data = final[key]
            if code == 4:
                out[key] = LEAD
            elif code == 2:
                fresh = self._decode(data)
                out[key] = _local(*fresh) if fresh is not None else ALONE
            else:
                try:
                    outcome = self.codec.decode_outcome(data)
                except CodecError:
                    gm.shared_error("corrupt")
                    outcome = None
                if outcome is None:
                    out[key] = ALONE
                elif isinstance(outcome, tuple):
                    out[key] = _local(*outcome)
                else:
                    out[key] = outcome
        return out

    async def publish(self, token: str, outcomes: Mapping[str, Fetched | UpstreamFailure]) -> None:
        """Hand each outcome to the processes waiting on this flight and release the
        locks; store answers fresh until their expiry (the engine's: a TTL grid step
        on the wall clock, shorter for an answer with warnings) and, when they carry
        no warnings, as last good (STALE_MAX_AGE_SECONDS). Failures are handed over,
        never stored: the next request simply asks again."""
        now_ms = int(time.time() * 1000)
        items: list[tuple[FigureKeys, Sequence[str], Sequence[Any]]] = []
        head: list[str | bytes | int] = [token, 2 * self.lease_ms, int(self.settings.stale_max_age_seconds * 1000)]
        for key, outcome in outcomes.items():
            k = self.keys.figure(key)
            rkeys = (k.fresh, k.good, k.res, k.lock)
            if isinstance(outcome, UpstreamFailure):
                items.append((k, rkeys, (b"", 0, "0", self.codec.encode_failure(outcome))))
                continue
            # Back to the wall clock; rounded to the millisecond the grid is made of
            # (the two clocks were read microseconds apart).
            fresh_at = round(to_wall(outcome.expires_at) * 1000)
            expires_at = fresh_at / 1000
            encoded = self.codec.encode(outcome, expires_at)
            if encoded is None:
                items.append((k, rkeys, (b"", 0, "0", _BIG)))
                continue
            items.append((k, rkeys, (encoded, fresh_at if fresh_at > now_ms + 5 else 0,
                                     "0" if outcome.warnings else "1", b"")))
        if items:
            await self.per_tag(self.publish_script, items, head, None)

    @contextlib.asynccontextmanager
    async def holding(self, keys: Sequence[str], token: str, *, figures: bool = True) -> AsyncIterator[None]:
        """Keep the locks on `keys` while the body runs (renewed every third of a lease),
        so only a holder that died or hangs loses them. `figures`: figure keys (tagged
        by tenant), else keys tagged by themselves (the range cache's)."""
        if not keys:
            yield
            return
        items = [(k, (k.lock,), ()) for key in keys for k in (self.keys.pick(key, figures),)]
        interval = self.lease_ms / 3000

        async def renew() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.per_tag(self.renew_script, items, [token, self.lease_ms], None)

        task = asyncio.get_running_loop().create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def ping(self) -> bool:
        return bool(await self.guarded(self.client.ping))


# -- the range cache's shared tier --------------------------------------------------------


