"""Who the children run as, and the groups vnetd joins to share directories with them.

vnetd runs as root but without CAP_CHOWN, CAP_KILL or CAP_DAC_OVERRIDE (systemd/vnetd.service).
Each child runs as its own unprivileged user:

* dnsmasq drops to `vnet-dns` by itself, after binding; its group owns the hosts files
  dnsmasq re-reads (they name VMs), which no other child may read;
* ISC dhcpd is started already as `vnet-dhcp`, with only CAP_NET_RAW and CAP_NET_BIND_SERVICE
  as ambient capabilities (its own `-user` drop would need CAP_CHOWN);
* vde_switch runs as `vnet-vde`, group `vnet`, with no capabilities at all.

`make install-files` creates `vnet-dns`, `vnet-dhcp` and `vnet-vde`; on a host without them
the children fall back to dnsmasq's user (never root). To hand a directory to a child without
CAP_CHOWN, vnetd joins the child's group at start-up (CAP_SETGID) and gives the directory
that group: changing the group of one's own file to a group one belongs to needs no
capability.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import stat
from pathlib import Path

from . import safefile

log = logging.getLogger("vnetd")

DNS_USER = "vnet-dns"
DHCP_USER = "vnet-dhcp"
VDE_USER = "vnet-vde"
VNET_GROUP = "vnet"
FRR_GROUP = "frrvty"  # FRR's vty sockets: vtysh applies the EVPN configuration through them
FALLBACK_USERS = ("dnsmasq", "nobody")


def user_ids(*names: str) -> tuple[int, int]:
    """(uid, primary gid) of the first user that exists; never root."""
    for name in (*names, *FALLBACK_USERS):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid != 0:
            return pw.pw_uid, pw.pw_gid
    return 65534, 65534


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def dhcpd_ids() -> tuple[int, int]:
    return user_ids(DHCP_USER)


def dnsmasq_ids() -> tuple[int, int]:
    return user_ids(DNS_USER)


def vde_ids(group: str = VNET_GROUP) -> tuple[int, int]:
    """vde_switch's user, with the network's tap group (the VDE sockets' group)."""
    uid, gid = user_ids(VDE_USER)
    g = group_id(group)
    return uid, gid if g is None else g


def join_child_groups() -> None:
    """Add the children's groups to vnetd's supplementary groups (see the module text)."""
    want = {dnsmasq_ids()[1], dhcpd_ids()[1], user_ids(VDE_USER)[1]}
    for name in (VNET_GROUP, FRR_GROUP):
        g = group_id(name)
        if g is not None:
            want.add(g)
    have = set(os.getgroups())
    if want <= have:
        return
    try:
        os.setgroups(sorted(have | want))
    except PermissionError:
        log.warning("cannot join groups %s (no CAP_SETGID); DHCP servers and VDE switches "
                    "may fail", sorted(want - have))


def share_dir(path: Path, gid: int, mode: int = 0o770) -> None:
    """A directory of ours that the group `gid` may write (dhcpd's lease directory, the VDE
    base directory). Its parent must be one only root writes (the state or runtime directory),
    so nobody else can have put anything at `path`; still, nothing is followed: an entry that
    is not a directory of ours (one left by an older vnetd that belongs to someone else, or
    anything that is not a directory) is moved aside to NAME.old-<time>, since without
    CAP_DAC_OVERRIDE vnetd could not write into it, and the group and mode are set through
    the opened directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()):
        aside = safefile.unique_aside(path, "old")
        log.warning("moving %s (%s, owned by uid %d) aside to %s", path,
                    "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory",
                    st.st_uid, aside)
        os.rename(path, aside)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            raise PermissionError(errno.EPERM, f"{path} is not vnetd's directory")
        os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def private_dir(path: Path) -> None:
    """A directory only vnetd writes (root:root 0755), such as the children's pid files."""
    share_dir(path, os.getegid(), 0o755)
