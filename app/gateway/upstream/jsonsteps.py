"""big JSON decoded series by series, collector paused."""

from __future__ import annotations

import gc
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_DECODER = json.JSONDecoder()


_WS = re.compile(r"[ \t\n\r]*")


# Envelope -> data -> result -> each series: the depth at which a big answer is split.
_SPLIT_DEPTH = 3


def _skip(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return match.end() if match is not None else pos


def _decode(text: str, pos: int, depth: int) -> tuple[Any, int]:
    """One JSON value at `pos`: objects and arrays down to `depth` member by member, the rest
    by the C decoder. Same result as json.loads, in small steps."""
    opener = text[pos:pos + 1]
    if depth <= 0 or opener not in ("{", "["):
        return _DECODER.raw_decode(text, pos)
    closer = "}" if opener == "{" else "]"
    obj: dict[str, Any] = {}
    arr: list[Any] = []
    pos = _skip(text, pos + 1)
    if text[pos:pos + 1] == closer:
        return (obj if opener == "{" else arr), pos + 1
    while True:
        if opener == "{":
            if text[pos:pos + 1] != '"':
                raise ValueError(f"expected a member name at {pos}")
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip(text, pos)
            if text[pos:pos + 1] != ":":
                raise ValueError(f"expected ':' at {pos}")
            obj[key], pos = _decode(text, _skip(text, pos + 1), depth - 1)
        else:
            value, pos = _decode(text, pos, depth - 1)
            arr.append(value)
        pos = _skip(text, pos)
        sep = text[pos:pos + 1]
        if sep == closer:
            return (obj if opener == "{" else arr), pos + 1
        if sep != ",":
            raise ValueError(f"expected ',' or {closer!r} at {pos}")
        pos = _skip(text, pos + 1)


def loads_in_steps(body: bytes) -> Any:
    """json.loads for big answers, one series at a time.

    json.loads holds the GIL for the whole document (74 ms for 50k series, 0.56 s
    for 160k on the reference machine), so even in a worker thread it stalls the
    event loop that long. Decoded series by series, the interpreter can switch
    back to the loop between any two of them.
    """
    text = body.decode("utf-8")
    value, end = _decode(text, _skip(text, 0), _SPLIT_DEPTH)
    if _skip(text, end) != len(text):
        raise ValueError(f"extra data at {end}")
    return value


_gc_lock = threading.Lock()


_gc_pausers = 0


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a big answer is turned into objects.

    Hundreds of thousands of new containers make the collector run full
    collections over and over, each walking the whole heap with the GIL held:
    200k series took 6 s to parse and stalled the event loop 0.5 s at a time with
    it, 1.1 s and 0.1 s without. The answer's objects are acyclic (refcounting frees
    them); the collector runs again once the last big answer is done.
    """
    global _gc_pausers
    with _gc_lock:
        _gc_pausers += 1
        if _gc_pausers == 1:
            gc.disable()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0:
                gc.enable()
