"""What the SIGKILL tests share: a replayable kill schedule and a writer killed mid-write.

Each test names its seed in every failure (``replaying``), takes it from
``OPTOGATE_CRASH_SEED`` to replay one (``crash_seed``), and runs a writer
process that prints ``ready`` and then one acknowledgement line per finished
write, to be SIGKILLed at a chosen moment (``killed_writer``).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

#: How long a writer may take to import and print ``ready``, on a loaded machine.
READY_S = 30.0


def crash_seed() -> int:
    """The kill schedule's seed: ``OPTOGATE_CRASH_SEED`` to replay one, else a fresh one."""
    text = os.environ.get("OPTOGATE_CRASH_SEED")
    return int(text) if text else random.SystemRandom().randrange(2**32)


@contextlib.contextmanager
def replaying(why: str) -> Iterator[None]:
    """Name the seed on any failure inside the block, not only on assertions."""
    try:
        yield
    except Exception as e:
        e.add_note(why)
        raise


def killed_writer(argv: list[str], log: Path, delay: float, why: str) -> list[str]:
    """Run a writer, SIGKILL it ``delay`` seconds after it is ready; return its complete lines.

    The writer's acknowledgements go to a file, not a pipe: a pipe nobody
    reads fills up and would stall the writer in a print, far from its
    writes.  A line the kill cut short was never acknowledged.
    """
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", *argv], stdout=out)
    try:
        deadline = time.monotonic() + READY_S
        while not log.read_text().startswith("ready\n"):
            assert proc.poll() is None, f"the writer exited with {proc.returncode}; {why}"
            assert time.monotonic() < deadline, f"the writer never became ready; {why}"
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    text = log.read_text()
    return text[: text.rfind("\n") + 1].splitlines()[1:]
