"""Simulators that stand in for hardware: ``optogate sim link`` and ``optogate sim modem``.

:mod:`host_tools.sim.line` is the sans-I/O model of the optical UART line
(pacing, bit errors, drops, latency, cut, power); :mod:`host_tools.sim.link`
is the asyncio adapter that joins two ptys through it and serves the control
socket.  :mod:`host_tools.sim.modem` emulates the outer module's dial-up
modem.
"""
