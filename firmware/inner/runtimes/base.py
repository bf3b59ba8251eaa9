"""The contract every algorithm runtime of the inner module fulfils.

A *runtime* runs one service's algorithm on request.  The inner daemon builds
one runtime per built service (``firmware.inner.runtimes.load_runtime``),
calls :meth:`Runtime.start` once to warm it up, :meth:`Runtime.invoke` for
every request from the LAN API, and :meth:`Runtime.aclose` when the service is
unloaded or the daemon stops.

An invocation carries JSON-able parameters and an optional binary input; an
outcome carries a JSON-able result and an optional binary output.  Binary data
travels as bytes end to end (never base64) so that a few megabytes of DXF or a
document to encrypt cost no more than a copy.

Failures are typed so the LAN API can map them to answers without looking
inside them::

    OptogateError
    └── RuntimeFailure                     the algorithm could not produce a result
        ├── AlgorithmError                 the algorithm refused the input (HTTP 422);
        │                                  ``.message`` is safe to show the caller
        ├── AlgorithmTimeout(TimeoutError) it ran past ``Limits.timeout_s``
        ├── AlgorithmCrashed               it died or raised something unexpected;
        │   └── MemoryLimitExceeded        ... by running out of its memory limit
        ├── ResultTooLarge                 its result exceeded ``Limits.max_result_bytes``
        └── RuntimeUnavailable             the runtime is closed or cannot start
    LocalProtocolError
    └── InvalidInvocation(ValueError)      the caller passed params that are not JSON-able,
                                           or data that is not bytes (nothing was run)

Only :class:`AlgorithmError` carries text from the algorithm; every other
failure says what happened in our own words and leaks no internals (the
details go to the operator's log).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from firmware.common.errors import LocalProtocolError, OptogateError

# A user-facing message longer than this is cut: it is shown to a caller and
# logged, and an algorithm must not be able to push megabytes through it.
MAX_ERROR_MESSAGE_CHARS = 1000


@dataclass(frozen=True)
class Limits:
    """Resource limits from the service manifest.

    ``timeout_s``: wall-clock seconds one invocation may take.
    ``memory_mb``: address space the algorithm's process may map, in MiB.
    ``max_result_bytes``: size cap of one encoded outcome (result + data).
    """

    timeout_s: float
    memory_mb: int
    max_result_bytes: int

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.memory_mb <= 0:
            raise ValueError(f"memory_mb must be > 0, got {self.memory_mb!r}")
        if self.max_result_bytes <= 0:
            raise ValueError(f"max_result_bytes must be > 0, got {self.max_result_bytes!r}")


@dataclass(frozen=True)
class Invocation:
    """One request: JSON-able ``params`` and a binary input ``data`` (may be b"")."""

    params: dict[str, Any]
    data: bytes = b""


@dataclass(frozen=True)
class Outcome:
    """One answer: a JSON-able ``result`` and a binary output ``data`` (may be b"")."""

    result: dict[str, Any]
    data: bytes = field(default=b"")


class RuntimeFailure(OptogateError):
    """The algorithm did not produce a result."""


class AlgorithmError(RuntimeFailure):
    """The algorithm refused its input with a message meant for the caller (HTTP 422).

    ``message`` is the algorithm's own text, cut to ``MAX_ERROR_MESSAGE_CHARS``.
    """

    def __init__(self, message: str) -> None:
        message = truncate_message(message)
        super().__init__(message)
        self.message = message


class AlgorithmTimeout(RuntimeFailure, TimeoutError):
    """The invocation ran past its time limit; the algorithm was stopped."""


class AlgorithmCrashed(RuntimeFailure):
    """The algorithm died or raised an unexpected exception (details only in the log)."""


class MemoryLimitExceeded(AlgorithmCrashed):
    """The algorithm ran out of the memory its manifest allows."""


class ResultTooLarge(RuntimeFailure):
    """The outcome exceeded ``Limits.max_result_bytes``."""


class RuntimeUnavailable(RuntimeFailure):
    """The runtime is closed, not started, or cannot run this service at all."""


class InvalidInvocation(LocalProtocolError, ValueError):
    """The invocation is malformed (a bug in the caller); nothing was run."""


class Runtime(Protocol):
    """What the inner daemon needs of a runtime (Python, WebAssembly...)."""

    async def start(self) -> None:
        """Warm up (start workers, compile modules).

        Raises RuntimeUnavailable if the service cannot be run at all.
        """

    async def invoke(self, inv: Invocation) -> Outcome:
        """Run the algorithm once and return its outcome.

        Raises a RuntimeFailure subclass; the runtime stays usable afterwards.
        """

    async def aclose(self) -> None:
        """Stop everything the runtime started; idempotent."""


def truncate_message(message: str, limit: int = MAX_ERROR_MESSAGE_CHARS) -> str:
    """Return ``message`` cut to ``limit`` characters (with an ellipsis if cut)."""
    if len(message) <= limit:
        return message
    return message[: limit - 1] + "\u2026"
