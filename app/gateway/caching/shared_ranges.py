"""the range cache's shared tier: extents and fleet-wide flights."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from app.gateway import metrics as gm
from app.gateway.caching.codec import _BIG, CodecError
from app.gateway.caching.shared import ALONE, LEAD, Alone, Lead, SharedTier, _text
from app.gateway.result import UpstreamFailure


class SharedExtentStore:
    """The range cache's ExtentStore in the shared tier: bytes by key with a time to live.

    Stores only store: keys are the range cache's own (which carry the tenant scope),
    hashed into the tier's namespace, so one tenant's extents never answer another's.
    Every command goes through the tier's guard (its timeout, breaker and episode): a
    failing Redis reads as empty and writes nothing, and the cache then works from its
    local tier and upstream. Entries larger than the tier's size bound stay local.
    """

    def __init__(self, tier: SharedTier, category: str = "range") -> None:
        self.tier = tier
        self.category = category

    def _key(self, key: str) -> str:
        return self.tier.keys.of(key).fresh

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [v for v, _ in await self.get_many_ttl(keys)]

    async def get_many_ttl(self, keys: Sequence[str]) -> list[tuple[bytes | None, float]]:
        """Each key's value and its remaining time to live in seconds (a local tier in
        front keeps a copy no longer than Redis does: live extents live seconds)."""
        if not keys:
            return []
        empty: list[tuple[bytes | None, float]] = [(None, 0.0)] * len(keys)
        if not self.tier.available:
            gm.shared_event(self.category, "bypass", len(keys))
            return empty
        rkeys = [self._key(k) for k in keys]

        async def read() -> list[Any]:
            pipe = self.tier.client.pipeline(transaction=False)
            for k in rkeys:
                pipe.get(k)
                pipe.pttl(k)
            return list(await pipe.execute())

        replies = await self.tier.guarded(read)
        if replies is None:
            gm.shared_event(self.category, "error", len(keys))
            return empty
        out: list[tuple[bytes | None, float]] = []
        for i in range(len(keys)):
            value, pttl = replies[2 * i], replies[2 * i + 1]
            if value is None or not isinstance(pttl, int) or pttl == -2:
                out.append((None, 0.0))
            else:  # -1 (no expiry) cannot happen for our writes; keep it briefly then
                out.append((bytes(value), pttl / 1000 if pttl > 0 else 1.0))
        hits = sum(1 for v, _ in out if v is not None)
        gm.shared_event(self.category, "hit", hits)
        gm.shared_event(self.category, "miss", len(keys) - hits)
        return out

    async def put_many(self, items: Sequence[tuple[str, bytes, float]]) -> None:
        kept = [(self._key(k), v, max(1, round(ttl * 1000))) for k, v, ttl in items
                if ttl > 0 and len(v) <= self.tier.codec.max_bytes]
        if not kept or not self.tier.available:
            return

        async def write() -> None:
            pipe = self.tier.client.pipeline(transaction=False)
            for k, v, px in kept:
                pipe.set(k, v, px=px)
            await pipe.execute()

        await self.tier.guarded(write)


_ANSWER: Final = b"R"  # a range-cache answer handed to waiters: status (3 digits), then the body


@dataclass(frozen=True, slots=True)
class SharedAnswer:
    """An answer another process produced for the request this one waited on."""

    status_code: int
    body: bytes


@dataclass(frozen=True, slots=True)
class RawClaim:
    token: str
    body: bytes | None = None  # the answer is stored already (fresh)
    holder: str | None = None  # another process is producing it: wait for this token


class SharedFlights:
    """Fleet-wide single flight for answers kept as bytes (the range cache's requests).

    The same lock, lease, renewal and hand-over as the figures' (the same scripts):
    one process per key fetches while holding a renewed lock; the others poll for its
    outcome; a holder that dies blocks them for at most one lease, after which one of
    them takes over; a failure is handed to that flight's waiters only, never stored.
    The answer's own key is where the cache's SharedExtentStore keeps it (the "fresh"
    key of the same KeySpace), so a finished flight is also a hit.
    """

    def __init__(self, tier: SharedTier, category: str = "range") -> None:
        self.tier = tier
        self.category = category

    @property
    def available(self) -> bool:
        return self.tier.available

    async def claim(self, key: str, budget: float) -> RawClaim | None:
        """The stored answer, the lock, or the holder to wait for; None when the tier failed."""
        k = self.tier.keys.of(key)
        token = secrets.token_hex(8)
        replies = await self.tier.script(self.tier.claim_script, [k.fresh, k.lock, k.good],
                                          [token, self.tier.lease_ms, "0"], budget)
        if replies is None:
            gm.shared_event(self.category, "error")
            return None
        code = int(replies[0][0])
        if code == 1:
            gm.shared_event(self.category, "hit")
            return RawClaim(token, body=bytes(replies[0][1]))
        if code == 3 and replies[0][1]:
            return RawClaim(token, holder=_text(replies[0][1]))
        gm.shared_event(self.category, "miss")
        return RawClaim(token)

    async def wait(self, key: str, token: str, holder: str,
                   deadline: float) -> SharedAnswer | UpstreamFailure | Lead | Alone:
        """Poll the holder's flight until its outcome, its takeover by this process (LEAD),
        a tier failure (ALONE) or `deadline` (event-loop time: a timeout failure)."""
        final, failed = await self.tier.poll({key: holder}, token, deadline, figures=False)
        result: SharedAnswer | UpstreamFailure | Lead | Alone
        if key in final:
            code, data = final[key]
            result = LEAD if code == 4 else SharedAnswer(200, data) if code == 2 else self._outcome(data)
        else:
            result = ALONE if failed else UpstreamFailure(
                "timeout", "request deadline reached while another process fetched")
        gm.shared_event(self.category, {Lead: "takeover", Alone: "error"}.get(type(result), "coalesced"))
        return result

    def _outcome(self, data: bytes) -> SharedAnswer | UpstreamFailure | Alone:
        tag = data[:1]
        if tag == _ANSWER and len(data) >= 4 and data[1:4].isdigit():
            return SharedAnswer(int(data[1:4]), data[4:])
        try:
            outcome = self.tier.codec.decode_outcome(data)
        except CodecError:
            gm.shared_error("corrupt")
            return ALONE
        return outcome if isinstance(outcome, UpstreamFailure) else ALONE

    def holding(self, key: str, token: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self.tier.holding([key], token, figures=False)

    async def publish(self, key: str, token: str, outcome: SharedAnswer | UpstreamFailure) -> None:
        """Hand the outcome to this flight's waiters and release the lock. Stores nothing
        fresh: the cache stores its answer through its ExtentStore when it may."""
        k = self.tier.keys.of(key)
        if isinstance(outcome, UpstreamFailure):
            body = self.tier.codec.encode_failure(outcome)
        else:
            body = _ANSWER + b"%03d" % outcome.status_code + outcome.body
            if len(body) > self.tier.codec.max_bytes:
                body = _BIG
        await self.tier.script(self.tier.publish_script, [k.fresh, k.good, k.res, k.lock],
                                [token, 2 * self.tier.lease_ms, "0", b"", "0", "0", body], None)
