"""The central server: customers, gateways, services, licences, payments, usage, audit.

Named for its role in the product brief (the central server that gateways
dial into); it is a complete server.  ``repository`` stores the records
behind a narrow protocol, ``admin`` changes them, ``licensing`` derives what
a gateway is entitled to, ``gateway`` answers the outer modules, ``server``
and ``app`` run it, ``cli`` is ``optogate central``.  See docs/central.md.
"""
