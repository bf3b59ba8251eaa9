"""Virtual ``_thread`` for the virtual board: the WebAssembly port has no threads.

``start_new_thread`` runs the function at once, on the caller's stack, until
the virtual watchdog ends its slice (machine.SliceEnd), then returns as a
real thread start would.  So the board loop runs a fixed number of steps at
boot and then stands still; the console (this REPL) stays usable.
"""

import machine


def start_new_thread(function, args) -> None:
    """Run ``function(*args)`` for one slice of the virtual board's time."""
    try:  # noqa: SIM105 - MicroPython's WebAssembly port has no contextlib
        function(*args)
    except machine.SliceEnd:
        pass
