"""One source, two interpreters: the filter core under MicroPython agrees with CPython.

MicroPython here is its WebAssembly port (npm, run by Node.js), the same
interpreter family and 32-bit small-int width as the RP2040 board.  One
interpreter process serves every vector of the module (starting it is the
slow part); the fixture closes it and waits for it.
"""

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.common.link.framing import FrameType
from firmware.common.link.kinds import Kind
from firmware.isolator import suite, vectors, wasmpy
from firmware.isolator.filtercore import A_TO_B, B_TO_A

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ISOLATOR = Path(vectors.__file__).parent
BOARD_FILES = [
    ISOLATOR / name for name in ("filtercore.py", "pump.py", "fakeboard.py", "vectors.py")
]


@pytest.fixture(scope="module")
def micropython() -> Iterator[wasmpy.MicroPythonServer]:
    why = wasmpy.missing()
    if why is not None:
        pytest.fail(why)
    with wasmpy.MicroPythonServer("vectors", "run_vector", BOARD_FILES) as server:
        yield server


@pytest.fixture(scope="module")
def micropython_pump() -> Iterator[wasmpy.MicroPythonServer]:
    why = wasmpy.missing()
    if why is not None:
        pytest.fail(why)
    with wasmpy.MicroPythonServer("vectors", "run_pump", BOARD_FILES) as server:
        yield server


def both(server: wasmpy.MicroPythonServer, vector: dict[str, Any]) -> tuple[Any, Any]:
    line = json.dumps(vector)
    return json.loads(vectors.run_vector(line)), json.loads(server.call(line))


def test_it_really_is_micropython(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\n\ndef name(line):\n    return sys.implementation.name + line\n")
    with wasmpy.MicroPythonServer("probe", "name", [probe]) as server:
        assert server.call("!") == "micropython!"


@pytest.mark.timeout(60)
def test_standard_vectors_agree(micropython: wasmpy.MicroPythonServer) -> None:
    vecs = suite.standard_vectors(seed=5)
    assert len(vecs) > 90
    for vec in vecs:
        cpython, mpy = both(micropython, vec)
        assert mpy == cpython, vec["name"]
        forwarded = [len(h) // 2 for h in mpy["out"]]
        assert sum(forwarded) or not any(vec["expect"]), vec["name"]


def frame_mix() -> st.SearchStrategy[bytes]:
    directions = st.sampled_from([A_TO_B, B_TO_A])
    valid = st.one_of(
        st.builds(
            suite.data_frame,
            st.sampled_from([int(k) for k in Kind] + [0, 0x20, 0x60, 0xFE]),
            directions,
            st.binary(max_size=300),
        ),
        st.builds(
            suite.control_frame,
            st.sampled_from([FrameType.HELLO, FrameType.HELLO_ACK, FrameType.ACK, FrameType.PING]),
            directions,
        ),
    )
    flipped = st.tuples(valid, st.integers(0, 10**6), st.integers(1, 255)).map(
        lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1 :]
    )
    return st.one_of(valid, flipped, st.binary(max_size=200))


@settings(max_examples=300)
@given(
    pieces=st.lists(st.tuples(st.sampled_from([A_TO_B, B_TO_A]), frame_mix()), max_size=16),
    maintenance=st.booleans(),
    frame_burst=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_streams_agree(
    micropython: wasmpy.MicroPythonServer,
    pieces: list[tuple[str, bytes]],
    maintenance: bool,
    frame_burst: int,
    seed: int,
) -> None:
    cfg = suite.shipped_config(maintenance)
    for direction in (A_TO_B, B_TO_A):
        cfg["rate"][direction]["frame_burst"] = frame_burst
        cfg["rate"][direction]["frames_per_s"] = 50
    rng = random.Random(seed)
    now = 0
    steps = []
    for direction, data in pieces:
        # deliver each piece in random slices at advancing times (seeded)
        i = 0
        while i < len(data):
            n = rng.randrange(1, 64)
            steps.append([direction, now, data[i : i + n].hex()])
            now += rng.randrange(0, 40)
            i += n
    cpython, mpy = both(micropython, {"config": cfg, "steps": steps})
    assert mpy == cpython


def test_errors_cross_back(micropython: wasmpy.MicroPythonServer) -> None:
    with pytest.raises(wasmpy.MicroPythonCallError, match=r"ValueError|KeyError"):
        micropython.call("{}")
    with pytest.raises(ValueError, match="one line"):
        micropython.call("a\nb")
    # the interpreter survives a failed call
    _, mpy = both(micropython, {"config": suite.shipped_config(), "steps": []})
    assert mpy["out"] == []


@settings(max_examples=80)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 300),
            st.lists(frame_mix(), max_size=3).map(b"".join),
            st.lists(frame_mix(), max_size=3).map(b"".join),
            st.integers(0, 1),
            st.integers(0, 1),
        ),
        max_size=12,
    ),
    write_limit=st.one_of(st.none(), st.integers(0, 500)),
    active_low=st.booleans(),
)
def test_board_loop_agrees(
    micropython_pump: wasmpy.MicroPythonServer,
    steps: list[tuple[int, bytes, bytes, int, int]],
    write_limit: int | None,
    active_low: bool,
) -> None:
    now = 0
    plan = []
    for dt, from_outer, from_inner, outer_power, inner_power in steps:
        now += dt
        plan.append([now, from_outer.hex(), from_inner.hex(), outer_power, inner_power])
    vector = {"config": suite.shipped_config(), "write_limit": write_limit, "steps": plan}
    line = json.dumps({**vector, "power_in_active_low": active_low})
    assert json.loads(micropython_pump.call(line)) == json.loads(vectors.run_pump(line))
