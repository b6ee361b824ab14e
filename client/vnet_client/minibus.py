"""A tiny synchronous D-Bus client: method calls on one connection, file descriptors in replies.

Standard library only and cheap to import (about a millisecond), for `vnet-bridge-helper`, which
QEMU starts for every `-netdev bridge` and which makes exactly one call; everything else uses
dbus-fast.

    with MiniBus() as bus:
        (info, taps, extra), fds = bus.call("org.qemuvnet.Vnet1", "/org/qemuvnet/Vnet1",
                                            "org.qemuvnet.Vnet1", "Method", "s", ["arg"])

Types: y b n q i u x t d s o g h, arrays (`ay` unmarshals to bytes, `a{..}` to a dict, any other
array to a list), structs (tuples; any sequence when sending) and variants. A variant to send is
a `(signature, value)` tuple, so an `a{sv}` to send is a dict like `{"mtu": ("u", 1500)}`; received
variants are plain values (their signature is dropped). Received `h` values are the fd numbers
themselves (the caller owns them: they are all in the fds list `call` returns); sent `h` values
are indexes into the `fds` passed to `call`. Every failure, including malformed input from the
bus, is a DBusError.
"""

import _socket  # the `socket` module costs ~2 ms more to import (enums, selectors)
import os
import struct
import time

ALLOW_INTERACTIVE_AUTHORIZATION = 0x4
NO_REPLY_EXPECTED = 0x1
MAX_MESSAGE = 1 << 27  # 128 MiB
MAX_ARRAY = 1 << 26  # 64 MiB
MAX_DEPTH = 64
SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"

_E = "org.freedesktop.DBus.Error."
_MALFORMED, _INVALID_ARGS = _E + "InconsistentMessage", _E + "InvalidArgs"
_DISCONNECTED = _E + "Disconnected"
_FIXED = dict(zip("ybnqiuxtdh", "BIhHiIqQdI", strict=True))  # struct formats
_ALIGN = {c: struct.calcsize(f) for c, f in _FIXED.items()}
_ALIGN.update({"s": 4, "o": 4, "g": 1, "v": 1, "a": 4, "(": 8, "{": 8})
_BASIC = frozenset("ybnqiuxtdhsog")
_HEADER_TYPES = {1: "o", 2: "s", 3: "s", 4: "s", 5: "u", 6: "s", 7: "s", 8: "g", 9: "u"}
_CODEC_ERRORS = (ValueError, TypeError, LookupError, struct.error, OverflowError, RecursionError)
_CMSG_SPACE = _socket.CMSG_SPACE(253 * 4)  # SCM_MAX_FD descriptors
_SIGNATURES: dict[str, tuple[str, ...]] = {}


class DBusError(Exception):
    """An error reply (`name` like "org.freedesktop.DBus.Error.AccessDenied") or a local failure."""

    def __init__(self, name: str, message: str = ""):
        super().__init__(f"{name}: {message}" if message else name)
        self.name, self.message = name, message


def _end(sig: str, i: int, arrays: int = 0, structs: int = 0) -> int:
    """Where the complete type starting at sig[i] ends (IndexError/ValueError if it is invalid)."""
    c = sig[i]
    if c == "a":
        if arrays >= 32:
            raise ValueError("arrays nested too deeply")
        if sig[i + 1] != "{":
            return _end(sig, i + 1, arrays + 1, structs)
        if sig[i + 2] not in _BASIC:
            raise ValueError("a dict key must be a basic type")
        j = _end(sig, i + 3, arrays + 1, structs + 1)
        if sig[j] != "}":
            raise ValueError("a dict entry must have exactly two types")
        return j + 1
    if c == "(":
        if structs >= 32 or sig[i + 1] == ")":
            raise ValueError("empty or too deeply nested struct")
        j = i + 1
        while sig[j] != ")":
            j = _end(sig, j, arrays, structs + 1)
        return j + 1
    if c in _BASIC or c == "v":
        return i + 1
    raise ValueError(f"bad type code {c!r}")


def _split(sig: str) -> tuple[str, ...]:
    """The complete types of a signature."""
    types = _SIGNATURES.get(sig)
    if types is None:
        if len(sig) > 255:
            raise ValueError("signature longer than 255 bytes")
        found, i = [], 0
        while i < len(sig):
            j = _end(sig, i)
            found.append(sig[i:j])
            i = j
        types = tuple(found)
        if len(_SIGNATURES) < 256:
            _SIGNATURES[sig] = types
    return types


def _is_path(p: str) -> bool:
    return p == "/" or (
        p[:1] == "/"
        and all(s.isascii() and s.replace("_", "a").isalnum() for s in p[1:].split("/"))
    )


class _Writer:
    def __init__(self):
        self.buf = bytearray()

    def pad(self, n: int) -> None:
        self.buf += bytes(-len(self.buf) % n)

    def write(self, t: str, v) -> None:
        c = t[0]
        if c in _FIXED:
            self.pad(_ALIGN[c])
            self.buf += struct.pack("<" + _FIXED[c], bool(v) if c == "b" else v)
        elif c in "sog":
            if c == "o" and not _is_path(v):
                raise ValueError(f"bad object path {v!r}")
            if c == "g":
                _split(v)
            data = v.encode()
            if b"\0" in data:
                raise ValueError("strings must not contain NUL")
            if c == "g":
                self.buf.append(len(data))
            else:
                self.write("u", len(data))
            self.buf += data + b"\0"
        elif c == "v":
            vt, vv = v
            if len(_split(vt)) != 1:
                raise ValueError(f"a variant needs a single complete type, not {vt!r}")
            self.write("g", vt)
            self.write(vt, vv)
        elif c == "(":
            self.pad(8)
            for et, ev in zip(_split(t[1:-1]), v, strict=True):
                self.write(et, ev)
        else:  # array: the length excludes the padding before the first element
            self.pad(4)
            at = len(self.buf)
            self.buf += bytes(4)
            et = t[1:]
            self.pad(_ALIGN[et[0]])
            start = len(self.buf)
            if et[0] == "{":
                kt, vt = _split(et[1:-1])
                for k, x in v.items():
                    self.pad(8)
                    self.write(kt, k)
                    self.write(vt, x)
            elif et == "y" and isinstance(v, bytes | bytearray):
                self.buf += v
            else:
                for x in v:
                    self.write(et, x)
            if len(self.buf) - start > MAX_ARRAY:
                raise ValueError("array longer than 64 MiB")
            struct.pack_into("<I", self.buf, at, len(self.buf) - start)


class _Reader:
    def __init__(self, data: bytes, endian: str = "<", fds=(), variant_sigs: bool = False):
        self.data, self.e, self.fds, self.variant_sigs, self.pos = (
            data,
            endian,
            fds,
            variant_sigs,
            0,
        )

    def align(self, n: int) -> None:
        end = self.pos + (-self.pos % n)
        if end > len(self.data) or any(self.data[self.pos : end]):
            raise ValueError("truncated or non-zero padding")
        self.pos = end

    def read(self, t: str, depth: int = 0):
        if depth > MAX_DEPTH:
            raise ValueError("nested too deeply")
        c, d = t[0], self.data
        if c in _FIXED:
            self.align(_ALIGN[c])
            (v,) = struct.unpack_from(self.e + _FIXED[c], d, self.pos)
            self.pos += _ALIGN[c]
            if c == "b" and v > 1:
                raise ValueError(f"bad boolean {v}")
            return self.fds[v] if c == "h" else (v == 1 if c == "b" else v)
        if c in "sog":
            n = self.read("y" if c == "g" else "u")
            start, self.pos = self.pos, self.pos + n + 1
            if d[start + n] != 0:
                raise ValueError("string without NUL terminator")
            v = d[start : start + n].decode()
            if "\0" in v or (c == "o" and not _is_path(v)):
                raise ValueError(f"bad string {v!r}")
            if c == "g":
                _split(v)
            return v
        if c == "v":
            vt = self.read("g")
            if len(_split(vt)) != 1:
                raise ValueError(f"bad variant signature {vt!r}")
            v = self.read(vt, depth + 1)
            return (vt, v) if self.variant_sigs else v
        if c == "(":
            self.align(8)
            return tuple(self.read(et, depth + 1) for et in _split(t[1:-1]))
        n, et = self.read("u"), t[1:]
        self.align(_ALIGN[et[0]])
        end = self.pos + n
        if n > MAX_ARRAY or end > len(d):
            raise ValueError("array too long")
        if et == "y":
            self.pos = end
            return d[end - n : end]
        if et[0] == "{":
            kt, vt = _split(et[1:-1])
            v = {}
            while self.pos < end:
                self.align(8)
                k = self.read(kt, depth + 2)
                v[k] = self.read(vt, depth + 2)
        else:
            v = []
            while self.pos < end:
                v.append(self.read(et, depth + 1))
        if self.pos != end:
            raise ValueError("array elements overrun the array length")
        return v


def marshal(signature: str, body) -> bytes:
    """`body` (a sequence with one value per complete type of `signature`), little endian."""
    w = _Writer()
    try:
        for t, v in zip(_split(signature), body, strict=True):
            w.write(t, v)
    except _CODEC_ERRORS as e:
        raise DBusError(_INVALID_ARGS, f"cannot marshal {signature!r}: {e}") from None
    return bytes(w.buf)


def unmarshal(signature: str, data: bytes, fds=(), endian: str = "<") -> list:
    """The values of a message body; `h` values become `fds[index]`."""
    r = _Reader(bytes(data), endian, fds)
    try:
        values = [r.read(t) for t in _split(signature)]
        if r.pos != len(r.data):
            raise ValueError("trailing bytes after the body")
    except _CODEC_ERRORS as e:
        raise DBusError(_MALFORMED, f"bad {signature!r} body: {e}") from None
    return values


def _parse_header(msg: bytes) -> tuple[int, dict, bytes, str]:
    """(message type, header fields by code, body bytes, endian) of one complete message."""
    endian = "<" if msg[0] == ord("l") else ">"
    r = _Reader(msg, endian, variant_sigs=True)
    try:
        _, mtype, _, _, _, serial, fields = (
            r.read(t) for t in ("y", "y", "y", "y", "u", "u", "a(yv)")
        )
        r.align(8)
        if not 1 <= mtype <= 4 or serial == 0:
            raise ValueError(f"bad message type {mtype} or serial {serial}")
        for code, (sig, _) in fields:
            if _HEADER_TYPES.get(code, sig) != sig:
                raise ValueError(f"header field {code} has type {sig!r}")
        headers = {code: value for code, (_, value) in fields}
        if mtype in (2, 3) and 5 not in headers or mtype == 3 and 4 not in headers:
            raise ValueError("a reply without REPLY_SERIAL or an error without ERROR_NAME")
    except _CODEC_ERRORS as e:
        raise DBusError(_MALFORMED, f"bad message header: {e}") from None
    return mtype, headers, msg[r.pos :], endian


def _method_call(serial, destination, path, interface, member, signature, body, flags, nfds):
    data = marshal(signature, body)
    fields = [(1, ("o", path)), (3, ("s", member))]
    fields += [(2, ("s", interface))] if interface else []
    fields += [(6, ("s", destination))] if destination else []
    fields += [(8, ("g", signature))] if signature else []
    fields += [(9, ("u", nfds))] if nfds else []
    head = marshal("yyyyuua(yv)", (ord("l"), 1, flags, 1, len(data), serial, fields))
    if len(head) + len(data) > MAX_MESSAGE - 8:
        raise DBusError(_E + "LimitsExceeded", "message larger than 128 MiB")
    return head + bytes(-len(head) % 8) + data


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _unescape(value: str) -> bytes:
    first, *rest = value.split("%")
    return first.encode() + b"".join(bytes.fromhex(p[:2]) + p[2:].encode() for p in rest)


class MiniBus:
    """One authenticated connection to a message bus; not thread-safe.

    `address` is a D-Bus address (default: $DBUS_SYSTEM_BUS_ADDRESS, else the system bus); its
    `unix:path=` and `unix:abstract=` entries are tried in order. `timeout` (seconds) bounds the
    connection handshake, and then each call. After a timeout, a lost connection or malformed
    input the connection is closed and later calls raise DBusError (Disconnected).
    """

    def __init__(self, address: str | None = None, timeout: float = 300.0):
        address = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS
        self.timeout, self._serial, self._buf, self._fds = timeout, 1, bytearray(), []
        self._sock, self.unix_fd, self.unique_name = None, False, ""
        deadline = time.monotonic() + timeout
        try:
            targets = []  # each unix: entry of the ';'-separated list, tried in order
            for entry in address.split(";"):
                transport, _, params = entry.partition(":")
                kv = dict(p.partition("=")[::2] for p in params.split(",") if p)
                if transport == "unix" and "path" in kv:
                    targets.append(_unescape(kv["path"]))
                elif transport == "unix" and "abstract" in kv:
                    targets.append(b"\0" + _unescape(kv["abstract"]))
        except ValueError as e:
            raise DBusError(_E + "BadAddress", f"{address!r}: {e}") from None
        error = "no unix:path= or unix:abstract= entry"
        for target in targets:
            try:
                self._sock = _socket.socket(
                    _socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC
                )
                self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                self._sock.connect(target)
                break
            except OSError as e:
                self.close()
                error = str(e)
        else:
            raise DBusError(_E + "NoServer", f"cannot connect to {address!r}: {error}")
        # Pipelined like sd-bus: AUTH, NEGOTIATE_UNIX_FD, BEGIN and Hello() in one write.
        uid = str(os.geteuid()).encode().hex().encode()
        auth = b"\0AUTH EXTERNAL " + uid + b"\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\n"
        bus = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
        try:
            self._send(auth + _method_call(1, *bus, "Hello", "", (), 0, 0), (), deadline)
            line = self._line(deadline)
            if not line.startswith(b"OK "):
                raise DBusError(_E + "AuthFailed", f"the bus answered {line[:100]!r}")
            self.unix_fd = self._line(deadline) == b"AGREE_UNIX_FD"
            values, fds = self._reply(1, deadline)
            _close_all(fds)
            if not values or not isinstance(values[0], str):
                raise DBusError(_MALFORMED, f"Hello() returned {values!r}")
            self.unique_name = values[0]
        except BaseException as e:
            self.close()
            if isinstance(e, DBusError) and e.name == _DISCONNECTED:  # how dbus-daemon refuses
                raise DBusError(_E + "AuthFailed", f"during the handshake: {e.message}") from None
            raise

    def call(self, destination, path, interface, member, signature="", body=(), *, flags=0, fds=()):
        """Call a method; returns (body values, received fds). Raises DBusError for an error reply.

        `flags` may include ALLOW_INTERACTIVE_AUTHORIZATION (or NO_REPLY_EXPECTED: returns at
        once); `fds` are sent along, and an `h` argument is an index into them."""
        if self._sock is None:
            raise DBusError(_DISCONNECTED, "the connection is closed")
        deadline = time.monotonic() + self.timeout
        self._serial += 1
        args = (destination, path, interface, member, signature, body, flags, len(fds))
        self._send(_method_call(self._serial, *args), fds, deadline)
        return ([], []) if flags & NO_REPLY_EXPECTED else self._reply(self._serial, deadline)

    def _send(self, message: bytes, fds, deadline: float) -> None:
        if fds and not self.unix_fd:
            raise DBusError(_E + "NotSupported", "the bus did not agree to pass file descriptors")
        ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        try:
            self._settimeout(deadline)
            sent = self._sock.sendmsg([message], ancillary if fds else [])
            if sent < len(message):
                self._sock.sendall(message[sent:])
        except OSError as e:
            self._fail(e)

    def _reply(self, serial: int, deadline: float) -> tuple[list, list[int]]:
        while True:
            mtype, headers, body, endian = self._message(deadline)
            count = headers.get(9, 0)
            if count > len(self._fds):
                self.close()
                raise DBusError(_MALFORMED, f"a message announced {count} fds that did not come")
            fds, self._fds = self._fds[:count], self._fds[count:]
            if mtype not in (2, 3) or headers[5] != serial:
                _close_all(fds)  # a signal, or a reply to an earlier call that timed out
                continue
            try:
                values = unmarshal(headers.get(8, ""), body, fds, endian)
            except DBusError:
                _close_all(fds)
                raise
            if mtype == 3:
                _close_all(fds)
                text = values[0] if values and isinstance(values[0], str) else ""
                raise DBusError(headers[4], text)
            return values, fds

    def _message(self, deadline: float) -> tuple[int, dict, bytes, str]:
        buf = self._buf
        while True:
            if len(buf) >= 16:
                endian = {ord("l"): "<", ord("B"): ">"}.get(buf[0])
                body_len, _, fields_len = struct.unpack_from((endian or "<") + "III", buf, 4)
                total = 16 + fields_len + (-fields_len % 8) + body_len
                if endian is None or buf[3] != 1 or fields_len > MAX_ARRAY or total > MAX_MESSAGE:
                    self.close()
                    raise DBusError(_MALFORMED, "bad message framing")
                if len(buf) >= total:
                    msg = bytes(buf[:total])
                    del buf[:total]
                    try:
                        return _parse_header(msg)
                    except DBusError:
                        self.close()
                        raise
            self._recv(deadline)

    def _line(self, deadline: float) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > 4096:
                raise DBusError(_E + "AuthFailed", "overlong line from the bus")
            self._recv(deadline)
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    def _recv(self, deadline: float) -> None:
        try:
            self._settimeout(deadline)
            data, ancillary, msg_flags, _ = self._sock.recvmsg(
                65536, _CMSG_SPACE, _socket.MSG_CMSG_CLOEXEC
            )
        except OSError as e:
            self._fail(e)
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                self._fds += struct.unpack(
                    f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]
                )
        if msg_flags & _socket.MSG_CTRUNC:
            self.close()
            raise DBusError(_MALFORMED, "file descriptors were lost (MSG_CTRUNC)")
        if not data:
            self.close()
            raise DBusError(_DISCONNECTED, "the bus closed the connection")
        self._buf += data

    def _settimeout(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(left)

    def _fail(self, error: OSError):
        self.close()
        if isinstance(error, TimeoutError):
            raise DBusError(_E + "NoReply", f"no reply within {self.timeout} s") from None
        raise DBusError(_DISCONNECTED, str(error)) from None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        _close_all(self._fds)
        self._fds = []

    def __enter__(self) -> "MiniBus":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
