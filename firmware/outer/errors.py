"""Errors of the outer module's uplink, relay and daemon, beside the code that raises them.

::

    OptogateError
    ├── ConfigError                      (firmware.common.errors)
    │   └── OuterConfigError             outer.toml is malformed or names something unusable
    ├── UplinkError                      no answer from central could be obtained
    │   ├── CentralUnreachable(ConnectionError)   every transport failed, or backing off
    │   └── CentralRefused               central refused to authenticate this gateway
    ├── StorageError                     (firmware.common.errors)
    │   └── CacheError                   the sealed-object cache could not be written

Each carries the stable ``code`` the relay puts into the ``Error`` reply to
the inner module, and (where a timer retry makes sense) ``retry_after``.
"""

from __future__ import annotations

from firmware.common.errors import ConfigError, OptogateError, StorageError


class OuterConfigError(ConfigError):
    """outer.toml is malformed, has an unknown key, or names an unusable file."""


class UplinkError(OptogateError):
    """No answer from central could be obtained; ``code`` goes into the Error reply."""

    code = "central_unreachable"

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class CentralUnreachable(UplinkError, ConnectionError):
    """Every configured transport failed (or the uplink is backing off after failures)."""

    code = "central_unreachable"


class CentralRefused(UplinkError):
    """Central answered, but refused to authenticate this gateway (unknown, revoked, bad key)."""

    code = "central_refused"


class CacheError(StorageError):
    """The sealed-object cache could not be written; what it held before is intact."""
