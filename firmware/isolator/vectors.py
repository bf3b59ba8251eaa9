"""Run filter vectors: the one harness both interpreters execute.

A vector is one JSON line::

    {"config": {...isolator.json...}, "steps": [["a->b", now_ms, "hex bytes"], ...]}

:func:`run_vector` feeds the steps, in order, to a fresh
:class:`filtercore.Filter` with the pure codec and returns one JSON line::

    {"out": ["hex forwarded by step 0", ...], "stats": {"a->b": {...}, "b->a": {...}}}

The tests run the same lines through this module under CPython and under
MicroPython (the WebAssembly port, see wasmpy.py) and require equal results,
so this file, like filtercore.py, sticks to the subset both interpreters
share.  A malformed vector raises ValueError/KeyError: it is a test bug, not
wire input.
"""

import json

try:
    from firmware.isolator import filtercore
except ImportError:  # on MicroPython the modules sit side by side
    import filtercore


def run_vector(line: str) -> str:
    """Run the vector in ``line``; return the result as one JSON line."""
    vector = json.loads(line)
    core = filtercore.Filter(filtercore.FilterConfig(vector["config"]))
    out = []
    for direction, now, data in vector["steps"]:
        out.append(core.feed(direction, bytes.fromhex(data), now).hex())
    return json.dumps({"out": out, "stats": core.statistics()})
