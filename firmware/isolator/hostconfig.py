"""Load and validate the isolator configuration on the host (CPython).

The file is firmware/isolator/isolator.json; the board reads the same file
after ``optogate isolator flash`` copies it.  Validation is the core's own
(:class:`~firmware.isolator.filtercore.FilterConfig`), so the host rejects
exactly what the board would.
"""

import json
from pathlib import Path
from typing import Any

from firmware.isolator.errors import IsolatorConfigError
from firmware.isolator.filtercore import FilterConfig, FilterConfigError

DEFAULT_CONFIG_PATH = Path(__file__).with_name("isolator.json")


def load_raw(path: Path | None = None) -> dict[str, Any]:
    """Return the parsed JSON of the configuration file at ``path`` (default: the shipped one).

    Raises IsolatorConfigError when the file cannot be read or is not a JSON object.
    """
    path = DEFAULT_CONFIG_PATH if path is None else path
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IsolatorConfigError(f"{path}: {e}") from e
    if not isinstance(raw, dict):
        raise IsolatorConfigError(f"{path}: expected a JSON object")
    return raw


def parse(raw: dict[str, Any]) -> FilterConfig:
    """Return the validated filter rules of ``raw``; raises IsolatorConfigError."""
    try:
        return FilterConfig(raw)
    except FilterConfigError as e:
        raise IsolatorConfigError(str(e)) from e
