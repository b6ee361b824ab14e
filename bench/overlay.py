"""VXLAN overlay: guest-to-guest TCP throughput across two hosts through the overlay
versus two guests on one host, and the time from a new guest's port appearing on host B to
its first ping answered by a guest on host A. Both with static control and with BGP EVPN
(FRR in each host namespace). Hosts are network namespaces, each with its own vnetd on its
own bus, joined by an underlay switch (tests/harness/multihost.py).

    sudo /opt/qemu-vnet/bin/python bench/overlay.py [--seconds 3] [--attaches 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from contextlib import ExitStack

from _common import emit, summary_ms

from tests.harness import services
from tests.harness.guests import Guest
from tests.harness.multihost import Frr, Host, Underlay, wait_until

NET = "vnet7"


def iperf(client: Guest, server: Guest, server_ip: str, seconds: int) -> float:
    srv = subprocess.Popen(["ip", "netns", "exec", server.netns, "iperf3", "-s", "-1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        r = client.run("iperf3", "-c", server_ip, "-t", str(seconds), "-J", timeout=seconds + 20)
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
    finally:
        srv.kill()
        srv.wait()


def time_to_reach(host: Host, ip: str, target: str) -> float:
    """From the new guest's port on the bridge to the first answered ping."""
    t0 = time.monotonic()
    g = Guest(host, NET)
    try:
        g.ip("addr", "add", f"{ip}/24", "dev", "eth0")
        while g.run("ping", "-c", "1", "-W", "1", target, timeout=5).returncode != 0:
            if time.monotonic() - t0 > 30:
                raise AssertionError(f"{ip} never reached {target}")
        return time.monotonic() - t0
    finally:
        g.close()


def run(control: str, seconds: int, attaches: int) -> dict:
    with ExitStack() as stack:
        ul = Underlay("10.91.0.0/24")
        stack.callback(ul.close)
        hosts = [Host(f"bo{control[0]}{c}") for c in "ab"]
        for h in hosts:
            stack.callback(h.close)
        addrs = [ul.join(h) for h in hosts]
        for h in hosts:
            if control == "evpn":
                f = Frr(h)
                stack.callback(f.stop)
                h.start(["--frr-pathspace", h.netns])
            else:
                h.start()
        for i, h in enumerate(hosts):
            args = ["define", NET, "--vni", "7007", "--local", addrs[i], "--peer", addrs[1 - i],
                    "--control", control]
            if i:
                args += ["--role", "member"]
            h.client(*args, check=True)
            h.client("start", NET, check=True)
        if control == "evpn":
            wait_until(lambda: all(
                set(json.loads(h.client("show", NET, "--json").stdout)["overlay-state"]["evpn"]
                    .get("peers", {}).values()) == {"Established"} for h in hosts), 30,
                "BGP sessions")
        a1, a2, b1 = Guest(hosts[0], NET), Guest(hosts[0], NET), Guest(hosts[1], NET)
        for g in (a1, a2, b1):
            stack.callback(g.close)
            g.lease = g.dhcp(configure=True)
            assert g.lease, "no lease"
        same = iperf(a2, a1, a1.lease["ip"], seconds)
        cross = iperf(b1, a1, a1.lease["ip"], seconds)
        reach = [time_to_reach(hosts[1], f"172.16.17.{20 + i}", a1.lease["ip"])
                 for i in range(attaches)]
        mtu = json.loads(hosts[1].client("show", NET, "--json").stdout)["mtu"]
    return {"same_host_gbit_s": round(same / 1e9, 3), "cross_host_gbit_s": round(cross / 1e9, 3),
            "cross_over_same": round(cross / same, 3), "overlay_mtu": mtu,
            "new_guest_to_reach_host_a": summary_ms(reach)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--attaches", type=int, default=10)
    a = ap.parse_args()
    with services.exclusive():
        services.start(with_vnetd=False)
        out = {c: run(c, a.seconds, a.attaches) for c in ("static", "evpn")}
    emit("overlay", {**out, "seconds_each": a.seconds,
                     "note": "hosts are namespaces on one machine; the underlay is veth + a "
                     "bridge with MTU 1500, so the overlay MTU is 1450"})


if __name__ == "__main__":
    main()
