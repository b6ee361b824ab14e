"""What a new definition means for a running network (vnetd.revise): which settings change
live, which wait for a restart, and what the caller is told. Pure: no root, no bus."""

from __future__ import annotations

import pytest
from vnetd import revise
from vnetd.model import Network


def net(**opts) -> Network:
    return Network.from_options("lab", {"mode": "nat", "subnet": "10.7.0.0/24", **opts})


def test_live_settings_take_effect_in_the_running_record():
    run = net()
    new = net(**{"dhcp-end": "10.7.0.150", "allow-host": True, "autostart": True})
    assert revise.waits(run, new) == []
    now = revise.in_force(run, new)
    assert now == new
    plan = revise.Plan(run, now)
    assert plan.dhcp and not plan.hosts and plan.firewall
    assert revise.notes("lab", run, run, new) == [
        "lab: changed while it runs: allow-host, autostart, dhcp-end."]


def test_hosts_alone_are_re_read_not_a_server_replaced():
    run = net()
    new = net(hosts=[{"vm": "web1", "mac": "52:54:00:00:00:05", "ip": "10.7.0.5"}])
    plan = revise.Plan(run, revise.in_force(run, new))
    assert plan.hosts and not plan.dhcp and plan.firewall


@pytest.mark.parametrize("change, key", [
    ({"subnet": "10.8.0.0/24"}, "subnet"),
    ({"subnet6": "fd00:7::/64"}, "subnet6"),
    ({"mtu": 1400}, "mtu"),
    ({"taps": 2}, "taps"),
    ({"mode": "host-only"}, "mode"),
])
def test_a_setting_only_a_restart_applies_is_named_and_keeps_the_running_record(change, key):
    run = net()
    # a live setting beside it would wait too: it was checked against the new subnet
    new = net(**change, **{"allow-host": True})
    assert revise.waits(run, new) == [key]
    assert revise.in_force(run, new) is run
    assert revise.Plan(run, revise.in_force(run, new)).fields == frozenset()


def test_the_uplink_is_named_by_its_option_key():
    assert revise.key("uplink") == "if" and revise.key("dhcp_start") == "dhcp-start"


def test_notes_for_a_stopped_network_and_for_no_change():
    run = net()
    assert revise.notes("lab", None, run, net(**{"allow-host": True})) == [
        "lab: saved; it is not running, so all of it takes effect when it starts."]
    assert revise.notes("lab", run, run, net()) == ["lab: nothing changed."]


def test_an_overlay_peer_is_live_and_its_device_settings_wait():
    ov = {"vni": 42, "local": "192.0.2.1", "peers": ["192.0.2.2"]}
    run = net(overlay=ov)
    more = net(overlay={**ov, "peers": ["192.0.2.2", "192.0.2.3"]})
    assert revise.waits(run, more) == []
    assert revise.Plan(run, revise.in_force(run, more)).peers == ({"192.0.2.3"}, set())
    moved = net(overlay={**ov, "vni": 43})
    assert revise.waits(run, moved) == ["overlay"]
    assert revise.in_force(run, moved) is run
