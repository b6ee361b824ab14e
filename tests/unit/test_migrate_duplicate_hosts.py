"""import-qemu-vlan: the same static host listed twice (same MAC, same address) is kept once,
with the name the second line gives when the first gives none."""

from __future__ import annotations

from pathlib import Path

from vnet_client.migrate import read_qemu_vlan_dir

CONF = """\
netmask=255.255.255.0
gateway=172.16.13.1
dhcp=dnsmasq
num=4
DNSMASQ_ARGS="--dhcp-host=52:54:00:aa:00:01,172.16.13.5
  --dhcp-host=52:54:00:aa:00:01,172.16.13.5,web1"
"""


def test_a_host_listed_twice_is_kept_once_with_its_name(tmp_path: Path) -> None:
    d = tmp_path / "vnet3"
    d.mkdir()
    (d / "vnet3.conf").write_text(CONF)
    imp = read_qemu_vlan_dir(d)
    assert imp.definition["hosts"] == [{"vm": "web1", "mac": "52:54:00:aa:00:01",
                                        "ip": "172.16.13.5"}]
    assert any("kept once" in f.reason for f in imp.findings), imp.findings
