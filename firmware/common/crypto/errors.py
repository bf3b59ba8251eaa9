"""The errors of the trust layer, all under :class:`~firmware.common.errors.CryptoError`.

::

    CryptoError
    ├── KeyFileError(ValueError)        a key file is missing, unreadable or not the expected key
    │   └── InsecureKeyFile             a private key file others can read: refused
    ├── InvalidSignature                a signature does not verify
    ├── InvalidObject(ValueError)       a sealed object is not valid (deliberately vague)
    │   ├── ExpiredObject               authentic, but past its expiry at trusted time
    │   ├── RollbackError               authentic, but older than a version already accepted
    │   └── UnlistedObject              not the version the sync metadata in force lists
    ├── StaleMetadata                   no sync metadata fresh enough at trusted time (freeze)
    └── InvalidApiKey(ValueError)       a string that is not an API key at all

:class:`InvalidObject` is vague on purpose, like Fernet's ``InvalidToken``: an
object that fails to parse, to verify, to decrypt or to decompress gives the
attacker no hint which.  Only once the issuer's signature has verified do we
say more (expired, rolled back), because only then is the object central's.
"""

from __future__ import annotations

from firmware.common.errors import CryptoError


class KeyFileError(CryptoError, ValueError):
    """A key file is missing, unreadable, malformed or holds another kind of key."""


class InsecureKeyFile(KeyFileError):
    """A private key file is readable or writable by group or others; it was not loaded."""


class InvalidSignature(CryptoError):
    """A signature does not verify under the given public key."""


class InvalidObject(CryptoError, ValueError):
    """A sealed object is not valid: malformed, forged, not for us, or not openable."""


class ExpiredObject(InvalidObject):
    """An authentic sealed object whose expiry has passed at trusted time."""


class RollbackError(InvalidObject):
    """An authentic sealed object older than one already accepted (or conflicting with it)."""


class UnlistedObject(InvalidObject):
    """An object that the accepted sync metadata does not list, at least not in this version."""


class StaleMetadata(CryptoError):
    """The latest accepted sync metadata is too old: the upstream may be frozen."""


class InvalidApiKey(CryptoError, ValueError):
    """A string that does not have the shape of an optogate API key."""
