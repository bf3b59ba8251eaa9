"""Tools for the vendor's side and for people: client library, ``optogate call``,
the link simulator, the modem emulator and the demo launcher."""
