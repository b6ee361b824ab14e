"""The firewall with real traffic: namespaces as hosts, real taps for spoofing."""

from __future__ import annotations

import json

import pytest

from tests.harness.daemon import run_client
from tests.harness.guests import Guest
from tests.harness.netpeers import Outside, Server, connect


@pytest.fixture(scope="module")
def world(vnetd):
    out = Outside(vnetd)
    run_client("define", "vnet2", "--subnet6=fd00:12::/64", check=True)
    run_client("start", "vnet2", check=True)
    run_client("define", "vnet3", "--mode=host-only", check=True)
    run_client("start", "vnet3", check=True)
    run_client("define", "vnet4", check=True)
    run_client("start", "vnet4", check=True)
    yield out
    out.close()


@pytest.fixture
def guests(vnetd):
    made = []

    def make(bridge: str, mac: str | None = None, dhcp: bool = True) -> Guest:
        g = Guest(vnetd, bridge, mac)
        made.append(g)
        if dhcp:
            assert g.dhcp(configure=True) is not None
        return g

    yield make
    for g in made:
        g.close()


def guest_ip(g: Guest) -> str:
    return next(a["local"] for a in g.ipj("addr", "show", "eth0")[0]["addr_info"]
                if a["family"] == "inet")


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_nat_guest_reaches_the_outside_as_the_host(world, guests, proto):
    srv = Server(world.netns, proto, 7001)
    try:
        g = guests("vnet2")
        assert connect(g.netns, proto, Outside.PEER, 7001) == f"seen {Outside.HOST}"
    finally:
        srv.close()


def test_host_only_guest_cannot_reach_the_outside(world, guests):
    srv = Server(world.netns, "tcp", 7002)
    try:
        g = guests("vnet3")
        assert connect(g.netns, "tcp", Outside.PEER, 7002).startswith("fail")
        # but DHCP and DNS on its gateway work (it got its address above)
    finally:
        srv.close()


def test_networks_are_isolated_from_each_other(world, guests):
    a, b = guests("vnet2"), guests("vnet4")
    srv = Server(b.netns, "tcp", 7003)
    try:
        assert connect(a.netns, "tcp", guest_ip(b), 7003).startswith("fail")
    finally:
        srv.close()


def test_forwards_from_outside_from_the_host_and_hairpin(world, guests, vnetd):
    web = guests("vnet2", mac="52:54:00:f0:00:05", dhcp=False)
    r = run_client("host", "add", "vnet2", "--vm=web1", "--ip=172.16.12.5",
                   "--mac=52:54:00:f0:00:05")
    assert r.returncode == 0, r.stderr
    assert web.dhcp(configure=True)["ip"] == "172.16.12.5"
    srv_t, srv_u = Server(web.netns, "tcp", 80), Server(web.netns, "udp", 53053)
    try:
        r = run_client("forward", "add", "vnet2", "tcp", "8080", "web1:80")
        assert r.returncode == 0, r.stderr
        r = run_client("forward", "add", "vnet2", "udp", "5353", "172.16.12.5:53053")
        assert r.returncode == 0, r.stderr
        # from outside: the guest sees the outside's own address
        assert connect(world.netns, "tcp", Outside.HOST, 8080) == f"seen {Outside.PEER}"
        assert connect(world.netns, "udp", Outside.HOST, 5353) == f"seen {Outside.PEER}"
        # from the host itself
        assert connect(vnetd.netns, "tcp", Outside.HOST, 8080).startswith("seen ")
        # hairpin: from another guest on the same network, to the host's address
        other = guests("vnet2")
        assert connect(other.netns, "tcp", Outside.HOST, 8080).startswith("seen ")
        fwds = json.loads(run_client("forward", "list", "vnet2", "--json").stdout)
        assert {(f["proto"], f["port"], f["resolved"]) for f in fwds} == {
            ("tcp", "8080", "172.16.12.5"), ("udp", "5353", "172.16.12.5")}
        # removal is live
        run_client("forward", "remove", "vnet2", "tcp", "8080", check=True)
        assert connect(world.netns, "tcp", Outside.HOST, 8080).startswith("fail")
        run_client("forward", "remove", "vnet2", "udp", "5353", check=True)
    finally:
        srv_t.close()
        srv_u.close()


def test_ipv6_forward(world, guests):
    g = guests("vnet2", dhcp=False)
    g.static("fd00:12::50/64", "fd00:12::1")
    srv = Server(g.netns, "tcp", 8086, family=6)
    try:
        r = run_client("forward", "add", "vnet2", "tcp", "8086", "[fd00:12::50]:8086", "-6")
        assert r.returncode == 0, r.stderr
        assert connect(world.netns, "tcp", Outside.HOST6, 8086) == f"seen {Outside.PEER6}"
        run_client("forward", "remove", "vnet2", "tcp", "8086", "-6", check=True)
    finally:
        srv.close()


def test_forward_conflicts_name_the_owner(world):
    run_client("forward", "add", "vnet2", "tcp", "2222", "172.16.12.9:22", check=True)
    r = run_client("forward", "add", "vnet4", "tcp", "2200-2300", "172.16.14.9:22")
    assert r.returncode == 1 and "Exists" in r.stderr and "vnet2" in r.stderr
    assert "172.16.12.9" in r.stderr
    run_client("forward", "remove", "vnet2", "tcp", "2222", check=True)


def test_original_rule_format(world):
    r = run_client("forward", "add", "vnet2", "--rule", "uplink0,tcp,2323,172.16.12.23:23")
    assert r.returncode == 0, r.stderr
    fwds = json.loads(run_client("forward", "list", "vnet2", "--json").stdout)
    # the interface means its addresses, as qemu-vlan's iptables -d ADDRESS did
    assert any(f.get("addr-of") == "uplink0" and f["port"] == "2323" for f in fwds)
    run_client("forward", "remove", "vnet2", "tcp", "2323", check=True)


@pytest.mark.parametrize("argv, words", [
    (["tcp", "0", "172.16.12.5:80"], "out of range"),
    (["tcp", "65536", "172.16.12.5:80"], "out of range"),
    (["tcp", "9000-8000", "172.16.12.5:80"], "reversed"),
    (["sctp", "80", "172.16.12.5:80"], None),  # the CLI's own choices: usage error
    (["tcp", "8081", "10.1.2.3:80"], "outside"),
    (["tcp", "8081", "172.16.12.1:80"], "not a guest"),
    (["tcp", "8081", "nosuchvm:80"], "unknown VM"),
    (["tcp", "8081", "172.16.12.5"], "needs a port"),
    (["--rule", "eth0,tcp,80"], "interface,proto,port"),
    (["--rule", "eth0,icmp,80,172.16.12.5:80"], "Unknown protocol"),
])
def test_forward_bad_input(world, vnetd, argv, words):
    before = vnetd.exec("nft", "-j", "list", "ruleset").stdout
    conf = (vnetd.config_dir / "networks" / "vnet2.toml").read_text()
    r = run_client("forward", "add", "vnet2", *argv)
    if words is None:
        assert r.returncode == 2
    else:
        assert r.returncode == 1, r.stderr
        assert "InvalidArgument" in r.stderr and words in r.stderr, r.stderr
    assert vnetd.exec("nft", "-j", "list", "ruleset").stdout == before
    assert (vnetd.config_dir / "networks" / "vnet2.toml").read_text() == conf


# --- anti-spoofing on real tap fds handed to a user -------------------------------------------
def frame(src_mac: str, ethertype: int, payload: bytes, dst: str = "ff:ff:ff:ff:ff:ff") -> str:
    mac = lambda m: bytes.fromhex(m.replace(":", ""))  # noqa: E731
    return (mac(dst) + mac(src_mac) + ethertype.to_bytes(2, "big") + payload).hex()


def arp_reply(mac: str, ip: str) -> bytes:
    import socket

    m = bytes.fromhex(mac.replace(":", ""))
    return (bytes.fromhex("0001080006040002") + m + socket.inet_aton(ip) + bytes(6)
            + socket.inet_aton("172.16.12.1"))


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"x" * 8) -> bytes:
    import socket
    import struct

    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    csum = sum(struct.unpack("!10H", hdr))
    csum = (csum & 0xFFFF) + (csum >> 16)
    hdr = hdr[:10] + struct.pack("!H", ~csum & 0xFFFF) + hdr[12:]
    return hdr + udp


def drops(port: str) -> int:
    n = json.loads(run_client("show", "vnet2", "--json", check=True).stdout)
    return next(p["spoof-drops"] for p in n["ports"] if p["ifname"] == port)


def send(holder, hexframe: str) -> None:
    from tests.harness.users import read_json

    holder.stdin.write(f"write {hexframe}\n")
    holder.stdin.flush()
    assert read_json(holder) == {"written": True}


def test_forged_frames_from_a_users_tap_are_dropped_and_counted(world):
    from tests.harness.daemon import ALICE
    from tests.harness.users import HOLDER, read_json, spawn_as

    run_client("host", "add", "vnet2", "--vm=spoofer", "--ip=172.16.12.20",
               "--mac=52:54:00:5f:00:20", check=True)
    holder = spawn_as(ALICE, HOLDER, "vnet2", "spoofer")
    try:
        got = read_json(holder)
        port, mac = got["ifname"], got["mac"]
        assert mac == "52:54:00:5f:00:20"  # the static host's MAC is the VM's stable MAC
        n = drops(port)
        send(holder, frame(mac, 0x0800, ipv4_udp("172.16.12.20", "172.16.12.1", 5000, 9)))
        assert drops(port) == n  # genuine
        send(holder, frame("52:54:00:66:66:66", 0x0800,
                           ipv4_udp("172.16.12.20", "172.16.12.1", 5000, 9)))
        assert drops(port) == n + 1  # forged source MAC
        send(holder, frame(mac, 0x0800, ipv4_udp("172.16.12.99", "172.16.12.1", 5000, 9)))
        assert drops(port) == n + 2  # forged source IP
        send(holder, frame(mac, 0x0806, arp_reply(mac, "172.16.12.1")))
        assert drops(port) == n + 3  # forged ARP: claims the gateway's address
        send(holder, frame(mac, 0x0800, ipv4_udp("172.16.12.20", "255.255.255.255", 67, 68)))
        assert drops(port) == n + 4  # a rogue DHCP server reply
        out = run_client("show", "vnet2", "--ports", check=True).stdout
        assert port in out and "SPOOF-DROPS" in out
    finally:
        holder.kill()
        holder.wait()
        run_client("host", "remove", "vnet2", "--vm=spoofer")


REATTACH = """
async def main():
    async with Client() as c:
        a = None
        for i in range(int(sys.argv[1])):  # the same VM again the moment its tap went
            if a is not None:
                a.close()
            while True:
                try:
                    a = await c.attach("vnet2", "again")
                    break
                except VnetClientError as e:
                    if not e.name.endswith("Busy"):
                        raise
        print(json.dumps({"ifname": a.ifname, "mac": a.mac}), flush=True)
        for line in sys.stdin:
            if line.startswith("write "):
                os.write(a.fds[0], bytes(10) + bytes.fromhex(line.strip()[6:]))
                print(json.dumps({"written": True}), flush=True)
asyncio.run(main())
"""


def test_the_same_vm_attaching_again_at_once_keeps_its_guard(world):
    """The old port's removal, handled after the new port of the same name was guarded,
    must not take the new port's guard with it (its frames would then pass unchecked)."""
    import time

    from tests.harness.daemon import ALICE
    from tests.harness.users import read_json, spawn_as

    holder = spawn_as(ALICE, REATTACH, "30")
    try:
        got = read_json(holder, timeout=60)
        port, mac = got["ifname"], got["mac"]
        time.sleep(0.5)  # whatever vnetd still had to do for the old ports is done
        n = drops(port)
        send(holder, frame("52:54:00:66:66:67", 0x0800,
                           ipv4_udp("0.0.0.0", "255.255.255.255", 68, 67)))
        assert drops(port) == n + 1  # a forged source MAC is still dropped
        send(holder, frame(mac, 0x0800, ipv4_udp("0.0.0.0", "255.255.255.255", 68, 67)))
        assert drops(port) == n + 1  # its own passes
    finally:
        holder.kill()
        holder.wait()


def test_unknown_mac_is_learned_then_locked(world):
    from tests.harness.daemon import ALICE
    from tests.harness.users import HOLDER, read_json, spawn_as

    holder = spawn_as(ALICE, HOLDER, "vnet2", "learner", "1", "learn")
    try:
        port = read_json(holder)["ifname"]
        n = json.loads(run_client("show", "vnet2", "--json").stdout)
        assert next(p for p in n["ports"] if p["ifname"] == port)["mac"] == "(learning)"
        first = "52:54:00:1e:a2:01"
        send(holder, frame(first, 0x0800, ipv4_udp("0.0.0.0", "255.255.255.255", 68, 67)))
        import time

        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            n = json.loads(run_client("show", "vnet2", "--json").stdout)
            if next(p for p in n["ports"] if p["ifname"] == port)["mac"] == first:
                break
            time.sleep(0.05)
        assert next(p for p in n["ports"] if p["ifname"] == port)["mac"] == first
        before = drops(port)
        send(holder, frame("52:54:00:1e:a2:02", 0x0800,
                           ipv4_udp("0.0.0.0", "255.255.255.255", 68, 67)))
        assert drops(port) == before + 1  # sticky: another MAC is now refused
    finally:
        holder.kill()
        holder.wait()


def test_docker_style_drop_policy_nat_still_works(world, guests, vnetd):
    """Docker sets 'policy drop' on forward and offers DOCKER-USER for exceptions."""
    for cmd in ("add table ip filter",
                "add chain ip filter FORWARD { type filter hook forward priority 0; "
                "policy drop; }",
                "add chain ip filter DOCKER-USER",
                "add rule ip filter FORWARD jump DOCKER-USER",
                "add rule ip filter DOCKER-USER return"):
        vnetd.exec("nft", cmd)
    srv = Server(world.netns, "tcp", 7010)
    try:
        g = guests("vnet2")
        assert connect(g.netns, "tcp", Outside.PEER, 7010).startswith("fail")  # blocked
        run_client("reload", check=True)  # vnetd (re)applies its accepts in DOCKER-USER
        assert connect(g.netns, "tcp", Outside.PEER, 7010) == f"seen {Outside.HOST}"
        listing = vnetd.exec("nft", "list", "chain", "ip", "filter", "DOCKER-USER").stdout
        assert listing.count('comment "qemu-vnet"') == 6  # a pair per running network
        assert "return" in listing and "policy drop" in vnetd.exec(
            "nft", "list", "chain", "ip", "filter", "FORWARD").stdout
        run_client("reload", check=True)  # idempotent: replaces only its own rules
        assert vnetd.exec("nft", "list", "chain", "ip", "filter",
                          "DOCKER-USER").stdout.count("qemu-vnet") == 6
        n = json.loads(run_client("show", "vnet2", "--json", check=True).stdout)
        assert "firewall-warnings" not in n  # handled, nothing to explain
    finally:
        srv.close()
        vnetd.exec("nft", "delete table ip filter")


def test_a_foreign_drop_policy_is_explained_in_show(world, vnetd):
    vnetd.exec("nft", "add table ip filter")
    vnetd.exec("nft", "add chain ip filter FORWARD { type filter hook forward priority 0; "
               "policy drop; }")
    try:
        n = json.loads(run_client("show", "vnet2", "--json", check=True).stdout)
        warn = " ".join(n.get("firewall-warnings", []))
        assert "ip filter FORWARD" in warn and 'iifname "vnet2" accept' in warn
        # and we never touched it
        assert "policy drop" in vnetd.exec("nft", "list table ip filter").stdout
    finally:
        vnetd.exec("nft", "delete table ip filter")


def test_forwards_persist_one_file_each_and_survive_a_restart(world, guests, vnetd):
    g = guests("vnet2", dhcp=False)
    g.static("172.16.12.77/24", "172.16.12.1")
    srv = Server(g.netns, "tcp", 8077)
    try:
        run_client("forward", "add", "vnet2", "tcp", "8077", "172.16.12.77:8077", check=True)
        fdir = vnetd.config_dir / "networks" / "vnet2.forwards"
        assert [p.name for p in fdir.iterdir()] == ["tcp4-any-any-8077.toml"]
        vnetd.kill()
        vnetd.start()
        assert connect(world.netns, "tcp", Outside.HOST, 8077) == f"seen {Outside.PEER}"
        # forwards written inline by hand move to the directory on reload
        path = vnetd.config_dir / "networks" / "vnet2.toml"
        path.write_text(path.read_text() + '\n[[forwards]]\nproto = "udp"\nport = "8078"\n'
                        'target = "172.16.12.77"\ntarget-port = 8078\n')
        run_client("reload", check=True)
        assert "forwards" not in path.read_text()
        assert (fdir / "udp4-any-any-8078.toml").exists()
        assert len(json.loads(run_client("forward", "list", "vnet2", "--json").stdout)) == 2
    finally:
        srv.close()
        run_client("forward", "remove", "vnet2", "tcp", "8077")
        run_client("forward", "remove", "vnet2", "udp", "8078")
