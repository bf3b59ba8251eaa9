"""The central server's errors, under the project's one tree.

::

    OptogateError
    └── CentralError                       central refused an operation; nothing was written
        ├── NotFound(LookupError)          an unknown customer, gateway, service, licence...
        ├── AlreadyExists                  an id or version that is already taken
        ├── Conflict                       the change contradicts stored state (overlap, revoked)
        ├── InvalidInput(ValueError)       a bad date, duration, amount, name or file
        └── Refused                        a gateway request central will not serve; ``code``
                                           is the stable Error-reply code sent on the wire

Administrative errors are raised before the transaction commits, so an
error always means the database is unchanged.  ``Refused.code`` values are
listed in ``docs/central.md``.
"""

from __future__ import annotations

from firmware.common.errors import OptogateError


class CentralError(OptogateError):
    """Central refused an operation; the database is unchanged."""


class NotFound(CentralError, LookupError):
    """An id names nothing central knows."""


class AlreadyExists(CentralError):
    """An id (or a service version) is already taken."""


class Conflict(CentralError):
    """The change contradicts stored state: an overlapping period, a revoked licence..."""


class InvalidInput(CentralError, ValueError):
    """A value the operator or a file supplied is malformed: a date, amount, name, bundle."""


class Refused(CentralError):
    """A gateway request central will not serve.

    ``code`` is the stable code of the Error reply (``[a-z][a-z0-9_]*``);
    the message is the detail for people.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
