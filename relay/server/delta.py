"""Fossil delta compression of publications, as Centrifugo sends them to `delta: "fossil"` subscribers.

A subscriber that asked for fossil deltas (and whose namespace lists it in `allowed_delta_types`)
gets its first publication whole, then, for publications published with `delta` (or in a
namespace with `delta_publish`), the fossil delta from the previous publication of the channel,
marked `delta: true` — unless the delta is not smaller, then the whole data with `delta: false`.
Over JSON such data travels as a JSON string (a delta is not JSON), as Centrifugo does it.
"""

from __future__ import annotations

import itertools
from typing import Any

import fossil_delta

FOSSIL = "fossil"
DELTA_TYPES = (FOSSIL,)


def _as_text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def whole(pub: dict[str, Any], json: bool) -> dict[str, Any]:
    """The publication for a delta subscriber, not as a delta (JSON: data as a string)."""
    if not json:
        return pub
    text = _as_text(pub["data"])
    return {**pub, "data": text} if text is not None else pub


def against(previous: bytes | None, pub: dict[str, Any], json: bool) -> dict[str, Any]:
    """The publication as a fossil delta from `previous` when that is smaller, else whole."""
    data: bytes = pub["data"]
    if previous is None:
        return whole(pub, json)
    patch = bytes(fossil_delta.create_delta(previous, data))
    if len(patch) >= len(data):
        return whole(pub, json)
    if not json:
        return {**pub, "data": patch, "delta": True}
    text = _as_text(patch)
    if text is None:  # a patch that is not UTF-8 cannot travel as a JSON string: send it whole
        return whole(pub, json)
    return {**pub, "data": text, "delta": True}


def recovered(pubs: list[dict[str, Any]], json: bool) -> list[dict[str, Any]]:
    """Recovered publications for a delta subscriber: the first whole, each next a delta from the one before."""
    out = [whole(pubs[0], json)] if pubs else []
    for before, pub in itertools.pairwise(pubs):
        out.append(against(before["data"], pub, json))
    return out
