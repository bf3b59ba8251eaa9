"""``optogate link``: the technician's test of the optical UART link.

Run ``optogate link echo --port DEV`` on one module and ``optogate link test
--port DEV --baud B`` on the other.  The test end first measures the round
trip time with a few LinkEcho exchanges, then sends N random bytes one way as
LinkData messages of ``--chunk`` bytes (a few in flight, so the line never
idles) and asks the echo end for the SHA-256 of what it received, in index
order.  It prints the goodput (payload bytes per second, from the first chunk
queued to the digest received), the fraction of the line rate it reached
(``baud / 10`` bytes per second for 8N1), and the session's error counters
(CRC drops, retransmissions, timeouts...).  Exit status 0 means the digest
matched; anything else is a failed test.

Both ends run the real session and the real Link facade over the real serial
adapter, so the test exercises exactly what the daemons use.  Roles default
to the optical link's (the test end is the client, like the inner module; the
echo end the server), and must differ between the two ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Final

from firmware.common.adapters.serial import open_serial
from firmware.common.errors import LocalProtocolError, OptogateError, RemoteError
from firmware.common.link import messages as m
from firmware.common.link.link import Link
from firmware.common.link.session import Role, SessionConfig

#: Default test volume: 1 MiB is ~90 s at 115200 baud, enough to see noise.
DEFAULT_BYTES: Final = 2**20
#: One LinkData message: big enough that the 150-odd bytes of envelope and
#: fragment headers are noise, small enough that several are in flight.
DEFAULT_CHUNK: Final = 64 * 1024
#: LinkData messages queued at once: keeps the session's window full without
#: holding the whole transfer in its queues.
CHUNKS_IN_FLIGHT: Final = 4
DEFAULT_ECHOES: Final = 5
#: Bound on one echo exchange: far above any sane round trip, even at 9600 baud.
ECHO_TIMEOUT: Final = 10.0
#: Slack on top of the transfer's line time before the test gives up.
TRANSFER_SLACK: Final = 3.0
TRANSFER_MARGIN: Final = 15.0
#: How long the echo end waits for missing chunks once the last one arrived.
ASSEMBLY_TIMEOUT: Final = 60.0
#: Out-of-order chunks the echo end holds at most (a peer could send anything).
MAX_HELD_BYTES: Final = 64 * 2**20
#: Counters (besides every ``dropped_*``) that say the line misbehaved.
ERROR_COUNTERS: Final = (
    "retransmits",
    "fast_retransmits",
    "timeouts",
    "duplicates",
    "messages_failed",
    "sessions_down",
    "peer_restarts",
    "dead_peer",
    "link_rejected",
    "link_refused",
)


def _add_port_options(parser: argparse.ArgumentParser, *, baud_required: bool) -> None:
    parser.add_argument("--port", required=True, metavar="DEV", help="serial device")
    parser.add_argument(
        "--baud",
        type=int,
        required=baud_required,
        default=None if baud_required else 115200,
        help="line rate, 8N1" + ("" if baud_required else " (115200)"),
    )
    parser.add_argument(
        "--role",
        choices=[r.value for r in Role],
        default=None,
        help="session role (echo: server, test: client); the two ends must differ",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log link events")


def build_parser(prog: str) -> argparse.ArgumentParser:
    """Return the parser of ``optogate link``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    echo = sub.add_parser("echo", help="serve as the far end of a link test")
    _add_port_options(echo, baud_required=False)
    test = sub.add_parser("test", help="measure round trip time and goodput")
    _add_port_options(test, baud_required=True)
    test.add_argument("--bytes", type=int, default=DEFAULT_BYTES, help="bytes to send (1 MiB)")
    test.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="bytes per message")
    test.add_argument("--echoes", type=int, default=DEFAULT_ECHOES, help="round trips (5)")
    test.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the link")
    test.add_argument("--seed", type=int, default=None, help="seed of the test data")
    test.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


# -- echo end -------------------------------------------------------------------


class Reassembly:
    """Chunks of one LinkData transfer, hashed in index order as they complete.

    Chunks may complete out of order (the session interleaves bulk messages);
    later ones are held until the gap fills.  A chunk of another transfer id
    abandons the current transfer (the previous test was interrupted).
    """

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.transfer: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the current transfer's chunks."""
        self._hash = hashlib.sha256()
        self.nbytes = 0
        self._next = 0
        self._held: dict[int, bytes] = {}
        self._held_bytes = 0
        self._last: int | None = None

    def add(self, msg: m.LinkData) -> None:
        """Take one chunk.  Raises RemoteError for a duplicate or a hostile volume."""
        if msg.transfer != self.transfer:
            self.reset()
            self.transfer = msg.transfer
        if msg.index < self._next or msg.index in self._held:
            raise RemoteError("bad_transfer", f"chunk {msg.index} received twice")
        if msg.last:
            self._last = msg.index
        self._held[msg.index] = msg.chunk
        self._held_bytes += len(msg.chunk)
        if self._held_bytes > MAX_HELD_BYTES:
            self.reset()
            raise RemoteError("bad_transfer", "too much out-of-order data")
        while self._next in self._held:
            chunk = self._held.pop(self._next)
            self._held_bytes -= len(chunk)
            self._hash.update(chunk)
            self.nbytes += len(chunk)
            self._next += 1
        self.changed.set()

    @property
    def complete(self) -> bool:
        """True when every chunk up to the last one has been hashed."""
        return self._last is not None and self._next > self._last

    def digest(self) -> m.LinkDigest:
        """Return the digest of the complete transfer and start over."""
        reply = m.LinkDigest(sha256=self._hash.digest(), nbytes=self.nbytes)
        self.reset()
        self.transfer = None
        return reply


class EchoResponder:
    """The far end's handler: LinkEcho -> LinkEchoReply, LinkData -> LinkDigest."""

    def __init__(self) -> None:
        self.transfer = Reassembly()

    async def __call__(self, msg: m.Message) -> m.Message | None:
        """Answer one request (None for a LinkData chunk that is not the last)."""
        if isinstance(msg, m.LinkEcho):
            return m.LinkEchoReply(nonce=msg.nonce, sent_at=msg.sent_at)
        if isinstance(msg, m.LinkData):
            self.transfer.add(msg)
            if not msg.last:
                return None
            try:
                async with asyncio.timeout(ASSEMBLY_TIMEOUT):
                    while not self.transfer.complete:
                        self.transfer.changed.clear()
                        await self.transfer.changed.wait()
            except TimeoutError:
                self.transfer.reset()
                raise RemoteError("incomplete_transfer", "chunks missing") from None
            return self.transfer.digest()
        raise RemoteError("unsupported", f"the link echo does not serve {msg.KIND.name}")


async def run_echo(args: argparse.Namespace) -> int:
    """Serve as the far end until SIGTERM/SIGINT; return the exit status."""
    role = Role(args.role or Role.SERVER.value)
    transport = await open_serial(args.port, args.baud)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    link = Link(transport, SessionConfig(role=role, baud=args.baud))
    try:
        serving = asyncio.create_task(link.serve(EchoResponder()))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if serving.done():
            serving.result()  # raises what made serving stop
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await link.aclose()
    return 0


# -- test end -----------------------------------------------------------------


@dataclass
class LinkTestResult:
    """What ``optogate link test`` measured."""

    rtt_ms: float | None = None
    bytes: int = 0
    seconds: float | None = None
    goodput_Bps: float | None = None
    line_rate_Bps: float = 0.0
    fraction: float | None = None
    digest_ok: bool = False
    counters: dict[str, int] | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """Return the JSON object (``error`` only when the test failed early)."""
        out: dict[str, Any] = {
            "rtt_ms": self.rtt_ms,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "goodput_Bps": self.goodput_Bps,
            "line_rate_Bps": self.line_rate_Bps,
            "fraction": self.fraction,
            "digest_ok": self.digest_ok,
            "counters": self.counters or {},
        }
        if self.error is not None:
            out["error"] = self.error
        return out


def error_counters(stats: dict[str, int]) -> dict[str, int]:
    """Return the counters of ``stats`` that record line trouble, zeros included."""
    picked = {k: v for k, v in stats.items() if k.startswith("dropped_")}
    picked.update({k: stats.get(k, 0) for k in ERROR_COUNTERS})
    return dict(sorted(picked.items()))


async def measure(link: Link, args: argparse.Namespace, result: LinkTestResult) -> None:
    """Run the echoes and the transfer over ``link``, filling in ``result``."""
    loop = asyncio.get_running_loop()
    await link.wait_up(args.wait)
    rtts = []
    for _ in range(args.echoes):
        nonce = os.urandom(8)
        reply = await link.request(
            m.LinkEcho(nonce=nonce, sent_at=loop.time()),
            expect=m.LinkEchoReply,
            timeout=ECHO_TIMEOUT,
        )
        if reply.nonce != nonce:
            raise m.InvalidMessage("echo reply carries another nonce")
        rtts.append(loop.time() - reply.sent_at)
    if rtts:
        result.rtt_ms = round(statistics.median(rtts) * 1000, 3)

    rng = random.Random(args.seed) if args.seed is not None else None
    data = rng.randbytes(args.bytes) if rng is not None else os.urandom(args.bytes)
    chunks = [data[i : i + args.chunk] for i in range(0, len(data), args.chunk)] or [b""]
    expected = hashlib.sha256(data).digest()
    limit = TRANSFER_MARGIN + TRANSFER_SLACK * len(data) / result.line_rate_Bps
    slots = asyncio.Semaphore(CHUNKS_IN_FLIGHT)
    transfer = random.getrandbits(32)

    async def send_chunk(index: int) -> m.LinkDigest | None:
        async with slots:
            last = index == len(chunks) - 1
            msg = m.LinkData(chunk=chunks[index], index=index, last=last, transfer=transfer)
            if last:
                return await link.request(msg, expect=m.LinkDigest, timeout=limit)
            await link.send(msg, timeout=limit)
            return None

    started = loop.time()
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(send_chunk(i)) for i in range(len(chunks))]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    elapsed = loop.time() - started
    digest = tasks[-1].result()
    if digest is None:  # the last chunk's task always returns the digest
        raise LocalProtocolError("the last chunk got no digest")
    result.bytes = len(data)
    result.seconds = round(elapsed, 6)
    result.goodput_Bps = round(len(data) / elapsed, 1) if elapsed > 0 else None
    if result.goodput_Bps is not None:
        result.fraction = round(result.goodput_Bps / result.line_rate_Bps, 4)
    result.digest_ok = digest.sha256 == expected and digest.nbytes == len(data)


async def run_test(args: argparse.Namespace) -> LinkTestResult:
    """Run the whole test; return its result (``error`` set when it failed)."""
    role = Role(args.role or Role.CLIENT.value)
    result = LinkTestResult(line_rate_Bps=args.baud / 10)
    try:
        transport = await open_serial(args.port, args.baud)
    except OptogateError as e:
        result.error = str(e)
        return result
    link = Link(transport, SessionConfig(role=role, baud=args.baud))
    try:
        await measure(link, args, result)
    except OptogateError as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.counters = error_counters(link.statistics())
        try:
            await link.aclose()
        except OptogateError as e:
            result.error = result.error or f"{type(e).__name__}: {e}"
    return result


def _print_human(result: LinkTestResult) -> None:
    if result.rtt_ms is not None:
        print(f"round trip: {result.rtt_ms:.1f} ms (median)")
    if result.seconds is not None:
        print(
            f"sent {result.bytes} bytes in {result.seconds:.2f} s: "
            f"{result.goodput_Bps:.0f} B/s, {100 * (result.fraction or 0):.1f} % of the "
            f"{result.line_rate_Bps:.0f} B/s line rate"
        )
        print(f"digest: {'ok' if result.digest_ok else 'MISMATCH'}")
    if result.error is not None:
        print(f"error: {result.error}")
    counters = result.counters or {}
    print("counters: " + (", ".join(f"{k}={v}" for k, v in counters.items()) or "none"))


def main(argv: list[str], prog: str) -> int:
    """Run ``optogate link ACTION ...``; return the exit status."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if args.baud is not None and args.baud <= 0:
        print(f"{prog}: error: --baud must be positive", file=sys.stderr)
        return 2
    if args.action == "echo":
        try:
            return asyncio.run(run_echo(args))
        except OptogateError as e:
            print(f"{prog} echo: error: {e}", file=sys.stderr)
            return 1
    if args.bytes < 0 or args.chunk < 1 or args.chunk > m.MAX_CHUNK or args.echoes < 0:
        print(f"{prog}: error: bad --bytes, --chunk or --echoes", file=sys.stderr)
        return 2
    result = asyncio.run(run_test(args))
    if args.json:
        print(json.dumps(result.as_json(), sort_keys=True))
    else:
        _print_human(result)
    return 0 if result.digest_ok and result.error is None else 1
