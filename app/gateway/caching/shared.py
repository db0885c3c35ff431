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

Keys are namespaced and versioned, ``<prefix>:v<format>:{<catalog hash>}:<kind>:<sha>``
(the sha of the figure's cache key; the braces keep a namespace in one Redis
Cluster slot, so one script call serves a batch): a changed catalog or format
reads none of the old entries.
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

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.common.episodes import FailureEpisode
from app.common.redis import AsyncRedis, make_redis_client
from app.gateway import metrics as gm
from app.gateway.caching.clock import to_monotonic, to_wall
from app.gateway.caching.codec import _BIG, Codec, CodecError
from app.gateway.catalog.model import Catalog
from app.gateway.result import Fetched, UpstreamFailure
from app.gateway.settings import GatewaySettings
from app.gateway.upstream.breaker import CircuitBreaker

log = logging.getLogger("gateway.shared")

FORMAT_VERSION: Final = 1
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


class KeySpace:
    """``<prefix>:v<format>:{<catalog hash>}:<kind>:<sha256 of the cache key>``.

    The braces make the catalog hash the Redis Cluster hash tag: a namespace lives
    in one slot, so one script call can serve a whole batch of figures.
    """

    def __init__(self, prefix: str, catalog_hash: str, version: int = FORMAT_VERSION) -> None:
        self.namespace = f"{prefix}:v{version}:{{{catalog_hash}}}"
        self._memo: dict[str, FigureKeys] = {}

    def of(self, key: str) -> FigureKeys:
        keys = self._memo.get(key)
        if keys is None:
            sha = hashlib.sha256(key.encode()).hexdigest()[:32]
            ns = self.namespace
            keys = FigureKeys(f"{ns}:fresh:{sha}", f"{ns}:good:{sha}", f"{ns}:lock:{sha}", f"{ns}:res:{sha}")
            if len(self._memo) >= 8192:  # keys come from the catalog and bounded filters
                self._memo.clear()
            self._memo[key] = keys
        return keys


# -- codec --------------------------------------------------------------------------------


# -- scripts: one call (one round trip, one command) per batch of figures ------------------
# Every key of a namespace shares one Redis Cluster slot ({catalog hash} tag), so a
# batch's keys may meet in one script. Run by EVALSHA (redis-py loads them on NOSCRIPT).

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
        self.episode = FailureEpisode("shared cache tier (Redis)", log)
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
            reason = _reason(exc)
            gm.shared_error(reason)
            self.breaker.failure()
            # A pipeline's error quotes the command (our script): keep only Redis' words.
            said = str(exc).rsplit("caused error: ", 1)[-1][:200]
            self.episode.failure(f"{reason}: {type(exc).__name__}: {said}")
            return None
        self.breaker.success()
        if self.episode.failing:
            self.episode.success()
        gm.shared_ok()
        return result

    async def script(self, script: Any, keys: Sequence[str], args: Sequence[str | bytes | int],
                      budget: float | None) -> Any:
        return await self.guarded(lambda: script(keys=keys, args=args), budget)

    # -- operations -----------------------------------------------------------------------

    async def claim(self, keys: Sequence[str], want_good: Sequence[bool], budget: float) -> Claim | None:
        """For each key: its fresh entry, else its lock (won, or who holds it), and
        its last good value where asked. One round trip. None when the tier failed."""
        token = secrets.token_hex(8)
        rkeys: list[str] = []
        for key in keys:
            k = self.keys.of(key)
            rkeys += (k.fresh, k.lock, k.good)
        args = [token, self.lease_ms, *("1" if g else "0" for g in want_good)]
        replies = await self.script(self.claim_script, rkeys, args, budget)
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

    async def poll(self, awaited: Mapping[str, str], token: str,
                   deadline: float) -> tuple[dict[str, tuple[int, bytes]], bool]:
        """The one poll loop of the fleet's flights (figures and ranges): poll the flights
        other processes lead (backoff 1 ms .. 25 ms) until each has a final reply (1: an
        outcome, 2: a fresh entry, 4: its holder vanished and the lock is now `token`'s),
        or `deadline` (event-loop time) passes. Returns the final replies by key and
        whether the tier failed (then the keys without a reply were left pending)."""
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
                rkeys: list[str] = []
                for key in order:
                    k = self.keys.of(key)
                    rkeys += (k.res, k.lock, k.fresh)
                replies = await self.script(self.poll_script, rkeys,
                                            [token, self.lease_ms, *(pending[k] for k in order)],
                                            deadline - loop.time())
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
        rkeys: list[str] = []
        args: list[str | bytes | int] = [token, 2 * self.lease_ms, int(self.settings.stale_max_age_seconds * 1000)]
        for key, outcome in outcomes.items():
            k = self.keys.of(key)
            rkeys += (k.fresh, k.good, k.res, k.lock)
            if isinstance(outcome, UpstreamFailure):
                args += (b"", 0, "0", self.codec.encode_failure(outcome))
                continue
            # Back to the wall clock; rounded to the millisecond the grid is made of
            # (the two clocks were read microseconds apart).
            fresh_at = round(to_wall(outcome.expires_at) * 1000)
            expires_at = fresh_at / 1000
            encoded = self.codec.encode(outcome, expires_at)
            if encoded is None:
                args += (b"", 0, "0", _BIG)
                continue
            args += (encoded, fresh_at if fresh_at > now_ms + 5 else 0, "0" if outcome.warnings else "1", b"")
        if rkeys:
            await self.script(self.publish_script, rkeys, args, None)

    @contextlib.asynccontextmanager
    async def holding(self, keys: Sequence[str], token: str) -> AsyncIterator[None]:
        """Keep the locks on `keys` while the body runs (renewed every third of a lease),
        so only a holder that died or hangs loses them."""
        if not keys:
            yield
            return
        locks = [self.keys.of(k).lock for k in keys]
        interval = self.lease_ms / 3000

        async def renew() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.script(self.renew_script, locks, [token, self.lease_ms], None)

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


