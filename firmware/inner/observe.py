"""What the daemon tells its operator: structured log lines and Prometheus metrics.

:class:`EventLog` writes one JSON object per line to a stream (stdout under
systemd: journald keeps it).  A line that cannot be written (a full pipe) is
dropped and counted, never allowed to block or crash the daemon.  Callers
pass only what is safe to show: service names, codes, sizes, durations -
never an API key or a parameter value.

:class:`Metrics` holds counters and gauges by name and label set and renders
them in the Prometheus text exposition format (version 0.0.4).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import IO, Final

#: Label sets whose rendering is cached (services x outcomes x paths x statuses).
MAX_LABEL_SETS: Final = 4096
#: Content type of the Prometheus text format.
PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


class EventLog:
    """One structured line per event (see the module docstring)."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        enabled: Callable[[str], bool] | None = None,
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._enabled = enabled
        self.dropped = 0
        self.written = 0

    def __call__(self, event: str, **fields: object) -> None:
        """Write ``{"ts", "event", **fields}`` as one line; count it as dropped on failure."""
        if self._enabled is not None and not self._enabled(event):
            return
        try:
            line = json.dumps(
                {"ts": round(self._clock(), 3), "event": event, **fields},
                separators=(",", ":"),
                default=str,
            )
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            self.dropped += 1
        else:
            self.written += 1


def _escape(value: str) -> str:
    """Escape a label value as the text format requires (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    """Counters and gauges, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._keys: dict[tuple[tuple[str, str], ...], str] = {}
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[str, float]] = {}
        self._gauges: list[Callable[[], list[tuple[str, dict[str, str], float]]]] = []

    def describe(self, name: str, kind: str, text: str) -> None:
        """Declare metric ``name`` of ``kind`` ("counter" or "gauge") with help ``text``."""
        self._help[name] = (kind, text)
        self._values.setdefault(name, {})

    def inc(self, name: str, labels: dict[str, str] | None = None, by: float = 1) -> None:
        """Add ``by`` to counter ``name`` with ``labels``."""
        items = tuple(labels.items()) if labels else ()
        key = self._keys.get(items)
        if key is None:
            key = self._keys[items] = _labels(labels or {})
            if len(self._keys) > MAX_LABEL_SETS:  # bounded: services x outcomes is small
                self._keys.clear()
        series = self._values.setdefault(name, {})
        series[key] = series.get(key, 0) + by

    def counter(self, name: str, labels: dict[str, str] | None = None) -> Callable[[float], None]:
        """Return a function adding to counter ``name`` with ``labels``.

        The same as :meth:`inc` without looking the label set up on every
        call: for counters bumped on every request.
        """
        series = self._values.setdefault(name, {})
        key = _labels(labels or {})

        def add(by: float = 1) -> None:
            series[key] = series.get(key, 0) + by

        return add

    def add_collector(self, fn: Callable[[], list[tuple[str, dict[str, str], float]]]) -> None:
        """Register ``fn`` returning ``[(name, labels, value)]`` gauges computed at scrape time."""
        self._gauges.append(fn)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Return the current value of a counter (0 if never incremented)."""
        return self._values.get(name, {}).get(_labels(labels or {}), 0)

    def render(self) -> str:
        """Return every metric in the Prometheus text exposition format."""
        values = {name: dict(series) for name, series in self._values.items()}
        for fn in self._gauges:
            for name, labels, value in fn():
                values.setdefault(name, {})[_labels(labels)] = value
        lines = []
        for name in sorted(values):
            kind, text = self._help.get(name, ("untyped", name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for key, value in sorted(values[name].items()):
                number = int(value) if float(value).is_integer() else value
                lines.append(f"{name}{key} {number}")
        return "\n".join(lines) + "\n"


class LogBridge(logging.Handler):
    """Send the libraries' ``logging`` records (link, aiohttp) to the event log as one line each.

    Only the first line of the message is kept: a traceback would spread one
    event over many lines (and may quote request bytes).
    """

    def __init__(self, log: EventLog, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record as a ``library_log`` event."""
        try:
            message = record.getMessage().splitlines()[0] if record.msg else ""
        except Exception:  # a bad format string in a library must not crash us
            message = str(record.msg)
        self._log("library_log", logger=record.name, level=record.levelname, message=message[:300])
