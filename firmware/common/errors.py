"""The one exception tree of optogate.

Every error the project raises on purpose derives from :class:`OptogateError`,
with a builtin mixed in where one fits, so callers can catch as narrowly or as
broadly as they need.  Foreign exceptions (``OSError`` from a port,
``cbor2.CBORDecodeError``, ``cryptography.exceptions.InvalidTag``...) are
wrapped where they cross an adapter boundary, with ``raise ... from e``.

The split follows h11: *Local* errors mean "you misused the API" (a bug in the
caller), *Remote* errors mean "the peer or the data broke the protocol" (to be
expected from a wire, handled and counted).

::

    OptogateError
    ├── ConfigError(ValueError)             bad or missing configuration
    ├── LocalProtocolError                  API misuse: a bug in our own code
    ├── RemoteProtocolError                 the peer broke the protocol
    │   └── MessageError(ValueError)        a message that fails strict decoding
    ├── LinkError                           the optical link / framed session
    │   ├── LinkDown(ConnectionError)       no session: keepalive lost, line cut, power gone
    │   │   └── PeerRestarted               the peer rebooted: new epoch seen
    │   ├── LinkTimeout(TimeoutError)       an exchange got no answer in time
    │   ├── LinkClosed(ConnectionError)     the local side was closed
    │   └── PortError(OSError)              opening or using a serial port / socket failed
    ├── CryptoError                         keys, signatures, sealed objects
    ├── StorageError(OSError)               durable storage failed; nothing was committed
    ├── ModemError                          AT dialogue and dial-up calls
    └── RemoteError                         the far end answered an exchange with an error

Subsystems add their own subclasses beside their code (for example
``firmware.common.crypto`` defines ``InvalidObject(CryptoError)``); this module
only holds the roots every package shares.
"""

from __future__ import annotations


class OptogateError(Exception):
    """Root of every error optogate raises on purpose."""


class ConfigError(OptogateError, ValueError):
    """Configuration is missing, malformed or names something unavailable."""


class LocalProtocolError(OptogateError):
    """The caller used a protocol core in a way the protocol forbids (a bug)."""


class RemoteProtocolError(OptogateError):
    """The peer sent something the protocol forbids."""


class MessageError(RemoteProtocolError, ValueError):
    """A message failed strict decoding: unknown type, missing/extra field, bad value."""


class LinkError(OptogateError):
    """Something went wrong on the framed session."""


class LinkDown(LinkError, ConnectionError):
    """The session is not established; exchanges in flight have been failed."""


class PeerRestarted(LinkDown):
    """The peer announced a new epoch: it rebooted, and everything in flight is lost."""


class LinkTimeout(LinkError, TimeoutError):
    """An exchange did not complete before its deadline."""


class LinkClosed(LinkError, ConnectionError):
    """The local end of the link was closed."""


class PortError(LinkError, OSError):
    """A serial port or socket could not be opened or used."""


class CryptoError(OptogateError):
    """A key, signature or sealed object is invalid or could not be used."""


class StorageError(OptogateError, OSError):
    """Durable storage failed; the last committed state is intact."""


class ModemError(OptogateError):
    """The modem misbehaved or a call could not be made."""


class RemoteError(OptogateError):
    """The far end of an exchange answered with an error.

    ``code`` is the stable error code from the reply (for example
    ``"central_unreachable"``); ``retry_after`` is a hint in seconds, or None.
    """

    def __init__(self, code: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.retry_after = retry_after
