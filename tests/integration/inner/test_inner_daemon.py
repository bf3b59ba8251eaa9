"""The daemon as systemd runs it: sd_notify, watchdog, `optogate inner status`, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable

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


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Return once ``cond()`` holds; raise TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - polling a plain attribute
            await asyncio.sleep(0.02)


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

                async def drain() -> None:  # as systemd does: read every datagram
                    while True:
                        seen.append((await loop.sock_recv(sock, 4096)).decode())

                reader = asyncio.ensure_future(drain())
                await until(lambda: sum("WATCHDOG=1" in m for m in seen) >= 2)
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
                await until(lambda: any("STOPPING=1" in m for m in seen))
                reader.cancel()
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


@pytest.mark.timeout(10)
def test_notify_never_blocks_on_a_receiver_that_stopped_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from firmware.common import sdnotify

    sock_dir = tempfile.mkdtemp(prefix="og-notify-")
    path = os.path.join(sock_dir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        results = [sdnotify.notify("WATCHDOG=1") for _ in range(5000)]  # never read
        assert results[0] is True
        assert results[-1] is False  # the queue is full: dropped, not blocked
    os.unlink(path)
    os.rmdir(sock_dir)
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.notify("READY=1") is False  # not under systemd
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdnotify.watchdog_interval() is None
