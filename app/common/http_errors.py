"""Client errors shaped like FastAPI's own validation errors (the documented HTTPValidationError)."""

from __future__ import annotations

from fastapi import HTTPException


def invalid_query(param: str, message: str) -> HTTPException:
    """A 422 for one query parameter, with a message a person can act on."""
    return HTTPException(422, [{"loc": ["query", param], "msg": message, "type": "value_error"}])
