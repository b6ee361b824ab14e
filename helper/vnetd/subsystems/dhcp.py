"""DHCP and DNS per network: which servers run, their files, readiness, leases.

`dhcp = "dnsmasq"` (default): one dnsmasq for DHCP, DNS and IPv6 RAs.
`dhcp = "dhcpd"`: ISC dhcpd for DHCP plus a DNS-only dnsmasq.
`dhcp = "none"`: nothing.
Leases persist under the state directory, so a restarted server hands out the same addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import logging
import os
import pwd
import shutil
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..children import identity, safefile
from ..children.supervisor import Child, open_recorded, reap
from ..errors import Failed
from ..fairlock import caller_key
from ..linebudget import LineBudget
from ..model import Network
from ..render import dhcpd as dhcpd_be
from ..render import dnsmasq as dnsmasq_be
from ..render.dnsmasq import Lease
from ..store import atomic_write

if TYPE_CHECKING:
    from ..networks import Running

log = logging.getLogger("vnetd.dhcp")

READY_TIMEOUT = 3.0
# a network's servers' pid files, in its runtime directory
DNSMASQ_PID, DHCPD_PID = "dnsmasq.pid", "dhcpd.pid"
LEASE_POLL = 0.5
# ISC dhcpd appends a record per answer and rewrites its lease file (live leases only) when
# it starts and once an hour at most: past this size vnetd restarts it, at most once a
# COMPACT_EVERY seconds, so the file vnetd parses twice a second stays small whatever the
# guests ask (each port may ask a few times a second: the guard's DHCP limit)
DHCPD_COMPACT_AT = 1 << 20
COMPACT_EVERY = 60.0


def dns_query(name: str, qid: int) -> bytes:
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for part in name.split("."):
        q += bytes([len(part)]) + part.encode()
    return q + b"\0" + struct.pack(">HH", 1, 1)


LEASE_LINES_BURST, LEASE_LINES_RATE = 20, 2.0  # lease lines per network: at once, a second


def dnsmasq_user() -> tuple[tuple[str, str], int]:
    """dnsmasq's user and group after it drops root (`vnet-dns`, see identity.py), and the
    group's gid: the files dnsmasq re-reads as that user (its hosts files, which name VMs,
    their MACs and addresses) are that group's and root's alone, which vnetd, a member,
    can make them without CAP_CHOWN."""
    uid, gid = identity.dnsmasq_ids()
    try:
        return (pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name), gid
    except KeyError:
        return dnsmasq_be.run_user(), grp.getgrnam(dnsmasq_be.run_user()[1]).gr_gid


class DhcpServers:
    def __init__(self, runtime_dir: Path, state_dir: Path,
                 lookup: Callable[[str], Network | None],
                 names: Callable[[str], dict[str, str]] = lambda network: {}):
        self.lookup = lookup  # a network's current definition, by name
        self.names = names  # a network's DNS names of VMs, by MAC (MacRegistry.dns_names)
        self._hosts_written: dict[str, str] = {}  # network -> its dhcp-hostsfile's text
        self.runtime_dir = Path(runtime_dir)
        self.state_dir = Path(state_dir)
        self.children: dict[str, list[Child]] = {}
        self.kinds: dict[str, str] = {}
        self.leases_seen: dict[str, dict[str, Lease]] = {}
        self.lease_mtimes: dict[str, float] = {}
        self._compacted: dict[str, float] = {}  # network -> when its dhcpd was last restarted
        # network -> (the lease file's path, kind, inode, size, mtime), its text's digest,
        # its leases
        # network -> (file version, digest, leases, leases by MAC)
        self._parsed: dict[str, tuple[Any, ...]] = {}
        # a line per new, changed or gone lease, per network: guests behind a VDE switch may
        # use any MAC, and so make as many leases as they like (as many lines, which would
        # push vnetd's audit lines past journald's rate limit)
        self._lines = LineBudget(LEASE_LINES_BURST, LEASE_LINES_RATE)
        self._pinned: dict[str, tuple] | None = None  # see one_reading
        # each network's lease file, as its kind of server names it: the poller looks at
        # every one twice a second, without building paths each time
        self._lease_paths: dict[str, tuple[str, str]] = {}
        self.listeners: list[Callable[[str, Lease, str], None]] = []
        self._poller: asyncio.Task | None = None
        # servers a previous vnetd started that still serve a running network, by network:
        # their pid files, until `replace_inherited` (or a change, a stop) takes them over
        self.inherited: dict[str, list[Path]] = {}

    # --- files --------------------------------------------------------------------------
    def paths(self, net: Network) -> dnsmasq_be.Paths:
        run = self.runtime_dir / net.name
        lib = self.state_dir / net.name
        return dnsmasq_be.Paths(conf=run / "dnsmasq.conf", hosts_dhcp=run / "hosts.dhcp",
                                hosts_dns=run / "hosts.dns", leases=lib / "dnsmasq.leases",
                                pid=run / DNSMASQ_PID)

    def lease_file(self, net: Network) -> Path:
        if self.kinds.get(net.name, net.dhcp) == "dhcpd":
            return self.state_dir / net.name / "dhcpd" / "dhcpd.leases"
        return self.paths(net).leases

    def _write_hosts(self, net: Network) -> bool:
        """Both hosts files; whether the DHCP one's text changed. dnsmasq re-reads them
        after dropping root: they are its group's and root's alone (they name VMs, their
        MACs and addresses, which a user may see of its own VMs only)."""
        p = self.paths(net)
        text = dnsmasq_be.render_hosts_dhcp(
            net, self.names(net.name) if net.dhcp == "dnsmasq" else None)
        changed = self._hosts_written.get(net.name) != text
        (_user, group), gid = dnsmasq_user()
        try:
            atomic_write(p.hosts_dhcp, text.encode(), mode=0o440, durable=False, group=gid)
            atomic_write(p.hosts_dns, dnsmasq_be.render_hosts_dns(net).encode(), mode=0o440,
                         durable=False, group=gid)
            self._hosts_written[net.name] = text
        except OSError as e:
            raise Failed(f"Cannot write the DNS/DHCP hosts files of '{net.name}' for group "
                         f"'{group}' ({e.strerror or e}): vnetd joins that group at start-up, "
                         "which needs CAP_SETGID.") from None
        return changed

    # --- the subsystem protocol (subsystems/__init__.py) -----------------------------------------
    name = "dhcp"

    async def apply(self, run: Running) -> None:
        """Serve the network as defined now: a server that runs for an older definition
        is replaced."""
        if run.name in self.children or run.name in self.inherited:
            await self.stop(run.name)
        await self.start(run.net)

    async def remove(self, name: str) -> None:
        await self.stop(name)

    async def adopt(self, run: Running) -> None:
        """A restarted vnetd replaces the servers the previous one left (it cannot wait
        for children it did not start)."""
        await self.start(run.net)

    async def sync(self) -> None:
        pass

    async def status(self, name: str) -> list[dict]:
        inherited = []
        for pf in self.inherited.get(name, []):
            found = open_recorded(pf)
            if found is not None:
                os.close(found[0])
            inherited.append({"name": f"{pf.name.split('.')[0]}[{name}]",
                              "state": "inherited" if found else "gone",
                              "pid": found[1] if found else 0, "restarts": 0})
        return [c.status() for c in self.children.get(name, [])] + inherited

    # --- after a restart ---------------------------------------------------------------
    def pidfiles(self, net: Network) -> list[Path]:
        """The pid files of the servers `net` runs with (dnsmasq; and dhcpd beside it)."""
        if net.dhcp == "none":
            return []
        run = self.runtime_dir / net.name
        return [run / DNSMASQ_PID] + ([run / DHCPD_PID] if net.dhcp == "dhcpd" else [])

    def inherit(self, net: Network) -> bool:
        """Whether every server a previous vnetd started for `net` still runs (each found
        by the record beside its pid file, checked against /proc: never by command line):
        then they go on serving, known as inherited, until `replace_inherited` replaces
        them with servers of this vnetd's (whose output it reads and whose exit it sees)."""
        files = self.pidfiles(net)
        for pf in files:
            found = open_recorded(pf)
            if found is None:
                return False
            os.close(found[0])
        if files:
            self.inherited[net.name] = files
            self.kinds[net.name] = net.dhcp
            self.leases_seen[net.name] = {le.mac: le for le in self.leases(net)}
            self._ensure_poller()
        return True

    async def replace_inherited(self, net: Network) -> None:
        """This vnetd's servers in the place of the inherited ones (each start stops the
        one its pid file names first)."""
        files = self.inherited.pop(net.name, None)
        if files is not None:
            self.kinds.pop(net.name, None)
            try:
                await self.start(net)
            except BaseException:  # none of them left serving unowned: stopped, all
                for pf in files:
                    await reap(pf)
                raise

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self, net: Network) -> None:
        if net.dhcp == "none" or net.name in self.children:
            return
        p = self.paths(net)
        # dnsmasq re-reads its hosts files after dropping root; dhcpd, unprivileged, goes
        # through the lease directory to its own; nobody else reads a lease (which guest has
        # which MAC, address and host name: Leases shows a user only its own VMs')
        for d, mode in ((p.conf.parent, 0o755), (p.leases.parent, 0o711)):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, mode)
        self._write_hosts(net)
        children: list[Child] = []
        user, _gid = dnsmasq_user()
        if net.dhcp == "dnsmasq":
            # dnsmasq opens it as root, before it drops root, and writes through that
            # descriptor: root's alone (also one an older vnetd left readable)
            p.leases.touch(mode=0o600)
            os.chmod(p.leases, 0o600)
            atomic_write(p.conf, dnsmasq_be.render_conf(net, p, user=user).encode(),
                         durable=False)
            children.append(Child(f"dnsmasq[{net.name}]", dnsmasq_be.argv(p), p.pid,
                                  str(p.conf)))
        else:  # dhcpd + a DNS-only dnsmasq
            atomic_write(p.conf, dnsmasq_be.render_conf(net, p, dhcp=False, user=user).encode(),
                         durable=False)
            children.append(Child(f"dnsmasq-dns[{net.name}]", dnsmasq_be.argv(p), p.pid,
                                  str(p.conf)))
            children.append(self._dhcpd_child(net))
        self.kinds[net.name] = net.dhcp
        started: list[Child] = []
        try:
            for c in children:
                await c.start()
                started.append(c)
            await self._wait_ready(net, children)
        except BaseException:
            for c in started:
                await c.stop()
            self.kinds.pop(net.name, None)
            raise
        self.children[net.name] = children
        self.leases_seen[net.name] = {le.mac: le for le in self.leases(net)}
        self._ensure_poller()

    def _dhcpd_child(self, net: Network) -> Child:
        """ISC dhcpd, started already unprivileged (see identity.py): its lease directory
        is ours, in dhcpd's group, because dhcpd rewrites the file by renaming in it."""
        uid, gid = identity.dhcpd_ids()
        d = self.state_dir / net.name / "dhcpd"
        identity.share_dir(d, gid)
        conf = self.runtime_dir / net.name / "dhcpd.conf"
        leases = d / "dhcpd.leases"
        # dhcpd appends to it before its first rewrite. The directory is dhcpd's to write, so
        # nothing in it is followed or trusted (safefile.py).
        try:
            safefile.prepare_shared_file(leases, gid, 0o664)
        except OSError as e:
            raise Failed(f"Cannot prepare the DHCP lease file {leases}: "
                         f"{e.strerror or e}.") from e
        atomic_write(conf, dhcpd_be.render_conf(net).encode(), durable=False)
        pidfile = self.runtime_dir / net.name / DHCPD_PID
        return Child(f"dhcpd[{net.name}]", dhcpd_be.argv(net, conf, leases, uid, gid),
                     pidfile, str(conf))

    async def _wait_ready(self, net: Network, children: list[Child]) -> None:
        """Ready when dnsmasq answers DNS on the gateway (it sets up DHCP before DNS). The
        probe socket is connected, so 'port unreachable' comes back at once while dnsmasq is
        still starting, and the next probe follows in milliseconds."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + READY_TIMEOUT
        qid = 1
        try:
            sock.connect((str(net.gateway), 53))
            while time.monotonic() < deadline:
                for c in children:
                    if c.proc is not None and c.proc.returncode is not None:
                        raise Failed(f"{c.name} exited at once (code {c.proc.returncode}); "
                                     "see the vnetd log.")
                qid += 1
                try:
                    sock.send(dns_query(f"vnetd-ready.{net.dns_domain}", qid))
                    await asyncio.wait_for(loop.sock_recv(sock, 512), 0.1)
                    return
                except (TimeoutError, OSError):
                    await asyncio.sleep(0.002)
        finally:
            sock.close()
        raise Failed(f"The DNS/DHCP server of '{net.name}' did not answer within "
                     f"{READY_TIMEOUT:.0f} s; see the vnetd log.")

    async def stop(self, net_name: str) -> None:
        for c in self.children.pop(net_name, []):
            await c.stop()
        for pf in self.inherited.pop(net_name, []):
            await reap(pf)
        self.kinds.pop(net_name, None)
        self._lease_paths.pop(net_name, None)
        self.leases_seen.pop(net_name, None)

    async def apply_hosts(self, net: Network) -> None:
        """Static hosts changed: dnsmasq re-reads its hosts files on SIGHUP; dhcpd restarts
        (an inherited server is replaced: it is started with them)."""
        if net.name in self.inherited:
            return await self.replace_inherited(net)
        if net.name not in self.children:
            return
        self._write_hosts(net)
        for c in self.children[net.name]:
            if c.name.startswith("dhcpd"):
                atomic_write(Path(c.marker), dhcpd_be.render_conf(net).encode(), durable=False)
                await c.stop()
                await c.start()
            else:
                await c.reload()

    async def names_changed(self, network: str) -> None:
        """The network's VMs changed in the MAC registry: its dnsmasq re-reads the names
        (SIGHUP) if they are not the ones it has. A server a previous vnetd left keeps its
        names until it is replaced (with the network's next change)."""
        net = self.lookup(network)
        if (net is None or net.dhcp != "dnsmasq" or network not in self.children
                or network in self.inherited or self.kinds.get(network) != "dnsmasq"):
            return
        if self._write_hosts(net):
            for c in self.children[network]:
                await c.reload()

    def forget(self, net_name: str) -> None:
        """An undefined network: its runtime directory (configs, pid files) and its state
        directory (leases) go, so a network defined later under that name starts clean.
        rmtree never follows a symbolic link, also not one a child left in dhcpd's directory."""
        if net_name in self.children or net_name in self.inherited:
            log.error("%s: its servers still run; its directories are kept", net_name)
            return
        self._hosts_written.pop(net_name, None)
        for d in (self.runtime_dir / net_name, self.state_dir / net_name):
            if d.is_symlink():
                d.unlink()
            elif d.exists():
                shutil.rmtree(d, onerror=lambda _f, path, e: log.warning(
                    "cannot remove %s: %s", path, e[1]))
        self.lease_mtimes.pop(net_name, None)
        self._parsed.pop(net_name, None)

    # --- leases -------------------------------------------------------------------------
    def leases(self, net: Network) -> list[Lease]:
        """The network's leases, parsed once per version of the file: every port's guard,
        every forward to a VM and every Leases call asks. A file changed in the last second
        is read again and compared (its time moves in clock ticks, and dnsmasq rewrites it
        in place), except within one_reading."""
        return list(self._reading(net)[2])

    def leases_of(self, net: Network, mac: str) -> tuple[Lease, ...]:
        """The leases of one MAC (a port's), without a walk over the others."""
        return self._reading(net)[3].get(mac, ())

    @contextlib.contextmanager
    def one_reading(self):
        """Within, each network's lease file is read once: a pass over every port of a
        network (a lease event) asks for each port's leases, and a file dnsmasq rewrote a
        moment ago would otherwise be read and hashed again for each one. The pass sees the
        file as it was when it began; a change meanwhile brings another event."""
        outer = self._pinned is not None
        if not outer:
            self._pinned = {}
        try:
            yield
        finally:
            if not outer:
                self._pinned = None

    def _reading(self, net: Network) -> tuple[Any, ...]:
        pinned = self._pinned
        if pinned is not None and net.name in pinned:
            return pinned[net.name]
        got = self._read(net)
        if pinned is not None:
            pinned[net.name] = got
        return got

    def _read(self, net: Network) -> tuple[Any, ...]:
        path = self.lease_file(net)
        kind = self.kinds.get(net.name, net.dhcp)
        try:
            st = os.lstat(path)
            version: tuple | None = (str(path), kind, st.st_ino, st.st_size, st.st_mtime_ns)
            settled = time.time() - st.st_mtime > 1.0
        except OSError:
            version, settled = None, False
        cached = self._parsed.get(net.name)
        if cached is not None and settled and cached[0] == version:
            return cached
        # dhcpd's file is in a directory dhcpd writes: no symlink, FIFO or endless file
        text = safefile.read_capped(path)
        if text is None:
            self._parsed.pop(net.name, None)
            return ((), b"", (), {})
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        got: tuple[Any, ...]
        if cached is not None and cached[1] == digest and cached[0][:2] == (str(path), kind):
            got = (version, digest, cached[2], cached[3])
        else:
            parsed = tuple(dhcpd_be.parse_leases(text) if kind == "dhcpd"
                           else dnsmasq_be.parse_leases(text))
            by_mac: dict[str, list[Lease]] = {}
            for le in parsed:
                by_mac.setdefault(le.mac, []).append(le)
            got = (version, digest, parsed, {m: tuple(v) for m, v in by_mac.items()})
        if got[0] is not None:
            self._parsed[net.name] = got
        return got

    def _ensure_poller(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """Watch the lease files; announce each lease that appears, changes or goes."""
        caller_key.set(None)  # vnetd's own work, whoever's call started the first server
        while True:
            await asyncio.sleep(LEASE_POLL)
            for name in [*self.children, *self.inherited]:
                net = self.lookup(name)
                if net is None:
                    continue
                kind = self.kinds.get(name, net.dhcp)
                path = self._lease_paths.get(name)
                if path is None or path[0] != kind:
                    path = self._lease_paths[name] = (kind, str(self.lease_file(net)))
                try:
                    st = os.lstat(path[1])
                except OSError:
                    continue
                if kind == "dhcpd" and st.st_size > DHCPD_COMPACT_AT:
                    await self._compact(net, st.st_size)
                if self.lease_mtimes.get(name) == st.st_mtime:
                    continue
                self.lease_mtimes[name] = st.st_mtime
                now = {le.mac: le for le in self.leases(net)}
                old = self.leases_seen.get(name, {})
                for mac, le in now.items():
                    if mac not in old:
                        self._emit(name, le, "added")
                    elif old[mac] != le:
                        self._emit(name, le, "changed", renewal=(
                            old[mac].ip, old[mac].hostname) == (le.ip, le.hostname))
                for mac, le in old.items():
                    if mac not in now:
                        self._emit(name, le, "removed")
                self.leases_seen[name] = now

    async def _compact(self, net: Network, size: int) -> None:
        """Restart the network's dhcpd, which rewrites its lease file with the live leases
        only (the leases themselves are kept: dhcpd reads the file first)."""
        now = time.monotonic()
        children = self.children.get(net.name)
        if children is None or now - self._compacted.get(net.name, -COMPACT_EVERY) \
                < COMPACT_EVERY:
            return
        self._compacted[net.name] = now
        for i, c in enumerate(children):
            if c.name.startswith("dhcpd["):
                log.warning("%s: the lease file has grown to %d bytes; restarting dhcpd, "
                            "which rewrites it", net.name, size)
                await c.stop()
                fresh = self._dhcpd_child(net)
                try:
                    await fresh.start()
                except (Failed, OSError) as e:
                    log.error("%s: dhcpd did not start again: %s", net.name, e)
                    return
                if self.children.get(net.name) is not children:  # stopped meanwhile
                    await fresh.stop()
                    return
                children[i] = fresh

    def _emit(self, network: str, lease: Lease, event: str, renewal: bool = False) -> None:
        # a renewal (only the expiry moved) is as frequent as a guest makes it: debug; the
        # rest within the network's budget of lines
        if renewal:
            log.debug("lease %s on %s: %s %s %s (renewed)", event, network, lease.ip,
                      lease.mac, lease.hostname or "-")
        elif (held := self._lines.take(network)) is not None:
            log.info("lease %s on %s: %s %s %s%s", event, network, lease.ip, lease.mac,
                     lease.hostname or "-",
                     f" ({held} lease line(s) of {network} held back before this one)"
                     if held else "")
        for fn in self.listeners:
            fn(network, lease, event)
