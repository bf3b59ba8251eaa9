"""``optogate demo --tour``: the scripted walk-through, every step timed and checked.

Theory of operation
-------------------
Each step is a function that acts on a running :class:`~host_tools.demo.Appliance`
the way a program or an operator would - through the client library, the
``optogate central`` command and the link simulator's control socket - and
returns a one-line account of what it saw; a step that sees anything else
raises :class:`StepFailed`.  :func:`walk` runs the steps in order, timing
each, and stops at the first failure (later steps depend on earlier ones).
A process that died on its own during a step fails that step too.

The steps:

1. ``dxf2svg``, first call: cold - the inner module asks the outer module,
   which dials central, fetches the sealed bundle and licence, and the inner
   module builds the service;
2. the same call again: warm;
3. a ``doc-encrypt`` round trip (encrypt, then decrypt to the same bytes);
4. a licence that has run out: ``echo`` answers 402 with the licence to renew;
5. ``optogate central payment record`` extends that licence;
6. the same call succeeds (the inner module syncs before refusing);
7. the outer module's power is cut: it powers off, the built ``dxf2svg``
   still answers, the never-built ``polyline-simplify`` answers 503 with
   Retry-After;
8. power back: the outer module boots again and the unbuilt service builds.
"""

from __future__ import annotations

import json
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from rich.console import Console

from firmware.common.errors import OptogateError
from host_tools.client import Client, GatewayError, PaymentRequired, Unavailable

if TYPE_CHECKING:
    from host_tools.demo import Appliance

#: A small drawing: a rectangle of lines and a circle in it (ASCII DXF).
SAMPLE_DXF: Final = "\n".join(
    [
        "0", "SECTION", "2", "ENTITIES",
        "0", "LINE", "8", "0", "10", "0", "20", "0", "11", "100", "21", "0",
        "0", "LINE", "8", "0", "10", "100", "20", "0", "11", "100", "21", "60",
        "0", "LINE", "8", "0", "10", "100", "20", "60", "11", "0", "21", "60",
        "0", "LINE", "8", "0", "10", "0", "20", "60", "11", "0", "21", "0",
        "0", "CIRCLE", "8", "0", "10", "50", "20", "30", "40", "20",
        "0", "ENDSEC", "0", "EOF", "",
    ]
).encode()  # fmt: skip
SAMPLE_DOCUMENT: Final = b"Quarterly report: private figures that never leave the LAN.\n" * 200
PASSWORD: Final = "correct horse battery staple"  # noqa: S105 - the demo document's, shown
#: Cold calls may dial, fetch a bundle at modem speed and build: the client
#: retries 503 ("being fetched") this long in total.
COLD_WAIT_S: Final = 300.0
#: How long the outer module may take to notice its power is gone and exit.
POWER_OFF_S: Final = 20.0
#: How long a module may take to boot again when power returns.
POWER_ON_S: Final = 90.0
#: A payment is visible to the inner module after one sync; a sync over
#: dial-up takes a call, so allow a few.
PAYMENT_SEEN_S: Final = 120.0
#: The inner module's trusted time trails the wall clock by a second or two
#: (it moves from central's signed time by the monotonic clock, in whole
#: seconds), and a licence is still valid in its last second: wait this long
#: past the expiry before expecting 402.
TRUSTED_TIME_SLACK_S: Final = 5.0
#: The outer module rewrites its status file every 2 s.
STATUS_FRESH_S: Final = 3.0


class StepFailed(OptogateError):
    """A tour step did not behave as the tour expects."""


@dataclass(frozen=True)
class StepResult:
    """What one step did: its name, whether it behaved, how long it took, what it saw."""

    name: str
    ok: bool
    seconds: float
    detail: str


def client(app: Appliance, max_wait: float = COLD_WAIT_S) -> Client:
    """Return a client of the appliance's LAN API (retrying 503 up to ``max_wait``)."""
    return Client(app.url, app.api_key, app.ca_file, max_wait=max_wait, timeout=COLD_WAIT_S)


def outer_status(app: Appliance) -> dict[str, Any]:
    """Return the outer module's status file ({} if there is none yet)."""
    try:
        value = json.loads((app.state_dir / "outer" / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _check_svg(app: Appliance) -> str:
    with client(app) as gw:
        out = gw.call("dxf2svg", {"precision": 2}, SAMPLE_DXF)
    entities = out.result.get("entities", {})
    if entities != {"CIRCLE": 1, "LINE": 4} or b"<svg" not in out.data:
        raise StepFailed(f"dxf2svg answered {out.result} and {out.data[:60]!r}")
    return f"{len(out.data)} bytes of SVG, entities {entities}"


def step_cold(app: Appliance) -> str:
    """The first dxf2svg call: the service is fetched through the uplink and built."""
    started = time.monotonic()
    detail = _check_svg(app)
    took = time.monotonic() - started
    status = fresh_outer_status(app, time.time())
    call = status.get("last_call.detail") or status.get("last_call.transport") or "none seen"
    return f"{detail}; call took {took:.1f} s; outer module's last uplink call: {call}"


def fresh_outer_status(app: Appliance, since: float) -> dict[str, Any]:
    """Return the outer module's status once it was written after ``since`` (or the last one)."""
    deadline = time.monotonic() + STATUS_FRESH_S
    while True:
        status = outer_status(app)
        if float(status.get("outer.time", 0)) >= since or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def step_warm(app: Appliance) -> str:
    """The same call again: answered by the built service, no uplink."""
    return _check_svg(app)


def step_doc_encrypt(app: Appliance) -> str:
    """Encrypt a document with a password, decrypt it again, compare."""
    with client(app) as gw:
        sealed = gw.call("doc-encrypt", {"op": "encrypt", "password": PASSWORD}, SAMPLE_DOCUMENT)
        if not sealed.data.startswith(b"OGDE") or SAMPLE_DOCUMENT[:20] in sealed.data:
            raise StepFailed("doc-encrypt did not return an OGDE container")
        opened = gw.call("doc-encrypt", {"op": "decrypt", "password": PASSWORD}, sealed.data)
    if opened.data != SAMPLE_DOCUMENT:
        raise StepFailed("decrypting gave other bytes than the document")
    return f"{len(SAMPLE_DOCUMENT)} bytes -> {len(sealed.data)}-byte container -> same bytes"


def step_expired(app: Appliance) -> str:
    """Call the service whose licence has run out: 402 with the licence to renew."""
    from host_tools.demo import EXPIRING_SERVICE

    remaining = app.expiring_until + TRUSTED_TIME_SLACK_S - time.time()
    if remaining > 0:
        time.sleep(remaining)
    try:
        with client(app) as gw:
            out = gw.call(EXPIRING_SERVICE, {"text": "hello"}, b"hello")
    except PaymentRequired as e:
        if e.licence != app.licences[EXPIRING_SERVICE]:
            raise StepFailed(f"402 names licence {e.licence}, not ours") from e
        return f"402 payment_required: {e}; renew {e.renew}"
    raise StepFailed(f"the call succeeded ({out.result}) although its licence ran out")


def step_payment(app: Appliance) -> str:
    """Record a payment with the operator's command, extending the licence 30 days."""
    from host_tools.demo import EXPIRING_SERVICE, optogate_argv

    licence = app.licences[EXPIRING_SERVICE]
    argv = optogate_argv(
        "central", "--config", str(app.central_config), "payment", "record",
        "--licence", licence, "--amount", "49.00", "--currency", "EUR", "--extend", "30d",
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise StepFailed(f"payment record failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


def step_paid(app: Appliance) -> str:
    """The call that got 402 now succeeds."""
    from host_tools.demo import EXPIRING_SERVICE

    deadline = time.monotonic() + PAYMENT_SEEN_S
    attempts = 0
    while True:
        attempts += 1
        try:
            with client(app) as gw:
                out = gw.call(EXPIRING_SERVICE, {"text": "hello"}, b"hello")
            break
        except PaymentRequired as e:
            if time.monotonic() > deadline:
                raise StepFailed(f"still 402 after the payment: {e}") from e
            time.sleep(2.0)
    if out.data != b"hello":
        raise StepFailed(f"{EXPIRING_SERVICE} answered {out.data[:40]!r}")
    tries = "at the first call" if attempts == 1 else f"after {attempts} calls"
    return f"{EXPIRING_SERVICE} answered {out.result} {tries}"


def step_power_cut(app: Appliance) -> str:
    """Cut the outer module's power: it powers off; built services still answer; an
    unbuilt one gets 503 with Retry-After."""
    sup = app.supervisor
    assert sup is not None
    # Cut whenever it comes: a call to central may still be up (the outer
    # module hangs up 5 s after its last exchange); central ends it when the
    # session goes silent.
    app.set_power("a", on=False)
    code = sup.wait_exit("outer", POWER_OFF_S)
    state = sup.processes["outer"].state
    if state != "powered off":
        raise StepFailed(f"the outer module exited with status {code} ({state})")
    built = _check_svg(app)
    try:
        with client(app, max_wait=0) as gw:
            out = gw.call("polyline-simplify", {"epsilon": 0.1}, _points())
    except Unavailable as e:
        if e.status != 503 or e.retry_after is None:
            raise StepFailed(f"expected 503 with Retry-After, got {e.status}: {e}") from e
        return (
            f"outer powered off (exit {code}); dxf2svg still answers ({built}); "
            f"polyline-simplify: 503 {e.code}, Retry-After {e.retry_after:g} s"
        )
    raise StepFailed(f"polyline-simplify answered {out.result} with the outer module off")


def step_power_back(app: Appliance) -> str:
    """Power back: the outer module boots again and the unbuilt service builds."""
    sup = app.supervisor
    assert sup is not None
    before = sup.processes["outer"].restarts
    app.set_power("a", on=True)
    deadline = time.monotonic() + POWER_ON_S
    while not (
        sup.processes["outer"].restarts > before and sup.processes["outer"].state == "running"
    ):
        if time.monotonic() > deadline:
            raise StepFailed(f"the outer module did not boot again within {POWER_ON_S:g} s")
        time.sleep(0.1)
    booted = time.monotonic()
    with client(app) as gw:
        out = gw.call("polyline-simplify", {"epsilon": 0.1}, _points())
    if out.result != {"points_in": 6, "points_out": 4}:
        raise StepFailed(f"polyline-simplify answered {out.result}")
    return (
        f"outer booted again (pid {sup.processes['outer'].pid}); polyline-simplify built and "
        f"answered {out.result} {time.monotonic() - booted:.1f} s after boot"
    )


def _points() -> bytes:
    points = [(0.0, 0.0), (1.0, 0.01), (2.0, -0.01), (3.0, 5.0), (4.0, 6.0), (5.0, 7.0)]
    return b"".join(struct.pack("<dd", *p) for p in points)


#: The tour, in order: (title, step).
STEPS: Final[tuple[tuple[str, Callable[[Appliance], str]], ...]] = (
    ("dxf2svg, first call (cold: dial, fetch, build)", step_cold),
    ("dxf2svg, second call (warm)", step_warm),
    ("doc-encrypt round trip", step_doc_encrypt),
    ("a licence runs out: 402", step_expired),
    ("optogate central payment record", step_payment),
    ("the same call succeeds", step_paid),
    ("outer module power cut", step_power_cut),
    ("power back", step_power_back),
)


def walk(app: Appliance, report: Callable[[StepResult], None] | None = None) -> list[StepResult]:
    """Run the steps in order until one fails; return their results."""
    results: list[StepResult] = []
    sup = app.supervisor
    for generic, step in STEPS:
        # Over the internet the outer module connects rather than dials.
        title = generic.replace("dial,", "connect,") if app.internet else generic
        deaths = len(sup.deaths) if sup else 0
        started = time.monotonic()
        try:
            detail = step(app)
            ok = True
        except (OptogateError, GatewayError) as e:
            detail, ok = f"{type(e).__name__}: {e}", False
        if sup is not None and len(sup.deaths) > deaths:
            dead = ", ".join(f"{d.name} (status {d.exit_code})" for d in sup.deaths[deaths:])
            detail, ok = f"{detail}; died meanwhile: {dead}", False
        result = StepResult(title, ok, time.monotonic() - started, detail)
        results.append(result)
        if report is not None:
            report(result)
        if not ok:
            break
    return results


def run_tour(app: Appliance, console: Console) -> bool:
    """Run the tour, printing each step with its timing; return True if every step behaved."""
    console.print("[bold]tour[/]")

    def report(r: StepResult) -> None:
        mark = "[green]ok  [/]" if r.ok else "[bold red]FAIL[/]"
        console.print(f"{mark} {r.seconds:6.1f} s  [bold]{r.name}[/]")
        console.print(f"             {r.detail}", highlight=False, soft_wrap=True)

    results = walk(app, report)
    passed = len(results) == len(STEPS) and all(r.ok for r in results)
    total = sum(r.seconds for r in results)
    verdict = "[green]every step behaved[/]" if passed else "[bold red]the tour failed[/]"
    console.print(f"{verdict} ({len(results)}/{len(STEPS)} steps, {total:.1f} s)")
    return passed
