"""The daemon as systemd runs it: sd_notify, watchdog, `optogate inner status`, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import tempfile

import pytest
from inner_testbed import (
    CentralPeer,
    DaemonProcess,
    algo_bundle,
    free_port,
    generate_api_key,
    provisioned,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def optogate(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from host_tools.cli import main; sys.exit(main())",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_notify_watchdog_status_and_clean_stop() -> None:
    sock_dir = tempfile.mkdtemp(prefix="og-notify-")
    path = os.path.join(sock_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    link_port = free_port()
    try:
        with provisioned(link_port) as gw:
            peer = CentralPeer(gw)
            key = generate_api_key()
            peer.publish(algo_bundle("algo", 1))
            peer.grant("algo", key, lic_id="L-1")
            await peer.start(link_port)
            daemon = DaemonProcess(gw, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
            try:
                await daemon.start()
                loop = asyncio.get_running_loop()
                seen: list[str] = []
                async with asyncio.timeout(10):
                    while sum("WATCHDOG=1" in m for m in seen) < 2 or not seen:
                        seen.append((await loop.sock_recv(sock, 4096)).decode())
                assert seen[0].startswith("READY=1")
                await asyncio.sleep(1.5)  # the status file is rewritten every second
                code, out, _ = await optogate("inner", "status", "--config", str(gw.config))
                assert code == 0, out
                assert "link         up" in out
                assert "L-1: acme / algo" in out
                code, out, _ = await optogate(
                    "inner", "status", "--config", str(gw.config), "--json"
                )
                doc = json.loads(out)
                assert doc["gateway"] == "gw-test"
                assert doc["link"]["state"] == "up"
                assert doc["usage"]["batches"] == 0
                assert await daemon.terminate() == 0
                async with asyncio.timeout(5):
                    while "STOPPING=1" not in seen[-1]:
                        seen.append((await loop.sock_recv(sock, 4096)).decode())
            finally:
                await daemon.terminate()
                await peer.stop()
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(sock_dir)


async def test_bad_configuration_and_second_instance_are_refused() -> None:
    link_port = free_port()
    with provisioned(link_port) as gw:
        bad = gw.root / "bad.toml"
        bad.write_text('[api]\nprot = 1\n[gateway]\nkeys_dir = "k"\nstate_dir = "s"\n')
        code, _, err = await optogate("inner", "run", "--config", str(bad))
        assert code == 2
        assert "prot" in err
        peer = CentralPeer(gw)
        await peer.start(link_port)
        daemon = DaemonProcess(gw)
        try:
            await daemon.start()
            code, _, err = await optogate("inner", "run", "--config", str(gw.config))
            assert code == 78
            assert "cannot start" in err
        finally:
            await daemon.terminate()
            await peer.stop()
        code, _, err = await optogate("inner", "status", "--config", str(gw.config))
        assert code == 1  # the status file's writer is gone (stale after a few seconds)
