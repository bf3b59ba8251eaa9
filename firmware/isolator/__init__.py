"""The optional optical isolation module: a protocol-break filter on a Raspberry Pi Pico.

Board code (runs on MicroPython and CPython alike):

- ``filtercore``: the sans-I/O filter, per direction: frames in, allowlisted
  frames re-encoded out, drops counted by reason (theory of operation there).
- ``pump``: the board loop: UARTs through the filter, power lines across,
  watchdog, LED, console snapshot.
- ``fakeboard``: in-process fakes of the ``machine`` objects the pump drives.
- ``vectors``: the harness both interpreters run in the agreement tests.
- ``board/``: main.py and ``isolator_app`` (board only: ``machine``, ``_thread``).
- ``isolator.json``: allowlist, caps, rates and pins.

Host code (CPython): ``simbox`` (the link simulator's middlebox),
``fastcodec`` (C-accelerated CRC-32C/COBS), ``hostconfig``, ``cli``
(``optogate isolator``), ``wasmpy`` (MicroPython's WebAssembly port run by
Node.js, and a virtual board for mpremote), ``suite`` (test frames and
vectors), ``errors``.  See docs/isolator.md.
"""
