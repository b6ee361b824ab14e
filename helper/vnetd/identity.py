"""Who the children run as, and the groups vnetd joins to share directories with them.

vnetd runs as root but without CAP_CHOWN, CAP_KILL or CAP_DAC_OVERRIDE (systemd/vnetd.service).
Each child runs as its own unprivileged user:

* dnsmasq drops to `dnsmasq` (Debian's dnsmasq-base creates it) by itself, after binding;
* ISC dhcpd is started already as `vnet-dhcp`, with only CAP_NET_RAW and CAP_NET_BIND_SERVICE
  as ambient capabilities (its own `-user` drop would need CAP_CHOWN);
* vde_switch runs as `vnet-vde`, group `vnet`, with no capabilities at all.

`make install-files` creates `vnet-dhcp` and `vnet-vde`; on a host without them the children
fall back to dnsmasq's user (never root). To hand a directory to a child without CAP_CHOWN,
vnetd joins the child's group at start-up (CAP_SETGID) and gives the directory that group:
changing the group of one's own file to a group one belongs to needs no capability.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
from pathlib import Path

log = logging.getLogger("vnetd")

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


def vde_ids(group: str = VNET_GROUP) -> tuple[int, int]:
    """vde_switch's user, with the network's tap group (the VDE sockets' group)."""
    uid, gid = user_ids(VDE_USER)
    g = group_id(group)
    return uid, gid if g is None else g


def join_child_groups() -> None:
    """Add the children's groups to vnetd's supplementary groups (see the module text)."""
    want = {dhcpd_ids()[1], user_ids(VDE_USER)[1]}
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
        log.warning("cannot join groups %s (no CAP_SETGID); DHCP by dhcpd and VDE switches "
                    "may fail", sorted(want - have))


def share_dir(path: Path, gid: int, mode: int = 0o770) -> None:
    """A directory of ours that the group `gid` may write (dhcpd's lease directory). A
    directory left by an older vnetd that belongs to someone else is moved aside: without
    CAP_DAC_OVERRIDE, vnetd could not write into it."""
    with contextlib.suppress(FileNotFoundError):
        st = path.stat()
        if st.st_uid != os.geteuid():
            aside = path.with_name(f"{path.name}.old")
            log.warning("moving %s (owned by uid %d) aside to %s", path, st.st_uid, aside)
            path.rename(aside)
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, -1, gid)
    os.chmod(path, mode)
