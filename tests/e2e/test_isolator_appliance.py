"""The whole appliance with the protocol-break isolator's filter on the optical line.

Cold calls fetch bundles that cross the line as streamed parts (``SERVICE_PART``
frames) beside every other kind the inner and outer modules exchange; the
filter must pass all of it and drop nothing, and a frame forged on the outer
module's side must still be dropped while calls go on.
"""

from __future__ import annotations

from typing import Any

import pytest

from firmware.common.link.kinds import Kind
from firmware.isolator import suite
from firmware.isolator.filtercore import A_TO_B, B_TO_A
from host_tools.client import Client
from host_tools.demo import appliance, link_command
from host_tools.tour import SAMPLE_DOCUMENT, SAMPLE_DXF

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Start (~20 s) and two cold calls (~20 s), with room for a loaded machine.
BOUND_S = 240


def _middlebox(control: str) -> dict[str, Any]:
    stats = link_command(control, {"cmd": "stats"})["stats"]["middlebox"]
    assert isinstance(stats, dict)
    return stats


def _dropped(counters: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if k.startswith("dropped_") and v}


@pytest.mark.timeout(BOUND_S)
def test_cold_calls_pass_the_isolator_and_a_forgery_does_not() -> None:
    with appliance(internet=True, isolator=True, expiring_after_s=None) as app:
        with Client(app.url, app.api_key, app.ca_file, max_wait=120, timeout=180) as gw:
            svg = gw.call("dxf2svg", {"precision": 2}, SAMPLE_DXF)
            assert svg.result["entities"] == {"CIRCLE": 1, "LINE": 4}
            before = _middlebox(app.control)
            assert _dropped(before[A_TO_B]) == {} and _dropped(before[B_TO_A]) == {}, before
            # the bundle crossed as parts: far more than keepalives went outer -> inner
            assert int(before[A_TO_B]["bytes_out"]) > 10_000

            # A compromised outer module writes a request (a command) onto the line.
            link_command(
                app.control,
                {
                    "cmd": "inject",
                    "side": "a",
                    "hex": suite.data_frame(Kind.FETCH_SERVICE, A_TO_B, b"run this").hex(),
                },
            )
            sealed = gw.call("doc-encrypt", {"op": "encrypt", "password": "pw"}, SAMPLE_DOCUMENT)
            opened = gw.call("doc-encrypt", {"op": "decrypt", "password": "pw"}, sealed.data)
            assert opened.data == SAMPLE_DOCUMENT
        after = _middlebox(app.control)
        assert int(after[A_TO_B]["dropped_kind"]) == 1, after
        assert _dropped(after[B_TO_A]) == {}, after
