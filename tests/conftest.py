"""Shared pytest set-up: quiet httpx logs; the repo root on sys.path for tests.support."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logging.getLogger("httpx").setLevel(logging.WARNING)
