"""Durations ("250ms", "5s", "2m") and sizes ("1MiB") as the config file spells them."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Longer would overflow the millisecond integers libraries (gRPC, aiokafka) are given.
MAX_DURATION = 100 * 365 * 86400.0
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2, "GB": 1000**3,
               "GiB": 1024**3}


def parse_duration(value: Any) -> float:
    """Seconds from "250ms" / "5s" / "2m" / "1h"; a bare number is not accepted (unit ambiguity)."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f'expected a duration string like "250ms", "5s" or "2m", got {value!r}')
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f'bad duration {value!r}: use a number and a unit (ms, s, m, h, d), like "5s"')
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not seconds <= MAX_DURATION:  # also catches inf from a few hundred digits
        raise ValueError(f"duration {value!r} is longer than 100 years")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from "1MiB" / "512KiB" / "100B", or a plain integer of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f'expected a size like "1MiB" or a number of bytes, got {value!r}')
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f'bad size {value!r}: use a number and a unit (B, KiB, MiB, GiB, KB, MB, GB)')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
