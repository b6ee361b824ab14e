"""A static address given to a VM that holds another lease never cuts it off: its port keeps
the leased address (and forwards to the VM keep going there) until the guest renews and gets
the static one; `host add` says so. Then only the static address is the VM's."""

from __future__ import annotations

import json

import pytest

from tests.harness.daemon import ALICE, run_client

from .lab import bridge_mac, dhcp_bind, ping, respond, wait_for

NET, GW, STATIC = "vnet5", "172.16.15.1", "172.16.15.5"


@pytest.fixture(scope="module", autouse=True)
def network(vnetd):
    run_client("define", NET, check=True)
    run_client("start", NET, check=True)
    yield
    run_client("stop", NET)
    run_client("undefine", NET)


def resolved(network: str) -> str:
    fwds = json.loads(run_client("forward", "list", network, "--json", check=True).stdout)
    return fwds[0]["resolved"]


def test_a_static_address_keeps_the_lease_until_the_guest_renews(vnetd, agents):
    web = agents(ALICE, NET, "web")
    assert web.error is None, web.hello
    leased = dhcp_bind(web, xid=0x55000001)
    assert leased != STATIC
    respond(web, ip4=[leased, STATIC])
    gw_mac = bridge_mac(vnetd, NET)
    assert ping(web, leased, gw_mac, GW), "positive control: the guest reaches its gateway"
    run_client("forward", "add", NET, "tcp", "8080", "web:80", check=True)
    assert wait_for(lambda: resolved(NET) == leased)

    out = json.loads(run_client("host", "add", NET, "--vm", "web", "--ip", STATIC, "--json",
                                check=True).stdout)
    assert out["ip"] == STATIC and out["keeps"] == leased
    text = run_client("host", "remove", NET, "--vm", "web", check=True)  # and the sentence form
    text = run_client("host", "add", NET, "--vm", "web", "--ip", STATIC, check=True).stdout
    assert leased in text and "renews" in text, text

    # not cut off: the leased address still works, and forwards still go there
    assert ping(web, leased, gw_mac, GW, seq=10), "the guest was cut off by the static host"
    assert resolved(NET) == leased
    # the guest renews: the server gives it the static address, and only that one is its own
    assert dhcp_bind(web, xid=0x55000002) == STATIC
    assert wait_for(lambda: resolved(NET) == STATIC, timeout=5)
    assert ping(web, STATIC, gw_mac, GW, seq=20)
    assert wait_for(lambda: not ping(web, leased, gw_mac, GW, seq=30, tries=1), timeout=5), \
        "the old lease is still allowed after the renewal"
    run_client("forward", "remove", NET, "tcp", "8080", check=True)
    run_client("host", "remove", NET, "--vm", "web", check=True)
