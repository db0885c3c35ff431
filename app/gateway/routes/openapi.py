"""OpenAPI description of the Prometheus API routes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute

from app.gateway.routes.envelope import FORM, JSON

# An empty value is an absent one (Go's FormValue), so the patterns accept "".
TIME = (r"^(|[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[iI][nN][fF]|[nN][aA][nN])"
         r"|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))$")


DURATION = (r"^(|[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?)"
                     r"|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$")


STR = {"type": "string"}


# A form field given once is a string, several times an array: the wire cannot tell them apart.
MATCH: dict[str, Any] = {"anyOf": [STR, {"type": "array", "items": STR}]}


LIMIT = {"type": "string", "pattern": r"^([+-]?[0-9]+)?$"}

# (name, required, schema) of one parameter
Param = tuple[str, bool, dict[str, Any]]


_ENVELOPE = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string", "enum": ["success", "error"]}, "data": {},
    "errorType": {"type": "string"}, "error": {"type": "string"},
    "warnings": {"type": "array", "items": {"type": "string"}},
    "infos": {"type": "array", "items": {"type": "string"}}}}


_ERROR = {"description": "Prometheus' error envelope", "content": {JSON: {"schema": _ENVELOPE}}}


API_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus' success envelope (the upstream's, passed through)",
          "content": {JSON: {"schema": _ENVELOPE}}},
    400: _ERROR, 404: _ERROR, 422: _ERROR, 500: _ERROR, 503: _ERROR,
}


def document(router: APIRouter, params_of: Mapping[str, Sequence[Param]]) -> None:
    """Describe each API route's parameters (query string for GET, form body for POST) and
    its answers in OpenAPI, so /docs shows them and schema-driven clients can call them."""
    for route in router.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        params = params_of.get(route.path_format, ())
        route.responses = {**API_RESPONSES, **route.responses}
        if "POST" in (route.methods or set()):
            props = {name: schema for name, _, schema in params}
            required = [name for name, req, _ in params if req]
            body: dict[str, Any] = {"type": "object", "properties": props}
            if required:
                body["required"] = required
            route.openapi_extra = {"requestBody": {"required": bool(required), "content": {FORM: {
                "schema": body, "encoding": {n: {"style": "form", "explode": True}
                                             for n, _, sc in params if sc is MATCH}}}}}
        elif params:
            route.openapi_extra = {"parameters": [
                {"name": name, "in": "query", "required": req, "schema": schema,
                 **({"style": "form", "explode": True} if schema is MATCH else {})}
                for name, req, schema in params]}
