"""A logging handler speaking journald's native protocol, standard library only.

Each record is one datagram to /run/systemd/journal/socket: fields as ``KEY=value`` lines,
or, for a value holding a newline (a traceback), ``KEY`` + newline + the value's length as a
64-bit little-endian number + the value + newline. A datagram too large for the socket goes
as a sealed memfd passed with SCM_RIGHTS, as sd_journal_send() does.

Fields: MESSAGE, PRIORITY (syslog levels), SYSLOG_IDENTIFIER, LOGGER, CODE_FILE, CODE_LINE,
CODE_FUNC, and every attribute of the record whose name starts with ``VNET_`` (a call's
``extra={"VNET_METHOD": ...}``): ``journalctl -u vnetd -o json`` and
``journalctl VNET_METHOD=Define`` read them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys

JOURNAL_SOCKET = "/run/systemd/journal/socket"
FIELD_PREFIX = "VNET_"
_FIELD = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}\Z")

# logging's levels as syslog priorities
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
              (logging.INFO, 6))


def priority(levelno: int) -> int:
    for level, prio in PRIORITIES:
        if levelno >= level:
            return prio
    return 7


def field_name(key: str) -> str | None:
    """The journal field a record attribute becomes, or None: upper case, [A-Z0-9_], at most
    64 characters, not starting with '_' (those are journald's own)."""
    name = key.upper()
    return name if _FIELD.match(name) else None


def encode_field(name: str, value: object) -> bytes:
    """One field in the native protocol's form."""
    if isinstance(value, bytes):
        data = value
    else:
        data = str(value).encode("utf-8", "backslashreplace")
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def encode(fields: dict[str, object]) -> bytes:
    return b"".join(encode_field(k, v) for k, v in fields.items())


class JournalHandler(logging.Handler):
    """Sends each record to journald; a record that cannot be sent is written to `fallback`
    (stderr, which systemd also puts in the journal), so nothing is lost."""

    def __init__(self, identifier: str = "vnetd", address: str = JOURNAL_SOCKET,
                 fallback=None) -> None:
        super().__init__()
        self.identifier = identifier
        self.address = address
        self.fallback = fallback if fallback is not None else sys.stderr
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def fields(self, record: logging.LogRecord) -> dict[str, object]:
        message = self.format(record)
        out: dict[str, object] = {
            "MESSAGE": message,
            "PRIORITY": priority(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        for key, value in record.__dict__.items():
            if key.startswith(FIELD_PREFIX) and value is not None:
                name = field_name(key)
                if name is not None:
                    out[name] = value
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode(self.fields(record))
            self.send(data)
        except Exception:
            try:
                self.fallback.write(f"{record.levelname} {record.name}: "
                                    f"{record.getMessage()}\n")
                self.fallback.flush()
            except Exception:
                self.handleError(record)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.address)
            return
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
        # too large for one datagram: the same bytes in a sealed memfd
        fd = os.memfd_create("vnetd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    struct.pack("i", fd))], 0, self.address)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            super().close()


def available(address: str = JOURNAL_SOCKET) -> bool:
    """journald's native socket is there and takes a datagram from us."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(address)
        return True
    except OSError:
        return False
    finally:
        s.close()
