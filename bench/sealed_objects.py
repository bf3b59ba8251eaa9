"""Cost of sealing and opening objects: what a bundle download costs the inner module.

For each payload size, suite (X25519, ML-KEM-768+X25519 hybrid) and
compression (none, zlib, xz) the benchmark seals a payload the way central
does and opens it the way the inner module does, and prints the median time
of each and the sealed size.  The payload is half random bytes, half a
repeated text pattern, a rough stand-in for a bundle (compiled code and
data compress about that well).

Nothing here is a pass/fail threshold; figures depend on the machine (a Pi 3
is roughly 5-10x slower than a laptop core).

Usage::

    .venv/bin/python bench/sealed_objects.py [--repeat N]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

from firmware.common.crypto.keys import RecipientKey, SigningKey
from firmware.common.crypto.sealed import Compression, Kind, open_sealed, seal

SIZES = [64 * 1024, 1024 * 1024, 8 * 1024 * 1024]
NOW = 1_767_225_600


def payload(size: int) -> bytes:
    """Return ``size`` bytes: half random, half a repeated pattern."""
    half = size // 2
    pattern = b"optogate bundle pattern 0123456789 "
    return os.urandom(half) + (pattern * (size // len(pattern) + 1))[: size - half]


def seal_once(data: bytes, central: SigningKey, inner: RecipientKey, comp: Compression) -> bytes:
    """Seal ``data`` as central would."""
    return seal(
        data,
        kind=Kind.BUNDLE,
        subject="bench",
        version=1,
        created=NOW,
        expires=NOW + 86_400,
        issuer=central,
        recipient=inner.public,
        compression=comp,
    )


def open_once(sealed: bytes, central: SigningKey, inner: RecipientKey) -> bytes:
    """Open ``sealed`` as the inner module would."""
    return open_sealed(sealed, inner, central.public, now=NOW, expected_kind=Kind.BUNDLE).payload


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Return the median wall time of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    central = SigningKey.generate()
    header = f"{'size':>9} {'suite':>7} {'compr':>5} {'sealed':>10} {'seal ms':>9} {'open ms':>9}"
    print(header)
    print("-" * len(header))
    for size in SIZES:
        data = payload(size)
        for pq in (False, True):
            inner = RecipientKey.generate(pq=pq)
            for comp in Compression:
                do_seal = functools.partial(seal_once, data, central, inner, comp)
                sealed = do_seal()
                t_seal = median_seconds(do_seal, args.repeat)
                do_open = functools.partial(open_once, sealed, central, inner)
                t_open = median_seconds(do_open, args.repeat)
                print(
                    f"{size // 1024:>7}Ki {'hybrid' if pq else 'x25519':>7} "
                    f"{comp.name.lower():>5} {len(sealed):>10} "
                    f"{t_seal * 1000:>9.1f} {t_open * 1000:>9.1f}"
                )


if __name__ == "__main__":
    main()
