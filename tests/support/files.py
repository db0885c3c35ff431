"""Writing secret files the way an operator's rotation does."""

from __future__ import annotations

import os
import time
from pathlib import Path


def rotate(path: Path, text: str, *, settled: bool = True) -> None:
    """Replace `path` atomically (temp file + rename). `settled`: date it a second back, so
    the secret-file reader adopts it at once instead of waiting out its settle time."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    if settled:
        past = time.time_ns() - 1_000_000_000
        os.utime(tmp, ns=(past, past))
    os.replace(tmp, path)
