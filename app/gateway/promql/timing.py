"""time as Prometheus reads and writes it: parseTime, parseDuration, ms grid, MarshalTimestamp."""

from __future__ import annotations

import math
import re
from datetime import datetime

# Go's strconv.ParseFloat syntax (decimal; no spaces or underscores, unlike Python's float()).
_FLOAT = re.compile(r"\A[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)\Z",
                    re.IGNORECASE | re.ASCII)


_RFC3339 = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})\Z", re.ASCII)


_DURATION = re.compile(r"\A(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?\Z",
                       re.ASCII)


_UNIT_SECONDS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)


_MIN_TIME_FORMATTED = "-292273086-05-16T16:47:06Z"


_MAX_TIME_FORMATTED = "292277025-08-18T07:12:54.999999999Z"


def parse_time(text: str) -> float:
    """Seconds since the epoch, as Prometheus' parseTime reads them (raises ValueError)."""
    if _FLOAT.match(text):
        t = float(text)
        if not math.isfinite(t):
            raise ValueError(text)
        whole = math.trunc(t)
        return whole + round((t - whole) * 1000) / 1000
    if _RFC3339.match(text):
        frac = ""
        if "." in text:
            head, rest = text.split(".", 1)
            digits = re.match(r"\d+", rest)
            assert digits is not None
            frac = digits.group(0)
            text = head + rest[len(frac):]
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return dt.timestamp() + (float("0." + frac) if frac else 0.0)
    if text == _MIN_TIME_FORMATTED:
        return -9.2e15
    if text == _MAX_TIME_FORMATTED:
        return 9.2e15
    raise ValueError(text)


def parse_duration(text: str) -> float:
    """Seconds, as Prometheus' parseDuration reads them: a float, or 1h30m-style (raises ValueError)."""
    if _FLOAT.match(text):
        d = float(text)
        if not math.isfinite(d) or abs(d) * 1e9 > 2**63 - 1:
            raise ValueError(f"cannot parse {text!r} to a valid duration. It overflows int64")
        return d
    m = _DURATION.match(text)
    if m and text:
        return sum(int(g) * unit for g, unit in zip(m.groups(), _UNIT_SECONDS, strict=True) if g)
    raise ValueError(f"cannot parse {text!r} to a valid duration")


def _go_round(x: float) -> int:
    """Go's math.Round: half away from zero (Python's round() is half to even)."""
    return math.floor(abs(x) + 0.5) * (1 if x >= 0 else -1)


def ms_of(seconds: float) -> int:
    """Unix seconds to whole milliseconds exactly as Prometheus' parseTime does.

    (Modf; the fraction rounded to ms; time.Unix normalisation; FromTime.) The
    evaluation grid must be Prometheus' own, to the millisecond.
    """
    frac, whole = math.modf(seconds)
    frac = _go_round(frac * 1000) / 1000
    total_ns = int(whole) * 1_000_000_000 + int(frac * 1e9)
    sec, ns = divmod(total_ns, 1_000_000_000)
    return sec * 1000 + ns // 1_000_000


def step_ms_of(step: float) -> int:
    """A float step in seconds to Prometheus' interval: Duration(step*1e9), then whole ms."""
    return int(step * 1e9) // 1_000_000


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


def repr_time(seconds: float) -> str:
    """A float time or step as a decimal string Prometheus parses to the same value."""
    text = repr(float(seconds))
    return text[:-2] if text.endswith(".0") else text
