"""Suite-wide fixtures: every test must leave no thread, child process or task behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis profiles: "dev" (default) keeps `make test` fast; "record" is the
# run of record for the link's property tests (>= 10,000 scenarios in total):
#   HYPOTHESIS_PROFILE=record .venv/bin/pytest tests/unit/link
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None, print_blob=True)
settings.register_profile("record", max_examples=2500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Benign threads owned by libraries for the life of the process.
_ALLOWED_THREAD_PREFIXES = ("asyncio_", "ThreadPoolExecutor", "pytest_timeout")


def _children() -> set[int]:
    """PIDs of this process's live (non-zombie) children, read from /proc."""
    me = os.getpid()
    kids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ... ; comm may contain spaces, so split after ')'
        rest = stat.rsplit(")", 1)[1].split()
        if int(rest[1]) == me and rest[0] != "Z":
            kids.add(int(entry.name))
    return kids


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    kids_before = _children()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked_threads = [
            t
            for t in threading.enumerate()
            if t not in threads_before
            and t.is_alive()
            and not t.name.startswith(_ALLOWED_THREAD_PREFIXES)
        ]
        leaked_kids = _children() - kids_before
        if not (leaked_threads or leaked_kids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked_threads, f"test leaked threads: {leaked_threads}"
    assert not leaked_kids, f"test leaked child processes: {sorted(leaked_kids)}"
