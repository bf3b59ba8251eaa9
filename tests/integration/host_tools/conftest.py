"""Fixtures for the client library and ``optogate call`` against a real inner daemon.

The inner module's test bench lives beside its tests; it is imported from
there so both suites drive the same real daemon and the same scripted peer.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inner"))

from inner_testbed import (
    CentralPeer,
    DaemonRunner,
    Gateway,
    algo_bundle,
    free_port,
    generate_api_key,
    provisioned,
)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    """A running inner daemon with services for every error class (see the tests)."""
    link_port = free_port()
    with provisioned(link_port) as gw:
        peer = CentralPeer(gw)
        key = generate_api_key()
        stranger = generate_api_key()
        peer.publish(algo_bundle("algo", 1))
        peer.publish(algo_bundle("slow", 1, timeout_s=0.5))
        peer.publish(algo_bundle("other", 1))
        peer.publish(algo_bundle("later", 1))
        peer.publish(algo_bundle("expired", 1))
        peer.grant("algo", key, lic_id="L-1")
        peer.grant("slow", key, lic_id="L-2")
        peer.grant("later", key, lic_id="L-3")
        peer.grant("other", stranger, lic_id="L-4")
        peer.grant("expired", key, lic_id="L-5", valid_until=peer.now() - 60)
        await peer.start(link_port)
        daemon = DaemonRunner(gw)
        try:
            await daemon.start()
            await daemon.wait_for(lambda: daemon.daemon.trust.licences is not None)
            yield Gateway(gw, peer, daemon, key, daemon.url)
        finally:
            await daemon.stop()
            await peer.stop()
