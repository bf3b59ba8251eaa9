"""Reference service ``echo``: returns its parameters and its data unchanged.

It does no work on purpose, so timing it measures only what the gateway adds.
"""

from __future__ import annotations

from typing import Any


def run(params: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
    """Return ``({"params": params}, data)``; never raises."""
    return {"params": params}, data
