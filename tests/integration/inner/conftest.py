"""Fixtures for the inner module's integration tests: a gateway, its peer, its daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from inner_testbed import (
    Bed,
    CentralPeer,
    DaemonRunner,
    algo_bundle,
    free_port,
    generate_api_key,
    provisioned,
    ssl_context,
)


@pytest.fixture
async def bed() -> AsyncIterator[Bed]:
    """A gateway with service ``algo`` v1 published and licensed to ``bed.key``; daemon running."""
    link_port = free_port()
    with provisioned(link_port) as gw:
        peer = CentralPeer(gw)
        key = generate_api_key()
        peer.publish(algo_bundle("algo", 1))
        peer.grant("algo", key, lic_id="L-1")
        await peer.start(link_port)
        daemon = DaemonRunner(gw)
        bed: Bed | None = None
        try:
            await daemon.start()
            async with httpx.AsyncClient(
                base_url=daemon.url, verify=ssl_context(gw), timeout=20
            ) as http:
                # the first sync happens when the link comes up
                await daemon.wait_for(lambda: daemon.daemon.trust.licences is not None)
                bed = Bed(gw, peer, daemon, key, http)
                yield bed
        finally:
            if bed is not None and bed.daemon is not daemon:  # the test restarted it
                await bed.daemon.stop()
            await daemon.stop()
            await peer.stop()
