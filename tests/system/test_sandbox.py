"""vnetd inside the unit's limits: the harness runs it with systemd/vnetd.service's capability
bounding set and no-new-privs (tests/harness/services.py sandboxed), so every system test
already proves the daemon works without CAP_KILL, CAP_CHOWN or CAP_DAC_OVERRIDE. This file
checks that the sandbox is really in force, and that each child runs as its own user with the
fewest capabilities it accepts."""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import time

import pytest

from tests.harness import services
from tests.harness.daemon import as_user, run_client, sh

CAP_BITS = {"chown": 0, "dac_override": 1, "kill": 5, "setgid": 6, "setuid": 7,
            "net_bind_service": 10, "net_admin": 12, "net_raw": 13}


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def caps(pid: int, which: str = "CapEff") -> set[str]:
    mask = int(status(pid)[which], 16)
    return {name for name, bit in CAP_BITS.items() if mask >> bit & 1} | (
        {"other"} if mask & ~sum(1 << b for b in CAP_BITS.values()) else set())


def user_of(pid: int) -> str:
    return pwd.getpwuid(int(status(pid)["Uid"].split()[0])).pw_name


def children_named(vnetd, name: str) -> list[int]:
    out = []
    for pid in vnetd.children():
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == name:
                    out.append(pid)
        except OSError:
            pass
    return out


@pytest.fixture(scope="module", autouse=True)
def networks(vnetd):
    run_client("define", "vnet5", "--dhcp", "dhcpd", check=True)
    run_client("define", "vnet6", "--vde", "-n", "1", check=True)
    run_client("start", "vnet5", check=True)
    run_client("start", "vnet6", check=True)
    yield
    for n in ("vnet5", "vnet6"):
        run_client("stop", n)


def test_vnetd_holds_only_the_units_capabilities(vnetd):
    want = set(services.unit_capabilities())
    assert "kill" not in want and "chown" not in want
    assert caps(vnetd.proc.pid, "CapBnd") == want  # setpriv's pid is vnetd's: it execs
    assert caps(vnetd.proc.pid) == want
    assert status(vnetd.proc.pid)["NoNewPrivs"] == "1"


def test_dhcpd_runs_as_vnet_dhcp_with_two_capabilities(vnetd):
    (pid,) = children_named(vnetd, "dhcpd")
    assert user_of(pid) == "vnet-dhcp"
    assert caps(pid) == {"net_raw", "net_bind_service"}
    assert status(pid)["Groups"] == ""


def test_dnsmasq_drops_to_its_user(vnetd):
    """dnsmasq runs as vnet-dns, in its own group alone: it reads the hosts files (VM names,
    MACs, addresses), and it can write nothing of dhcpd's (group vnet-dhcp's lease files)."""
    import grp

    pids = children_named(vnetd, "dnsmasq")  # the DNS-only one next to dhcpd
    assert pids
    for pid in pids:
        assert user_of(pid) == "vnet-dns"
        assert caps(pid) <= {"net_admin", "net_raw", "net_bind_service"}
        st = status(pid)
        gids = {int(g) for g in st["Gid"].split()} | {int(g) for g in st["Groups"].split()}
        assert gids == {grp.getgrnam("vnet-dns").gr_gid}, st


def test_vde_switch_runs_as_vnet_vde_without_capabilities(vnetd):
    (pid,) = children_named(vnetd, "vde_switch")
    assert user_of(pid) == "vnet-vde"
    assert caps(pid) == set()
    assert caps(pid, "CapPrm") == set()


def test_children_of_other_users_are_stopped_without_cap_kill(vnetd):
    """Stopping a network signals dnsmasq, dhcpd and vde_switch, which run as three other
    users, through the signal helper; all of them end."""
    before = {n: children_named(vnetd, n) for n in ("dhcpd", "dnsmasq", "vde_switch")}
    assert all(before.values())
    run_client("stop", "vnet5", check=True)
    run_client("stop", "vnet6", check=True)
    deadline = time.monotonic() + 5
    while any(children_named(vnetd, n) for n in before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(children_named(vnetd, n) for n in before)
    assert "PermissionError" not in vnetd.log()


def test_adopted_children_are_replaced_after_a_crash(vnetd):
    """A SIGKILLed vnetd leaves its children running as their users; the next one replaces
    them (signalled as their users) and serves again."""
    run_client("start", "vnet5", check=True)
    old = set(children_named(vnetd, "dhcpd"))
    vnetd.kill()
    vnetd.start()
    run_client("stop", "vnet5", check=True)
    run_client("start", "vnet5", check=True)
    new = set(children_named(vnetd, "dhcpd"))
    assert len(new) == 1 and not new & old
    assert not any(p in old for p in vnetd.children())


# --- files the children may write: nothing there is followed ----------------------------------

def planted_target(tmp_path, name: str = "root-file") -> tuple:
    """A file of root's elsewhere, which a compromised child would like vnetd to hand over."""
    target = tmp_path / name
    target.write_text("root's own\n")
    os.chmod(target, 0o600)
    st = target.stat()
    return target, (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink)


def unchanged(target, before: tuple) -> bool:
    st = target.stat()
    return (target.read_text() == "root's own\n"
            and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == before)


def restart(network: str) -> None:
    run_client("stop", network, check=True)
    run_client("start", network, check=True)


def test_a_symlink_planted_as_dhcpd_leases_is_not_followed(vnetd, tmp_path):
    """vnet-dhcp (a compromised dhcpd) replaces dhcpd.leases, in the directory it may write,
    with a symbolic link to a root file, then to /dev/zero, then to a file that does not
    exist. vnetd reads no leases through them without hanging, and on the next start replaces
    the link with a fresh lease file: the root file keeps its owner, group and mode, and no
    file appears where the dangling link pointed."""
    run_client("start", "vnet5")  # whatever the tests before left, it runs now
    leases = vnetd.state_dir / "vnet5" / "dhcpd" / "dhcpd.leases"
    target, before = planted_target(tmp_path)
    ghost = tmp_path / "made-by-vnetd"

    def plant(to) -> None:
        sh(*as_user("vnet-dhcp", ["ln", "-sfn", str(to), str(leases)]))
        assert leases.is_symlink()

    plant("/dev/zero")
    r = run_client("leases", "vnet5", "--json", timeout=10)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    time.sleep(1.2)  # two turns of the lease poller, which must not block either
    assert run_client("leases", "vnet5", "--json", timeout=10).returncode == 0

    for to in (target, ghost):
        plant(to)
        restart("vnet5")
        st = os.lstat(leases)  # vnetd's new file, or already dhcpd's rewrite of it
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
        assert pwd.getpwuid(st.st_uid).pw_name in ("root", "vnet-dhcp")
        assert grp.getgrgid(st.st_gid).gr_name == "vnet-dhcp"
        assert unchanged(target, before)
        assert not ghost.exists()
        (pid,) = children_named(vnetd, "dhcpd")  # and DHCP is served again
        assert user_of(pid) == "vnet-dhcp"
    assert "is a symbolic link (left by a child?)" in vnetd.log()


def test_vde_pid_files_are_kept_where_only_root_writes(vnetd, tmp_path):
    """The switches may write /run/.../vde (group vnet-vde, no sticky bit): vnetd's pid files
    for them are in /run/.../_pids (root 0755), and a symlink a switch plants where the pid
    file used to be is never written through."""
    run_client("start", "vnet6")
    vde_dir = vnetd.runtime_dir / "vde"
    pids = vnetd.runtime_dir / "_pids"
    (sw,) = json.loads(run_client("show", "vnet6", "--json", check=True).stdout)["vde"]
    tap = sw["tap"]
    assert not list(vde_dir.glob("*.pid"))
    st = os.lstat(pids)
    assert stat.S_ISDIR(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    assert (pids / f"vde_switch-{tap}.pid").read_text() == f"{sw['pid']}\n"
    (pid,) = children_named(vnetd, "vde_switch")
    assert pid == sw["pid"]

    target, before = planted_target(tmp_path)
    sh(*as_user("vnet-vde", ["ln", "-sfn", str(target), str(vde_dir / f"{tap}.pid")]))
    restart("vnet6")
    assert unchanged(target, before)
    assert not list(vde_dir.glob("*.pid"))  # the old name is cleared, never written
    (sw,) = json.loads(run_client("show", "vnet6", "--json", check=True).stdout)["vde"]
    assert sw["state"] == "running" and sw["free"] == sw["ports"] - 1  # management socket works
    assert (pids / f"vde_switch-{tap}.pid").read_text() == f"{sw['pid']}\n"
