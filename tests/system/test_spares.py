"""Spare taps: a guarded network keeps taps made ahead of attaches on its bridge, which the
firewall holds as pending (nothing passes to or from them); an attach hands one out and its
guard follows; a spare's holder gets nothing of what the LAN sent before it was handed out;
the spares go with their network and with vnetd, and come back with them."""

from __future__ import annotations

import json
import time

import pytest

from tests.harness.daemon import ALICE, run_client
from tests.harness.users import read_json, run_as, spawn_as
from tests.system.test_firewall import frame

SPARES = 2  # vnetd's default


@pytest.fixture(scope="module", autouse=True)
def networks(vnetd):
    run_client("define", "vnet2", check=True)
    run_client("start", "vnet2", check=True)
    run_client("define", "vnet3", "--no-spoof-protection", check=True)
    run_client("start", "vnet3", check=True)
    yield


def wait_for(what: str, pred, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def on_bridge(vnetd, bridge: str) -> dict[str, dict]:
    return {lk["ifname"]: lk for lk in vnetd.ipj("-d", "link", "show", "master", bridge)}


def spares_of(vnetd, bridge: str) -> set[str]:
    pending = vnetd.spare_taps()
    return {n for n in on_bridge(vnetd, bridge) if n in pending}


def port_names() -> set[str]:
    return {p["ifname"] for p in json.loads(run_client("ports", "--json", check=True).stdout)}


def drops(network: str, port: str) -> int:
    n = json.loads(run_client("show", network, "--json", check=True).stdout)
    return next(p["spoof-drops"] for p in n["ports"] if p["ifname"] == port)


# a holder that also reads: what its tap received (frames, after the 10-byte virtio header)
READER = """
import select
network, vm = sys.argv[1], sys.argv[2]
async def main():
    async with Client() as c:
        a = await c.attach(network, vm)
        os.set_blocking(a.fds[0], False)
        print(json.dumps({"ifname": a.ifname, "mac": a.mac}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd.startswith("write "):
                os.write(a.fds[0], bytes(10) + bytes.fromhex(cmd[6:]))
                print(json.dumps({"written": True}), flush=True)
            elif cmd.startswith("read"):  # what is queued now, or within a moment
                wait = float(cmd.split()[1]) if " " in cmd else 0.0
                frames = []
                while select.select([a.fds[0]], [], [], wait)[0]:
                    frames.append(os.read(a.fds[0], 65536)[10:].hex())
                    wait = 0.0
                print(json.dumps({"frames": frames}), flush=True)
            elif cmd == "exit":
                break
asyncio.run(main())
"""


def send(holder, line: str) -> dict:
    holder.stdin.write(line + "\n")
    holder.stdin.flush()
    return read_json(holder, timeout=20)


def arp_probe(mac: str, target: str = "172.16.12.77") -> bytes:
    import socket

    m = bytes.fromhex(mac.replace(":", ""))
    return bytes.fromhex("0001080006040001") + m + bytes(4) + bytes(6) + socket.inet_aton(target)


ONCE = """
async def main():
    async with Client() as c:
        (await c.attach(sys.argv[1], "first-vm")).close()
asyncio.run(main())
"""


def stocked(vnetd, network: str = "vnet2") -> set[str]:
    """The network's spares, after an attach if none was made yet (a network keeps spares
    from its first attach on)."""
    if not spares_of(vnetd, network):
        r = run_as(ALICE, ONCE, network)
        assert r.returncode == 0, r.stderr
    return wait_for(f"two spares on {network}", lambda: len(spares_of(vnetd, network))
                    == SPARES and spares_of(vnetd, network))


def test_a_network_keeps_spares_from_its_first_attach_on_held_as_pending(vnetd):
    time.sleep(0.3)
    assert not spares_of(vnetd, "vnet2")  # started, but nobody attached yet: no tap made
    spares = stocked(vnetd)
    links = on_bridge(vnetd, "vnet2")
    bridge = vnetd.ipj("link", "show", "vnet2")[0]
    for name in spares:
        lk = links[name]
        assert lk["ifalias"] == "qemu-vnet:vnet2" and lk["mtu"] == bridge["mtu"]
        assert "UP" in lk["flags"] and lk["linkinfo"]["info_kind"] == "tun"
        assert vnetd.exec("cat", f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").stdout \
            .strip() == "1"
    assert not spares & port_names()  # not ports: nobody holds them
    # an unguarded network keeps none (a spare up on its bridge would queue its LAN's frames)
    time.sleep(0.3)
    assert not on_bridge(vnetd, "vnet3")


def test_an_attach_hands_out_a_spare_and_its_guard_follows(vnetd):
    before = stocked(vnetd)
    holder = spawn_as(ALICE, READER, "vnet2", "spare-vm")
    try:
        got = read_json(holder, timeout=20)
        port, mac = got["ifname"], got["mac"]
        assert port in before  # a spare, handed out
        wait_for("its guard in place of pending", lambda: port not in vnetd.spare_taps())
        now = wait_for("stocked again", lambda: len(spares_of(vnetd, "vnet2")) == SPARES
                       and spares_of(vnetd, "vnet2"))
        assert port not in now and (before - {port}) <= now
        n = drops("vnet2", port)
        assert send(holder, "write " + frame("52:54:00:66:66:68", 0x0806,
                                             arp_probe("52:54:00:66:66:68"))) == {"written": True}
        assert drops("vnet2", port) == n + 1  # the guard: another MAC is dropped
        send(holder, "write " + frame(mac, 0x0806, arp_probe(mac)))
        assert drops("vnet2", port) == n + 1  # its own passes
    finally:
        holder.kill()
        holder.wait()


def test_a_spare_gives_its_holder_nothing_the_lan_sent_before(vnetd):
    """The attack: a guest floods the LAN; a spare tap up on the bridge would queue those
    frames for whoever is handed it next, who would read another VM's traffic from before
    its own attach."""
    stocked(vnetd)
    talker = spawn_as(ALICE, READER, "vnet2", "talker")
    listener = None
    try:
        t = read_json(talker, timeout=20)
        wait_for("the talker's guard", lambda: t["ifname"] not in vnetd.spare_taps())
        wait_for("two spares", lambda: len(spares_of(vnetd, "vnet2")) == SPARES)
        for i in range(20):  # broadcasts its guard lets pass: flooded to every bridge port
            send(talker, "write " + frame(t["mac"], 0x0806,
                                          arp_probe(t["mac"], f"172.16.12.{100 + i}")))
        assert drops("vnet2", t["ifname"]) == 0
        listener = spawn_as(ALICE, READER, "vnet2", "listener")
        ln = read_json(listener, timeout=20)
        assert send(listener, "read") == {"frames": []}  # nothing from before
        wait_for("the listener's guard", lambda: ln["ifname"] not in vnetd.spare_taps())
        probe = frame(t["mac"], 0x0806, arp_probe(t["mac"], "172.16.12.200"))
        send(talker, "write " + probe)
        assert probe in send(listener, "read 2")["frames"]  # and what comes now, it gets
    finally:
        for h in (talker, listener):
            if h is not None:
                h.kill()
                h.wait()


def test_spares_go_with_their_network_and_with_vnetd_and_come_back(vnetd):
    old = stocked(vnetd)
    run_client("stop", "vnet2", check=True)
    assert not old & {lk["ifname"] for lk in vnetd.ipj("link", "show")}
    assert not vnetd.spare_taps()  # nothing left held
    run_client("start", "vnet2", check=True)
    started = stocked(vnetd)  # again from the first attach on
    holder = spawn_as(ALICE, READER, "vnet2", "stays")  # a VM attached across the restart
    try:
        port = read_json(holder, timeout=20)["ifname"]
        started = wait_for("two spares", lambda: len(spares_of(vnetd, "vnet2")) == SPARES
                           and spares_of(vnetd, "vnet2"))
        vnetd.kill()  # its fds close: the kernel removes the spares
        assert not started & {lk["ifname"] for lk in vnetd.ipj("link", "show")}
        vnetd.start()
        # adopted with a VM attached: stocked again at once
        again = wait_for("two spares", lambda: len(spares_of(vnetd, "vnet2")) == SPARES
                         and spares_of(vnetd, "vnet2"))
        assert not again & started and port not in again
        assert vnetd.spare_taps() == again  # the restart's full ruleset holds only the new ones
    finally:
        holder.kill()
        holder.wait()


def test_no_spares_with_spare_taps_0_and_attaches_make_their_own(vnetd):
    vnetd.stop()
    vnetd.start(["--spare-taps", "0"])
    try:
        time.sleep(0.3)
        assert not spares_of(vnetd, "vnet2") and not vnetd.spare_taps()
        holder = spawn_as(ALICE, READER, "vnet2", "no-spare")
        try:
            got = read_json(holder, timeout=20)
            assert got["ifname"] in on_bridge(vnetd, "vnet2")
            assert got["ifname"] in port_names()
        finally:
            holder.kill()
            holder.wait()
    finally:
        vnetd.stop()
        vnetd.start()
