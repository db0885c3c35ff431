"""Prometheus API parameters read as Prometheus reads them (Go's r.Form)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from fastapi import Request

from app.gateway.promql.timing import parse_duration, parse_time
from app.gateway.routes.envelope import FORM, bad_data, invalid_param


@dataclass(frozen=True, slots=True)
class Params:
    """The request's parameters in order, URL and form body merged (body first, as Go's r.Form)."""

    items: tuple[tuple[str, str], ...]

    def get(self, name: str) -> str:
        """The first value, or "" (Go's FormValue)."""
        for k, v in self.items:
            if k == name:
                return v
        return ""

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]

    def without(self, *names: str) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.items if k not in names]

    def replaced(self, name: str, value: str) -> list[tuple[str, str]]:
        """The items with the first `name` set to value (appended when absent), later copies dropped."""
        out: list[tuple[str, str]] = []
        done = False
        for k, v in self.items:
            if k == name:
                if not done:
                    out.append((k, value))
                    done = True
                continue
            out.append((k, v))
        if not done:
            out.append((name, value))
        return out


def _decode_pairs(raw: bytes | str, where: str) -> list[tuple[str, str]]:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return parse_qsl(text, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_data(f"error parsing form values: {where}: {exc}") from None


async def read_params(request: Request) -> Params:
    url = _decode_pairs(request.url.query, "query string")
    body: list[tuple[str, str]] = []
    if request.method == "POST":
        raw = await request.body()
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype == FORM:
            body = _decode_pairs(raw, "body")
        elif raw.strip():
            raise bad_data(f"unsupported Content-Type {ctype or '(none)'!r} for a POST with a body; "
                           f"send parameters as {FORM}")
    if body:
        in_body: dict[str, list[str]] = {}
        for k, v in body:
            in_body.setdefault(k, []).append(v)
        in_url: dict[str, list[str]] = {}
        for k, v in url:
            in_url.setdefault(k, []).append(v)
        for k in in_body.keys() & in_url.keys():
            if in_body[k] != in_url[k]:
                raise bad_data(f'parameter "{k}" is given in both the URL and the body with different values')
        return Params(tuple(body) + tuple((k, v) for k, v in url if k not in in_body))
    return Params(tuple(url))


_INT = re.compile(r"\A[+-]?[0-9]+\Z")


def _go_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def time_param(p: Params, name: str, default: float | None) -> float | None:
    text = p.get(name)
    if text == "":
        return default
    try:
        return parse_time(text)
    except ValueError:
        raise invalid_param(name, f"Invalid time value for '{name}': cannot parse {_go_quote(text)} "
                                  "to a valid timestamp") from None


def required_time(p: Params, name: str) -> float:
    text = p.get(name)
    try:
        return parse_time(text)
    except ValueError:
        raise invalid_param(name, f"cannot parse {_go_quote(text)} to a valid timestamp") from None


def duration_param(p: Params, name: str) -> float:
    text = p.get(name)
    try:
        return parse_duration(text)
    except ValueError as exc:
        msg = str(exc).replace(repr(text), _go_quote(text))
        raise invalid_param(name, msg) from None


def _ns(t: float) -> int:
    return round(t * 1e9)
