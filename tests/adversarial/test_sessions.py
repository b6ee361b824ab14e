"""Attacks through private sessions (OpenSession): a session is its opener's bus connection
without dbus-daemon, so it must carry exactly the opener's identity and rights, die with that
connection, and give a local user no way to stall or bloat vnetd that the bus would not."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from tests.harness import fdkinds
from tests.harness import frames as F
from tests.harness.daemon import ALICE, BOB, PolkitRule, grant_rule, run_client
from tests.harness.users import run_as, spawn_as

from .lab import FRAMES_PATH, fdb_ports_of

ERR = "org.qemuvnet.Vnet1.Error."
IAR = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
ATTACH_ACTION = "org.qemuvnet.Vnet1.attach"
MANAGE_ACTION = "org.qemuvnet.Vnet1.manage"

# raw session calls: D-Bus messages written and read by hand, as any program could
RAW = """
import array, io, socket, time
from dbus_fast import Message, MessageFlag, Variant
from dbus_fast._private.unmarshaller import Unmarshaller
from vnet_common.frames import message_length
def msg(member, sig="", body=(), serial=1, flags=MessageFlag.NONE):
    return Message(path="/org/qemuvnet/Vnet1", interface="org.qemuvnet.Vnet1.Manager",
                   member=member, signature=sig, body=list(body), serial=serial,
                   flags=flags)._marshall(True)
def read(sock, timeout=10.0):
    '''(the answer, its fds); (None, []) when vnetd ended the session'''
    sock.settimeout(timeout)
    buf, fds = b"", []
    while True:
        data, anc, _f, _a = sock.recvmsg(65536, socket.CMSG_SPACE(64))
        for _l, _k, raw in anc:
            fds += list(array.array("i", raw))
        if not data:
            return None, fds
        buf += data
        if len(buf) >= 16 and len(buf) >= message_length(buf[:16]):
            return Unmarshaller(stream=io.BytesIO(buf)).unmarshall(), fds
def ended(sock, timeout=10.0):
    try:
        r, _ = read(sock, timeout)
    except (ConnectionResetError, BrokenPipeError):
        return True
    return r is None
def name(r):
    return r.error_name or "ok"
async def open_raw(c):
    r = await c.call("OpenSession")
    return socket.socket(fileno=r.unix_fds[r.body[0]])
"""


@pytest.fixture(scope="module", autouse=True)
def network(vnetd):
    run_client("define", "vnet2", "--dhcp=none", check=True)
    run_client("start", "vnet2", check=True)
    yield
    run_client("stop", "vnet2")
    run_client("undefine", "vnet2")


ATTACH = RAW + """
async def main():
    async with Client() as c:
        s = await open_raw(c)
        out = {}
        s.sendall(msg("Attach", "ssa{sv}", ["vnet2", sys.argv[1], {}], 1))
        r, fds = read(s)
        out["attach"] = name(r)
        if not r.error_name:
            out["ifname"] = r.body[0]["ifname"].value
            out["uid"] = r.body[0]["uid"].value
            out["tap"] = tap_name(fds[r.body[1][0]])
        for fd in fds:
            os.close(fd)
        time.sleep(0.3)  # vnetd saw the tap go: it kept no copy of the fd
        s.sendall(msg("ListPorts", serial=2))
        r, _ = read(s)
        out["ports_after_close"] = [p["ifname"].value for p in r.body[0]]
        if len(sys.argv) > 2:  # another user's port, by its interface name
            s.sendall(msg("Detach", "s", [sys.argv[2]], 3))
            out["detach_other"] = name(read(s)[0])
        s.sendall(msg("Define", "sa{sv}", ["vnet9", {"mode": Variant("s", "host-only")}], 4))
        out["define"] = name(read(s)[0])
        print(json.dumps(out))
asyncio.run(main())
"""

HOLD = RAW + """
async def main():
    async with Client() as c:
        a = await c.attach("vnet2", sys.argv[1])
        print(json.dumps({"ifname": a.ifname}), flush=True)
        sys.stdin.readline()
asyncio.run(main())
"""


def test_a_session_call_is_the_openers_own_call(vnetd):
    """Who calls on a session is whoever opened it: the port is Alice's, Bob on his session
    cannot take her VM or detach her port, and polkit answers about each opener alone."""
    holder = spawn_as(ALICE, HOLD, "alice-web")
    try:
        alices = json.loads(holder.stdout.readline())["ifname"]
        r = run_as(ALICE, ATTACH, "web1", timeout=60)
        assert r.returncode == 0, r.stderr
        a = json.loads(r.stdout)
        assert a["attach"] == "ok" and a["tap"] == a["ifname"], a
        assert a["ports_after_close"] == [alices], a  # web1's port went with its fd
        assert a["define"] == IAR, a  # manage: a password, as on the bus

        b = json.loads(run_as(BOB, ATTACH, "bob-web", timeout=60).stdout)
        assert b["attach"] == IAR, b  # not in group vnet: on his session as on the bus

        with PolkitRule("90-vnet-test-session-bob", grant_rule(BOB, ATTACH_ACTION)):
            r = run_as(BOB, ATTACH, "alice-web", alices, timeout=60)
            assert r.returncode == 0, r.stderr
            b = json.loads(r.stdout)
        assert b["attach"] == ERR + "NotOwner", b  # Alice's VM name
        assert b["ports_after_close"] == [], b  # Alice's port is not Bob's to see
        assert b["detach_other"] == IAR, b  # another user's port: an administrator's
        assert alices in run_client("ports").stdout

        with PolkitRule("90-vnet-test-session", grant_rule(ALICE, MANAGE_ACTION)):
            b = json.loads(run_as(BOB, ATTACH, "bob-web", timeout=60).stdout)
            assert b["define"] == IAR, b  # Alice's rule is not Bob's
            a = json.loads(run_as(ALICE, ATTACH, "web2", timeout=60).stdout)
            assert a["define"] == "ok", a
    finally:
        holder.kill()
        holder.wait()
        run_client("undefine", "vnet9")


ENDS_WITH_CONNECTION = RAW + """
async def main():
    c = await Client().connect()
    s = await open_raw(c)
    s.sendall(msg("GetMac", "ssu", ["vnet2", "web1", 0], 1))
    before = name(read(s)[0])
    c.close()  # the bus connection goes; the session was handed to this process alone
    time.sleep(0.5)
    try:
        s.sendall(msg("GetMac", "ssu", ["vnet2", "web1", 0], 2))
    except OSError:
        pass
    print(json.dumps({"before": before, "ended": ended(s)}))
asyncio.run(main())
"""


def test_a_session_ends_with_its_openers_bus_connection(vnetd):
    """A session that outlived its connection would act for a polkit subject that is gone
    (and whose unique name polkit can no longer check)."""
    r = run_as(ALICE, ENDS_WITH_CONNECTION, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"before": "ok", "ended": True}


BAD_INPUT = RAW + """
import struct
async def main():
    out = {}
    async with Client() as c:
        s = await open_raw(c)  # bytes that are not D-Bus
        s.sendall(b"GET / HTTP/1.1" + bytes(64))
        out["garbage"] = ended(s)
        s = await open_raw(c)  # a header that promises 100 MiB: nothing more is read
        head = bytes([0x6C, 1, 0, 1]) + struct.pack("<III", 100 << 20, 1, 0)
        s.sendall(head)
        out["huge"] = ended(s)
        s = await open_raw(c)  # fds sent with a call are closed, not kept
        r_end, w_end = os.pipe()
        s.sendmsg([msg("GetMac", "ssu", ["vnet2", "web1", 0], 1)],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w_end]))])
        out["with_fd"] = name(read(s)[0])
        os.close(w_end)
        os.set_blocking(r_end, False)
        time.sleep(0.2)
        try:
            out["pipe_closed_everywhere"] = os.read(r_end, 1) == b""
        except BlockingIOError:
            out["pipe_closed_everywhere"] = False  # a write end is still open somewhere
        s.sendall(msg("OpenSession", serial=2))  # sessions are opened on the bus only
        out["nested"] = name(read(s)[0])
        s.sendall(msg("NoSuchMethod", serial=3))
        out["unknown"] = name(read(s)[0])
        s.sendall(msg("GetMac", "s", ["vnet2"], 4))
        out["bad_signature"] = name(read(s)[0])
        s.sendall(msg("GetMac", "ssu", ["vnet2", "web1", 0], 5,
                      flags=MessageFlag.NO_REPLY_EXPECTED))
        s.sendall(msg("GetMac", "ssu", ["vnet2", "web1", 0], 6))
        r, _ = read(s)
        out["no_reply_expected_then"] = r.reply_serial  # only the second is answered
    print(json.dumps(out))
asyncio.run(main())
"""


def test_what_is_not_a_call_ends_the_session_and_nothing_is_kept(vnetd):
    r = run_as(ALICE, BAD_INPUT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "garbage": True, "huge": True, "with_fd": "ok", "pipe_closed_everywhere": True,
        "nested": "org.freedesktop.DBus.Error.NotSupported",
        "unknown": "org.freedesktop.DBus.Error.UnknownMethod",
        "bad_signature": "org.freedesktop.DBus.Error.InvalidArgs",
        "no_reply_expected_then": 6}
    assert vnetd.alive()


LIMITS = RAW + """
async def main():
    out = {"per_connection": [], "per_uid": []}
    clients = [await Client().connect() for _ in range(5)]
    socks = []
    for i in range(5):  # 5 on one connection: the fifth is refused
        try:
            socks.append(await open_raw(clients[0]))
            out["per_connection"].append("ok")
        except VnetClientError as e:
            out["per_connection"].append(e.name)
    for c in clients[1:]:  # 4 more connections, 4 each: 16 in all, then no more
        for i in range(4):
            try:
                socks.append(await open_raw(c))
                out["per_uid"].append("ok")
            except VnetClientError as e:
                out["per_uid"].append(e.name)
    socks.pop().close()  # one closed: one may be opened again
    time.sleep(0.3)
    try:
        socks.append(await open_raw(clients[4]))
        out["after_close"] = "ok"
    except VnetClientError as e:
        out["after_close"] = e.name
    print(json.dumps(out))
    for c in clients:
        c.close()
asyncio.run(main())
"""


def test_sessions_per_connection_and_per_user_are_bounded(vnetd):
    r = run_as(BOB, LIMITS, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["per_connection"] == ["ok"] * 4 + [ERR + "QuotaExceeded"], out
    # 4 on the first connection, then 12 more reach the user's 16
    assert out["per_uid"] == ["ok"] * 12 + [ERR + "QuotaExceeded"] * 4, out
    assert out["after_close"] == "ok", out


STALL = RAW + """
async def main():
    async with Client() as c:
        s = await open_raw(c)
        # calls written back to back, no answer ever read: vnetd writes answers until the
        # socket is full, then stops reading this session (and only this one)
        s.setblocking(False)
        sent = 0
        call = msg("ListNetworks", serial=1)
        try:
            while sent < 200000:
                s.send(call)
                sent += 1
        except BlockingIOError:
            pass
        print(json.dumps({"sent": sent}), flush=True)
        sys.stdin.readline()
asyncio.run(main())
"""

TIMED = """
import time
async def main():
    async with Client() as c:
        await c.open_session()
        t = time.perf_counter()
        for i in range(20):
            (await c.attach("vnet2", f"v{i}")).close()
        print(json.dumps({"ms": (time.perf_counter() - t) * 1000 / 20}))
asyncio.run(main())
"""


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_session_that_never_reads_stalls_only_itself(vnetd):
    before = rss_kb(vnetd.proc.pid)
    stallers = [spawn_as(BOB, STALL) for _ in range(4)]
    try:
        sent = [json.loads(p.stdout.readline())["sent"] for p in stallers]
        assert all(n > 100 for n in sent), sent  # the socket took many calls, then was full
        time.sleep(1)
        r = run_as(ALICE, TIMED, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["ms"] < 50, r.stdout  # Alice's session is served
        r = run_client("list", "--json")
        assert r.returncode == 0 and "vnet2" in r.stdout
        grown = rss_kb(vnetd.proc.pid) - before
        # one call in and one answer out per session, whatever was written
        assert grown < 8 * 1024, f"vnetd grew {grown} kB"
    finally:
        for p in stallers:
            p.kill()
            p.wait()
    assert vnetd.alive()


RESTART = """
async def main():
    async with Client() as c:
        await c.open_session()
        before = await c.get_mac("vnet2", "web1")
        print(json.dumps({"open": True}), flush=True)
        sys.stdin.readline()  # vnetd restarts meanwhile
        out = {"before": before}
        out["get_mac"] = await c.get_mac("vnet2", "web1")  # a read: once more, on the bus
        out["session_after"] = c.session is not None
        await c.open_session()
        try:
            a = await c.attach("vnet2", "web1")
            out["attach"] = a.ifname
            a.close()
        except VnetClientError as e:
            out["attach"] = e.name
        print(json.dumps(out), flush=True)
asyncio.run(main())
"""


def test_a_client_whose_session_ended_goes_on_over_the_bus(vnetd):
    p = spawn_as(ALICE, RESTART)
    try:
        assert json.loads(p.stdout.readline()) == {"open": True}
        vnetd.kill()
        vnetd.start()
        p.stdin.write("\n")
        out = json.loads(p.stdout.readline())
    finally:
        p.kill()
        p.wait()
    assert out["get_mac"] == out["before"], out
    assert out["session_after"] is False, out  # the dead session was dropped
    assert out["attach"].startswith("vnet2-"), out  # a new session works


WINDOW = RAW + """
sys.path.insert(0, sys.argv[2])
import frames as F
async def main():
    victim = sys.argv[1]
    async with Client() as c:
        s = await open_raw(c)
        s.sendall(msg("Attach", "ssa{sv}", ["vnet2", "window1", {}], 1))
        r, fds = read(s)  # on a session the answer comes first, the port's guard after it
        fd = fds[r.body[1][0]]
        own, ifname = r.body[0]["mac"].value, r.body[0]["ifname"].value
        spoofed = F.udp4_frame(victim, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                               tag="spoofed")
        sent, t = 0, time.monotonic()
        while time.monotonic() - t < 0.05:  # from the answer on: before and after the guard
            F.write_frame(fd, spoofed)
            sent += 1
        time.sleep(0.3)
        F.write_frame(fd, F.udp4_frame(own, F.BROADCAST, "0.0.0.0", "255.255.255.255", 68, 67,
                                       tag="own"))
        print(json.dumps({"sent": sent, "ifname": ifname}), flush=True)
        sys.stdin.readline()
asyncio.run(main())
"""


def test_the_moment_between_a_sessions_answer_and_its_guard_lets_nothing_through(vnetd,
                                                                                 agents):
    """Bob writes frames with Alice's MAC from the instant his session's Attach answers,
    before its guard is in (the tap is still pending then) and after: none reaches Alice's
    VM, and the bridge never learns her MAC on his port; his own frames pass once guarded."""
    victim = agents(ALICE, "vnet2", "window-victim")
    assert victim.error is None, victim.hello
    victim.clear()
    with PolkitRule("90-vnet-test-session-window", grant_rule(BOB, ATTACH_ACTION)):
        bob = spawn_as(BOB, WINDOW, victim.mac, str(FRAMES_PATH.parent))
        try:
            out = json.loads(bob.stdout.readline())
            got = victim.collect(0.5)
            assert out["sent"] > 10, out
            assert "spoofed" not in F.tags(got), "a spoofed frame reached the victim"
            assert "own" in F.tags(got), "positive control: Bob's own frame, once guarded"
            assert out["ifname"] not in fdb_ports_of(vnetd, "vnet2", victim.mac)
        finally:
            bob.kill()
            bob.wait()


FORGED = RAW + """
import struct, threading
async def main():
    out = {}
    async with Client() as c:
        s = await open_raw(c)
        # a sender header of the caller's own making: a name that is not even valid
        raw = bytes(Message(path="/org/qemuvnet/Vnet1", interface="org.qemuvnet.Vnet1.Manager",
                            member="Attach", signature="ssa{sv}",
                            body=["vnet2", "forged1", {}], serial=1, sender=":1.1")._marshall(True))
        s.sendall(raw.replace(b":1.1", b"!!!!", 1))
        r, fds = read(s)
        out["forged_sender"] = name(r)
        out["uid"] = r.body[0]["uid"].value if not r.error_name else None
        for fd in fds:
            os.close(fd)
        # a call begun and never finished: the session ends (what it holds is bounded in time)
        s = await open_raw(c)
        whole = msg("GetMac", "ssu", ["vnet2", "web1", 0], 2)
        s.sendall(whole[:20])
        t = time.monotonic()
        out["unfinished_ended"] = ended(s, timeout=20)
        out["after_s"] = round(time.monotonic() - t)
        # calls that never wait, as fast as one can write and read them: vnetd's loop is
        # everyone's, so another caller on the bus is answered meanwhile
        s = await open_raw(c)
        bad = msg("GetMac", "s", ["vnet2"], 3)
        stop = time.monotonic() + 3
        def writer():
            try:
                while time.monotonic() < stop:
                    s.sendall(bad * 64)
            except OSError:
                pass
        def reader():
            s.settimeout(1)
            try:
                while time.monotonic() < stop + 0.5:
                    s.recv(1 << 16)
            except OSError:
                pass
        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for th in threads:
            th.start()
        print(json.dumps(out), flush=True)
        for th in threads:
            th.join()
asyncio.run(main())
"""

TIMED_LIST = """
import time
async def main():
    async with Client() as c:
        worst = 0.0
        for i in range(20):
            t = time.perf_counter()
            await c.list_networks()
            worst = max(worst, time.perf_counter() - t)
            await asyncio.sleep(0.05)
        print(json.dumps({"worst_ms": worst * 1000}))
asyncio.run(main())
"""


def test_a_sessions_caller_cannot_forge_its_sender_hold_a_call_open_or_keep_the_loop(vnetd):
    p = spawn_as(ALICE, FORGED)
    try:
        out = json.loads(p.stdout.readline())
        assert out["forged_sender"] == "ok", out  # answered as the opener, the header ignored
        assert out["uid"] == int(run_as(ALICE, "print(os.getuid())").stdout), out
        assert out["unfinished_ended"] is True and 5 <= out["after_s"] <= 15, out
        r = run_as(BOB, TIMED_LIST, timeout=60)  # during the flood of calls that never wait
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["worst_ms"] < 500, r.stdout
    finally:
        p.kill()
        p.wait()
    assert vnetd.alive()
    assert "Traceback" not in vnetd.log()


FD_FLOOD = RAW + fdkinds.SOURCE + """
def rights(fds):
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
async def main():
    keep = []
    async with Client() as c:
        s = await open_raw(c)
        if sys.argv[1] == "many-at-once":
            # one write with more fds than one read of vnetd takes, the last one holding a
            # lingering socket: what a read leaves, the kernel drops in the reader's thread.
            # Bob's own copies must be gone by the time vnetd reads them: he first makes it
            # stop reading (calls whose answers he leaves unread, until they fill the socket)
            calls = 400
            s.sendall(b"".join(msg("ListNetworks", serial=10 + i) for i in range(calls)))
            time.sleep(1)
            y = nested(keep, 3)
            nulls = [os.open("/dev/null", os.O_RDONLY) for _ in range(40)]
            call = msg("GetMac", "ssu", ["vnet2", "web1", 0], 1)
            s.sendmsg([call[:1]], rights(nulls + [y.fileno()]))
            y.close()
            for n in nulls:
                os.close(n)
            print(json.dumps({"sent": 41}), flush=True)
            buf, got = b"", 0  # now the answers, and vnetd reads on
            s.settimeout(10)
            while got < calls:
                data = s.recv(1 << 16)
                if not data:
                    break
                buf += data
                while len(buf) >= 16 and len(buf) >= message_length(buf[:16]):
                    buf, got = buf[message_length(buf[:16]):], got + 1
            try:
                s.sendall(call[1:])
                print(json.dumps({"ended": ended(s)}), flush=True)
            except OSError:
                print(json.dumps({"ended": True}), flush=True)
        else:
            # one call begun and never finished, 16 fds with each of its bytes
            null = os.open("/dev/null", os.O_RDONLY)
            head = bytearray(msg("GetMac", "ssu", ["vnet2", "w" * 200000, 0], 1))
            n = 0
            try:
                for i in range(1000):
                    s.sendmsg([head[i:i + 1]], rights([null] * 16))
                    n += 1
                    time.sleep(0.001)
            except OSError:
                pass
            print(json.dumps({"sent": n * 16}), flush=True)
        time.sleep(30)
asyncio.run(main())
"""


def _fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("how", ["many-at-once", "one-byte-at-a-time"])
def test_fds_sent_on_a_session_neither_stall_nor_bloat_vnetd(vnetd, how):
    """Bob (not in group vnet) may open a session. fds he sends on it: more than vnetd reads
    at once made the kernel drop the rest in vnetd's own thread (a lingering socket among
    them held its loop 3 s), and a call never finished gathered every fd sent with its bytes
    (16,000 of them held open by vnetd for the session's 10 s). A call that brings more fds
    than any answer carries ends the session, all of them closed off the loop."""
    from vnet_client import Client

    base = _fds_of(vnetd.proc.pid)
    attack = spawn_as(BOB, FD_FLOOD, how)
    try:
        sent = json.loads(attack.stdout.readline())
        took = []

        async def calls() -> None:
            async with Client() as c:
                await c.open_session()  # vnetd's own answers, no dbus-daemon between
                end = time.monotonic() + 1.5
                while time.monotonic() < end:
                    t = time.perf_counter()
                    await c.list_networks()
                    took.append(time.perf_counter() - t)
                    await asyncio.sleep(0.005)

        asyncio.run(calls())
        held = _fds_of(vnetd.proc.pid) - base
        last = json.loads(attack.stdout.readline()) if how == "many-at-once" else None
    finally:
        attack.kill()
        attack.wait()
    assert max(took) < 0.5, (
        f"a call of root took {max(took) * 1000:.0f} ms while Bob sent {sent} fds ({how})")
    assert held < 64, f"vnetd held {held} more fds while Bob's call was unfinished ({how})"
    if how == "many-at-once":
        assert last == {"ended": True}  # (more fds than an answer carries: the session ends)
    assert vnetd.alive()
