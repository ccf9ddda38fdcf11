"""What a test does when a real component cannot be had: fail in CI, skip (saying why) locally."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

CACHE = Path(os.environ.get("RELAY_CACHE", Path.home() / ".cache" / "centrifugo-relay"))


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def unavailable(reason: str) -> NoReturn:
    """CI never skips a real component: a missing tool fails the run loudly."""
    if in_ci():
        pytest.fail(f"required test component unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"{reason} (a local skip; CI fails here)")
