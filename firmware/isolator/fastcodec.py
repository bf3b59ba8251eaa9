"""CPython fast path for the filter core's codec: C-accelerated CRC-32C and COBS.

The board runs :class:`~firmware.isolator.filtercore.PureCodec`; the link
simulator at 1 Mbaud (about 100 KB/s per direction) wants the ``crc32c`` and
``cobs`` packages, the same ones firmware/common/link/framing.py uses.  Both
codecs must give identical bytes and reject the same inputs
(tests/unit/isolator/test_codec.py proves it); :func:`best_codec` falls back to
the pure one when the packages are missing.
"""

from typing import Any

from firmware.isolator.filtercore import PureCodec


class FastCodec:
    """CRC-32C and COBS from the C extensions, with the core's codec interface."""

    def __init__(self) -> None:
        import crc32c
        from cobs import cobs

        self._crc = crc32c.crc32c
        self._cobs = cobs
        self.cobs_encode = cobs.encode

    def crc32c(self, data: bytes) -> bytes:
        """Return the CRC-32C of ``data`` as 4 big-endian bytes."""
        crc: int = self._crc(data)
        return crc.to_bytes(4, "big")

    def cobs_decode(self, data: bytes) -> bytes | None:
        """Return the decoded bytes, or None when ``data`` is not valid COBS."""
        try:
            decoded: bytes = self._cobs.decode(data)
        except self._cobs.DecodeError:
            return None
        return decoded


def best_codec() -> Any:
    """Return a FastCodec when the C packages import, else the pure codec."""
    try:
        return FastCodec()
    except ImportError:
        return PureCodec
