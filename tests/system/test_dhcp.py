"""DHCP and DNS with real servers (dnsmasq, ISC dhcpd) and real clients (busybox udhcpc)."""

from __future__ import annotations

import ipaddress
import json
import os
import select
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness.daemon import ALICE, BOB, PolkitRule, grant_rule, run_client
from tests.harness.guests import Guest


@pytest.fixture(scope="module", autouse=True)
def networks(vnetd):
    run_client("define", "vnet2", "--subnet6=fd00:12::/64", check=True)
    run_client("start", "vnet2", check=True)
    run_client("define", "vnet3", "--mode=host-only", check=True)
    run_client("start", "vnet3", check=True)
    run_client("define", "vnet5", "--dhcp=dhcpd", "--domain=lab5.test", check=True)
    run_client("start", "vnet5", check=True)
    yield


@pytest.fixture
def guests(vnetd):
    made: list[Guest] = []

    def make(bridge: str, mac: str | None = None) -> Guest:
        g = Guest(vnetd, bridge, mac)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def show(name: str) -> dict:
    return json.loads(run_client("show", name, "--json", check=True).stdout)


def server_pid(name: str, prefix: str = "dnsmasq[") -> int:
    return next(s["pid"] for s in show(name)["servers"] if s["name"].startswith(prefix))


def test_dnsmasq_gives_an_address_in_the_range_with_router_and_dns(guests):
    g = guests("vnet2")
    lease = g.dhcp()
    assert lease is not None
    ip = ipaddress.IPv4Address(lease["ip"])
    assert ipaddress.IPv4Address("172.16.12.32") <= ip <= ipaddress.IPv4Address("172.16.12.254")
    assert lease["router"] == "172.16.12.1" and lease["dns"] == "172.16.12.1"
    assert lease["domain"] == "vnet2" and lease["serverid"] == "172.16.12.1"


def test_static_host_gets_its_address_and_its_name_resolves(guests):
    r = run_client("host", "add", "vnet2", "--vm=web1", "--ip=172.16.12.5",
                   "--mac=52:54:00:00:12:05")
    assert r.returncode == 0, r.stderr
    g = guests("vnet2", "52:54:00:00:12:05")
    lease = g.dhcp(configure=True, hostname="web1")
    assert lease["ip"] == "172.16.12.5"
    assert g.resolve("web1.vnet2", "172.16.12.1") == "172.16.12.5"
    leases = json.loads(run_client("leases", "vnet2", "--json", check=True).stdout)
    mine = [le for le in leases if le["mac"] == "52:54:00:00:12:05"]
    assert mine and mine[0]["ip"] == "172.16.12.5" and mine[0]["vm"] == "web1"
    hosts = json.loads(run_client("host", "list", "vnet2", "--json", check=True).stdout)
    assert hosts == [{"vm": "web1", "mac": "52:54:00:00:12:05", "ip": "172.16.12.5"}]
    # a VM without a static host resolves by its name too, whatever name its guest sends
    mac = run_client("mac", "--br=vnet2", "--vm=dyn7", check=True).stdout.strip()
    d = guests("vnet2", mac)
    lease = _until_named(lambda: d.dhcp(configure=True, hostname="other7"),
                         g, "dyn7.vnet2")
    assert g.resolve("dyn7.vnet2", "172.16.12.1") == lease["ip"]
    assert g.resolve("other7.vnet2", "172.16.12.1") is None


def _until_named(take, g: Guest, name: str, timeout: float = 5.0) -> dict:
    """Take a lease (again) until `name` resolves: a VM registered a moment ago reaches the
    DHCP server's names just after the answer that registered it."""
    deadline = time.monotonic() + timeout
    while True:
        lease = take()
        if g.resolve(name, "172.16.12.1", tries=1) or time.monotonic() > deadline:
            return lease
        time.sleep(0.1)


def test_a_guest_cannot_take_another_vms_dns_name(guests):
    """Alice's VM web8 resolves to her guest's address. Bob's guest (his VM bob8) asks for
    the name web8 in DHCP after her: dnsmasq gave a name to the newest lease that asked for
    it, so web8.vnet2 led to Bob's guest. Now a lease's name is its VM's, from the MAC
    registry, whatever the guest sends; and a VM name that differs only in case from
    another user's (one name in DNS) is refused."""
    alice_mac = run_client("mac", "--br=vnet2", "--vm=web8", user=ALICE,
                           check=True).stdout.strip()
    with PolkitRule("90-vnet-test-bob-attach", grant_rule(BOB, "org.qemuvnet.Vnet1.attach")):
        bob_mac = run_client("mac", "--br=vnet2", "--vm=bob8", user=BOB,
                             check=True).stdout.strip()
        refused = run_client("mac", "--br=vnet2", "--vm=WEB8", user=BOB)
    alice = guests("vnet2", alice_mac)
    a = _until_named(lambda: alice.dhcp(configure=True, hostname="web8"), alice, "web8.vnet2")
    bob = guests("vnet2", bob_mac)
    b = bob.dhcp(configure=True, hostname="web8")
    assert a["ip"] != b["ip"]
    time.sleep(0.3)
    assert alice.resolve("web8.vnet2", "172.16.12.1") == a["ip"]  # Alice's, not Bob's
    _until_named(lambda: bob.dhcp(hostname="web8"), alice, "bob8.vnet2")
    assert alice.resolve("bob8.vnet2", "172.16.12.1") == b["ip"]
    assert refused.returncode != 0 and "NotOwner" in refused.stderr, refused.stderr
    assert "differ only in case" in refused.stderr


def test_static_host_added_live_without_dropping_leases(guests):
    g = guests("vnet2")
    first = g.dhcp()
    pid = server_pid("vnet2")
    r = run_client("host", "add", "vnet2", "--vm=db1", "--mac=52:54:00:00:12:06")
    assert r.returncode == 0, r.stderr
    assert server_pid("vnet2") == pid  # SIGHUP, not a restart
    h = guests("vnet2", "52:54:00:00:12:06")
    assert h.dhcp()["ip"] == "172.16.12.2"  # first free static address
    assert g.dhcp(request=first["ip"])["ip"] == first["ip"]
    run_client("host", "remove", "vnet2", "--vm=db1", check=True)
    assert "db1" not in run_client("host", "list", "vnet2").stdout


def test_a_static_address_inside_the_range_is_refused_while_another_mac_leases_it(guests):
    g = guests("vnet2")
    leased = g.dhcp()["ip"]
    r = run_client("host", "add", "vnet2", "--vm=thief", f"--ip={leased}",
                   "--mac=52:54:00:00:12:09", "--json")
    assert r.returncode == 1, r.stdout
    err = json.loads(r.stderr)
    assert err["error"].endswith("Exists") and f"{leased} is leased to {g.mac}" in \
        err["message"] and "below the DHCP range" in err["message"], err
    assert "thief" not in run_client("host", "list", "vnet2").stdout
    # a free address inside the range is given, and the answer says where it lies
    start, end = show("vnet2")["dhcp-range"]
    # (the range's last address that nobody leases: dnsmasq picks an address from a hash of
    # the MAC, and the random MACs of this module's guests land on the last ones now and then)
    taken = {le["ip"] for le in json.loads(run_client("leases", "vnet2", "--json",
                                                      check=True).stdout)}
    free = next(str(a) for a in (ipaddress.ip_address(end) - i for i in range(64))
                if str(a) not in taken)
    assert free != leased
    r = run_client("host", "add", "vnet2", "--vm=inrange", f"--ip={free}",
                   "--mac=52:54:00:00:12:0a")
    assert r.returncode == 0, r.stderr
    assert f"Note: {free} is inside the DHCP range {start}-{end}" in r.stdout, r.stdout
    run_client("host", "remove", "vnet2", "--vm=inrange", check=True)


def test_dhcpd_network(guests):
    g = guests("vnet5")
    lease = g.dhcp()
    assert lease is not None, "no lease from dhcpd"
    assert lease["router"] == "172.16.15.1" and lease["dns"] == "172.16.15.1"
    assert lease["domain"] == "lab5.test"
    r = run_client("host", "add", "vnet5", "--vm=web5", "--ip=172.16.15.7",
                   "--mac=52:54:00:00:15:07")
    assert r.returncode == 0, r.stderr
    s = guests("vnet5", "52:54:00:00:15:07")
    assert s.dhcp(configure=True)["ip"] == "172.16.15.7"
    assert s.resolve("web5.lab5.test", "172.16.15.1") == "172.16.15.7"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leases = json.loads(run_client("leases", "vnet5", "--json", check=True).stdout)
        if any(le["ip"] == lease["ip"] for le in leases):
            break
        time.sleep(0.2)
    assert any(le["ip"] == lease["ip"] and le["mac"] == g.mac for le in leases)


def test_128_clients_each_get_a_unique_lease(vnetd, guests):
    clients = [guests("vnet3") for _ in range(128)]
    with ThreadPoolExecutor(16) as pool:
        leases = list(pool.map(lambda g: g.dhcp(tries=8), clients))
    assert all(leases), f"{sum(1 for x in leases if not x)} clients got no lease"
    ips = [le["ip"] for le in leases]
    assert len(set(ips)) == 128
    assert all(ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("172.16.13.0/24") for ip in ips)


def test_kill_9_the_server_it_is_back_within_1s_and_renews_the_same_ip(guests):
    g = guests("vnet2")
    first = g.dhcp()
    pid = server_pid("vnet2")
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    new = None
    while time.monotonic() - t0 < 1.0:
        servers = show("vnet2")["servers"]
        pids = [s.get("pid") for s in servers]
        if pids and pids[0] and pids[0] != pid:
            new = pids[0]
            break
        time.sleep(0.02)
    assert new is not None, "dnsmasq was not restarted within 1 s"
    again = g.dhcp(request=first["ip"])
    assert again["ip"] == first["ip"]


def test_crash_loop_is_reported_and_backed_off(guests):
    def wait_pid(old: int | None, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = show("vnet2")["servers"][0].get("pid")
            if pid and pid != old:
                return pid
            time.sleep(0.02)
        raise AssertionError("dnsmasq did not come back")

    pid = wait_pid(None)
    for _ in range(4):  # four quick deaths in a row
        os.kill(pid, signal.SIGKILL)
        pid = wait_pid(pid)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    s = show("vnet2")["servers"][0]
    assert s["state"] == "crash-loop" and s["restarts"] >= 4
    assert "pid" not in s  # backing off, not restarting at once
    wait_pid(pid)  # and it comes back after the back-off


def test_networks_do_not_answer_each_others_clients(guests):
    a, b = guests("vnet2"), guests("vnet3")
    assert a.dhcp()["serverid"] == "172.16.12.1"
    assert b.dhcp()["serverid"] == "172.16.13.1"


def test_dnsmasq_listens_only_on_its_gateways(vnetd):
    out = vnetd.exec("ss", "-H", "-lnup").stdout + vnetd.exec("ss", "-H", "-lntp").stdout
    locals_ = [line.split()[3] for line in out.splitlines() if "dnsmasq" in line]
    assert locals_, out
    for addr in locals_:
        host, _, port = addr.rpartition(":")
        if port == "53" and host.startswith("[fe80:"):
            assert host.endswith("%vnet2"), addr  # link-local, for RAs: only on its bridge
        elif port == "53":
            assert host.strip("[]") in ("172.16.12.1", "fd00:12::1", "172.16.13.1",
                                        "172.16.15.1"), addr
        elif port in ("67", "547"):
            assert "%vnet" in host, addr  # bound to its bridge only
    assert not any(a.startswith(("0.0.0.0:53", "127.", "*:53", "[::]:53")) for a in locals_)


def test_stop_stops_servers_and_restart_never_runs_two(vnetd):
    def count(net: str) -> int:
        conf = f"{vnetd.runtime_dir}/{net}/dnsmasq.conf"
        return sum(1 for p in os.listdir("/proc") if p.isdigit() and conf in _cmdline(p))

    assert count("vnet3") == 1
    vnetd.kill()
    assert count("vnet3") == 1  # the network keeps its DHCP while vnetd is down
    vnetd.start()
    assert count("vnet3") == 1
    run_client("stop", "vnet3", check=True)
    assert count("vnet3") == 0
    run_client("start", "vnet3", check=True)
    assert count("vnet3") == 1


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_lease_changed_signal(vnetd, guests):

    from tests.harness.users import run_as, spawn_as  # noqa: F401

    mon = subprocess.Popen(["dbus-monitor", "--system",
                            "type='signal',interface='org.qemuvnet.Vnet1.Manager',"
                            "member='LeaseChanged'"], stdout=subprocess.PIPE)
    try:
        time.sleep(0.3)
        g = guests("vnet3")
        lease = g.dhcp()
        seen = ""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and '"added"' not in seen:
            ready, _, _ = select.select([mon.stdout], [], [], 0.2)
            if ready:
                seen += os.read(mon.stdout.fileno(), 65536).decode(errors="replace")
        # everyone on the bus hears it: the network and the event, nothing of the VM
        assert '"vnet3"' in seen and '"added"' in seen, seen
        assert lease["ip"] not in seen and g.mac not in seen, seen
    finally:
        mon.kill()


@pytest.mark.parametrize("argv, error, words", [
    (["define", "vnet6", "--dhcp-start=172.16.99.5"], "InvalidArgument", "outside"),
    (["define", "vnet6", "--dhcp-start=172.16.16.200", "--dhcp-end=172.16.16.100"],
     "InvalidArgument", "reversed"),
    (["define", "vnet6", "--domain=bad_domain!"], "InvalidArgument", "not a DNS domain"),
    (["host", "add", "vnet2", "--vm=x1", "--ip=172.16.12.5", "--mac=52:54:00:00:00:99"],
     "Exists", "already given"),
    (["host", "add", "vnet2", "--vm=x1", "--mac=52:54:00:00:12:05"], "Exists", "already given"),
    (["host", "add", "vnet2", "--vm=x1", "--mac=52:54:zz:00:00:01"], "InvalidArgument", "MAC"),
    (["host", "add", "vnet2", "--vm=x_1", "--mac=52:54:00:00:00:98"], "InvalidArgument",
     "DNS host name"),
    (["host", "add", "vnet2", "--vm=x1", "--ip=172.16.99.9", "--mac=52:54:00:00:00:97"],
     "InvalidArgument", "outside"),
    (["host", "add", "vnet2", "--vm=x1", "--ip=172.16.12.1", "--mac=52:54:00:00:00:97"],
     "InvalidArgument", "gateway"),
    (["host", "add", "vnet2", "--vm=x1", "--ip=172.16.12.255", "--mac=52:54:00:00:00:97"],
     "InvalidArgument", "broadcast"),
    (["host", "add", "vnet2", "--vm=nomac1"], "InvalidArgument", "give --mac"),
    (["host", "remove", "vnet2", "--vm=ghost"], "NotFound", "no static host"),
])
def test_dhcp_bad_input(vnetd, argv, error, words):
    before = vnetd.snapshot()
    conf = {p.name: p.read_text() for p in (vnetd.config_dir / "networks").glob("*.toml")}
    r = run_client(*argv)
    assert r.returncode == 1, r.stderr
    assert f"org.qemuvnet.Vnet1.Error.{error}" in r.stderr and words in r.stderr
    assert vnetd.snapshot() == before
    assert {p.name: p.read_text() for p in (vnetd.config_dir / "networks").glob("*.toml")} == conf


def test_unknown_dhcp_kind_over_dbus_is_a_named_error(vnetd):
    import asyncio

    from vnet_client import Client, VnetClientError

    async def go():
        async with Client() as c:
            with pytest.raises(VnetClientError) as e:
                await c.define("vnet6", dhcp="foo")
            assert e.value.short_name == "InvalidArgument" and "foo" in e.value.message

    asyncio.run(go())
    assert run_client("define", "vnet6", "--dhcp=foo").returncode == 2  # the CLI's own check


def test_dhcpd_lease_file_is_kept_small(vnetd, guests):
    """ISC dhcpd appends a record per answer and rewrites its file once an hour at most;
    vnetd parses that file twice a second. Past DHCPD_COMPACT_AT bytes vnetd restarts dhcpd,
    which rewrites it with the live leases only: the file shrinks, the lease stays."""
    from vnetd.subsystems.dhcp import DHCPD_COMPACT_AT

    g = guests("vnet5")
    lease = g.dhcp()
    assert lease is not None, "no lease from dhcpd"
    path = vnetd.state_dir / "vnet5" / "dhcpd" / "dhcpd.leases"
    filler = "".join(
        f"lease 172.16.15.{200 + i % 40} {{\n  starts 4 2026/01/01 00:00:00;\n"
        f"  ends 4 2026/01/01 00:10:00;\n  binding state free;\n"
        f"  hardware ethernet 52:54:00:ff:00:{i % 200:02x};\n}}\n" for i in range(12000))
    with open(path, "a") as f:  # what a flood of answers leaves behind
        f.write(filler)
    assert path.stat().st_size > DHCPD_COMPACT_AT
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and path.stat().st_size > DHCPD_COMPACT_AT:
        time.sleep(0.2)
    assert path.stat().st_size < DHCPD_COMPACT_AT // 4, path.stat().st_size
    assert "restarting dhcpd, which rewrites it" in vnetd.log()
    assert g.dhcp() is not None  # dhcpd serves again
    leases = json.loads(run_client("leases", "vnet5", "--json", check=True).stdout)
    assert any(le["ip"] == lease["ip"] and le["mac"] == g.mac for le in leases), leases
