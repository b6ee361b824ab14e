"""D-Bus messages on a private session socket (see vnetd.session): where one ends.

A session carries whole D-Bus messages back to back, with no bus between the two ends and
no authentication exchange (the socket was handed out by a call on the system bus, which
had authenticated its caller). Both ends read a message by its fixed 16-byte header: the
body's length, and the length of the header's field array, which is padded to 8 bytes.

Standard library only.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

HEADER = 16  # endianness, type, flags, version, body length, serial, fields length
MAX_MESSAGE = 1 << 20  # bytes in one message vnetd reads, on a session or on the bus
MAX_FDS = 16  # fds taken from one read (Attach hands out at most 2 x 8 queues)
PROTOCOL_VERSION = 1


def close_fds(fds: Iterable[int]) -> None:
    """Close fds a message brought or was to carry; one already closed is no error."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class BadFrame(ValueError):
    """What was read is not the start of a D-Bus message a session takes."""


def message_length(head: bytes | bytearray | memoryview) -> int:
    """The whole length in bytes of the message whose first HEADER bytes are `head`."""
    if len(head) < HEADER:
        raise BadFrame(f"a message header has {HEADER} bytes, not {len(head)}")
    order = {0x6C: "<", 0x42: ">"}.get(head[0])  # 'l' little, 'B' big endian
    if order is None:
        raise BadFrame(f"byte {head[0]:#04x} does not say a byte order ('l' or 'B')")
    if head[3] != PROTOCOL_VERSION:
        raise BadFrame(f"D-Bus protocol version {head[3]} is not {PROTOCOL_VERSION}")
    body, _serial, fields = struct.unpack_from(order + "III", head, 4)
    total = HEADER + fields + (-fields & 7) + body
    if total > MAX_MESSAGE:
        raise BadFrame(f"a message of {total} bytes is longer than a session takes "
                       f"({MAX_MESSAGE})")
    return total
