"""Files and sockets vnetd shares with its children, which it must not trust: lease files in
dhcpd's directory, pid files, the VDE management socket (helper/vnetd/children/safefile.py,
children/supervisor.py, render/vde_switch.py, vde.py). No root needed."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from vnetd.children import identity, safefile, supervisor
from vnetd.errors import Busy, Failed
from vnetd.model import Network
from vnetd.render import vde_switch as vde_be
from vnetd.subsystems import vde as vde_mod

GID = os.getgid()


def secret(tmp_path: Path, text: str = "root's secret\n", mode: int = 0o600) -> Path:
    """A file standing for one of root's files elsewhere on the host."""
    p = tmp_path / "elsewhere" / "secret"
    p.parent.mkdir(exist_ok=True)
    p.write_text(text)
    p.chmod(mode)
    return p


def untouched(p: Path, text: str = "root's secret\n", mode: int = 0o600) -> bool:
    st = p.stat()
    return p.read_text() == text and stat.S_IMODE(st.st_mode) == mode and st.st_nlink == 1


# --- read_capped ---------------------------------------------------------------------------

def test_read_capped_reads_a_regular_file(tmp_path):
    p = tmp_path / "dhcpd.leases"
    p.write_text("lease 10.0.0.2 {\n}\n")
    assert safefile.read_capped(p) == "lease 10.0.0.2 {\n}\n"
    assert safefile.read_capped(tmp_path / "missing") is None


def test_read_capped_does_not_follow_a_symlink(tmp_path, caplog):
    target = secret(tmp_path, mode=0o644)
    p = tmp_path / "dhcpd.leases"
    p.symlink_to(target)
    assert safefile.read_capped(p) is None
    assert "symbolic link" in caplog.text


def test_read_capped_refuses_dev_zero_and_a_fifo_without_blocking(tmp_path):
    p = tmp_path / "dhcpd.leases"
    p.symlink_to("/dev/zero")
    t = time.monotonic()
    assert safefile.read_capped(p) is None
    p.unlink()
    os.mkfifo(p)  # no writer: a blocking open would hang here
    assert safefile.read_capped(p) is None
    assert time.monotonic() - t < 2


def test_read_capped_refuses_a_file_beyond_the_cap(tmp_path, caplog):
    p = tmp_path / "dnsmasq.leases"
    p.write_bytes(b"x" * 1001)
    assert safefile.read_capped(p, cap=1000) is None
    assert "1001 bytes" in caplog.text
    p.write_bytes(b"x" * 1000)
    assert safefile.read_capped(p, cap=1000) == "x" * 1000
    assert safefile.LEASE_FILE_CAP == 16 * 1024 * 1024


def test_lease_readers_go_through_read_capped(tmp_path, monkeypatch):
    """DhcpServers.leases reads both servers' files through the safe reader."""
    from vnetd.subsystems import dhcp

    seen = []
    monkeypatch.setattr(safefile, "read_capped", lambda p, *a: seen.append(Path(p)) or None)
    servers = dhcp.DhcpServers(tmp_path / "run", tmp_path / "lib", lambda n: None)
    for kind in ("dnsmasq", "dhcpd"):
        net = Network.from_options("vnet9", {"dhcp": kind})
        assert servers.leases(net) == []
    assert seen == [tmp_path / "lib/vnet9/dnsmasq.leases",
                    tmp_path / "lib/vnet9/dhcpd/dhcpd.leases"]


def test_a_lease_file_is_parsed_once_per_version(tmp_path, monkeypatch):
    """Every port's guard asks for the leases on every lease event: one parse per version of
    the file; a file changed within the last second is read again and compared (its time
    moves in clock ticks, and dnsmasq rewrites it in place at the same size)."""
    import os
    import time

    from vnetd.render import dnsmasq as dnsmasq_be
    from vnetd.subsystems import dhcp

    parses = []
    real = dnsmasq_be.parse_leases
    monkeypatch.setattr(dnsmasq_be, "parse_leases", lambda t: parses.append(t) or real(t))
    servers = dhcp.DhcpServers(tmp_path / "run", tmp_path / "lib", lambda n: None)
    net = Network.from_options("vnet9", {})
    path = tmp_path / "lib/vnet9/dnsmasq.leases"
    path.parent.mkdir(parents=True)
    path.write_text("2000000000 52:54:00:00:00:01 10.0.0.5 a *\n")
    old = time.time() - 10
    os.utime(path, (old, old))
    for _ in range(5):
        assert [le.ip for le in servers.leases(net)] == ["10.0.0.5"]
    assert len(parses) == 1
    # rewritten in place, same size, same second: read again, parsed again
    path.write_text("2000000000 52:54:00:00:00:01 10.0.0.6 a *\n")
    assert [le.ip for le in servers.leases(net)] == ["10.0.0.6"]
    assert len(parses) == 2
    # recent but unchanged: read and compared, not parsed
    assert [le.ip for le in servers.leases(net)] == ["10.0.0.6"]
    assert len(parses) == 2


def test_a_pass_over_every_port_reads_a_fresh_lease_file_once(tmp_path, monkeypatch):
    """A lease event re-checks every port of its network, and each port asks for its own
    leases: a file dnsmasq rewrote a moment ago was read and hashed once per port (70 ms
    a pass at 1,000 ports). Within one_reading it is read once, and each port's leases come
    from an index by MAC; outside, a fresh file is read again, as before."""
    from vnetd.subsystems import dhcp

    reads = []
    real = safefile.read_capped
    monkeypatch.setattr(safefile, "read_capped", lambda p, *a: reads.append(p) or real(p, *a))
    servers = dhcp.DhcpServers(tmp_path / "run", tmp_path / "lib", lambda n: None)
    net = Network.from_options("vnet9", {})
    path = tmp_path / "lib/vnet9/dnsmasq.leases"
    path.parent.mkdir(parents=True)
    path.write_text("".join(f"2000000000 52:54:00:00:00:{i:02x} 10.0.0.{i} vm{i} *\n"
                            for i in range(1, 51)))  # fresh: written just now
    with servers.one_reading():
        found = [servers.leases_of(net, f"52:54:00:00:00:{i:02x}") for i in range(1, 51)]
        assert servers.leases(net)[0].ip == "10.0.0.1"
    assert len(reads) == 1
    assert [le[0].ip for le in found] == [f"10.0.0.{i}" for i in range(1, 51)]
    assert servers.leases_of(net, "52:54:00:00:00:99") == ()
    servers.leases(net)
    assert len(reads) == 3  # (outside a pass, a fresh file is read again at each ask)


# --- prepare_shared_file (dhcpd's lease file) ----------------------------------------------

def shared(p: Path) -> bool:
    st = os.lstat(p)
    return (stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o664
            and st.st_gid == GID and st.st_nlink == 1)


def test_prepare_creates_a_missing_file_for_the_group(tmp_path):
    p = tmp_path / "dhcpd.leases"
    safefile.prepare_shared_file(p, GID)
    assert shared(p) and p.read_text() == ""


def test_prepare_keeps_an_existing_file_and_fixes_its_mode(tmp_path):
    p = tmp_path / "dhcpd.leases"
    p.write_text("lease 10.0.0.2 {\n}\n")
    p.chmod(0o600)
    safefile.prepare_shared_file(p, GID)
    assert shared(p) and p.read_text() == "lease 10.0.0.2 {\n}\n"


def test_prepare_replaces_a_symlink_and_leaves_its_target_alone(tmp_path, caplog):
    target = secret(tmp_path)
    p = tmp_path / "dhcpd.leases"
    p.symlink_to(target)
    safefile.prepare_shared_file(p, GID)
    assert untouched(target)
    assert shared(p) and p.read_text() == ""
    assert "symbolic link" in caplog.text


def test_prepare_does_not_create_through_a_dangling_symlink(tmp_path):
    target = tmp_path / "elsewhere" / "new-root-file"
    target.parent.mkdir()
    p = tmp_path / "dhcpd.leases"
    p.symlink_to(target)
    safefile.prepare_shared_file(p, GID)
    assert not target.exists()
    assert shared(p)


def test_prepare_replaces_a_hard_link_and_leaves_the_other_name_alone(tmp_path):
    target = secret(tmp_path)
    p = tmp_path / "dhcpd.leases"
    os.link(target, p)
    safefile.prepare_shared_file(p, GID)
    assert untouched(target)
    assert shared(p) and p.read_text() == ""


@pytest.mark.parametrize("kind", ["fifo", "dir", "socket"])
def test_prepare_replaces_what_is_not_a_regular_file(tmp_path, kind):
    p = tmp_path / "dhcpd.leases"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir":
        p.mkdir()
        (p / "inside").write_text("x")
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    safefile.prepare_shared_file(p, GID)
    assert shared(p)
    if kind == "dir":  # moved aside, not deleted
        (aside,) = tmp_path.glob("dhcpd.leases.bad-*")
        assert (aside / "inside").read_text() == "x"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a file of another user")
def test_prepare_leaves_the_childs_own_file_alone(tmp_path):
    p = tmp_path / "dhcpd.leases"
    p.write_text("dhcpd's\n")
    os.chown(p, 65534, 65534)
    p.chmod(0o644)
    safefile.prepare_shared_file(p, GID)
    st = p.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o644)


def test_prepare_gives_up_when_the_name_keeps_being_replaced(tmp_path, monkeypatch):
    p = tmp_path / "dhcpd.leases"
    real_unlink = os.unlink

    def replant(path, *a, **kw):  # a child racing: a new symlink after each removal
        real_unlink(path, *a, **kw)
        os.symlink("/etc/passwd", path)

    monkeypatch.setattr(safefile.os, "unlink", replant)
    p.symlink_to("/etc/passwd")
    with pytest.raises(OSError):
        safefile.prepare_shared_file(p, GID)


# --- share_dir ----------------------------------------------------------------------------

def test_share_dir_makes_the_directory_with_group_and_mode(tmp_path):
    d = tmp_path / "net" / "dhcpd"
    identity.share_dir(d, GID)
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o770 and st.st_gid == GID


def test_share_dir_moves_a_symlink_aside_and_leaves_its_target_alone(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    d = tmp_path / "dhcpd"
    d.symlink_to(target)
    identity.share_dir(d, GID)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_ISDIR(os.lstat(d).st_mode)
    (aside,) = tmp_path.glob("dhcpd.old-*")
    assert aside.is_symlink()


def test_moving_aside_never_reuses_a_name(tmp_path):
    d = tmp_path / "dhcpd"
    names = set()
    for _ in range(3):
        aside = safefile.unique_aside(d, "old")
        aside.mkdir()
        names.add(aside.name)
    assert len(names) == 3 and all(n.startswith("dhcpd.old-") for n in names)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a directory of another user")
def test_share_dir_moves_a_foreign_directory_aside_twice(tmp_path):
    """The second time, an older `.old` is already there: a fresh name is used."""
    d = tmp_path / "dhcpd"
    d.mkdir()
    for _ in range(2):
        os.chown(d, 65534, 65534)
        identity.share_dir(d, GID)
        assert os.lstat(d).st_uid == 0
    assert len(list(tmp_path.glob("dhcpd.old-*"))) == 2


# --- pid files ----------------------------------------------------------------------------

def test_write_pid_file(tmp_path):
    p = tmp_path / "x.pid"
    safefile.write_pid_file(p, 1234)
    safefile.write_pid_file(p, 56)
    assert p.read_text() == "56\n" and stat.S_IMODE(p.stat().st_mode) == 0o644


def test_write_pid_file_does_not_follow_a_symlink(tmp_path):
    target = secret(tmp_path)
    p = tmp_path / "x.pid"
    p.symlink_to(target)
    with pytest.raises(OSError) as e:
        safefile.write_pid_file(p, 1234)
    assert e.value.errno == errno.ELOOP
    assert untouched(target)
    dangling = tmp_path / "y.pid"
    dangling.symlink_to(tmp_path / "elsewhere" / "created")
    with pytest.raises(OSError):
        safefile.write_pid_file(dangling, 1234)
    assert not (tmp_path / "elsewhere" / "created").exists()


def test_write_pid_file_does_not_block_on_a_fifo(tmp_path):
    p = tmp_path / "x.pid"
    os.mkfifo(p)
    with pytest.raises(OSError):
        safefile.write_pid_file(p, 1234)


def test_child_runs_even_if_its_pid_file_is_a_symlink(tmp_path, caplog):
    """A symbolic link in place of the pid file is never followed: start removes what a
    previous child left there, and write_pid_file would refuse a link; the child runs and
    its record (next to the pid file) names it."""
    target = secret(tmp_path)
    pidfile = tmp_path / "x.pid"
    pidfile.symlink_to(target)
    token = f"vnet-test-{uuid.uuid4().hex}"

    async def main():
        c = supervisor.Child("sleeper", [sys.executable, "-c", "import time; time.sleep(30)",
                                         token], pidfile, token)
        await c.start()
        try:
            assert c.pid and c.state == "running"
            assert supervisor.read_record(pidfile)[0] == c.pid
            pid = c.pid
        finally:
            await c.stop()
        assert supervisor.proc_stat(pid) is None
        assert not supervisor.record_path(pidfile).exists()

    asyncio.run(main())
    assert untouched(target)  # the stale link was removed (unlink never follows), not written


def test_vde_pid_files_are_not_in_the_switches_directory(tmp_path):
    v = vde_mod.VdeSwitches(tmp_path)
    assert v.pidfile("vnet3_1") == tmp_path / "_pids" / "vde_switch-vnet3_1.pid"
    assert v.pidfile("vnet3_1").parent != v.base
    assert all(p.parent != v.base or p.suffix != ".pid" for p in v._paths("vnet3_1"))


# --- signals ------------------------------------------------------------------------------

def test_signal_pidfd_survives_a_helper_that_cannot_start(monkeypatch, caplog):
    def denied(fd, sig):
        raise PermissionError(errno.EPERM, "no CAP_KILL")

    async def broken(*a, **kw):
        raise OSError(errno.ENOEXEC, "Exec format error")

    monkeypatch.setattr(supervisor.signal, "pidfd_send_signal", denied)
    monkeypatch.setattr(supervisor, "proc_ids", lambda pid: (65534, 65534))
    monkeypatch.setattr(supervisor.asyncio, "create_subprocess_exec", broken)
    asyncio.run(supervisor.signal_pidfd(99, 4242, 15))
    assert "cannot signal pid 4242" in caplog.text


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["/bin/sleep", "30"])


def test_reap_stops_the_recorded_process_only_while_it_is_that_process(tmp_path):
    os.chmod(tmp_path, 0o755)
    pidfile = tmp_path / "x.pid"
    p = _sleeper()
    try:
        start = supervisor.proc_stat(p.pid)[1]
        names = supervisor.exe_names(["/bin/sleep"])
        # a record whose start time is not the process's (its pid was reused): left alone
        supervisor.write_record(pidfile, p.pid, start + 1, names)
        asyncio.run(supervisor.reap(pidfile))
        assert p.poll() is None and not supervisor.record_path(pidfile).exists()
        # a record of some other program: left alone
        supervisor.write_record(pidfile, p.pid, start, ["dnsmasq"])
        asyncio.run(supervisor.reap(pidfile))
        assert p.poll() is None
        # the very process: stopped
        supervisor.write_record(pidfile, p.pid, start, names)
        asyncio.run(supervisor.reap(pidfile))
        assert p.wait(5) == -signal.SIGTERM
    finally:
        p.kill()
        p.wait()


def test_records_others_could_write_are_ignored(tmp_path):
    os.chmod(tmp_path, 0o777)
    pidfile = tmp_path / "x.pid"
    p = _sleeper()
    try:
        supervisor.write_record(pidfile, p.pid, supervisor.proc_stat(p.pid)[1],
                                supervisor.exe_names(["/bin/sleep"]))
        if os.geteuid() == 0:
            assert supervisor.read_record(pidfile) is None  # the directory is not root's alone
        asyncio.run(supervisor.reap(pidfile))
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def _gate(r: int, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([supervisor.GATE_SHELL, "-p", "-c", supervisor.GATE, str(r), *argv],
                            pass_fds=(r,), env=env)


def _high_pipe() -> tuple[int, int]:
    """A pipe whose read end is above fd 9, as in vnetd (dash refuses such fd numbers)."""
    r, w = os.pipe()
    high = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 40)
    os.close(r)
    return high, w


def test_the_gate_runs_nothing_when_vnetd_dies_before_it_says_go(tmp_path):
    flag = tmp_path / "ran"
    r, w = _high_pipe()
    p = _gate(r, "/usr/bin/touch", str(flag))
    os.close(r)
    os.close(w)  # as a killed vnetd's end closes
    assert p.wait(10) == 0
    assert not flag.exists()


def test_the_gate_runs_the_program_on_go_without_the_pipe(tmp_path):
    r, w = _high_pipe()
    out = tmp_path / "fds"
    args = tmp_path / "args"
    p = _gate(r, "/bin/bash", "-c", f'ls /proc/$$/fd > {out}; echo "$0|$1" > {args}',
              "two words", "x")
    os.close(r)
    os.write(w, b"1\n")
    os.close(w)
    assert p.wait(10) == 0
    assert str(r) not in out.read_text().split()  # the gate's pipe is not the program's
    assert args.read_text() == "two words|x\n"  # its arguments as given, word for word


def test_the_gate_waits_for_go_whatever_its_environment_says(tmp_path):
    """vnetd's environment is the gate's: a TMOUT there (a shell profile's) must not cut its
    wait short, nor a BASH_ENV or an exported function run anything first."""
    flag, early = tmp_path / "ran", tmp_path / "early"
    r, w = _high_pipe()
    env = {**os.environ, "TMOUT": "0.01", "BASH_ENV": str(tmp_path / "env.sh"),
           "BASH_FUNC_read%%": "() { touch " + str(early) + "; }"}
    (tmp_path / "env.sh").write_text(f"touch {early}\n")
    p = _gate(r, "/usr/bin/touch", str(flag), env=env)
    os.close(r)
    time.sleep(0.2)  # well past the TMOUT
    os.write(w, b"1\n")
    os.close(w)
    assert p.wait(10) == 0
    assert flag.exists() and not early.exists()


def test_the_gate_runs_nothing_on_anything_but_go(tmp_path):
    flag = tmp_path / "ran"
    r, w = _high_pipe()
    p = _gate(r, "/usr/bin/touch", str(flag))
    os.close(r)
    os.write(w, b"11\n")
    os.close(w)
    assert p.wait(10) == 0
    assert not flag.exists()


def test_a_process_is_waited_for_on_the_loop_without_a_thread():
    """Children are waited for through a pidfd on the event loop: the exit status (also of
    a signal) and the output arrive, and no thread is started per child."""
    async def main():
        threads = threading.active_count()
        procs = [supervisor.Process(["/bin/sh", "-c", f"echo line{i}; exit {i}"])
                 for i in range(5)]
        killed = supervisor.Process(["/bin/sleep", "30"])
        for p in [*procs, killed]:
            await p.connect_output()
        assert threading.active_count() == threads  # none per child
        os.kill(killed.pid, signal.SIGTERM)
        codes = [await asyncio.wait_for(p.wait(), 10) for p in procs]
        assert codes == [0, 1, 2, 3, 4] and [p.returncode for p in procs] == codes
        assert await asyncio.wait_for(killed.wait(), 10) == -signal.SIGTERM
        assert [await p.stdout.readline() for p in procs] == [
            f"line{i}\n".encode() for i in range(5)]
        # a wait cancelled (a timeout) leaves the exit to be seen by the next one
        slow = supervisor.Process(["/bin/sleep", "0.3"])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow.wait(), 0.01)
        assert await asyncio.wait_for(slow.wait(), 10) == 0
    asyncio.run(main())


# --- VDE ----------------------------------------------------------------------------------

def test_vde_argv_without_a_management_group_name():
    a = vde_be.argv("t1", Path("/run/x/vde/t1"), Path("/run/x/vde/t1.mgmt"), 8, "vnet", None)
    assert "--mgmtgroup" not in a
    assert a[a.index("--mgmtmode") + 1] == "600"
    a = vde_be.argv("t1", Path("/run/x/vde/t1"), Path("/run/x/vde/t1.mgmt"), 8, "vnet", "vde")
    assert a[a.index("--mgmtgroup") + 1] == "vde" and a[a.index("--mgmtmode") + 1] == "660"


def test_mgmt_group_name_of_a_gid_without_a_name():
    assert vde_mod.mgmt_group_name(0) == "root"
    free = next(g for g in range(2_000_000_000, 2_000_001_000) if not _has_group(g))
    assert vde_mod.mgmt_group_name(free) is None


def _has_group(gid: int) -> bool:
    import grp
    try:
        grp.getgrgid(gid)
        return True
    except KeyError:
        return False


PORTS = (b"0000 DATA END WITH '.'\nPort 0001 untagged_vlan=0000 ACTIVE - Unnamed Allocatable\n"
         b"Port 0002 untagged_vlan=0000 ACTIVE - Unnamed Allocatable\n.\n1000 Success\n\nvde$ ")


class FakeSwitch:
    """A management socket served by a thread: `behave(conn)` talks to one client."""

    def __init__(self, path: Path, behave):
        self.path = path
        self.received = b""
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, args=(behave,), daemon=True)
        self.t.start()

    def _run(self, behave):
        conn, _ = self.srv.accept()
        with conn:
            conn.settimeout(0.2)
            behave(self, conn)

    def read(self, conn):
        try:
            self.received += conn.recv(1024)
        except OSError:
            pass

    def close(self):
        self.stop.set()
        self.t.join(5)
        self.srv.close()


def test_active_ports_from_an_honest_switch(tmp_path):
    def honest(fs, conn):
        conn.sendall(b"VDE switch V.2.3.2\n\nvde$ ")
        while b"port/print" not in fs.received and not fs.stop.is_set():
            fs.read(conn)
        conn.sendall(PORTS)
        fs.stop.wait(5)

    fs = FakeSwitch(tmp_path / "m", honest)
    try:
        assert vde_be.active_ports(fs.path, peer_uid=os.getuid()) == 2
    finally:
        fs.close()


def test_active_ports_gives_up_on_a_trickling_switch(tmp_path):
    def trickle(fs, conn):
        try:
            while not fs.stop.is_set():
                conn.send(b"x")
                time.sleep(0.05)
        except OSError:
            pass  # the client gave up

    fs = FakeSwitch(tmp_path / "m", trickle)
    try:
        t = time.monotonic()
        assert vde_be.active_ports(fs.path, deadline=0.5) is None
        assert time.monotonic() - t < 1.0
    finally:
        fs.close()


def test_active_ports_stops_reading_at_the_byte_cap(tmp_path):
    def flood(fs, conn):
        try:
            while not fs.stop.is_set():
                conn.sendall(b"Port 0001 untagged_vlan=0000 ACTIVE\n" * 100)
        except OSError:
            pass  # the client gave up

    fs = FakeSwitch(tmp_path / "m", flood)
    try:
        t = time.monotonic()
        assert vde_be.active_ports(fs.path, max_bytes=64 * 1024) is None
        assert time.monotonic() - t < 0.5
    finally:
        fs.close()


def test_active_ports_sends_nothing_to_another_users_socket(tmp_path):
    def listen(fs, conn):
        try:
            conn.sendall(b"vde$ ")
        except OSError:
            return  # the client gave up
        while not fs.stop.is_set():
            fs.read(conn)

    fs = FakeSwitch(tmp_path / "m", listen)
    try:
        assert vde_be.active_ports(fs.path, peer_uid=os.getuid() + 1) is None
    finally:
        fs.close()
    assert fs.received == b""


async def test_free_socket_with_unknown_free_ports(tmp_path, monkeypatch):
    net = Network.from_options("vnet9", {"vde": True, "taps": 2})
    v = vde_mod.VdeSwitches(tmp_path)
    monkeypatch.setattr(v, "switches", lambda n: [
        {"tap": "vnet9_1", "sock": "/s1", "state": "running", "free": 0},
        {"tap": "vnet9_2", "sock": "/s2", "state": "running"}])
    assert await v.free_socket(net) == "/s2"
    monkeypatch.setattr(v, "switches", lambda n: [
        {"tap": "vnet9_1", "sock": "/s1", "state": "running", "free": 0},
        {"tap": "vnet9_2", "sock": "/s2", "state": "crash-loop"}])
    with pytest.raises(Busy):
        await v.free_socket(net)


async def test_the_switches_are_asked_once_for_everyone_in_a_thread_of_their_own(tmp_path,
                                                                                 monkeypatch):
    """Anyone may look at a VDE network (GetNetwork), and asking its switches takes up to a
    second each: callers at the same time share one asking, in vnetd's one thread for it
    (never the loop's shared workers, which write the MAC registry and make taps); a caller
    after it is answered afresh (a plug that came meanwhile shows)."""
    import threading
    import time

    net = Network.from_options("vnet9", {"vde": True, "taps": 2})
    v = vde_mod.VdeSwitches(tmp_path)
    v.nets[net.name] = net
    threads = []

    def slow(n):
        threads.append(threading.current_thread().name)
        time.sleep(0.2)
        return [{"tap": "vnet9_1", "sock": "/s1", "state": "running", "free": 3}]

    monkeypatch.setattr(v, "switches", slow)
    answers = await asyncio.gather(*(v.status("vnet9") for _ in range(20)))
    assert len(threads) == 1 and threads[0].startswith("vde-ask"), threads
    assert all(a == answers[0] for a in answers) and answers[0][0]["free"] == 3
    answers[0][0]["free"] = 0  # (each caller has its own copy)
    assert answers[1][0]["free"] == 3
    await v.status("vnet9")
    assert len(threads) == 2


def test_give_tap_ebusy_is_a_failure(monkeypatch):
    def busy(tap, uid):
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(vde_mod.tap_be, "set_tap_owner", busy)
    with pytest.raises(Failed, match="held by another process"):
        vde_mod.give_tap("vnet9_1", 1000)


def test_vde_start_stops_old_switches_before_handing_the_tap(tmp_path, monkeypatch):
    """C11: a switch left for the tap (perhaps a root one from an older vnetd) is stopped
    first, then the tap goes to vnet-vde, then the new switch starts."""
    calls = []
    net = Network.from_options("vnet9", {"vde": True, "taps": 1})
    v = vde_mod.VdeSwitches(tmp_path)
    monkeypatch.setattr(identity, "share_dir", lambda *a, **kw: None)
    monkeypatch.setattr(identity, "private_dir", lambda *a, **kw: None)

    async def reap(pidfile):
        calls.append(("reap", str(pidfile)))

    async def start(self):
        calls.append(("start", self.marker))
        raise Failed("stop here")

    async def stop(self):
        pass

    monkeypatch.setattr(vde_mod, "reap", reap)
    monkeypatch.setattr(vde_mod, "give_tap", lambda tap, uid: calls.append(("give", tap)))
    monkeypatch.setattr(supervisor.Child, "start", start)
    monkeypatch.setattr(supervisor.Child, "stop", stop)
    with pytest.raises(Failed):
        asyncio.run(v.start(net))
    sock = str(tmp_path / "vde" / "vnet9_0")  # the first tap is NAME_0, as qemu-vlan's
    assert calls == [("reap", str(v.pidfile("vnet9_0"))), ("give", "vnet9_0"), ("start", sock)]


def test_vde_switch_macs_go_to_their_own_switch(tmp_path, monkeypatch):
    """vde-macs (qemu-vlan's vde_switch_ether_<i>): switch i runs with --macaddr MAC_i."""
    argvs = []
    net = Network.from_options("vnet9", {"vde": True, "taps": 2, "vde-switch-args": ["--hub"],
                                         "vde-macs": ["52:54:00:09:00:00", "52:54:00:09:00:01"]})
    v = vde_mod.VdeSwitches(tmp_path)
    monkeypatch.setattr(identity, "share_dir", lambda *a, **kw: None)
    monkeypatch.setattr(identity, "private_dir", lambda *a, **kw: None)
    monkeypatch.setattr(identity, "user_ids", lambda name: (1000, 1000))
    monkeypatch.setattr(identity, "vde_ids", lambda group: (1000, 1000))

    async def reap(pidfile):
        pass

    async def start(self):
        argvs.append(self.argv)

    async def ready(self, net, children):
        pass

    monkeypatch.setattr(vde_mod, "reap", reap)
    monkeypatch.setattr(vde_mod, "give_tap", lambda tap, uid: None)
    monkeypatch.setattr(supervisor.Child, "start", start)
    monkeypatch.setattr(vde_mod.VdeSwitches, "_wait_ready", ready)
    asyncio.run(v.start(net))
    assert [a[a.index("--tap") + 1] for a in argvs] == ["vnet9_0", "vnet9_1"]
    assert [a[a.index("--macaddr") + 1] for a in argvs] == ["52:54:00:09:00:00",
                                                           "52:54:00:09:00:01"]
    assert all(a.count("--macaddr") == 1 and "--hub" in a for a in argvs)


def test_lease_lines_of_a_network_are_budgeted_and_every_event_still_goes_out(caplog):
    """Guests behind a VDE switch may use any MAC, so as many leases as they like: a line per
    lease would push vnetd's audit lines past journald's rate limit. At most a burst of
    lines per network, then a few a second, the next line saying how many were held back;
    every event still reaches the firewall and the bus."""
    import logging

    from vnetd.render.dnsmasq import Lease
    from vnetd.subsystems import dhcp

    servers = dhcp.DhcpServers(Path("/nonexistent/run"), Path("/nonexistent/lib"),
                               lambda n: None)
    heard = []
    servers.listeners.append(lambda network, lease, event: heard.append((network, event)))
    with caplog.at_level(logging.INFO, logger="vnetd.dhcp"):
        for i in range(200):
            servers._emit("vnet3", Lease(mac=f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}",
                                         ip=f"10.0.0.{i % 250}", hostname="", expiry=0),
                          "added")
        servers._emit("vnet4", Lease(mac="02:00:00:00:09:09", ip="10.1.0.9", hostname="",
                                     expiry=0), "added")
    lines = [r.getMessage() for r in caplog.records if r.name == "vnetd.dhcp"]
    assert len([x for x in lines if " on vnet3:" in x]) <= dhcp.LEASE_LINES_BURST + 1, lines
    assert any(" on vnet4:" in x for x in lines)  # (another network's budget is its own)
    assert len(heard) == 201
