"""Read an old qemu-vlan configuration directory (`/etc/qemu/vnet3`) into a vnetd definition.

A pure reader: it opens files under the directory (and the files its configuration names),
never the network, the bus or the system's user database. What it reads:

- `<br>.conf` (`vnet3.conf`): shell lines the original script wrote and sourced -
  `netmask=`, `gateway=`, `broadcast=`, `ether=` (the bridge's own MAC; an older hand-written
  form gave the path of ether.conf there), `vde_switch_ether_<i>=` (one VDE switch's MAC per
  tap), and what a user may add because the script sources the file over its own variables:
  `num=` (the tap count), `vde=true`, `dhcp=`, `if=`, `br=`, `user=`, `group=`,
  `DNSMASQ_ARGS="..."`, `VDE_SWITCH_ARGS="..."`, `PREROUTING_RULES="..."` (and the misspelled
  `PREROUTING_RULSES` of the original's documentation), `ether_<i>=` MACs;
- `ether.conf`: `ether_<i>=52:54:00:xx:xx:xx` from i=0 (VM `<network>_<i>`);
- dnsmasq's files: `dhcp.host` and any `--dhcp-hostsfile` (one `dhcp-host` value a line),
  `dnsmasq.conf` (`option=value` lines), and `dhcp.conf` with any `dhcp-optsfile` (DHCP
  options, `option:router,0.0.0.0` lines: dnsmasq's dhcp-optsfile format);
- ISC dhcpd's `dhcpd.conf` (`host NAME { hardware ethernet ..; fixed-address ..; }`,
  `subnet .. { range ..; option routers ..; }`).

Everything that is not carried over is named in `Imported.findings`, line by line; a file
that cannot be understood at all raises `MigrationError` naming the line. The result's
`definition` holds the TOML keys of `vnet-client define --from FILE` (see
`render_definition_toml`), and `macs` the VM -> MAC entries for ImportMacs.

The package: `records` (what the readers return: frozen records with their line, `Finding`,
`MigrationError`), `text` (file names, value patterns, reading a file), `shell` (the shell
files' assignments), `dhcpd` (dhcpd.conf's declarations: subnets, ranges, options, hosts),
`dnsmasq` (dnsmasq's files, options and dhcp-host values), `bridge_conf` (bridge.conf) and
`importer` (records -> one definition, with vnet_common's limits, names and TOML writer).

This package must not import the daemon package (`vnetd`): the client is installed without it.
"""

from .bridge_conf import BridgeAcl, read_bridge_conf, render_bridge_acl_rules
from .importer import read_qemu_vlan_dir, render_definition_toml
from .records import Finding, Imported, MigrationError
from .shell import read_shell_assignments

__all__ = ["BridgeAcl", "Finding", "Imported", "MigrationError", "read_bridge_conf",
           "read_qemu_vlan_dir", "read_shell_assignments", "render_bridge_acl_rules",
           "render_definition_toml"]
