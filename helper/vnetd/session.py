"""Private sessions: a caller's own socket to vnetd, for callers that make many calls.

A caller on the system bus calls OpenSession and is handed one end of a socket pair. On it
it sends method calls of vnetd's interfaces as D-Bus messages, one after another, and vnetd
answers each on the same socket, fds included. Every call on a session is the call its
opener would have made on the bus. The sender is the opener's bus name, so polkit is asked
about the same subject, the same cached answers apply, the same checks, limits and log
lines follow. The two hops through dbus-daemon go, and one thing is reordered: what a call
leaves to do after its answer (an attached port's guard, the audit line) follows the answer
here, where on the bus it precedes it. Until its guard is in, a port is pending (nothing
passes to or from its tap), so a session's Attach returns sooner and its port carries
traffic from a moment later (well under a millisecond; a guest is not running yet then).

What bounds a session (a local user must not stall or bloat vnetd through one):
- it lives only as long as its opener's bus connection (a session outliving it would keep
  a polkit subject that is gone) and ends at the first message that is not D-Bus, or longer
  than frames.MAX_MESSAGE;
- calls are served one at a time, in order, and nothing more is read while an answer waits
  to be written: what a session buffers is one message in and one answer out;
- an answer the peer does not read within WRITE_TIMEOUT ends the session, and so does a call
  begun and not finished within MESSAGE_TIMEOUT (what it holds meanwhile is one message);
- the loop is given back after every call, so a session whose calls never wait (cached
  refusals, bad arguments) does not keep it from everyone else;
- the sender of every call is the opener, whatever the header the caller wrote says;
- a session that ends while a call is being served (its opener left the bus) is shut down,
  not cancelled: the call runs to its end, as on the bus;
- a bus connection opens at most PER_CONNECTION sessions, a uid at most PER_UID (root is
  held only to TOTAL, the limit of all sessions together);
- fds sent with a call are closed unread (no method takes any), off the event loop
  (kernel/closing.py); a call that brings more than MAX_FDS (as many as an answer carries)
  ends the session; OpenSession itself is a call on the bus only.
"""

from __future__ import annotations

import array
import asyncio
import io
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller
from vnet_common.frames import HEADER, MAX_FDS, BadFrame, close_fds, message_length

from .errors import QuotaExceeded
from .kernel import closing

log = logging.getLogger("vnetd.session")

PER_CONNECTION = 4  # sessions one bus connection may hold
PER_UID = 16  # sessions one uid may hold, over all its connections
TOTAL = 1024  # sessions in all (one fd each in vnetd)
WRITE_TIMEOUT = 30.0  # seconds an answer may wait for its reader
SCM_MAX_FD = 253  # the most fds the kernel passes with one write (include/net/scm.h)
MESSAGE_TIMEOUT = 10.0  # seconds from a call's first byte to its last
READ_CHUNK = 1 << 16  # bytes a read takes at most beyond what the message still needs

# (the call, the opener's bus name) -> (the answer, or None when none is expected; the fds it
# carries, which the session closes once the answer is written; what is left to do then,
# which the session hands to `finish`)
Serve = Callable[[Message, str], Awaitable[tuple[Message | None, list[int], Any]]]
Finish = Callable[[Any], Awaitable[None]]


class Session:
    def __init__(self, owner: str, uid: int, sock: socket.socket, serve: Serve,
                 finish: Finish):
        self.owner, self.uid, self.sock = owner, uid, sock
        self.serve, self.finish = serve, finish
        self.task: asyncio.Task | None = None
        self.closed = False
        self.calls = 0
        self.pending = bytearray()  # bytes read past the last message

    async def run(self) -> None:
        try:
            while True:
                got = await self._read()
                if got is None:
                    return
                data, fds = got
                closing.discard(fds)  # no method takes fds (kernel/closing.py)
                try:
                    msg = Unmarshaller(stream=io.BytesIO(data)).unmarshall()  # type: ignore[arg-type]
                except Exception as e:  # whatever the bytes were, they were not D-Bus
                    log.info("session of %s (uid %d) ended: not a D-Bus message (%s)",
                             self.owner, self.uid, e)
                    return
                if msg is not None and msg.message_type == MessageType.METHOD_CALL:
                    await self._serve(msg)
                # every other turn of the loop's too: a session whose calls never wait (bad
                # arguments, cached refusals) must not keep the loop to itself
                await asyncio.sleep(0)
        except BadFrame as e:
            log.info("session of %s (uid %d) ended: %s", self.owner, self.uid, e)
        except (OSError, TimeoutError) as e:
            log.debug("session of %s (uid %d) ended: %r", self.owner, self.uid, e)
        except Exception:
            log.exception("session of %s (uid %d) ended", self.owner, self.uid)
        finally:
            self._shut()

    async def _serve(self, msg: Message) -> None:
        self.calls += 1
        # the caller wrote the header: whatever it says, the sender is the opener
        msg.sender, msg.destination = self.owner, None
        reply, out_fds, after = await self.serve(msg, self.owner)
        # what the call left to do (an attached port's guard) starts now, beside the write:
        # an answer its reader leaves unread must not hold the guard back
        follow = asyncio.ensure_future(self.finish(after)) if after is not None else None
        try:
            if reply is not None:
                await self._write(reply._marshall(True), out_fds)
        finally:
            closing.close_later(out_fds)  # (none left, unless the write failed before)
            if follow is not None:
                await follow  # (finish shields what it runs: a cancel here leaves it be)

    def close(self) -> None:
        """End the session. A call being served is never cancelled halfway (its handler may
        be in the middle of a change): the socket is shut down, so that the session ends
        at its next read or write, and it is closed by its task once the loop no longer
        watches it (never a number that may already be someone else's)."""
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        else:
            self._shut()

    def _shut(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    # --- the socket -----------------------------------------------------------------------
    async def _ready(self, write: bool, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd = self.sock.fileno()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        if write:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def _recv(self, n: int, fds: list[int], deadline: float | None = None) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            try:
                # room for every fd one write can carry: any the read left, the kernel
                # would drop here, on the loop, and the last copy of one may wait to close
                data, anc, _flags, _addr = self.sock.recvmsg(
                    n, socket.CMSG_SPACE(SCM_MAX_FD * 4), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise TimeoutError("a message was begun and not finished in time") from None
                await self._ready(write=False, timeout=left)
                continue
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", raw[:len(raw) - len(raw) % 4]))
            return data

    async def _read(self) -> tuple[bytes, list[int]] | None:
        """One whole message and the fds that came with it; None at the end of the stream.
        A read takes what is there (up to READ_CHUNK), so a call usually comes in one system
        call; bytes of a next message stay in `pending` for the next read."""
        buf, self.pending = self.pending, bytearray()
        fds: list[int] = []
        need = HEADER
        loop = asyncio.get_running_loop()
        # from a message's first byte on, the rest within MESSAGE_TIMEOUT
        deadline = loop.time() + MESSAGE_TIMEOUT if buf else None
        try:
            while True:
                if need == HEADER and len(buf) >= HEADER:
                    need = message_length(buf[:HEADER])
                if len(buf) >= need:
                    break
                chunk = await self._recv(max(need - len(buf), READ_CHUNK), fds, deadline)
                if not chunk:
                    closing.discard(fds)
                    return None
                if len(fds) > MAX_FDS:  # (no method takes any: what a caller sends is
                    # closed unread, and no more than an answer carries is gathered)
                    raise BadFrame(f"{len(fds)} fds sent with one call (at most {MAX_FDS})")
                if deadline is None:
                    deadline = loop.time() + MESSAGE_TIMEOUT
                buf += chunk
        except BaseException:
            closing.discard(fds)
            raise
        self.pending = buf[need:]
        return bytes(buf[:need]), fds

    async def _write(self, data: bytes | bytearray, fds: list[int]) -> None:
        """Write an answer; its fds go with the first byte, and vnetd's copies are closed
        (and `fds` emptied) as soon as that byte is written: the fds are in the socket then,
        and the peer, which cannot use them before the whole answer is there, always holds
        the last copy. Closing the last copy of a port's tap makes the kernel remove the tap
        (about 15 ms here), and that wait is the holder's, never vnetd's event loop's."""
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WRITE_TIMEOUT
        while view:
            try:
                if fds:
                    sent = self.sock.sendmsg(
                        [view[:1]],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    close_fds(fds)
                    fds.clear()
                else:
                    sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError("the peer did not read its answer") from None
                await self._ready(write=True, timeout=left)
                continue
            view = view[sent:]


class Sessions:
    """Every open session, by opener; serve answers a call as the bus would."""

    def __init__(self, serve: Serve, finish: Finish):
        self.serve, self.finish = serve, finish
        self.by_owner: dict[str, set[Session]] = {}
        self.per_uid: dict[int, int] = {}
        self.count = 0

    def open(self, owner: str, uid: int) -> int:
        """A new session for `owner`: the fd of the caller's end (the caller closes it after
        sending it)."""
        mine = self.by_owner.get(owner, set())
        if self.count >= TOTAL:
            raise QuotaExceeded(f"vnetd holds {TOTAL} sessions already; make the call on the "
                                "bus instead.")
        if uid != 0 and len(mine) >= PER_CONNECTION:
            raise QuotaExceeded(f"One bus connection may open at most {PER_CONNECTION} "
                                "sessions; use one of yours, or close one.")
        if uid != 0 and self.per_uid.get(uid, 0) >= PER_UID:
            raise QuotaExceeded(f"uid {uid} holds {PER_UID} sessions already, the most one "
                                "user may; close one first.")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        session = Session(owner, uid, ours, self.serve, self.finish)
        self.by_owner.setdefault(owner, set()).add(session)
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        self.count += 1
        session.task = asyncio.get_running_loop().create_task(session.run())
        session.task.add_done_callback(lambda _t: self._gone(session))
        return theirs.detach()

    def _gone(self, session: Session) -> None:
        session.close()
        mine = self.by_owner.get(session.owner)
        if mine is None or session not in mine:
            return
        mine.discard(session)
        if not mine:
            del self.by_owner[session.owner]
        n = self.per_uid.get(session.uid, 1) - 1
        if n:
            self.per_uid[session.uid] = n
        else:
            self.per_uid.pop(session.uid, None)
        self.count -= 1

    def forget(self, owner: str) -> None:
        """The opener left the bus: its sessions end with it."""
        for session in list(self.by_owner.get(owner, ())):
            session.close()

    def close_all(self) -> None:
        for owner in list(self.by_owner):
            self.forget(owner)
