"""Edits of the boot partition's ``config.txt`` and ``cmdline.txt`` (pure text in, text out).

config.txt
    The builder owns exactly one block, between two marker comments, placed
    at the end of the file and opened with ``[all]`` so no earlier
    conditional section (``[pi4]``, ``[cm4]``...) can swallow it; later lines
    win in config.txt, so the block also overrides an ``enable_uart=0`` above
    it.  A re-run removes the old block wherever it is and appends the new
    one: the file never holds two.  A begin marker without its end, or the
    reverse, is refused rather than guessed at.

    Pi 3 / Pi 4 (``board="pi4"``): ``enable_uart=1`` and
    ``dtoverlay=disable-bt`` move the full PL011 UART from Bluetooth to
    GPIO14/15, where ``/dev/serial0`` points; ``hciuart`` is masked on the
    root partition, since it would otherwise try to attach Bluetooth to it.

    Pi 5 (``board="pi5"``): the RP1 chip gives GPIO14/15 a PL011 of its own
    (``uart0``, ``/dev/ttyAMA0``) and Bluetooth has its own UART, so
    ``disable-bt`` is not needed; ``dtparam=uart0=on`` enables the header
    UART, and ``enable_uart=1`` (which on a Pi 5 means the separate debug
    connector) is kept so the block is the same shape on every board.  The
    daemons then open ``/dev/ttyAMA0``, because on a Pi 5 ``serial0`` names
    the debug connector.

cmdline.txt
    The kernel command line is one line.  Every ``console=`` naming a serial
    device (``serial0``, ``serial1``, ``ttyAMA*``, ``ttyS*``) is removed, so
    the kernel and getty never talk on the optical link; everything else
    (``root=PARTUUID=...``, ``console=tty1``, ``init=...``, quiet...) is kept
    in order.  A file with more than one non-empty line is refused: the
    firmware reads only the first, so such a file is already broken.
"""

from __future__ import annotations

import re
from typing import Final

from provisioning.image.errors import BootFileError

BEGIN_MARKER: Final = "# BEGIN optogate (written by `optogate image build`; edits here are lost)"
END_MARKER: Final = "# END optogate"

#: Boards the block is written for; "pi4" also covers the Pi 3 family.
BOARDS: Final = ("pi4", "pi5")

#: config.txt lines per board (see the module docstring for why each is there).
UART_LINES: Final[dict[str, tuple[str, ...]]] = {
    "pi4": ("enable_uart=1", "dtoverlay=disable-bt"),
    "pi5": ("enable_uart=1", "dtparam=uart0=on"),
}

#: The serial device the daemons open on each board.
SERIAL_DEVICE: Final[dict[str, str]] = {"pi4": "/dev/serial0", "pi5": "/dev/ttyAMA0"}

#: config.txt is a few KB; the firmware itself refuses files much larger than this.
MAX_BOOT_FILE_BYTES: Final = 256 * 1024

_SERIAL_CONSOLE = re.compile(r"^console=(serial\d+|ttyAMA\d+|ttyS\d+)(,.*)?$")


def _decode(data: bytes, name: str) -> str:
    if len(data) > MAX_BOOT_FILE_BYTES:
        raise BootFileError(f"{name} is {len(data)} bytes: too large to be a boot file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BootFileError(f"{name} is not UTF-8 text") from e
    if "\0" in text:
        raise BootFileError(f"{name} contains NUL bytes")
    return text


def managed_block(board: str) -> list[str]:
    """Return the lines of the managed config.txt block for ``board``; raise BootFileError."""
    if board not in UART_LINES:
        raise BootFileError(f"unknown board {board!r}: expected one of {', '.join(BOARDS)}")
    return [BEGIN_MARKER, "[all]", *UART_LINES[board], END_MARKER]


def edit_config_txt(data: bytes, board: str) -> bytes:
    """Return ``data`` (config.txt) with exactly one managed block, at its end.

    Raises BootFileError when the file is not UTF-8 text, the board is unknown,
    or the markers are unbalanced (a begin without an end, an end without a
    begin, or one block nested in another).
    """
    text = _decode(data, "config.txt")
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    kept: list[str] = []
    inside = False
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped == BEGIN_MARKER:
            if inside:
                raise BootFileError(f"config.txt line {number}: a second begin marker")
            inside = True
        elif stripped == END_MARKER:
            if not inside:
                raise BootFileError(f"config.txt line {number}: an end marker without a begin")
            inside = False
        elif not inside:
            kept.append(line)
    if inside:
        raise BootFileError("config.txt: the optogate block has no end marker")
    while kept and not kept[-1].strip():
        kept.pop()
    block = managed_block(board)
    out = [*kept, "", *block] if kept else block
    return ("\n".join(out) + "\n").encode("utf-8")


def edit_cmdline_txt(data: bytes) -> bytes:
    """Return ``data`` (cmdline.txt) without serial consoles, as one line ending in a newline.

    Raises BootFileError when it is not UTF-8 text, is empty, or holds more
    than one non-empty line.
    """
    text = _decode(data, "cmdline.txt")
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines:
        raise BootFileError("cmdline.txt is empty: the kernel would have no root= to boot")
    if len(lines) > 1:
        raise BootFileError("cmdline.txt has more than one line; the firmware reads only the first")
    words = [w for w in lines[0].split() if not _SERIAL_CONSOLE.match(w)]
    if not words:
        raise BootFileError("cmdline.txt holds nothing but serial consoles")
    return (" ".join(words) + "\n").encode("utf-8")


def serial_consoles(data: bytes) -> list[str]:
    """Return the serial ``console=`` words of a cmdline.txt (for checks); raise BootFileError."""
    return [w for w in _decode(data, "cmdline.txt").split() if _SERIAL_CONSOLE.match(w)]
