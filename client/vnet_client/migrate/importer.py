"""The importer: a qemu-vlan directory's files, read into records, become one vnetd
definition (the keys of vnet_common.options), the MACs to import and the findings; and the
definition as the TOML file `vnet-client define --from FILE` takes (vnet_common.toml)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from vnet_common.limits import (
    DEFAULT_VDE_PORTS,
    MAX_IFNAME,
    MAX_PORT,
    MAX_TAPS,
    MAX_UID,
    MAX_VDE_PORTS,
    MAX_VM_NAME,
    MIN_PORT,
    MIN_VDE_PORTS,
)
from vnet_common.names import GROUP_RE as _GROUP_RE
from vnet_common.names import IFNAME_RE as _IFNAME_RE
from vnet_common.names import LABEL_RE as _LABEL_RE
from vnet_common.names import VM_RE as _VM_RE
from vnet_common.names import network_number
from vnet_common.toml import comment, render_toml

from .dhcpd import DhcpdHost, DhcpdOption, DhcpdSubnet, read_dhcpd_conf
from .dnsmasq import (
    _DNSMASQ_VNETD,
    parse_dhcp_host,
    read_dnsmasq_lines,
    split_dnsmasq_arg,
)
from .records import (
    Assignment,
    Finding,
    HostRecord,
    Imported,
    MigrationError,
    RangeRecord,
)
from .shell import _Shell
from .text import (
    _ETHER_KEY,
    _LEASE_FIELD,
    _MAC_RE,
    _VDE_ETHER_KEY,
    DHCPD_FILE,
    DNSMASQ_FILES,
    ETHER_FILE,
    FALSE_WORDS,
    HOSTS_FILE,
    MACS_PER_TAP,
    MACS_PER_VDE_TAP,
    OPTS_FILE,
    TRUE_WORDS,
    _mac,
    _read_text,
    _short,
)

_VDE_VNETD = {
    "-s": "--sock", "--sock": "--sock", "-M": "--mgmt", "--mgmt": "--mgmt",
    "-m": "--mode", "--mode": "--mode", "-g": "--group", "--group": "--group",
    "-t": "--tap", "--tap": "--tap", "-d": "--daemon", "--daemon": "--daemon",
    "-p": "--pidfile", "--pidfile": "--pidfile", "-f": "--rcfile", "--rcfile": "--rcfile",
    "--mgmtmode": "--mgmtmode", "--dirmode": "--dirmode",
}
_VDE_FLAGS = {"-x": "--hub", "--hub": "--hub", "-F": "--fstp", "--fstp": "--fstp"}
_VDE_VALUED = {"--macaddr": _MAC_RE, "--priority": re.compile(r"\d{1,5}"),
               "--hashsize": re.compile(r"\d{1,6}")}
_VDE_TAKES_VALUE = {"-s", "--sock", "-M", "--mgmt", "-m", "--mode", "-g", "--group", "-t",
                    "--tap", "-p", "--pidfile", "-f", "--rcfile", "--mgmtmode", "--dirmode"}

_CONF_KEYS = {
    "netmask", "gateway", "broadcast", "address", "ether", "br", "num", "n", "nic", "dhcp",
    "vde", "if", "user", "group", "DNSMASQ_ARGS", "DHCPD_ARGS", "VDE_SWITCH_ARGS",
    "PREROUTING_RULES", "PREROUTING_RULSES", "POSTROUTING_RULES", "POSTROUTING_RULSES",
}
_CONF_ALIASES = {"dnsmasq_args": "DNSMASQ_ARGS", "vde_switch_args": "VDE_SWITCH_ARGS",
                 "DNMASQ_ARGS": "DNSMASQ_ARGS", "dhcpd_args": "DHCPD_ARGS",
                 "prerouting_rules": "PREROUTING_RULES", "prerouting_rulses": "PREROUTING_RULSES",
                 "QEMU_VLAN_PREROUTING_RULES": "PREROUTING_RULES",
                 "QEMU_VLAN_PREROUTING_RULSES": "PREROUTING_RULSES",
                 "QEMU_VLAN_POSTROUTING_RULES": "POSTROUTING_RULES",
                 "QEMU_VLAN_POSTROUTING_RULSES": "POSTROUTING_RULSES"}


class _Importer:
    def __init__(self, directory: Path, conf: Path | None, iface: str | None = None,
                 num: int | None = None):
        self.dir = directory
        self.num = num
        self.conf_path = conf
        self.iface = iface
        self.vde_ethers: list[Assignment] = []
        self.n_ether_keys = 0
        self.optsfiles: set[Path] = set()
        self.findings: list[Finding] = []
        self.read_files: set[Path] = set()
        self.conf: dict[str, Assignment] = {}
        self.conf_ethers: list[Assignment] = []
        self.hosts: list[HostRecord] = []
        self.ranges: dict[str, list[RangeRecord]] = {"dnsmasq": [], "dhcpd": []}
        self.domains: dict[str, list[tuple[str, str, int, str]]] = {"dnsmasq": [], "dhcpd": []}
        self.dnsmasq_used: list[str] = []
        self.hostsfiles: set[Path] = set()
        self.dnsmasq_files: set[Path] = set()
        self.dhcpd_present = False
        self.ether_index: dict[str, int] = {}
        self.network = ""
        self.subnet = ipaddress.IPv4Network("0.0.0.0/32")
        self.gateway = ipaddress.IPv4Address(0)

    # -- helpers ----------------------------------------------------------------------
    def note(self, file: str | Path, line: int, text: str, reason: str) -> None:
        self.findings.append(Finding(str(file), line, text, reason))

    def shown(self, p: Path) -> str:
        return str(p)

    def _conf_file(self) -> str:
        return str(self.conf_path) if self.conf_path else str(self.dir)

    def _resolve(self, value: str, file: str, line: int, text: str, what: str) -> Path | None:
        """A file the configuration names: as written (relative to the directory), or, when
        that does not exist (a copied directory), the same name in the directory."""
        p = Path(value)
        if not p.is_absolute():
            p = self.dir / p
        if p.is_file():
            return p
        local = self.dir / Path(value).name
        if local.is_file():
            self.note(file, line, text, f"{what} {value} does not exist; read {local} (the "
                      "same name in this directory) instead.")
            return local
        return None

    # -- the run ------------------------------------------------------------------------
    def run(self) -> Imported:
        self._find_conf()
        guess = self.dir.name
        if self.conf_path is not None:
            self._read_conf(guess)
        network = self._network_name(guess)
        self.network = network
        subnet = self._subnet(network)
        self.subnet = subnet
        self.gateway = subnet.network_address + 1
        definition: dict[str, Any] = {}
        macs = self._macs(network)
        self._bridge_mac()
        self._dnsmasq_sources()
        self._hostsfiles()
        self._dhcpd()
        dhcp = self._dhcp_kind()
        mode = self._mode(dhcp, network)
        definition["mode"] = mode
        if mode == "bridged":
            return self._bridged(network, definition, macs)
        definition["subnet"] = str(subnet)
        taps = self._taps(network)
        if taps:
            definition["taps"] = taps
        self._owner(definition, taps)
        definition["dhcp"] = dhcp
        self._range(definition, dhcp)
        self._domain(definition, dhcp)
        self._vde(definition, taps, len(macs))
        hosts = self._final_hosts(network, macs)
        if hosts:
            definition["hosts"] = hosts
        forwards = self._forwards()
        if forwards:
            definition["forwards"] = forwards
        self._other_files()
        order = {f: i for i, f in enumerate(sorted({f.file for f in self.findings}))}
        self.findings.sort(key=lambda f: (order[f.file], f.line))
        return Imported(network=network, definition=definition, macs=macs,
                        findings=self.findings)

    def _find_conf(self) -> None:
        if self.conf_path is not None:
            self.read_files.add(self.conf_path)
            return
        own = self.dir / f"{self.dir.name}.conf"
        if own.is_file():
            self.conf_path = own
        else:
            skip = {ETHER_FILE, DHCPD_FILE, *DNSMASQ_FILES}
            cands = sorted(p for p in self.dir.glob("*.conf") if p.name not in skip
                           and p.is_file())
            if len(cands) > 1:
                raise MigrationError(self.dir, 0, "several configuration files ("
                                     + ", ".join(p.name for p in cands) + f") and no {own.name}: "
                                     "give the one to read (import-qemu-vlan FILE.conf).")
            if cands:
                self.conf_path = cands[0]
                self.note(cands[0], 0, "", f"read as the network's configuration (there is "
                          f"no {own.name}).")
            else:
                self.note(self.dir, 0, "", f"no {own.name}: the original's defaults apply "
                          "(subnet from the name, dnsmasq).")
        if self.conf_path is not None:
            self.read_files.add(self.conf_path)

    def _read_conf(self, guess: str) -> None:
        assert self.conf_path is not None
        file = str(self.conf_path)
        text = _read_text(self.conf_path, file)
        for a in _Shell(self.conf_path, text, {"br": guess}).parse():
            key = _CONF_ALIASES.get(a.key, a.key)
            if _ETHER_KEY.fullmatch(key):
                self.conf_ethers.append(a)
                continue
            if _VDE_ETHER_KEY.fullmatch(key):
                self.vde_ethers.append(a)
                continue
            if key not in _CONF_KEYS:
                self.note(file, a.line, a.text, f"unknown key '{a.key}': not carried over.")
                continue
            if a.problem is not None:
                if key == "ether":
                    self.note(file, a.line, a.text, f"ether= is not understood ({a.problem}); "
                              f"looking for {ETHER_FILE} in the directory instead.")
                else:
                    self.note(file, a.line, a.text,
                              f"'{a.key}' is not carried over: {a.problem}.")
                continue
            if key in self.conf:
                old = self.conf[key]
                self.note(file, old.line, old.text, f"'{old.key}' is set again on line "
                          f"{a.line}: the later value is used, as the shell would.")
            self.conf[key] = a

    def _network_name(self, guess: str) -> str:
        a = self.conf.get("br")
        name = guess
        if a is not None and a.value.strip():
            name = a.value.strip()
            if name != guess:
                self.note(self._conf_file(), a.line, a.text, f"br={name}: the network is "
                          f"named {name}, not after the directory ({guess}).")
        if (not _IFNAME_RE.fullmatch(name) or len(name.encode()) > MAX_IFNAME):
            where = (self._conf_file(), a.line) if a is not None else (str(self.dir), 0)
            raise MigrationError(*where, f"'{_short(name)}' cannot be a network (bridge) name: "
                                 f"at most {MAX_IFNAME} bytes of letters, digits, '_', '.', '-'.")
        return name

    def _subnet(self, network: str) -> ipaddress.IPv4Network:
        file = self._conf_file()
        gw_a, nm_a = self.conf.get("gateway"), self.conf.get("netmask")
        number = network_number(network)
        prefix: int | None = None
        if gw_a is not None and gw_a.value.strip():
            text = gw_a.value.strip()
            addr, _, plen = text.partition("/")
            try:
                gw = ipaddress.IPv4Address(addr)
                if plen:
                    prefix = ipaddress.IPv4Network(f"0.0.0.0/{plen}").prefixlen
            except ValueError:
                raise MigrationError(file, gw_a.line, f"gateway='{_short(text)}' is not an "
                                     "IPv4 address.") from None
        else:
            if number is None or number > 245:
                raise MigrationError(file, gw_a.line if gw_a else 0,
                                     f"no gateway= and the name '{network}' gives no subnet "
                                     "(vnetN -> 172.16.(10+N).0/24 needs N <= 245).")
            gw = ipaddress.IPv4Address(f"172.16.{10 + number}.1")
        if nm_a is not None and nm_a.value.strip():
            text = nm_a.value.strip().lstrip("/")
            try:
                prefix = ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
            except ValueError:
                raise MigrationError(file, nm_a.line, f"netmask='{_short(text)}' is not a "
                                     "netmask (255.255.255.0 or 24).") from None
        prefix = 24 if prefix is None else prefix
        if not 8 <= prefix <= 30:
            a = nm_a or gw_a
            raise MigrationError(file, a.line if a else 0, f"a /{prefix} network cannot be "
                                 "carried over: vnetd takes /8 to /30 (a gateway and guests).")
        subnet = ipaddress.IPv4Network(f"{gw}/{prefix}", strict=False)
        if gw != subnet.network_address + 1:
            a = gw_a
            self.note(file, a.line if a else 0, a.text if a else "",
                      f"vnetd's gateway is the subnet's first address, "
                      f"{subnet.network_address + 1}, not {gw}: guests configured by hand "
                      "must use the new gateway and DNS server.")
        return subnet

    def _taps(self, network: str) -> int:
        file = self._conf_file()
        for key in ("n", "nic"):
            b = self.conf.get(key)
            if b is not None:
                self.note(file, b.line, b.text, f"{key}= is not the tap count in qemu-vlan "
                          "(the script sets n to the number in the bridge's name itself; the "
                          "tap count is num=): not carried over.")
        a = self.conf.get("num")
        if self.num is not None:
            if self.num > MAX_TAPS or len(f"{network}_{self.num - 1}".encode()) > MAX_IFNAME:
                raise MigrationError(file, 0, f"-n {self.num}: vnetd pre-creates 1 to "
                                     f"{MAX_TAPS} taps whose names fit {MAX_IFNAME} bytes.")
            if a is not None and a.value.strip() != str(self.num):
                self.note(file, a.line, a.text, f"num={a.value.strip()}: -n {self.num} given "
                          "to the import is used instead.")
            return self.num
        if a is None:
            return self._taps_inferred(network)
        text = a.value.strip()
        if not text.isdigit():
            self.note(self._conf_file(), a.line, a.text, f"'{a.key}={_short(text)}' is not a "
                      "tap count: no taps are pre-created.")
            return 0
        n = int(text)
        if n == 0:
            return 0
        if n > MAX_TAPS:
            self.note(self._conf_file(), a.line, a.text, f"{n} taps are more than vnetd's "
                      f"{MAX_TAPS}: no taps are pre-created (give -n at most {MAX_TAPS}).")
            return 0
        if len(f"{network}_{n - 1}".encode()) > MAX_IFNAME:
            self.note(self._conf_file(), a.line, a.text, f"the tap name {network}_{n - 1} would "
                      f"exceed {MAX_IFNAME} bytes: no taps are pre-created.")
            return 0
        return n

    def _taps_inferred(self, network: str) -> int:
        """No num= saved (the script never writes it): the count its own files imply - one
        VDE switch MAC per tap, else the MACs --macaddr wrote (8 per tap, 32 with VDE)."""
        file = self._conf_file()
        how = ""
        n = 0
        if self.vde_ethers:
            n = len({a.key for a in self.vde_ethers})
            how = f"{n} vde_switch_ether_<i> line(s), one VDE switch per tap"
        elif self.n_ether_keys and self.n_ether_keys % MACS_PER_TAP == 0:
            per = MACS_PER_VDE_TAP if self._vde_on() else MACS_PER_TAP
            if self.n_ether_keys % per == 0:
                n = self.n_ether_keys // per
                how = (f"{self.n_ether_keys} ether_<i> lines in {ETHER_FILE}, {per} per tap as "
                       "qemu-vlan --macaddr wrote them")
        if not n:
            self.note(file, 0, "", "no num= (the tap count) is recorded and none follows from "
                      "the other files: no taps are pre-created (define with -n COUNT; "
                      "qemu-vlan 1.0.0's default was 4).")
            return 0
        if n > MAX_TAPS or len(f"{network}_{n - 1}".encode()) > MAX_IFNAME:
            self.note(file, 0, "", f"{how} would make {n} taps, more than fit: no taps are "
                      "pre-created (define with -n COUNT).")
            return 0
        self.note(file, 0, "", f"no num= is recorded: {n} tap(s) {network}_0..{network}_{n - 1} "
                  f"from {how}.")
        return n

    def _vde_on(self) -> bool:
        a = self.conf.get("vde")
        return bool(self.vde_ethers) or (a is not None and a.value.strip().lower() in TRUE_WORDS)

    def _bridge_mac(self) -> None:
        d = self.conf.get("DHCPD_ARGS")
        if d is not None and d.value.strip():
            self.note(self._conf_file(), d.line, d.text, "DHCPD_ARGS: vnetd runs ISC dhcpd with "
                      "its own arguments and takes no extra ones: not carried over.")
        a = self.conf.get("ether")
        if a is not None and _MAC_RE.fullmatch(a.value.strip()):
            self.note(self._conf_file(), a.line, a.text, f"ether= is the bridge's own MAC "
                      f"({a.value.strip().lower()}); vnetd gives the bridge a fixed MAC of its "
                      "own: not carried over (guests learn the new one by ARP).")
        for k in ("broadcast", "address"):
            b = self.conf.get(k)
            if b is not None:
                self.note(self._conf_file(), b.line, b.text, f"{k}= follows from the subnet "
                          "in vnetd: not needed.")

    def _owner(self, definition: dict[str, Any], taps: int) -> None:
        file = self._conf_file()
        u = self.conf.get("user")
        if u is not None and u.value.strip():
            v = u.value.strip()
            if v.isdigit() and int(v) <= MAX_UID:
                definition["tap-user"] = int(v)
            else:
                self.note(file, u.line, u.text, f"the taps' owner '{_short(v)}' is a user name; "
                          "a definition holds a uid, which this reader does not look up: give "
                          f"-u {_short(v)} to import-qemu-vlan (or --user to define).")
        g = self.conf.get("group")
        if g is not None and g.value.strip():
            v = g.value.strip()
            if _GROUP_RE.fullmatch(v):
                definition["tap-group"] = v
            else:
                self.note(file, g.line, g.text, f"'{_short(v)}' is not a valid group name: "
                          "not carried over (vnetd's default group is vnet).")
        elif taps:
            self.note(file, 0, "", "the original's taps belonged to group qemu unless --group "
                      "said otherwise; vnetd's default is group vnet (import-qemu-vlan -g qemu "
                      "keeps the old group).")

    # -- MACs ---------------------------------------------------------------------------
    def _macs(self, network: str) -> dict[str, str]:
        entries: dict[int, tuple[str, str, int, str]] = {}
        a = self.conf.get("ether")
        path: Path | None = None
        if a is not None and _MAC_RE.fullmatch(a.value.strip()):
            a = None  # the bridge's own MAC (see _bridge_mac), not a file
        if a is None:
            own = self.dir / ETHER_FILE
            path = own if own.is_file() else None
        elif a.value.strip():
            path = self._resolve(a.value.strip(), self._conf_file(), a.line, a.text, "ether=")
            if path is None:
                self.note(self._conf_file(), a.line, a.text, f"ether={a.value.strip()} is "
                          f"neither a MAC address nor a file that exists, nor is there an "
                          f"{ETHER_FILE} here: no MACs imported from it.")
        for e in self.conf_ethers:
            self._ether_entry(e, self._conf_file(), entries)
        if path is not None:
            self.read_files.add(path)
            file = str(path)
            text = _read_text(path, file)
            for e in _Shell(path, text, {"br": network}).parse():
                if not _ETHER_KEY.fullmatch(e.key):
                    self.note(file, e.line, e.text, f"unknown key '{e.key}' in {path.name}: not "
                              "carried over (only ether_<i>= lines are).")
                    continue
                self._ether_entry(e, file, entries)
        elif not self.conf_ethers:
            self.note(self.dir, 0, "", f"no {ETHER_FILE}: no MACs to keep; vnetd gives each VM "
                      "a stable MAC from now on.")
        macs: dict[str, str] = {}
        owner: dict[str, tuple[int, str, int]] = {}
        for i in sorted(entries):
            mac, file, line, text = entries[i]
            if mac in owner:
                j, f2, l2 = owner[mac]
                self.note(file, line, text, f"{mac} is already ether_{j}'s ({f2}:{l2}): one MAC "
                          f"cannot belong to two VMs; ether_{i} is not carried over.")
                continue
            owner[mac] = (i, file, line)
            macs[f"{network}_{i}"] = mac
        self.ether_index = {mac: i for mac, (i, _, _) in owner.items()}
        return macs

    def _ether_entry(self, e: Assignment, file: str,
                     entries: dict[int, tuple[str, str, int, str]]) -> None:
        i = int(_ETHER_KEY.fullmatch(e.key).group(1))  # type: ignore[union-attr]
        self.n_ether_keys += 1
        if e.problem is not None:
            self.note(file, e.line, e.text, f"{e.key} is not a MAC address ({e.problem}): "
                      f"not carried over; VM {self.network or 'NET'}_{i} gets a new MAC.")
            return
        try:
            mac = _mac(e.value, file, e.line, f"MAC address (for {e.key})")
        except MigrationError as err:
            why = (" (qemu-vlan 1.0.0's --macaddr wrote such lines: it ran without md5sum)"
                   if e.value.strip().endswith(":::") else "")
            self.note(file, e.line, e.text, f"{err.message.rstrip('.')}{why}: not carried "
                      f"over; VM {self.network or 'NET'}_{i} gets a new MAC from vnetd.")
            return
        if i in entries and entries[i][0] != mac:
            _, f2, l2, t2 = entries[i]
            self.note(f2, l2, t2, f"{e.key} is set again ({file}:{e.line}): the later value "
                      "is used, as the shell would.")
        entries[i] = (mac, file, e.line, e.text)

    # -- dnsmasq ------------------------------------------------------------------------
    def _dnsmasq_sources(self) -> None:
        a = self.conf.get("DNSMASQ_ARGS")
        if a is not None and a.value.strip():
            self.dnsmasq_used.append(f"DNSMASQ_ARGS ({Path(self._conf_file()).name}:{a.line})")
            toks = a.token_lines()
            i = 0
            while i < len(toks):
                tok, line = toks[i]
                name, value, consumed = split_dnsmasq_arg(toks, i)
                text = " ".join(t for t, _ in toks[i:i + consumed])
                i += consumed
                if name is None:
                    self.note(self._conf_file(), line, text, "not a dnsmasq option: not "
                              "carried over.")
                    continue
                self._dnsmasq_option(name, value, self._conf_file(), line, text)
        for fname in DNSMASQ_FILES:
            p = self.dir / fname
            if p.is_file():
                self._dnsmasq_conf(p)
        p = self.dir / OPTS_FILE
        if p.is_file():
            self._optsfile(p)

    def _optsfile(self, path: Path) -> None:
        """dnsmasq's dhcp-optsfile: one dhcp-option value a line (`option:router,0.0.0.0`).
        The original's first samples wrote `option:router 0.0.0.0`, with a blank: dnsmasq
        refuses that line; it is read for what it meant, and said so."""
        for file, n, line in self._dnsmasq_lines(path, self.optsfiles):
            value = line
            if re.match(r"[a-z][a-z0-9-]*(=|$)", line) and not re.match(
                    r"(option6?|tag|set|net|encap|vendor|vi-encap):", line):
                self.note(file, n, line, "a dnsmasq configuration line, not a DHCP option: "
                          "dnsmasq refuses it in a dhcp-optsfile: not carried over.")
                continue
            m = re.fullmatch(r"((?:(?:tag|set|net|encap|vendor|vi-encap):[^,\s]*,)*"
                             r"option6?:[a-z0-9-]+|\d{1,3})\s+(\S.*)", line)
            if m:
                value = f"{m.group(1)},{m.group(2)}"
                self.note(file, n, line, "dnsmasq refuses this line (option and value are "
                          "separated by a blank, not a comma); read as "
                          f"'{_short(value, 40)}'.")
            self._dhcp_option(value, file, n, line)

    def _dnsmasq_lines(self, path: Path, seen: set) -> list[tuple[str, int, str]]:
        """(file, line number, text) of a dnsmasq-style file's lines that say something; a
        file already read (through another name) gives none."""
        if path.resolve() in seen:
            return []
        seen.add(path.resolve())
        self.read_files.add(path)
        file = str(path)
        self.dnsmasq_used.append(path.name)
        return [(r.file, r.line, r.text) for r in read_dnsmasq_lines(path, file)]

    def _dnsmasq_conf(self, path: Path) -> None:
        for file, n, line in self._dnsmasq_lines(path, self.dnsmasq_files):
            name, eq, value = line.partition("=")
            name = name.strip()
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
                raise MigrationError(file, n, f"'{_short(line, 40)}' is not a dnsmasq option "
                                     "line (option or option=value).")
            self._dnsmasq_option(name, value.strip() if eq else None, file, n, line)

    def _dnsmasq_option(self, name: str, value: str | None, file: str, line: int,
                        text: str) -> None:
        if name == "dhcp-host" and value is not None:
            self._dhcp_host(value, file, line, text)
        elif name == "dhcp-range" and value is not None:
            self._dhcp_range(value, file, line, text)
        elif name == "domain" and value is not None:
            parts = value.split(",")
            dom = parts[0].strip()
            if len(parts) > 1 and parts[1].strip() and not self._is_our_subnet(parts[1]):
                self.note(file, line, text, f"the domain {dom} is for {parts[1].strip()}, not "
                          f"this network's {self.subnet}: not carried over.")
                return
            self.domains["dnsmasq"].append((dom, file, line, text))
        elif name in ("dhcp-hostsfile", "dhcp-hostfile") and value is not None:
            p = self._resolve(value.strip(), file, line, text, name)
            if p is None:
                self.note(file, line, text, f"the hosts file {value.strip()} does not exist "
                          "here: its hosts are not carried over.")
            else:
                self._hostsfile(p)
        elif name == "conf-file" and value is not None:
            p = self._resolve(value.strip(), file, line, text, name)
            if p is None:
                self.note(file, line, text, f"the dnsmasq file {value.strip()} does not exist "
                          "here: not carried over.")
            else:
                self._dnsmasq_conf(p)
        elif name == "dhcp-option" and value is not None:
            self._dhcp_option(value, file, line, text)
        elif name in ("dhcp-optsfile", "addn-hosts") and value is not None:
            p = self._resolve(value.strip(), file, line, text, name)
            if p is None:
                self.note(file, line, text, f"the file {value.strip()} does not exist here: "
                          "nothing read from it.")
            elif name == "dhcp-optsfile":
                self._optsfile(p)
            else:
                self._addn_hosts(p, file, line, text)
        elif name in _DNSMASQ_VNETD:
            self.note(file, line, text, f"vnetd runs dnsmasq with its own '{name}' (bound to "
                      "the bridge only, authoritative, its own lease and pid files): not "
                      "carried over.")
        else:
            self.note(file, line, text, f"the dnsmasq option '{name}' is not carried over "
                      "(vnetd does not take extra dnsmasq options).")

    def _addn_hosts(self, path: Path, file: str, line: int, text: str) -> None:
        """addn-hosts: /etc/hosts lines (IP NAME...). vnetd's DNS answers for its static hosts
        and leases and writes its own addn-hosts; an entry here has no MAC to make a static
        host of, so each is named."""
        lines = self._dnsmasq_lines(path, self.hostsfiles)
        if not lines:
            self.note(file, line, text, f"{path.name} is empty: nothing to carry over (vnetd "
                      "writes its own addn-hosts file from the static hosts).")
        for f2, n, ln in lines:
            self.note(f2, n, ln, "a DNS-only name (addn-hosts): vnetd's DNS answers for static "
                      "hosts and leases only; make it a static host (host add NET --vm NAME "
                      "--mac MAC --ip IP) to keep the name: not carried over.")

    def _is_our_subnet(self, text: str) -> bool:
        try:
            return ipaddress.IPv4Network(text.strip(), strict=False) == self.subnet
        except ValueError:
            return False

    def _dhcp_option(self, value: str, file: str, line: int, text: str) -> None:
        fields = [f.strip() for f in value.split(",")]
        while fields and re.match(r"(tag|set|net|encap|vendor|vi-encap):", fields[0]):
            fields.pop(0)
        opt = fields[0].lower() if fields else ""
        if opt in ("3", "option:router", "6", "option:dns-server") and len(fields) > 1:
            what = "router" if opt in ("3", "option:router") else "DNS server"
            self._router_note(what, fields[1:], file, line, text)
        elif opt in ("15", "option:domain-name") and len(fields) > 1:
            self.domains["dnsmasq"].append((fields[1].strip('"'), file, line, text))
        else:
            self.note(file, line, text, "extra DHCP options are not carried over (vnetd does "
                      "not take them yet).")

    def _router_note(self, what: str, addrs: list[str], file: str, line: int,
                     text: str) -> None:
        others = [a for a in addrs if a and a != "0.0.0.0" and a != str(self.gateway)]
        if others:
            dot2 = str(self.subnet.network_address + 2)
            why = (" (the original's dhcpd setup pointed it at .2 by mistake)"
                   if dot2 in others else "")
            self.note(file, line, text, f"the {what} was {', '.join(others)}; vnetd gives the "
                      f"gateway {self.gateway} as {what}{why}: not carried over.")
        else:
            self.note(file, line, text, f"vnetd gives the gateway {self.gateway} as {what} "
                      "itself: not needed.")

    def _dhcp_range(self, value: str, file: str, line: int, text: str) -> None:
        fields = [f.strip() for f in value.split(",")]
        while fields and re.match(r"(tag|set|net|interface|constructor):", fields[0]):
            fields.pop(0)
        try:
            start = ipaddress.IPv4Address(fields[0])
            end = ipaddress.IPv4Address(fields[1])
        except (ValueError, IndexError):
            self.note(file, line, text, "this DHCP range is not an IPv4 start,end pair (IPv6 "
                      "or static ranges: vnetd serves IPv6 with router advertisements once the "
                      "network has --subnet6): not carried over.")
            return
        rest = [f for f in fields[2:] if f not in (str(self.subnet.netmask),
                                                   str(self.subnet.broadcast_address))]
        lease = [f for f in rest if _LEASE_FIELD.fullmatch(f)]
        if lease:
            self.note(file, line, text, f"the lease time {lease[0]}: vnetd's leases last 1 "
                      "hour (a guest renews after 30 minutes): not carried over.")
        rest = [f for f in rest if f not in lease]
        if rest:
            self.note(file, line, text, f"'{','.join(rest)}' of this range is not carried "
                      "over: vnetd sets mask and broadcast from the subnet"
                      + (" (the original wrote '<br>oadcast' for the broadcast address by "
                         "mistake)" if any(f.endswith("oadcast") for f in rest) else "") + ".")
        self.ranges["dnsmasq"].append(RangeRecord(str(start), str(end), file, line, text))

    def _hostsfiles(self) -> None:
        p = self.dir / HOSTS_FILE
        if p.is_file():
            self._hostsfile(p)

    def _hostsfile(self, path: Path) -> None:
        for file, n, line in self._dnsmasq_lines(path, self.hostsfiles):
            self._dhcp_host(line, file, n, line)

    def _dhcp_host(self, value: str, file: str, line: int, text: str) -> None:
        """A dhcp-host value (read by dnsmasq.parse_dhcp_host) as a static host, or findings."""
        h = parse_dhcp_host(value, file, line)
        macs, wild, ips, names, dropped = h.macs, h.wild, h.ips, h.names, h.dropped
        if h.ignore:
            self.note(file, line, text, "this host is refused DHCP ('ignore'); vnetd has no "
                      "such setting: not carried over.")
            return
        if not macs:
            why = "wildcard MACs" if wild else "no MAC address"
            self.note(file, line, text, f"{why}: vnetd's static hosts are one MAC each: not "
                      "carried over.")
            return
        if not ips:
            self.note(file, line, text, "no IPv4 address: vnetd's static hosts need one: not "
                      "carried over.")
            return
        if len(macs) > 1 or wild:
            self.note(file, line, text, f"several MACs for one host: only {macs[0]} is carried "
                      "over.")
        if len(ips) > 1:
            self.note(file, line, text, f"several addresses: only {ips[0]} is carried over.")
        if len(names) > 1:
            self.note(file, line, text, f"several names: only '{names[0]}' is carried over.")
        if dropped:
            self.note(file, line, text, f"'{','.join(dropped)}' (client ids, tags, IPv6 "
                      "addresses, lease times) is not carried over.")
        self.hosts.append(HostRecord(macs[0], ips[0], names[0] if names else None, file, line,
                                     text))

    # -- dhcpd --------------------------------------------------------------------------
    def _dhcpd(self) -> None:
        path = self.dir / DHCPD_FILE
        if not path.is_file():
            return
        self.read_files.add(path)
        items = read_dhcpd_conf(path, str(path))
        self.dhcpd_present = True
        for it in items:
            if isinstance(it, Finding):
                self.findings.append(it)
            elif isinstance(it, DhcpdSubnet):
                if it.net != self.subnet:
                    self.note(it.file, it.line, it.text, f"a declaration for {it.net}, not "
                              f"this network's {self.subnet}: its settings may not fit.")
            elif isinstance(it, RangeRecord):
                self.ranges["dhcpd"].append(it)
            elif isinstance(it, DhcpdOption):
                self._dhcpd_option(it.name, list(it.args), it.file, it.line, it.text)
            else:
                self._dhcpd_host(it)

    def _dhcpd_option(self, name: str, args: list[str], file: str, line: int,
                      text: str) -> None:
        if name == "routers":
            self._router_note("router", args, file, line, text)
        elif name == "domain-name-servers":
            self._router_note("DNS server", args, file, line, text)
        elif name == "domain-name":
            self.domains["dhcpd"].append((args[0], file, line, text))
        elif name in ("subnet-mask", "broadcast-address"):
            self.note(file, line, text, f"vnetd sets {name} from the subnet itself: not needed.")
        else:
            self.note(file, line, text, f"the DHCP option '{name}' is not carried over (vnetd "
                      "does not take extra DHCP options yet).")

    def _dhcpd_host(self, h: DhcpdHost) -> None:
        name, file, text = h.name, h.file, h.text
        if h.mac is None:
            self.note(file, h.line, text, f"host {name} has no 'hardware ethernet': vnetd's "
                      "static hosts are keyed by MAC: not carried over.")
            return
        addrs: list[ipaddress.IPv4Address] = []
        for x in h.ips:
            try:
                addrs.append(ipaddress.IPv4Address(x))
            except ValueError:
                self.note(file, h.line, text, f"host {name}'s fixed-address '{_short(x, 40)}' "
                          "is a name, not an address: not carried over.")
        if not addrs:
            if not h.ips:
                self.note(file, h.line, text, f"host {name} has no fixed-address: not carried "
                          "over.")
            return
        if len(addrs) > 1:
            self.note(file, h.line, text, f"host {name} has several addresses: only {addrs[0]} "
                      "is carried over.")
        self.hosts.append(HostRecord(h.mac, addrs[0], name, file, h.line, text))

    # -- decisions ----------------------------------------------------------------------
    def _dhcp_kind(self) -> str:
        a = self.conf.get("dhcp")
        file = self._conf_file()
        dhcpd = self.dhcpd_present
        if a is not None:
            v = a.value.strip().lower()
            if v in ("dnsmasq", "dhcpd"):
                return v
            if v == "dnsmask":
                self.note(file, a.line, a.text, "dhcp=dnsmask (the original documentation's "
                          "spelling) is read as dnsmasq.")
                return "dnsmasq"
            if v in ("", "none", "no"):
                return "none"
            if v in ("dhcpcd", "dhclient", "udhcpc"):
                self.note(file, a.line, a.text, f"dhcp={v} ran a DHCP client on the bridge "
                          "(bridged mode, with if=); vnetd runs none: not carried over.")
            else:
                self.note(file, a.line, a.text, f"dhcp={_short(v)} is not a DHCP server vnetd "
                          "knows (dnsmasq, dhcpd, none).")
        if not dhcpd and not self.dnsmasq_used and (self.dir / "dhcpd.lease").is_file():
            self.note(str(self.dir / "dhcpd.lease"), 0, "", "no dhcp= and no DHCP server "
                      "configuration, but the lease file qemu-vlan made for --dhcp=dhcpd: ISC "
                      "dhcpd is used (a host-only network).")
            return "dhcpd"
        if dhcpd and not self.dnsmasq_used:
            self.note(str(self.dir / DHCPD_FILE), 0, "", "no dhcp= in the configuration: "
                      "ISC dhcpd is used, as this directory has a dhcpd.conf.")
            return "dhcpd"
        if dhcpd:
            self.note(str(self.dir / DHCPD_FILE), 0, "", "both dnsmasq settings ("
                      + ", ".join(self.dnsmasq_used) + ") and a dhcpd.conf, and no dhcp=: "
                      "dnsmasq is used; static hosts are taken from both.")
        return "dnsmasq"

    def _looks_bridged(self, network: str) -> bool:
        """What the original saved for --if: gateway=192.168.0.1 (its bridged default) and no
        DHCP server files - and not the 172.16.(10+N) subnet its NAT networks had."""
        gw = self.conf.get("gateway")
        if gw is None or self.dnsmasq_used or self.dhcpd_present:
            return False
        number = network_number(network)
        nat_gw = f"172.16.1{str(number)[-1]}.1" if number is not None else None
        return gw.value.strip() != nat_gw and gw.value.strip().startswith("192.168.")

    def _mode(self, dhcp: str, network: str) -> str:
        file = self._conf_file()
        iface = self.conf.get("if")
        if self.iface:
            return "bridged"
        if iface is not None and iface.value.strip():
            return "bridged"
        if self._looks_bridged(network):
            gw = self.conf["gateway"]
            raise MigrationError(file, gw.line, f"gateway={gw.value.strip()} and no DHCP server "
                                 "files: this is what qemu-vlan saved for a bridged network "
                                 "(--if=NIC), and it does not record the NIC. Give it: "
                                 "import-qemu-vlan --if=NIC DIR (or, for a NAT network, set "
                                 "gateway= to its 172.16.x.1 in a copy).")
        if dhcp == "dhcpd":
            self.note(file, 0, "", "mode host-only: the original used ISC dhcpd for private "
                      "networks and dnsmasq for those with access outside (its NAT came from "
                      "your firewall); define with --mode=nat to change it.")
            return "host-only"
        return "nat"

    def _range(self, definition: dict[str, Any], dhcp: str) -> None:
        for kind, ranges in self.ranges.items():
            for k, r in enumerate(ranges):
                if kind != dhcp:
                    self.note(r.file, r.line, r.text, f"a {kind} range, and the network uses "
                              f"{dhcp}: not carried over.")
                    continue
                if k:
                    self.note(r.file, r.line, r.text, "a second DHCP range: vnetd has one; not "
                              "carried over.")
                    continue
                bad = [x for x in (r.start, r.end) if not self._host_ip_ok(
                    ipaddress.IPv4Address(x))]
                if bad or ipaddress.IPv4Address(r.start) > ipaddress.IPv4Address(r.end):
                    self.note(r.file, r.line, r.text, f"the range {r.start}-{r.end} does not fit "
                              f"{self.subnet} (gateway {self.gateway}): not carried over.")
                    continue
                definition["dhcp-start"] = r.start
                definition["dhcp-end"] = r.end

    def _domain(self, definition: dict[str, Any], dhcp: str) -> None:
        """The domain the network's own server gave (with dhcp=none: the first one found)."""
        chosen = False
        for kind in sorted(self.domains, key=lambda k: k != dhcp):
            for dom, file, line, text in self.domains[kind]:
                if chosen or (kind != dhcp and dhcp != "none"):
                    why = "another domain" if chosen else f"a {kind} setting, and the network "\
                        f"uses {dhcp}"
                    self.note(file, line, text, f"{why} ({dom}): not carried over.")
                    continue
                labels = dom.rstrip(".").split(".")
                if not dom or len(dom) > 253 or not all(_LABEL_RE.fullmatch(x) for x in labels):
                    self.note(file, line, text, f"'{_short(dom)}' is not a DNS domain vnetd "
                              "takes: not carried over.")
                    continue
                definition["domain"] = dom.rstrip(".").lower()
                chosen = True

    def _vde(self, definition: dict[str, Any], taps: int, n_macs: int) -> None:
        file = self._conf_file()
        a = self.conf.get("vde")
        on = False
        if a is not None:
            v = a.value.strip().lower()
            if v in TRUE_WORDS:
                on = True
            elif v not in FALSE_WORDS:
                self.note(file, a.line, a.text, f"vde={_short(v)} is neither yes nor no: VDE "
                          "is not enabled.")
        args = self.conf.get("VDE_SWITCH_ARGS")
        ports: int | None = None
        extra: list[str] = []
        if args is not None and args.value.strip():
            ports, extra = self._vde_args(args, on)
        if self.vde_ethers and not on:
            on = True
            e = self.vde_ethers[0]
            self.note(file, e.line, e.text, "vde_switch_ether_<i> lines: the network ran VDE "
                      "switches (the script records no vde=): imported with VDE switches.")
        if on and not taps:
            self.note(file, a.line if a else 0, a.text if a else "", "a VDE network runs one "
                      "switch per tap, and no tap count (num=) is recorded: VDE is not enabled "
                      "(define with --vde -n COUNT).")
            on = False
        if on:
            definition["vde"] = True
            definition["vde-ports"] = ports or DEFAULT_VDE_PORTS
            if extra:
                definition["vde-switch-args"] = extra
            vmacs = self._vde_macs(taps)
            if vmacs:
                definition["vde-macs"] = vmacs
        elif args is not None and args.value.strip():
            self.note(file, args.line, args.text, "VDE_SWITCH_ARGS is set but vde= does not "
                      "say the network used VDE switches: not carried over (define with --vde "
                      "if it did).")
        if not on and taps and n_macs and n_macs == taps * 32:
            self.note(file, 0, "", f"{ETHER_FILE} holds {n_macs} MACs, 32 per tap, as qemu-vlan "
                      "wrote them for --vde: if this network used VDE switches, define it with "
                      "--vde.")

    def _vde_macs(self, taps: int) -> list[str]:
        """vde_switch_ether_<i>: switch i's MAC, for i in 0..taps-1; all or none."""
        file = self._conf_file()
        found: dict[int, str] = {}
        for e in self.vde_ethers:
            i = int(_VDE_ETHER_KEY.fullmatch(e.key).group(1))  # type: ignore[union-attr]
            try:
                if e.problem is not None:
                    raise MigrationError(file, e.line, e.problem)
                mac = _mac(e.value, file, e.line, f"MAC address (for {e.key})")
            except MigrationError as err:
                self.note(file, e.line, e.text, f"{err.message.rstrip('.')}: not carried over.")
                continue
            if i >= taps:
                self.note(file, e.line, e.text, f"there is no switch {i} with {taps} tap(s): "
                          "not carried over.")
                continue
            if mac in self.ether_index:
                self.note(file, e.line, e.text, f"{mac} is also ether_{self.ether_index[mac]}'s "
                          "(a VM's): one MAC cannot be both a switch's and a VM's: not "
                          "carried over.")
                continue
            found[i] = mac
        if not found:
            return []
        if len(found) != taps:
            missing = [str(i) for i in range(taps) if i not in found]
            self.note(file, 0, "", "VDE switch MACs are kept for all switches or none, and "
                      f"vde_switch_ether_{'/'.join(missing)} is missing: vnetd picks the "
                      "switches' MACs.")
            return []
        return [found[i] for i in range(taps)]

    def _vde_args(self, a: Assignment, on: bool) -> tuple[int | None, list[str]]:
        file = self._conf_file()
        toks = a.token_lines()
        ports: int | None = None
        extra: list[str] = []
        i = 0
        while i < len(toks):
            tok, line = toks[i]
            nxt = toks[i + 1][0] if i + 1 < len(toks) else None
            flag, eq, val = tok.partition("=")
            if flag in ("-n", "--numports") or (tok.startswith("-n") and tok[2:].isdigit()):
                if tok.startswith("-n") and len(tok) > 2:
                    val, used = tok[2:], 1
                elif eq:
                    used = 1
                else:
                    val, used = nxt or "", 2
                text = " ".join(t for t, _ in toks[i:i + used])
                if val.isdigit() and MIN_VDE_PORTS <= int(val) <= MAX_VDE_PORTS:
                    ports = int(val)
                else:
                    self.note(file, line, text, f"'{_short(val)}' ports per switch: vnetd takes "
                              f"{MIN_VDE_PORTS} to {MAX_VDE_PORTS}; not carried over.")
                i += used
            elif tok in _VDE_FLAGS:
                extra.append(_VDE_FLAGS[tok])
                i += 1
            elif flag in _VDE_VALUED:
                used = 1 if eq else 2
                val = val if eq else (nxt or "")
                if _VDE_VALUED[flag].fullmatch(val):
                    extra += [flag, val.lower() if flag == "--macaddr" else val]
                else:
                    self.note(file, line, " ".join(t for t, _ in toks[i:i + used]),
                              f"'{_short(val)}' is not a valid value of {flag}: not carried "
                              "over.")
                i += used
            elif flag in _VDE_VNETD:
                used = 2 if flag in _VDE_TAKES_VALUE and not eq and nxt is not None else 1
                self.note(file, line, " ".join(t for t, _ in toks[i:i + used]),
                          f"vnetd sets {_VDE_VNETD[flag]} of its switches itself (sockets under "
                          "/run/qemu-vnet/vde/, group, mode) and supervises them: not carried "
                          "over.")
                i += used
            else:
                self.note(file, line, tok, f"the vde_switch argument '{_short(tok, 40)}' is not "
                          "carried over (vnetd takes --hub, --fstp, --macaddr, --priority, "
                          "--hashsize and the port count).")
                i += 1
        return ports, extra

    def _host_ip_ok(self, ip: ipaddress.IPv4Address) -> bool:
        return (ip in self.subnet and ip not in (self.subnet.network_address,
                                                 self.subnet.broadcast_address, self.gateway))

    def _final_hosts(self, network: str, macs: dict[str, str]) -> list[dict[str, str]]:
        accepted: list[HostRecord] = []
        by_mac: dict[str, HostRecord] = {}
        by_ip: dict[ipaddress.IPv4Address, HostRecord] = {}
        for h in self.hosts:
            if not self._host_ip_ok(h.ip):
                self.note(h.file, h.line, h.text, f"{h.ip} is not a guest address of "
                          f"{self.subnet} (gateway {self.gateway}): not carried over.")
                continue
            if h.mac in by_mac:
                o = by_mac[h.mac]
                if o.ip == h.ip:
                    if o.name is None and h.name:  # the record is frozen: a named copy
                        named = replace(o, name=h.name)
                        accepted[accepted.index(o)] = by_mac[h.mac] = by_ip[h.ip] = named
                    self.note(h.file, h.line, h.text, f"{h.mac} -> {h.ip} is already listed "
                              f"({o.file}:{o.line}): kept once.")
                else:
                    self.note(h.file, h.line, h.text, f"{h.mac} already has {o.ip} "
                              f"({o.file}:{o.line}): this second address is not carried over.")
                continue
            if h.ip in by_ip:
                o = by_ip[h.ip]
                self.note(h.file, h.line, h.text, f"{h.ip} is already given to {o.mac} "
                          f"({o.file}:{o.line}): not carried over.")
                continue
            by_mac[h.mac] = by_ip[h.ip] = h
            accepted.append(h)
        used: set[str] = set()
        out: list[dict[str, str]] = []
        ether_macs = set(macs.values())
        for h in accepted:
            idx = self.ether_index.get(h.mac)
            number = int(h.ip) - int(self.subnet.network_address)
            notes: list[str] = []
            if h.name:
                label = _to_label(h.name)
                if label is None:
                    label = f"host{number}"
                    notes.append(f"its name '{_short(h.name, 40)}' cannot be a DNS name: it is "
                                 f"called {label}")
                elif label != h.name:
                    notes.append(f"its name '{h.name}' becomes '{label}' (a DNS name takes "
                                 "letters, digits and '-')")
            elif idx is not None:
                label = _to_label(f"{network}_{idx}") or f"host{number}"
                notes.append(f"no name: named after ether_{idx} (VM {network}_{idx}), as a DNS "
                             f"name '{label}'")
            else:
                label = f"host{number}"
                notes.append(f"no name: called {label}")
            base, k = label, 2
            while label.lower() in used:
                suffix = f"-{k}"
                label = base[: 63 - len(suffix)].rstrip("-") + suffix
                k += 1
            if label != base:
                notes.append(f"'{base}' is taken: called '{label}'")
            used.add(label.lower())
            if idx is not None:
                notes.append(f"its MAC is ether_{idx}'s: attach it as --vm {network}_{idx} to "
                             f"keep MAC and address ({label}.<domain> in DNS)")
            elif h.mac not in ether_macs:
                macs[label] = h.mac
            if notes:
                self.note(h.file, h.line, h.text, "; ".join(notes) + ".")
            out.append({"vm": label, "mac": h.mac, "ip": str(h.ip)})
        return out

    def _bridged(self, network: str, definition: dict[str, Any],
                 macs: dict[str, str]) -> Imported:
        """A bridged network: the NIC in the bridge, guests on the physical LAN; no subnet,
        DHCP server, static hosts or forwards of its own."""
        file = self._conf_file()
        a = self.conf.get("if")
        nic = self.iface or (a.value.strip() if a is not None else "")
        if not _IFNAME_RE.fullmatch(nic) or len(nic.encode()) > MAX_IFNAME:
            raise MigrationError(file, a.line if a is not None and not self.iface else 0,
                                 f"'{_short(nic)}' is not an interface name.")
        definition["if"] = nic
        self.note(file, a.line if a is not None and not self.iface else 0,
                  a.text if a is not None and not self.iface else "",
                  f"bridged network: {nic} is put in the bridge {network} when it starts; "
                  "the guests take addresses from the physical LAN.")
        for k in ("gateway", "netmask"):
            g = self.conf.get(k)
            if g is not None:
                self.note(file, g.line, g.text, f"{k}= is the physical LAN's in a bridged "
                          "network: vnetd does not set it (the host keeps its own address "
                          f"on {nic}'s side).")
        d = self.conf.get("dhcp")
        if d is not None and d.value.strip():
            self.note(file, d.line, d.text, f"dhcp={d.value.strip()}: a bridged network has no "
                      "DHCP server of vnetd's; the original could run a DHCP client on the "
                      "bridge, vnetd does not: not carried over.")
        taps = self._taps(network)
        if taps:
            definition["taps"] = taps
        self._owner(definition, taps)
        self._vde(definition, taps, len(macs))
        for h in self.hosts:
            self.note(h.file, h.line, h.text, "a static host: a bridged network's addresses "
                      "come from the physical LAN's DHCP server: not carried over.")
        for key in ("PREROUTING_RULES", "PREROUTING_RULSES"):
            r = self.conf.get(key)
            if r is not None and r.value.strip():
                self.note(file, r.line, r.text, "port forwards are for nat and host-only "
                          "networks: not carried over.")
        self._other_files()
        order = {f: i for i, f in enumerate(sorted({f.file for f in self.findings}))}
        self.findings.sort(key=lambda f: (order[f.file], f.line))
        return Imported(network=network, definition=definition, macs=macs,
                        findings=self.findings)

    def _forwards(self) -> list[dict[str, str]]:
        file = self._conf_file()
        out: list[dict[str, str]] = []
        taken: list[tuple[str, int, int, str | None, str]] = []
        for key in ("POSTROUTING_RULES", "POSTROUTING_RULSES"):
            a = self.conf.get(key)
            if a is not None and a.value.strip():
                self.note(file, a.line, a.text, f"{a.key}: vnetd's forwards translate the "
                          "replies back themselves (connection tracking): not needed.")
        seen: set[str] = set()
        for key in ("PREROUTING_RULES", "PREROUTING_RULSES"):
            a = self.conf.get(key)
            if a is None or not a.value.strip():
                continue
            self.note(file, a.line, a.text, f"{a.key}: the original never applied these rules "
                      "(dead code); vnetd applies the ones carried over as soon as the network "
                      "runs: check they are still wanted. They keep their meaning: traffic "
                      "to the interface's addresses (iptables -d ADDRESS), from outside, the "
                      "host and other guests alike, followed when the addresses change; add "
                      "interface-means = \"incoming\" to a forward for traffic arriving on the "
                      "interface instead.")
            for rule, line in a.token_lines():
                if rule in seen:
                    self.note(file, line, rule, "this rule is listed twice: kept once.")
                    continue
                seen.add(rule)
                why = self._rule_problem(rule, taken)
                if why:
                    self.note(file, line, rule, why)
                else:
                    out.append({"rule": rule})
        return out

    def _rule_problem(self, rule: str,
                      taken: list[tuple[str, int, int, str | None, str]]) -> str | None:
        parts = rule.split(",")
        if len(parts) != 4:
            return "not 'interface,proto,port,address:port[/4|6]': not carried over."
        iface, proto, port, dest = (p.strip() for p in parts)
        family = 4
        if dest.endswith(("/4", "/6")):
            family, dest = int(dest[-1]), dest[:-2]
        if family == 6:
            return ("an IPv6 forward: the network has no IPv6 prefix in the original "
                    "configuration; define it with --subnet6=PREFIX, then "
                    f"'vnet-client forward add {self.network} --rule {rule}': not carried over.")
        if iface and (not _IFNAME_RE.fullmatch(iface) or len(iface.encode()) > MAX_IFNAME):
            return f"'{_short(iface)}' is not an interface name: not carried over."
        proto = proto.lower()
        if proto not in ("tcp", "udp"):
            return f"the protocol '{_short(proto)}': vnetd forwards tcp and udp: not carried over."
        m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", port)
        if not m:
            return f"'{_short(port)}' is not a port or port range: not carried over."
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not (MIN_PORT <= lo <= hi <= MAX_PORT):
            return (f"the ports {port} are not {MIN_PORT} to {MAX_PORT} (low-high): not "
                    "carried over.")
        addr, sep, tport = dest.rpartition(":")
        if not sep or not tport.isdigit() or not MIN_PORT <= int(tport) <= MAX_PORT:
            return f"'{_short(dest)}' is not ADDRESS:PORT: not carried over."
        if int(tport) + (hi - lo) > MAX_PORT:
            return (f"the target ports {tport}-{int(tport) + hi - lo} go past {MAX_PORT}: not "
                    "carried over.")
        try:
            ip = ipaddress.IPv4Address(addr)
        except ValueError:
            if not _VM_RE.fullmatch(addr) or len(addr) > MAX_VM_NAME:
                return (f"'{_short(addr)}' is neither an IPv4 address nor a VM name: not carried "
                        "over.")
        else:
            if not self._host_ip_ok(ip):
                return (f"the target {ip} is not a guest address of {self.subnet}: not carried "
                        "over.")
        for p2, l2, h2, i2, r2 in taken:
            if p2 == proto and lo <= h2 and l2 <= hi and (not iface or not i2 or iface == i2):
                return f"it overlaps the forward '{r2}': not carried over."
        taken.append((proto, lo, hi, iface or None, rule))
        return None

    def _other_files(self) -> None:
        known = {p.resolve() for p in self.read_files}
        try:
            entries = sorted(self.dir.iterdir())
        except OSError as e:
            raise MigrationError(self.dir, 0, f"cannot list it: {e.strerror or e}.") from None
        for p in entries:
            if p.resolve() in known:
                continue
            if p.is_dir():
                self.note(p, 0, "", "a directory: not read.")
            elif re.search(r"lease", p.name, re.IGNORECASE):
                self.note(p, 0, "", "DHCP leases are not carried over: a guest without a static "
                          "host gets a new lease (maybe another address).")
            else:
                self.note(p, 0, "", "not read: qemu-vnet has no use for this file.")


def _to_label(name: str) -> str | None:
    """A DNS label from a host name: the first label of a dotted name, '_' and other
    characters become '-'; None when nothing usable is left."""
    first = name.split(".")[0]
    label = re.sub(r"[^A-Za-z0-9-]", "-", first).strip("-")[:63].rstrip("-")
    return label if label and _LABEL_RE.fullmatch(label) else None


def read_qemu_vlan_dir(path: str | Path, iface: str | None = None,
                       num: int | None = None) -> Imported:
    """Read a qemu-vlan directory (`/etc/qemu/vnet3`, or its `vnet3.conf`) into a definition,
    the MACs to import and the findings. `iface`: the NIC of a bridged network, `num`: the
    tap count (the original took both from its command line and saved neither). Raises
    MigrationError for a file it cannot read."""
    p = Path(path)
    if p.is_file():
        return _Importer(p.parent, p, iface, num).run()
    if not p.is_dir():
        raise MigrationError(p, 0, "no such directory (give a qemu-vlan directory such as "
                             "/etc/qemu/vnet3).")
    return _Importer(p, None, iface, num).run()


def render_definition_toml(imp: Imported) -> str:
    """The definition as a TOML file `vnet-client define NAME --from FILE` takes: scalars and
    lists first, then [[hosts]] and [[forwards]] tables; the findings as comments on top."""
    header = [f"qemu-vnet definition of network {imp.network}, imported from qemu-vlan.",
              f"vnet-client define {imp.network} --from THIS-FILE"]
    if imp.findings:
        header.append(f"Not carried over, or changed ({len(imp.findings)}):")
        for f in imp.findings:
            where = f"{f.file}:{f.line}" if f.line else f.file
            header.append(comment(f"  {where}: {f.reason}"))
    return render_toml(imp.definition, "\n".join(comment(h) for h in header), gap=True)
