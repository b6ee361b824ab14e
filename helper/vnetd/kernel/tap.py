"""Tap devices through the tun driver's ioctls (no ip(8), no shell).

Pure constants and struct packing here; the few syscalls are in small functions so that the
engine decides when to call them.
"""

from __future__ import annotations

import fcntl
import os
import struct

TUN_PATH = "/dev/net/tun"

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
IFF_PERSIST = 0x0800

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
TUNGETIFF = 0x800454D2

_IFREQ = "16sH22x"  # struct ifreq: name[IFNAMSIZ], short flags, padding to 40 bytes

HANDOFF_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL


def pack_ifreq(name: str, flags: int) -> bytes:
    return struct.pack(_IFREQ, name.encode(), flags)


def unpack_ifreq(data: bytes) -> tuple[str, int]:
    raw, flags = struct.unpack(_IFREQ, data)
    return raw.split(b"\0", 1)[0].decode(), flags


def open_tap(name: str, flags: int = HANDOFF_FLAGS) -> int:
    """Open /dev/net/tun and attach it to (creating) tap `name`; returns the fd (O_CLOEXEC)."""
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, pack_ifreq(name, flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def tap_name_of(fd: int) -> tuple[str, int]:
    """TUNGETIFF: the interface a tun fd is attached to, and its flags."""
    return unpack_ifreq(fcntl.ioctl(fd, TUNGETIFF, bytes(40)))


def make_persistent_tap(name: str, uid: int | None, gid: int | None) -> None:
    """Create a persistent tap owned by uid/gid (the qemu-vlan '-n COUNT' taps), as
    `ip tuntap add mode tap user U group G` does. The fd is closed; the device stays."""
    fd = open_tap(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL)
    try:
        if uid is not None:
            fcntl.ioctl(fd, TUNSETOWNER, uid)
        if gid is not None:
            fcntl.ioctl(fd, TUNSETGROUP, gid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def set_tap_owner(name: str, uid: int) -> None:
    """TUNSETOWNER on an existing persistent tap (its group stays)."""
    fd = open_tap(name, IFF_TAP | IFF_NO_PI)
    try:
        fcntl.ioctl(fd, TUNSETOWNER, uid)
    finally:
        os.close(fd)


def clear_persist(name: str) -> None:
    """Attach to an existing persistent tap and drop IFF_PERSIST (the kernel then deletes it
    when this fd closes, unless someone else still holds it)."""
    fd = open_tap(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    finally:
        os.close(fd)
