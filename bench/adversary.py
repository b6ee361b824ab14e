"""Frame-level attacks under load (JSON out): three attackers (ports of a user who is not the
victims', got through Attach: one without an address, one bound by DHCP, one learn-mac)
send a mix of spoofed and forbidden frames for VNET_BENCH_SECONDS (default 60) at ten
guarded victims, while another user attaches and detaches VMs.

- frames delivered to victims: attack frames that reached any victim (target 0);
- vnetd's RSS growth over the run (target < 10 %);
- the other user's Attach p99 during the run (target < 100 ms).

    sudo /opt/qemu-vnet/bin/python bench/adversary.py [--seconds 60] [--rate 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

from _common import bench_daemon, emit, summary_ms

from tests.adversarial.lab import Agent, bridge_mac, dhcp_bind, respond
from tests.harness import frames as F
from tests.harness.daemon import ALICE, BOB, PolkitRule, grant_rule, run_client
from tests.harness.users import spawn_as

NET, SUBNET, SUBNET6 = "adv1", "10.203.0.0/24", "fd00:203::/64"
GW, GW6 = "10.203.0.1", "fd00:203::1"
VICTIMS, ATTACKERS = 10, 3

ATTACH_LOOP = """
import time
seconds, names = float(sys.argv[1]), int(sys.argv[2])
async def main():
    samples, errors = [], {}
    async with Client() as c:
        await c.attach(sys.argv[3], "warmup")  # the first call asks polkit
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            t = time.perf_counter()
            try:
                a = await c.attach(sys.argv[3], f"other{i % names}")
            except VnetClientError as e:
                errors[e.name] = errors.get(e.name, 0) + 1
                await asyncio.sleep(0.05)
            else:
                samples.append(time.perf_counter() - t)
                a.close()
            i += 1
            await asyncio.sleep(0.02)
    print(json.dumps({"samples": samples, "errors": errors}))
asyncio.run(main())
"""


def attack_mix(amac: str, aip: str | None, victims: list[Agent], vips: list[str],
               brmac: str, n: int) -> list[bytes]:
    """Frames no guarded victim may receive, each marked ADV:atk<n>-<i>;."""
    out: list[bytes] = []
    all6, mall6 = "ff02::1", F.mcast6_mac("ff02::1")
    ll = F.eui64_ll(amac)
    src4 = aip or "0.0.0.0"
    t = f"atk{n}-x"
    out += [F.gratuitous_arp(amac, GW, tag=f"{t}-garp-gw"),
            F.neighbor_advert(amac, ll, GW6, tag=f"{t}-na-gw"),
            F.router_advert(amac, ll, "fd00:99::/64", tag=f"{t}-ra")]
    for i, (v, vip) in enumerate(zip(victims, vips, strict=True)):
        t = f"atk{n}-{i}"
        vll = F.eui64_ll(v.mac)
        out += [
            F.arp(2, amac, GW, v.mac, vip, dst=v.mac, tag=f"{t}-arp-gw"),
            F.arp(2, amac, vip, brmac, GW, dst=brmac, tag=f"{t}-arp-victim-host"),
            F.udp4_frame(v.mac, F.BROADCAST, vip, "255.255.255.255", 9, 9, tag=f"{t}-src-mac"),
            F.udp4_frame(amac, v.mac, vip, vip, 9, 9, tag=f"{t}-src-ip"),
            F.udp4_frame(amac, F.BROADCAST, src4, "255.255.255.255", 68, 67, vlan=5,
                         tag=f"{t}-vlan"),
            F.udp4_frame("01:00:5e:00:00:fb", F.BROADCAST, src4, "255.255.255.255", 9, 9,
                         tag=f"{t}-mcast-src"),
            F.dhcp_server(F.OFFER, amac, src4 if aip else "10.203.0.66", v.mac, vip,
                          router=aip or "10.203.0.66", tag=f"{t}-rogue-offer"),
            F.dhcp_client(F.DISCOVER, amac, chaddr=v.mac, xid=0x5500 + i,
                          tag=f"{t}-dhcp-chaddr"),
            F.udp6_frame(amac, mall6, vll, all6, 9, 9, tag=f"{t}-src6"),
            F.neighbor_advert(amac, ll, vll, dst=vll, dst_mac=v.mac, tag=f"{t}-na-victim"),
            F.neighbor_solicit(amac, ll, GW6, sll=v.mac, dst=all6, tag=f"{t}-ns-sll"),
            F.redirect6(amac, ll, vll, v.mac, ll, "2001:db8::1", tag=f"{t}-redirect"),
            F.icmp4_redirect(amac, v.mac, GW, vip, src4, tag=f"{t}-redirect4"),
        ]
    return F.distinct(out)


def vnetd_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float,
                    default=float(os.environ.get("VNET_BENCH_SECONDS", "60")))
    ap.add_argument("--rate", type=int, default=2000, help="frames per second per attacker")
    a = ap.parse_args()
    agents: list[Agent] = []
    with bench_daemon("adversary") as d, \
            PolkitRule("60-vnet-bench-adversary", grant_rule(BOB, "org.qemuvnet.Vnet1.attach")):
        run_client("define", NET, f"--subnet={SUBNET}", f"--subnet6={SUBNET6}", check=True)
        run_client("start", NET, check=True)
        try:
            victims = [Agent.attach(ALICE, NET, f"victim{i}") for i in range(VICTIMS)]
            agents += victims
            vips = []
            for i, v in enumerate(victims):
                assert v.error is None, v.hello
                vips.append(dhcp_bind(v, xid=0x56000000 + i))
                respond(v, ip4=[vips[-1]], ip6=[F.eui64_ll(v.mac)])
            brmac = bridge_mac(d, NET)
            attackers = [Agent.attach(BOB, NET, "evil0"), Agent.attach(BOB, NET, "evil1"),
                         Agent.attach(BOB, NET, "evil2", learn_mac=True)]
            agents += attackers
            assert all(x.error is None for x in attackers), [x.hello for x in attackers]
            aips: list[str | None] = [None, dhcp_bind(attackers[1], xid=0x56100001), None]
            mixes = [attack_mix(x.mac if i < 2 else F.random_mac(), aips[i], victims, vips,
                                brmac, i) for i, x in enumerate(attackers)]
            cores = sorted({F.core(f).hex() for mix in mixes for f in mix})
            for v in victims:
                v.call(op="watch", cores=cores)

            rss0 = vnetd_rss_kib(d.proc.pid)
            other = spawn_as(ALICE, ATTACH_LOOP, str(a.seconds), "50", NET)
            sent = [0] * ATTACKERS
            deadline = time.monotonic() + a.seconds

            def attack(i: int) -> None:
                mix, batch = mixes[i], 40
                k = 0
                while time.monotonic() < deadline:
                    t = time.monotonic()
                    frames = [mix[(k + j) % len(mix)] for j in range(batch)]
                    k += batch
                    r = attackers[i].send(*frames, check=False)
                    sent[i] += r["sent"]
                    pause = batch / a.rate - (time.monotonic() - t)
                    if pause > 0:
                        time.sleep(pause)

            threads = [threading.Thread(target=attack, args=(i,)) for i in range(ATTACKERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out_other = json.loads(other.communicate(timeout=a.seconds + 120)[0])
            time.sleep(0.5)
            rss1 = vnetd_rss_kib(d.proc.pid)
            summaries = [v.call(op="summary") for v in victims]
            delivered = sum(s["hits"] for s in summaries)
            kinds: dict[str, int] = {}
            for s in summaries:
                for tag, n in s["tags"].items():
                    kind = tag.split("-", 2)[2] if tag.count("-") >= 2 else tag
                    kinds[kind] = kinds.get(kind, 0) + n
            victims_ok = 0  # the victims are still served
            for i, v in enumerate(victims[:3]):
                try:
                    dhcp_bind(v, xid=0x56200000 + i)
                    victims_ok += 1
                except AssertionError:
                    pass
            latency = summary_ms(out_other["samples"]) if out_other["samples"] else {}
            growth = (rss1 - rss0) / rss0 * 100
            out = {
                "seconds": a.seconds, "victims": VICTIMS, "attackers": ATTACKERS,
                "attack_frames_sent": sum(sent),
                "frames_delivered_to_victims": delivered,
                "delivered_by_kind": kinds,
                "victim_frames_seen_total": sum(s["frames"] for s in summaries),
                "victims_still_served_by_dhcp": f"{victims_ok}/3",
                "vnetd_rss_kib": {"start": rss0, "end": rss1},
                "vnetd_rss_growth_pct": round(growth, 2),
                "other_user_attach": latency,
                "other_user_attach_errors": out_other["errors"],
                "targets": {"frames_delivered": 0, "rss_growth_pct": 10, "attach_p99_ms": 100},
                "met": {"frames_delivered": delivered == 0, "rss_growth": growth < 10,
                        "attach_p99": bool(latency) and latency["p99_ms"] < 100},
            }
        finally:
            for x in agents:
                x.close()
    emit("adversary", out)


if __name__ == "__main__":
    main()
