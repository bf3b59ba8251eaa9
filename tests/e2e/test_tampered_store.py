"""A correctly published bundle, tampered with afterwards in storage: refused, reported, repaired.

``tests/e2e/test_faults.py`` shows central refusing a tampered bundle at
publish time.  Here the bundle was published and sealed for the gateway
correctly, and the bytes change afterwards, at rest:

1. **A bit flipped in central's blob store.**  Central names each blob by
   its SHA-256 and checks it on every read, so it refuses to serve the
   damaged object (``internal_error`` to the outer module).
2. **The blob replaced consistently** - tampered bytes stored under their
   own digest and central's record pointed at them, as someone with write
   access to central's storage (or a wrong backup restored) would leave it.
   Central now serves the tampered bytes; central's signature no longer
   verifies, so the outer module refuses to relay or cache them
   (``bad_upstream_object``), and the inner module would refuse them too.
3. **The same bytes planted in the outer module's cache** (an outer module
   that is compromised, and so checks nothing): the outer serves them and
   the inner module refuses to install them.

Each time the caller gets a typed error at once - HTTP 503 with code
``unavailable`` and a ``Retry-After`` (docs/api.md), ``Unavailable`` in the
client library, exit status 8 from ``optogate call`` - nothing is
installed, and the outer module's cache never holds the tampered object
unless it was planted there.  Once the operator repairs (republishes the
service; restores the outer module), the next call succeeds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable

import pytest

from central_stub.repository import SealedRef, TinyRepository
from firmware.common.crypto.sealed import Kind
from firmware.outer.cache import digest_of
from host_tools.client import Client, Unavailable
from host_tools.demo import (
    GATEWAY,
    REFERENCE_DIR,
    Appliance,
    appliance,
    free_port,
    optogate_argv,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Start (~15 s), three refused calls with restarts between, two repairs.
BOUND_S = 240
#: The inner module's first sync (through which central seals every bundle
#: for the gateway) comes within seconds of the start.
SEALED_S = 60.0
#: A refusal reaches the caller within seconds once the outer module is
#: connected to central again.
MET_S = 60.0
#: ``optogate call`` starts in a second or two.
COMMAND_S = 60.0


def _wait_for(predicate: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _sealed_echo(repo: TinyRepository) -> SealedRef | None:
    """Central's record of the echo bundle sealed for the gateway (the newest version)."""
    raw = json.loads(repo.path.read_bytes())
    refs = [
        SealedRef(**doc)
        for doc in raw.get("sealed", {}).values()
        if doc["kind"] == int(Kind.BUNDLE) and doc["subject"] == "echo"
    ]
    return max(refs, key=lambda r: r.version, default=None)


def _refused(app: Appliance) -> Unavailable:
    """Call echo once; return the typed error the caller got."""
    with (
        pytest.raises(Unavailable) as refused,
        Client(app.url, app.api_key, app.ca_file, max_wait=0, timeout=120) as gw,
    ):
        gw.call("echo", {"text": "x"}, b"x")
    error = refused.value
    assert error.status == 503 and error.code == "unavailable", error
    assert error.retry_after is not None and error.retry_after > 0, error
    assert error.exit_code == 8  # what `optogate call` exits with
    return error


def _refused_until(app: Appliance, seen: Callable[[], bool], what: str) -> Unavailable:
    """Call echo until ``seen()`` says the tampered object was met; every call is refused.

    Just after a restart the outer module may still be waiting out its
    reconnection backoff: those calls are refused too (central unreachable).
    """
    deadline = time.monotonic() + MET_S
    while True:
        error = _refused(app)
        if seen():
            return error
        assert time.monotonic() < deadline, f"never saw {what}; last answer: {error}"
        time.sleep(0.5)


def _nothing_installed(app: Appliance) -> None:
    assert not (app.state_dir / "inner" / "services" / "echo" / "current.json").exists()


def _outer_cache(app: Appliance) -> tuple[dict[str, object], set[str]]:
    cache = app.state_dir / "outer" / "cache"
    index = json.loads((cache / "index.json").read_bytes())
    return index, {p.name for p in (cache / "objects").iterdir()}


def _log(app: Appliance, name: str) -> str:
    return (app.state_dir / "logs" / f"{name}.log").read_text(encoding="utf-8")


@pytest.mark.timeout(BOUND_S)
def test_bundle_tampered_at_rest_is_refused_then_repaired() -> None:
    # A port of its own: another appliance on this machine may hold the usual one.
    with appliance(internet=True, expiring_after_s=None, api_port=free_port()) as app:
        sup = app.supervisor
        assert sup is not None
        repo = TinyRepository(app.state_dir / "central")
        _wait_for(lambda: '"synced"' in _log(app, "inner"), SEALED_S, "the inner never synced")
        ref = _sealed_echo(repo)
        assert ref is not None and ref.gateway_id == GATEWAY
        blob = repo.blobs.directory / ref.blob[:2] / ref.blob
        good = blob.read_bytes()
        tampered = bytearray(good)
        tampered[len(tampered) // 2] ^= 0x01

        # 1. One bit flipped in place.  Central keeps sealed objects in memory
        #    too: it is restarted, as after the disk was damaged under it.
        blob.write_bytes(bytes(tampered))
        sup.stop("central")
        sup.restart("central")
        error = _refused_until(
            app, lambda: f"{ref.blob} is damaged" in _log(app, "central"), "central's refusal"
        )
        assert "cannot be fetched" in str(error)
        _nothing_installed(app)
        blob.write_bytes(good)  # the operator restores the blob from a backup

        # 2. The tampered bytes stored whole, and central's record pointed at them:
        #    the outer module checks central's signature and refuses to relay
        #    them (or, when it passes a bundle on as it arrives, the inner does).
        bad_digest = repo.blobs.put(bytes(tampered))
        with repo.transaction() as tx:
            tx.put_sealed(SealedRef(ref.gateway_id, ref.kind, ref.subject, ref.version, bad_digest))
        sup.stop("central")
        sup.restart("central")
        _refused_until(
            app,
            lambda: (
                "bad_upstream_object" in _log(app, "outer") or "build_failed" in _log(app, "inner")
            ),
            "the tampered bundle refused",
        )
        _nothing_installed(app)
        index, objects = _outer_cache(app)
        # Not cached: the outer module verifies before it stores.
        assert bad_digest not in objects and digest_of(bytes(tampered)) == bad_digest
        assert "echo" not in index["services"]  # type: ignore[operator]

        # 3. The same bytes planted in the outer module's cache, as a
        #    compromised outer module would serve them: the inner refuses them.
        cache = app.state_dir / "outer" / "cache"
        sup.stop("outer")
        saved_index = (cache / "index.json").read_bytes()
        (cache / "objects" / bad_digest).write_bytes(bytes(tampered))
        planted = json.loads(saved_index)
        planted["services"]["echo"] = {
            "version": ref.version,
            "bundle": bad_digest,
            "stored_at": time.time(),
        }
        (cache / "index.json").write_text(json.dumps(planted))
        sup.restart("outer")
        before = len(_log(app, "inner"))
        error = _refused_until(
            app, lambda: '"build_failed"' in _log(app, "inner")[before:], "the inner's refusal"
        )
        # The call that met the build answers "could not be built"; one that
        # came just after is refused by the failed build's backoff, saying why.
        assert "could not be built" in str(error) or "did not verify" in str(error), error
        assert '"service":"echo"' in _log(app, "inner")[before:]
        _nothing_installed(app)
        # What `optogate call` shows a script: exit status 8 and the error as JSON.
        done = subprocess.run(
            optogate_argv(
                "call", "echo", "--json", "--max-wait", "0", "--url", app.url,
                "--api-key", app.api_key, "--ca", str(app.ca_file),
            ),
            capture_output=True, text=True, timeout=COMMAND_S, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 8, (done.returncode, done.stdout, done.stderr)
        shown = json.loads(done.stdout)
        assert (shown["ok"], shown["status"], shown["code"]) == (False, 503, "unavailable"), shown
        _nothing_installed(app)
        # The operator restores the outer module.
        sup.stop("outer")
        (cache / "index.json").write_bytes(saved_index)
        (cache / "objects" / bad_digest).unlink()
        sup.restart("outer")

        # Repair at central: the service republished, as a new version.
        source = app.state_dir / "echo-v2"
        shutil.copytree(REFERENCE_DIR / "echo", source)
        manifest = source / "manifest.toml"
        manifest.write_text(manifest.read_text().replace("version = 1", "version = 2"))
        app.command("bundle", "build", str(source), "--out", "bundles/echo-v2.ogb",
                    "--sign-key", "central-keys/central.key")  # fmt: skip
        app.command("central", "--config", str(app.central_config), "service", "publish",
                    "bundles/echo-v2.ogb")  # fmt: skip
        with Client(app.url, app.api_key, app.ca_file, max_wait=120, timeout=300) as gw:
            assert gw.call("echo", {"text": "y"}, b"y").data == b"y"
            (echo,) = [s for s in gw.services() if s["service"] == "echo"]
        assert echo["version"] == 2, echo
        current = app.state_dir / "inner" / "services" / "echo" / "current.json"
        assert json.loads(current.read_bytes()) == {"version": 2}
        assert [d.name for d in sup.deaths] == []  # nothing died on its own
