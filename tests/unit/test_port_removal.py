"""A port's removal takes its tap off the bridge before its guard: Detach, a port cut off
(its holder re-MACed its tap, or its guest sent as another VM), and a port that went before
its guard was in. Until the tap is off the bridge, its guard (or its pending hold) is all that
stops its frames; and every element of a port goes with it (Detach left them in the kernel
and in vnetd, one port's worth at each attach and Detach). The engine over a stub of the
kernel that records what is done, in order: no root, no bus."""

from __future__ import annotations

import asyncio
import json

import pytest
from vnetd import engine as engine_mod
from vnetd.engine import Engine
from vnetd.ports import Port
from vnetd.store import Store

from .test_limits import NoLinks


class Kernel(NoLinks):
    """Links that record each change, in the order the firewall's changes are made too."""

    def __init__(self) -> None:
        self.done: list[str] = []

    async def delete(self, index):
        self.done.append(f"delete tap #{index}")
        return True

    async def set(self, index, **kw):
        self.done.append(f"set #{index} {kw}")


@pytest.fixture
def world(tmp_path):
    kernel = Kernel()
    e = Engine(Store(tmp_path / "etc", tmp_path / "var", tmp_path / "run"), kernel)
    e.firewall._apply = lambda cmd, what: kernel.done.append(what)
    return e, kernel


def port(name: str = "vnet2-abcdef", index: int = 42, kind: str = "attach") -> Port:
    return Port(ifname=name, ifindex=index, network="vnet2", vm="web1", nic=0, uid=4001,
                mac="52:54:00:12:34:56", mac_known=True, holder_pid=None, queues=1,
                created=0.0, tap_mac="aa:bb:cc:dd:ee:ff", kind=kind)


async def guarded(e: Engine, p: Port) -> None:
    e.ports._add(p)
    await e.firewall.spares_added([p.ifname])  # as a new tap is, from before it exists
    await e.firewall.port_attached(p)


async def test_detach_takes_the_tap_away_then_every_element_of_its_guard(world):
    e, kernel = world
    p = port()
    await guarded(e, p)
    assert p.ifname in e.firewall.applied_ports and e.firewall._held
    kernel.done.clear()
    await e.detach(p)
    assert kernel.done == ["delete tap #42", "forget the port"]
    assert p.ifname not in e.firewall.applied_ports and p.ifname not in e.firewall.pending
    assert not e.firewall._held  # (a VM's shared elements: none left held by it)


async def test_a_detach_before_the_guard_lets_the_pending_hold_go(world):
    e, kernel = world
    p = port()
    e.ports._add(p)
    await e.firewall.spares_added([p.ifname])
    kernel.done.clear()
    await e.detach(p)
    assert kernel.done == ["delete tap #42", "let the spare taps go"]
    assert p.ifname not in e.firewall.pending


@pytest.mark.parametrize("kind, removal", [("attach", "delete tap #42"),
                                           ("vde", "set #42 {'master': 0}")])
async def test_a_port_cut_off_loses_its_guard_only_once_its_tap_is_off_the_bridge(
        world, kind, removal):
    e, kernel = world
    p = port(kind=kind)
    await guarded(e, p)
    kernel.done.clear()
    e.ports._cut(p, "02:00:00:00:00:01")  # its tap's address changed: cut off (soon)
    for _ in range(200):
        if "forget the port" in kernel.done:
            break
        await asyncio.sleep(0.01)
    assert kernel.done == [removal, "forget the port"]
    assert p.ifname not in e.firewall.applied_ports


async def test_a_port_cut_off_before_its_guard_keeps_its_pending_hold_until_its_tap_is_gone(
        world, monkeypatch):
    """The guard's turn may come between the cut and the tap's removal: the tap is still on
    the bridge then, and its pending hold is what stops its frames."""
    e, kernel = world
    p = port()
    e.ports._add(p)
    await e.firewall.spares_added([p.ifname])
    e.ports._drop(p)  # as the cut does, before its _cut_off's turn comes
    monkeypatch.setattr(engine_mod, "tap_exists", lambda port: True)
    kernel.done.clear()
    await e.guard_port(p)
    assert p.ifname in e.firewall.pending and "let the spare taps go" not in kernel.done
    monkeypatch.setattr(engine_mod, "tap_exists", lambda port: False)
    await e._cut_off(p)
    assert kernel.done[0] == "delete tap #42" and kernel.done[-1] == "let the spare taps go"
    assert p.ifname not in e.firewall.pending


async def test_a_port_parked_before_its_guard_gets_it_when_its_network_returns(world):
    """A network stopped between an attach and its guard parks the port: no guard is put on
    a parked port (it was counted twice when the network came back, and its VM's shared
    elements outlived it), and its pending hold stays until the network's return replaces
    it with the guard, in one transaction."""
    from vnetd.model import Network

    e, kernel = world
    p = port()
    e.ports._add(p)
    await e.firewall.spares_added([p.ifname])
    p.parked = True
    kernel.done.clear()
    await e.guard_port(p)
    assert kernel.done == [] and p.ifname in e.firewall.pending
    assert p.ifname not in e.firewall.applied_ports

    async def nothing() -> None:
        pass

    e.firewall._host_settings = nothing
    p.parked = False
    sent = []
    e.firewall._apply = lambda cmd, what: sent.append(json.dumps(cmd))
    await e.firewall._join(Network.from_options("vnet2", {"subnet": "172.16.12.0/24"}))
    assert p.ifname not in e.firewall.pending and p.ifname in e.firewall.applied_ports
    assert '"delete": {"element": {"family": "bridge", "table": "qemu_vnet", "name": ' \
           '"pending"' in sent[0] and p.ifname in sent[0]
    assert max(e.firewall._held.values()) == 1  # counted once
