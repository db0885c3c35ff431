"""Time as Prometheus reads and writes it: parseTime, parseDuration, the ms grid, MarshalTimestamp.

One reading of a time parameter (`parse_time`) for the whole gateway: the validation
at the edge, the evaluation grid of the range cache and the keys all use its
milliseconds, so they can never disagree with each other or with Prometheus (its
float path rounds the fraction half away from zero, RFC 3339 is exact to the
nanosecond and truncated to whole milliseconds by the engine). The caller's own text
travels with it, so what goes upstream is what the caller wrote.
"""

from __future__ import annotations

import calendar
import math
import re
from dataclasses import dataclass
from datetime import datetime

_NS_PER_MS = 1_000_000
_NS_PER_S = 1_000_000_000

# Go's strconv.ParseFloat syntax (decimal; no spaces or underscores, unlike Python's float()).
_FLOAT = re.compile(r"\A[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)\Z",
                    re.IGNORECASE | re.ASCII)


_RFC3339 = re.compile(r"\A(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})\Z", re.ASCII)


_DURATION = re.compile(r"\A(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?\Z",
                       re.ASCII)


_UNIT_MS = (365 * 86_400_000, 7 * 86_400_000, 86_400_000, 3_600_000, 60_000, 1000, 1)


_MIN_TIME_FORMATTED = "-292273086-05-16T16:47:06Z"


_MAX_TIME_FORMATTED = "292277025-08-18T07:12:54.999999999Z"


# Prometheus' MinTime and MaxTime (v1.MinTime, v1.MaxTime), in nanoseconds.
_MIN_TIME_NS = -9_223_309_901_257_974 * 1_000_000_000
_MAX_TIME_NS = 9_223_309_901_257_974 * 1_000_000_000 + 999_999_999


@dataclass(frozen=True, slots=True)
class Time:
    """A time parameter: the caller's text and the instant Prometheus reads from it."""

    text: str  # as the caller wrote it (sent upstream unchanged)
    ns: int  # Go's time.Time, in nanoseconds since the epoch

    @property
    def ms(self) -> int:
        """timestamp.FromTime: the millisecond the engine evaluates at (truncated, never rounded)."""
        return self.ns // _NS_PER_MS

    @property
    def seconds(self) -> float:
        return self.ns / _NS_PER_S


@dataclass(frozen=True, slots=True)
class Duration:
    """A duration parameter (step, timeout): the caller's text and Go's time.Duration."""

    text: str
    ns: int

    @property
    def ms(self) -> int:
        """The engine's interval in whole milliseconds (Go's integer division, toward zero)."""
        return self.ns // _NS_PER_MS if self.ns >= 0 else -(-self.ns // _NS_PER_MS)

    @property
    def seconds(self) -> float:
        return self.ns / _NS_PER_S


def _go_round(x: float) -> int:
    """Go's math.Round: half away from zero (Python's round() is half to even)."""
    return math.floor(abs(x) + 0.5) * (1 if x >= 0 else -1)


def parse_time(text: str) -> Time:
    """Prometheus' parseTime (raises ValueError).

    A float: math.Modf, the fraction rounded to whole milliseconds half away from
    zero, time.Unix (1.0625 -> 1.063, -1.5 -> -1.5). RFC 3339: exact to the
    nanosecond (digits past the ninth ignored, as Go does), any offset.
    """
    if _FLOAT.match(text):
        t = float(text)
        if not math.isfinite(t):
            raise ValueError(text)
        frac, whole = math.modf(t)
        frac = _go_round(frac * 1000) / 1000
        return Time(text, int(whole) * _NS_PER_S + int(frac * 1e9))
    m = _RFC3339.match(text)
    if m:
        head, digits, zone = m.groups()
        dt = datetime.fromisoformat(head + ("+00:00" if zone == "Z" else zone))
        seconds = calendar.timegm(dt.utctimetuple())
        nanos = int((digits or "0")[:9].ljust(9, "0"))
        return Time(text, seconds * _NS_PER_S + nanos)
    if text == _MIN_TIME_FORMATTED:
        return Time(text, _MIN_TIME_NS)
    if text == _MAX_TIME_FORMATTED:
        return Time(text, _MAX_TIME_NS)
    raise ValueError(text)


def parse_duration(text: str) -> Duration:
    """Prometheus' parseDuration: float seconds (truncated to ns), or 1h30m-style (raises ValueError)."""
    if _FLOAT.match(text):
        d = float(text)
        ts = d * 1e9
        if not math.isfinite(d) or ts > 2.0**63 or ts < -(2.0**63):
            raise ValueError(f"cannot parse {text!r} to a valid duration. It overflows int64")
        return Duration(text, int(ts))
    m = _DURATION.match(text)
    if m and text:
        ms = sum(int(g) * unit for g, unit in zip(m.groups(), _UNIT_MS, strict=True) if g)
        return Duration(text, ms * _NS_PER_MS)
    raise ValueError(f"cannot parse {text!r} to a valid duration")


def fmt_ms(ms: int) -> str:
    """Milliseconds as decimal seconds that every parser reads back to the same ms."""
    sign = "-" if ms < 0 else ""
    sec, frac = divmod(abs(ms), 1000)
    return f"{sign}{sec}" if frac == 0 else f"{sign}{sec}.{frac:03d}".rstrip("0")


def ts_text(ms: int) -> bytes:
    """A timestamp as Prometheus writes it in JSON (jsonutil.MarshalTimestamp): whole
    seconds, and the milliseconds as three digits when there are any ("…34.770", where
    json.dumps would write "…34.77"), so assembled bodies equal upstream's bytes."""
    sign = "-" if ms < 0 else ""
    sec, frac = divmod(abs(ms), 1000)
    return (f"{sign}{sec}" if frac == 0 else f"{sign}{sec}.{frac:03d}").encode()


def ts_ms(text: bytes) -> int:
    """A written timestamp back to whole milliseconds (exact for Prometheus' own form)."""
    whole, _, frac = text.partition(b".")
    if len(frac) > 3:
        raise ValueError("sub-millisecond timestamp")
    ms = abs(int(whole)) * 1000 + (int((frac + b"000")[:3]) if frac else 0)
    return -ms if whole.startswith(b"-") else ms
