"""The outer module's dial-up modem: AT result parser, dialler core, serial adapter.

``at`` and ``dialler`` are sans-I/O cores; ``port`` is the asyncio/pyserial
adapter.  See docs/modem.md.
"""
