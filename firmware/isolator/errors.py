"""Errors the isolator's CPython side raises (the board core has its own, self-contained).

::

    OptogateError
    ├── ConfigError
    │   └── IsolatorConfigError     isolator.json is malformed or unsafe
    └── IsolatorError
        └── BoardError(OSError)     mpremote failed or the board answered nonsense
"""

from firmware.common.errors import ConfigError, OptogateError


class IsolatorConfigError(ConfigError):
    """The isolator configuration is malformed or unsafe (wraps FilterConfigError)."""


class IsolatorError(OptogateError):
    """Root of the isolator's host-side errors."""


class BoardError(IsolatorError, OSError):
    """Talking to the isolator board through mpremote failed."""
