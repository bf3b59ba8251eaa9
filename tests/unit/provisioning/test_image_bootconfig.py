"""config.txt's managed block and cmdline.txt's consoles: pure edits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provisioning.image.bootconfig import (
    BEGIN_MARKER,
    END_MARKER,
    edit_cmdline_txt,
    edit_config_txt,
    managed_block,
    serial_consoles,
)
from provisioning.image.errors import BootFileError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

STOCK = b"dtparam=audio=on\n\n[cm4]\notg_mode=1\n\n[pi4]\narm_boost=1\n\n[all]\n"
CMDLINE = (
    b"console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 "
    b"fsck.repair=yes rootwait quiet\n"
)


def test_block_appended_at_end_opened_with_all() -> None:
    out = edit_config_txt(STOCK, "pi4").decode()
    assert out.startswith("dtparam=audio=on\n\n[cm4]\notg_mode=1\n")
    tail = out.splitlines()[-5:]
    assert tail == [BEGIN_MARKER, "[all]", "enable_uart=1", "dtoverlay=disable-bt", END_MARKER]
    assert out.count(BEGIN_MARKER) == 1
    assert out.endswith("\n")


def test_pi5_variant_enables_uart0_without_disable_bt() -> None:
    out = edit_config_txt(STOCK, "pi5").decode()
    assert "dtparam=uart0=on" in out
    assert "disable-bt" not in out


def test_rerun_replaces_the_block() -> None:
    once = edit_config_txt(STOCK, "pi4")
    assert edit_config_txt(once, "pi4") == once
    switched = edit_config_txt(once, "pi5").decode()
    assert switched.count(BEGIN_MARKER) == 1
    assert "disable-bt" not in switched


def test_block_in_the_middle_is_moved_to_the_end() -> None:
    block = "\n".join(managed_block("pi4")).encode()
    moved = edit_config_txt(b"a=1\n" + block + b"\n[pi4]\nb=2\n", "pi4").decode().splitlines()
    assert moved[:3] == ["a=1", "[pi4]", "b=2"]
    assert moved[-1] == END_MARKER
    assert moved.count(BEGIN_MARKER) == 1


def test_crlf_and_empty_files() -> None:
    assert edit_config_txt(b"a=1\r\nb=2\r\n", "pi4").decode().startswith("a=1\nb=2\n\n")
    assert edit_config_txt(b"", "pi4").decode().splitlines() == managed_block("pi4")


@pytest.mark.parametrize(
    "text",
    [
        f"a=1\n{BEGIN_MARKER}\nenable_uart=1\n",
        f"a=1\n{END_MARKER}\n",
        f"{BEGIN_MARKER}\n{BEGIN_MARKER}\n{END_MARKER}\n",
    ],
)
def test_unbalanced_markers_refused(text: str) -> None:
    with pytest.raises(BootFileError):
        edit_config_txt(text.encode(), "pi4")


@pytest.mark.parametrize("data", [b"\xff\xfe", b"a=1\0", b"x" * 300_000])
def test_non_text_config_refused(data: bytes) -> None:
    with pytest.raises(BootFileError):
        edit_config_txt(data, "pi4")


def test_unknown_board_refused() -> None:
    with pytest.raises(BootFileError):
        edit_config_txt(STOCK, "pi2")


def test_cmdline_loses_serial_consoles_only() -> None:
    out = edit_cmdline_txt(CMDLINE)
    assert out == (
        b"console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait quiet\n"
    )
    assert serial_consoles(out) == []
    assert edit_cmdline_txt(out) == out


@pytest.mark.parametrize(
    "console",
    ["console=serial0,115200", "console=ttyAMA0,115200", "console=ttyS0", "console=serial1"],
)
def test_every_serial_console_form_removed(console: str) -> None:
    out = edit_cmdline_txt(f"{console} root=/dev/mmcblk0p2 console=tty1\n".encode())
    assert out == b"root=/dev/mmcblk0p2 console=tty1\n"


def test_trailing_blank_lines_tolerated() -> None:
    assert edit_cmdline_txt(b"root=x quiet\n\n\n") == b"root=x quiet\n"


@pytest.mark.parametrize("data", [b"", b"\n\n", b"root=x\nquiet\n", b"console=serial0,115200\n"])
def test_bad_cmdline_refused(data: bytes) -> None:
    with pytest.raises(BootFileError):
        edit_cmdline_txt(data)


_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789=,.-_/", min_size=1, max_size=12)
_CONSOLE = st.sampled_from(["console=serial0,115200", "console=ttyAMA0", "console=tty1"])


@given(
    st.lists(st.one_of(_WORD, _CONSOLE), min_size=1, max_size=20).filter(
        lambda ws: (
            any(not w.startswith("console=") or w == "console=tty1" for w in ws)
            and any(not serial_consoles(w.encode()) for w in ws)
        )
    )
)
def test_cmdline_edit_keeps_order_and_is_idempotent(words: list[str]) -> None:
    out = edit_cmdline_txt((" ".join(words) + "\n").encode())
    kept = [w for w in words if not serial_consoles(w.encode())]
    assert out.decode().split() == kept
    assert out.count(b"\n") == 1
    assert edit_cmdline_txt(out) == out
