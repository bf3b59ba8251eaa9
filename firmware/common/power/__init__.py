"""Power-status monitoring and status LEDs over GPIO.

* :mod:`.config` - backend name, BCM pins, pulls, active levels, debounce.
* :mod:`.gpio` - the GPIO seam (``GpioBackend``, ``InputLine``,
  ``OutputLine``), the ``none`` backend and ``load_backend``;
  :mod:`.rpigpio` (RPi.GPIO / rpi-lgpio) and :mod:`.sim` (driven pins) behind it.
* :mod:`.debounce`, :mod:`.monitor` - sans-I/O cores: debounced power lines
  to ``PeerPowerLost`` / ``PeerPowerRestored`` / ``OwnPowerFailing`` /
  ``OwnPowerRestored`` events.
* :mod:`.leds` - sans-I/O LED pattern core.
* :mod:`.watcher` - asyncio adapters: ``PowerWatcher``, ``LedDriver``.
* :mod:`.simlink` - the sim backend's power pins follow the link simulator.

docs/hardware.md describes the wiring these defaults assume.
"""
