"""Message kinds: the one-byte ``kind`` carried in every DATA frame header.

The kind tells a wire filter (the isolator) what a frame belongs to without
decoding the message.  Ranges fix the direction a kind may travel in:

    0x01-0x3F  requests  client -> server   (inner -> outer, outer -> central)
    0x40-0x7F  replies   server -> client
    0x80-0xBF  link maintenance, either direction (technician's link test)

The optical link's allowlist follows from it: the inner module (client) sends
only requests; the outer module (server) sends only replies, so it cannot
command the inner module.
"""

from __future__ import annotations

import enum


class Kind(enum.IntEnum):
    """Every message kind on any optogate session."""

    # requests: client -> server
    FETCH_SERVICE = 0x01  # sealed bundle + licence data for one service
    SYNC = 0x02  # licences, client key hashes, revocations, signed time
    USAGE_REPORT = 0x03  # a signed batch of usage records
    STATUS = 0x04  # ask the server for its status summary
    AUTH_BEGIN = 0x10  # uplink: gateway announces itself, asks for a challenge
    AUTH_PROOF = 0x11  # uplink: gateway's signature over the challenge
    # replies: server -> client
    SERVICE = 0x41
    SYNC_DATA = 0x42
    USAGE_ACK = 0x43
    STATUS_REPORT = 0x44
    SERVICE_PART = 0x45  # a piece of the bundle of the SERVICE reply that follows
    AUTH_CHALLENGE = 0x50
    AUTH_OK = 0x51
    ERROR = 0x7F  # a typed error answering any request
    # link maintenance: either direction
    LINK_ECHO = 0x80  # round-trip probe; answered by LINK_ECHO_REPLY
    LINK_ECHO_REPLY = 0x81
    LINK_DATA = 0x82  # bulk test data; answered by LINK_DIGEST
    LINK_DIGEST = 0x83


REQUEST_RANGE = range(0x01, 0x40)
REPLY_RANGE = range(0x40, 0x80)
MAINTENANCE_RANGE = range(0x80, 0xC0)


def is_request(kind: int) -> bool:
    """Return True when ``kind`` may only travel client -> server."""
    return kind in REQUEST_RANGE


def is_reply(kind: int) -> bool:
    """Return True when ``kind`` may only travel server -> client."""
    return kind in REPLY_RANGE
