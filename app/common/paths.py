"""The path a router matches on, with a proxy's ``root_path`` taken off (the one copy)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def route_path(scope: Mapping[str, Any]) -> str:
    """``scope['path']`` without ``root_path``, cut only at a segment boundary
    (``/api`` is not the root of ``/apis``)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path
