"""Simulators that stand in for hardware: the optical link (``optogate sim link``).

:mod:`host_tools.sim.line` is the sans-I/O model of the UART line (pacing,
bit errors, drops, latency, cut, power); :mod:`host_tools.sim.link` is the
asyncio adapter that joins two ptys through it and serves the control socket.
"""
