"""The dnsmasq configuration vnetd renders: everything dnsmasq writes is inside vnetd's own
directories. dnsmasq's defaults (/run/dnsmasq.pid, /var/lib/misc/dnsmasq.leases,
/etc/dnsmasq.conf) belong to the host's own dnsmasq service and are read-only to vnetd's unit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vnetd.model import Network
from vnetd.render import dnsmasq

RUN = Path("/run/qemu-vnet/lab")
STATE = Path("/var/lib/qemu-vnet/lab")
PATHS = dnsmasq.Paths(conf=RUN / "dnsmasq.conf", hosts_dhcp=RUN / "hosts.dhcp",
                      hosts_dns=RUN / "hosts.dns", leases=STATE / "dnsmasq.leases",
                      pid=RUN / "dnsmasq.pid")


def settings(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.append((key, value))
    return out


@pytest.mark.parametrize("dhcp", [True, False], ids=["dhcp", "dns-only"])
@pytest.mark.parametrize("options", [{"subnet": "10.7.0.0/24"},
                                     {"subnet": "10.7.0.0/24", "subnet6": "fd00:7::/64"},
                                     {"mode": "host-only", "subnet": "10.7.0.0/24"}])
def test_dnsmasq_writes_no_pid_file_of_its_own(options, dhcp):
    net = Network.from_options("lab", options)
    conf = settings(dnsmasq.render_conf(net, PATHS, dhcp=dhcp, user=("dnsmasq", "nogroup")))
    pid_files = [v for k, v in conf if k == "pid-file"]
    # An empty pid-file= turns dnsmasq's pid file off; without it every instance writes
    # /run/dnsmasq.pid (and fails where /run is read-only).
    assert pid_files == [""], f"expected exactly one empty pid-file=, got {pid_files}"


@pytest.mark.parametrize("options", [{"subnet": "10.7.0.0/24"},
                                     {"subnet": "10.7.0.0/24", "subnet6": "fd00:7::/64"}])
def test_every_path_dnsmasq_writes_is_below_vnetds_directories(options):
    net = Network.from_options("lab", options)
    conf = settings(dnsmasq.render_conf(net, PATHS, dhcp=True, user=("dnsmasq", "nogroup")))
    written = {k: v for k, v in conf if k in ("dhcp-leasefile", "pid-file", "dhcp-hostsfile",
                                              "addn-hosts")}
    assert written["dhcp-leasefile"] == str(PATHS.leases)
    for key, value in written.items():
        if value:
            assert value.startswith(("/run/qemu-vnet/", "/var/lib/qemu-vnet/")), (key, value)
    argv = dnsmasq.argv(PATHS)
    assert f"--conf-file={PATHS.conf}" in argv, "dnsmasq must not read /etc/dnsmasq.conf"


def test_leases_belong_to_a_mac_never_to_a_client_id():
    """A client-id can be copied off another guest's broadcast DISCOVERs; the MAC of a frame
    is held to the port's by the guard. Both servers key leases by the MAC alone."""
    from vnetd.render import dhcpd
    net = Network.from_options("vnet2", {"subnet": "10.10.0.0/24"})
    assert ("dhcp-ignore-clid", "") in settings(
        dnsmasq.render_conf(net, PATHS, dhcp=True, user=("dnsmasq", "nogroup")))
    assert "ignore-client-uids true;" in dhcpd.render_conf(net).splitlines()


def test_no_line_per_dhcp_message_or_router_solicitation():
    """A guest decides how many DHCP messages and router solicitations it sends; dnsmasq's
    line for each would be relayed into vnetd's log (vnetd logs lease changes itself)."""
    net = Network.from_options("vnet2", {"subnet": "10.10.0.0/24", "subnet6": "fd00:10::/64"})
    for dhcp in (True, False):
        conf = settings(dnsmasq.render_conf(net, PATHS, dhcp=dhcp, user=("dnsmasq", "nogroup")))
        assert {("quiet-dhcp", ""), ("quiet-dhcp6", ""), ("quiet-ra", "")} <= set(conf)


def test_a_leases_name_is_its_vms_never_the_one_its_guest_sends():
    """A guest may send any name in DHCP, also another VM's; dnsmasq gave a name to the
    newest lease that asked for it. Names come from the hosts file alone: the static hosts',
    then each registered VM's (MAC,name), where no static host has the MAC or the name."""
    net = Network.from_options("vnet2", {"subnet": "10.10.0.0/24", "hosts": [
        {"vm": "Web1", "mac": "52:54:00:00:00:05", "ip": "10.10.0.5"}]})
    assert ("dhcp-ignore-names", "") in settings(
        dnsmasq.render_conf(net, PATHS, dhcp=True, user=("dnsmasq", "nogroup")))
    names = {"52:54:00:00:00:05": "other",  # the static host's MAC: its own name stays
             "52:54:00:00:00:07": "web1",  # the static host's name: not twice
             "52:54:00:00:00:09": "db1"}
    assert dnsmasq.render_hosts_dhcp(net, names) == (
        "52:54:00:00:00:05,10.10.0.5,web1\n"
        "52:54:00:00:00:09,db1\n")
    assert dnsmasq.render_hosts_dhcp(net) == "52:54:00:00:00:05,10.10.0.5,web1\n"
