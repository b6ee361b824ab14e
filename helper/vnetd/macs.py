"""Stable guest MACs: one per (network, vm, nic), under QEMU's 52:54:00 prefix.

A MAC is derived from a hash of network/vm/nic, so the same VM gets the same MAC on any host
with an empty registry; a collision inside the network is resolved by rehashing with a
counter, and every MAC given out is remembered in the state directory, so it never changes
once given (the original qemu-vlan's MACs depended on the shell's PID).
The registry also carries MACs imported from an old ether.conf, or from another host's
registry (ExportMacs/ImportMacs: a VM that moves keeps its MACs).

On disk, each network's entries and owners are one file, `<network>.macs.json` in the state
directory (a name no network can take: see vnet_common.names): a change to one network
writes that network's file only, however many networks and entries the host holds. The
single `macs.json` and `mac-creators.json` of earlier versions are split into these files
at start-up (load), and then removed.

Bounds, so that callers allowed to ask for MACs cannot grow the registry without end or crowd
each other out: each network holds at most `limit` entries, the whole registry (networks
undefined since included) at most `total_limit`, and a user other than root brings in at
most `per_user` entries per network (who first asked for a VM is kept with the entries).

Ownership: a VM name on a network belongs to the uid that first registered it (asked for its
MAC or attached it), root included; another uid's calls for that VM are refused (NotOwner)
until an administrator forgets it (ForgetMac).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vnet_common.names import (
    LABEL_RE,
    key,
    parse_key,
    split_key,
    validate_mac,
    validate_network_name,
    validate_nic,
    validate_vm_name,
)

from .errors import Exists, InvalidArgument, NotFound, NotOwner, QuotaExceeded, VnetError

log = logging.getLogger("vnetd.macs")

QEMU_OUI = "52:54:00"
# names no VM's lease is given in DNS: clients look them up to configure themselves (a web
# proxy, an IPv6 transition router), so whoever held one would be every guest's proxy
RESERVED_NAMES = frozenset({"wpad", "isatap", "localhost"})
DEFAULT_LIMIT = 4096  # entries per network
DEFAULT_TOTAL = 65536  # entries in all
DEFAULT_PER_USER = 1024  # entries one user (not root) brings into one network


def derive_mac(network: str, vm: str, nic: int, attempt: int = 0) -> str:
    seed = f"{network}/{vm}/{nic}" + (f"/{attempt}" if attempt else "")
    d = hashlib.sha256(seed.encode()).digest()
    return f"{QEMU_OUI}:{d[0]:02x}:{d[1]:02x}:{d[2]:02x}"


@dataclass
class _Index:
    """What a network's checks would otherwise count by walking its entries (a full network
    holds thousands: a new VM cost a millisecond there, 13 us on an empty one). Built when
    first needed, kept up to date as `get` and `_note_creator` add to the network, and
    dropped by every other change to it (rebuilt at the next check)."""
    by_mac: dict[str, str] = field(default_factory=dict)  # mac -> "vm/nic"
    per_vm: Counter = field(default_factory=Counter)  # vm -> its entries
    of_vm: dict[str, list[str]] = field(default_factory=dict)  # vm -> its MACs
    entries_of: Counter = field(default_factory=Counter)  # creator (None: none) -> entries
    names_of: Counter = field(default_factory=Counter)  # uid -> VM names it created
    # a VM name in lower case (DNS names ignore case) -> {owner: the name as registered}
    folded: dict[str, dict[int, str]] = field(default_factory=dict)


SUFFIX = ".macs.json"  # <network>.macs.json: one network's entries and owners
LEGACY = "macs.json"  # the whole registry in one file (earlier versions)
LEGACY_CREATORS = "mac-creators.json"

# save(network, entries, owners): write one network's file (both empty: remove it)
Save = Callable[[str, dict[str, str], dict[str, int]], None]


@dataclass(frozen=True)
class Job:
    """A deferred write of one network's file, with a copy of its state as it was taken."""

    network: str
    macs: dict[str, str]
    creators: dict[str, int]
    version: int
    registry: MacRegistry

    def __call__(self) -> None:
        self.registry._write(self.network, self.macs, self.creators, self.version)


@dataclass(frozen=True)
class Change:
    """A change to one network's entries or owners (a forget, a transfer, an import),
    checked and planned but not made: `write` puts the network's state after it on disk
    (vnetd runs it in a thread: a durable write must not hold up the event loop), and only
    then does `commit` make it the registry's, so a write that fails changes nothing.
    Nothing else may change the network between the two (the engine's lock, and GetMac
    waits: see Vms)."""

    network: str
    macs: dict[str, str]
    creators: dict[str, int]
    version: int
    result: Any
    registry: MacRegistry

    def write(self) -> None:
        self.registry._write(self.network, self.macs, self.creators, self.version)

    def commit(self) -> Any:
        _put(self.registry.data, self.registry.creators, self.network, self.macs,
             self.creators)
        self.registry._changed(self.network)
        return self.result

    def make(self) -> Any:
        """Write and commit, here and now (on the caller's thread)."""
        self.write()
        return self.commit()


class MacRegistry:
    """{network: {"vm/nic": mac}} and {network: {vm: uid}}, persisted a network at a time
    through a save callback after each change."""

    def __init__(self, data: dict[str, dict[str, str]], save: Save, limit: int = DEFAULT_LIMIT,
                 creators: dict[str, dict[str, int]] | None = None,
                 total_limit: int = DEFAULT_TOTAL, per_user: int = DEFAULT_PER_USER):
        self.data = {n: dict(m) for n, m in data.items() if isinstance(m, dict)}
        # (network, mac) -> the VM (or "the gateway") that holds it, in the registry or
        # outside it (the engine's resolver: a port's MAC, a static host's, the gateway's)
        self.holder: Callable[[str, str], str | None] = lambda network, mac: None
        # called with a network whose entries or owners changed (its DNS names follow them)
        self.on_change: Callable[[str], None] = lambda network: None
        self._save = save
        self.limit = limit
        self.total_limit = total_limit
        self.per_user = per_user
        # {network: {vm: uid}}: who first asked for a VM's MAC (its entries count for them)
        self.creators = {n: dict(m) for n, m in (creators or {}).items() if isinstance(m, dict)}
        # while `defer` is above 0, a new entry or owner is only marked here (the attach path,
        # which answers first, and GetMac: vnetd writes the files off its event loop, see
        # `take_dirty`); a count, since an attach holds it across awaits
        self.defer = 0
        self.dirty: set[str] = set()  # networks whose file is to be written
        # every write carries the number of the state it saves; a lock per network orders
        # the writes of its file (from the deferred writer's thread, a change's own thread,
        # the event loop), and an older state of a network is never written over a newer
        # one; writes of different networks do not wait for each other
        self._version = 0
        self._written: dict[str, int] = {}  # network -> the state its file holds
        self._io = threading.Lock()  # (guards _io_of)
        self._io_of: dict[str, threading.Lock] = {}
        self._ix: dict[str, _Index] = {}  # network -> its counts (see _Index)

    def _index(self, network: str) -> _Index:
        ix = self._ix.get(network)
        if ix is None:
            owners = self.creators.get(network, {})
            ix = _Index(names_of=Counter(owners.values()))
            for vm, uid in sorted(owners.items()):
                ix.folded.setdefault(vm.lower(), {}).setdefault(uid, vm)
            for k, mac in self.data.get(network, {}).items():
                vm = split_key(k)[0]
                ix.by_mac.setdefault(mac, k)  # (a hand-edited file may give one MAC twice)
                ix.per_vm[vm] += 1
                ix.of_vm.setdefault(vm, []).append(mac)
                ix.entries_of[owners.get(vm)] += 1
            self._ix[network] = ix
        return ix

    def _changed(self, network: str) -> None:
        """Anything but `get` changed the network's entries or owners: counted again."""
        self._ix.pop(network, None)
        self.on_change(network)

    def _write(self, network: str, macs: dict[str, str], creators: dict[str, int],
               version: int | None = None) -> None:
        if version is None:
            self._version += 1
            version = self._version
        with self._io:
            lock = self._io_of.setdefault(network, threading.Lock())
        with lock:
            if version <= self._written.get(network, 0):
                return  # a newer state is on disk already
            self._save(network, macs, creators)
            self._written[network] = version

    def _store(self, network: str) -> None:
        if self.defer:
            self.dirty.add(network)
        else:
            self._write(network, self.data.get(network, {}), self.creators.get(network, {}))

    def take_dirty(self) -> list[Job]:
        """The deferred writes, one per network changed, each saving a copy of that
        network's state as it is now, and clear the marks: the caller runs them (off the
        event loop: the copies are their own, and a state written meanwhile by a later
        change is not overwritten). Only the networks changed are copied and written."""
        jobs: list[Job] = []
        for network in sorted(self.dirty):
            self._version += 1
            jobs.append(Job(network, dict(self.data.get(network, {})),
                            dict(self.creators.get(network, {})), self._version, self))
        self.dirty.clear()
        return jobs

    def remember(self, network: str, vm: str, uid: int, nic: int = 0,
                 mac: str | None = None) -> None:
        """An adopted port's VM, holder and (if it came from here) registry MAC, from its
        runtime record: put back what a crash right after its attach kept from being
        written. Nothing that is there is changed."""
        if mac is not None:
            macs = self.data.get(network, {})
            k = key(vm, nic)
            ix = self._index(network)
            if k not in macs and mac not in ix.by_mac:
                self.data.setdefault(network, {})[k] = mac
                ix.by_mac[mac] = k  # (kept, not counted again: start-up remembers each port)
                ix.per_vm[vm] += 1
                ix.of_vm.setdefault(vm, []).append(mac)
                ix.entries_of[self.creators.get(network, {}).get(vm)] += 1
                self._store(network)
                self.on_change(network)
        if vm not in self.creators.get(network, {}):
            self._note_creator(network, vm, uid)

    def total(self) -> int:
        return sum(len(m) for m in self.data.values())

    def _check_room(self, network: str, uid: int, vm: str, adding: int = 1) -> None:
        macs = self.data.get(network, {})
        if len(macs) + adding > self.limit:
            raise self._full(network, len(macs), adding)
        if self.total() + adding > self.total_limit:
            raise QuotaExceeded(
                f"The MAC registry holds {self.total()} entries on all networks together, its "
                f"limit of {self.total_limit}; 'vnet-client mac forget NET VM' frees the "
                "entries of VMs that are gone, also on networks undefined since (or ask the "
                "administrator to raise vnetd's --max-macs).")
        if uid == 0 or self.creators.get(network, {}).get(vm, uid) != uid:
            return  # root, or a VM someone else brought in (it counts for them)
        held = self._index(network).entries_of[uid]
        if held + adding > self.per_user:
            raise QuotaExceeded(
                f"uid {uid} has brought {held} MACs into the registry of network {network}, "
                f"the limit of {self.per_user} per user: 'vnet-client mac forget {network} VM' "
                "frees the entries of your VMs that are gone (or ask the administrator to "
                "raise vnetd's --max-macs-per-user).")

    def _note_creator(self, network: str, vm: str, uid: int, store: bool = True) -> None:
        """`uid` owns the VM name if no one does yet; `store`: and the network's file is
        written (or marked), unless the caller does that itself."""
        by_vm = self.creators.setdefault(network, {})
        if vm not in by_vm:
            ix = self._index(network)
            by_vm[vm] = uid
            ix.names_of[uid] += 1
            ix.folded.setdefault(vm.lower(), {}).setdefault(uid, vm)
            moved = ix.per_vm[vm]  # entries of the VM from before it had an owner
            if moved:
                ix.entries_of[None] -= moved
                ix.entries_of[uid] += moved
            if store:
                self._store(network)

    def reclaim(self, network: str, vm: str) -> int | None:
        """Root owns the VM name from now on (a network's pre-created tap's); the uid that
        owned it, if another."""
        before = self.owner_uid(network, vm)
        if before in (None, 0):
            return None
        self.creators[network][vm] = 0
        self._changed(network)
        self._store(network)
        return before

    def owner_uid(self, network: str, vm: str) -> int | None:
        return self.creators.get(network, {}).get(vm)

    def check_owner(self, network: str, vm: str, uid: int) -> None:
        """Refuse `uid` a VM name another uid registered first, also in another case (one
        name in DNS); root may use any."""
        if uid == 0:
            return
        owner = self.owner_uid(network, vm)
        if owner is not None and owner != uid:
            raise NotOwner(
                f"VM '{vm}' on {network} belongs to another user (uid {owner}), who registered "
                "it first: choose another VM name, or ask an administrator to forget it "
                f"('vnet-client mac forget {network} {vm}').")
        if owner is None and network in self.creators:
            variants = self._index(network).folded.get(vm.lower(), {})
            if variants and uid not in variants:
                other, name = next(iter(variants.items()))
                raise NotOwner(
                    f"VM '{vm}' on {network} would share its DNS name with VM '{name}' of "
                    f"another user (uid {other}): names that differ only in case are one "
                    "name in DNS. Choose another VM name.")

    def claim(self, network: str, vm: str, uid: int) -> None:
        """Register `uid` as the owner of a VM name that has none yet (bounded like the MAC
        entries: a user names at most `per_user` VMs per network)."""
        self.check_owner(network, vm, uid)
        if vm in self.creators.get(network, {}):
            return
        if uid != 0 and self._index(network).names_of[uid] >= self.per_user:
            raise QuotaExceeded(
                f"uid {uid} has named {self.per_user} VMs on network {network}, the limit per "
                f"user: 'vnet-client mac forget {network} VM' frees the names of your VMs "
                "that are gone (or ask the administrator to raise vnetd's "
                "--max-macs-per-user).")
        self._note_creator(network, vm, uid)

    def lookup(self, network: str, vm: str, nic: int) -> str | None:
        return self.data.get(network, {}).get(key(vm, nic))

    def _full(self, network: str, held: int, adding: int = 1) -> QuotaExceeded:
        what = ("" if adding == 1 else
                f" and the import would add {adding} new ones, past its limit of {self.limit}")
        return QuotaExceeded(
            f"The MAC registry of network {network} holds {held} entries"
            f"{what or ', its limit'}; 'vnet-client mac forget {network} VM' frees the "
            "entries of a VM that is gone (or ask the administrator to raise vnetd's "
            "--max-macs-per-network).")

    def get(self, network: str, vm: str, nic: int, uid: int = 0) -> str:
        """The MAC of (network, vm, nic), giving one out (and remembering it) if new; a new
        entry counts for `uid` (see the module text)."""
        validate_network_name(network)
        validate_vm_name(vm)
        validate_nic(nic)
        self.check_owner(network, vm, uid)
        k = key(vm, nic)
        macs = self.data.get(network, {})
        if k in macs:
            self._note_creator(network, vm, uid)
            return macs[k]
        self._check_room(network, uid, vm)
        self._note_creator(network, vm, uid, store=False)  # (one write for both, below)
        macs = self.data.setdefault(network, {})
        ix = self._index(network)
        used = ix.by_mac
        attempt = 0
        mac = derive_mac(network, vm, nic)
        # a MAC is derived from a name anyone may choose, so a user could search for a name
        # whose MAC is one a port, a static host or the gateway holds without the registry
        # (given with mac=, or learned): that one is someone else's (this VM's own, say its
        # static host's after a `mac forget`, stays its own)
        while mac in used or self.holder(network, mac) not in (None, vm):
            attempt += 1
            mac = derive_mac(network, vm, nic, attempt)
        macs[k] = mac
        ix.by_mac[mac] = k
        ix.per_vm[vm] += 1
        ix.of_vm.setdefault(vm, []).append(mac)
        ix.entries_of[self.creators[network].get(vm)] += 1
        self._store(network)
        if nic == 0:
            self.on_change(network)
        return mac

    def dns_names(self, network: str) -> dict[str, str]:
        """MAC -> DNS name of each VM's first NIC on the network: the VM's name in lower case,
        where that is a DNS label (letters, digits and '-') and not one clients look up to
        configure themselves (RESERVED_NAMES). A guest's DHCP server gives its lease that
        name, never one the guest asks for, so no guest takes another VM's name. VM names
        that differ only in case are one user's (check_owner); where an administrator made
        others (or an older vnetd let them be), the name goes to the VM named exactly so,
        else to the first in order."""
        best: dict[str, tuple[bool, str, str]] = {}  # name -> (not exact, vm, mac)
        for k, mac in self.data.get(network, {}).items():
            vm, nic = split_key(k)
            name = vm.lower()
            if nic != 0 or name in RESERVED_NAMES or not LABEL_RE.fullmatch(vm):
                continue
            candidate = (vm != name, vm, mac)
            if name not in best or candidate < best[name]:
                best[name] = candidate
        return {mac: name for name, (_, _, mac) in best.items()}

    def macs_of(self, network: str, vm: str) -> list[str]:
        """The VM's MACs on the network (every NIC's), without a walk over the others."""
        return list(self._index(network).of_vm.get(vm, ()))

    def owner_of(self, network: str, mac: str) -> str | None:
        return self._index(network).by_mac.get(mac)

    def _plan(self, network: str, macs: dict[str, str], creators: dict[str, int],
              result: Any) -> Change:
        """A change to be written as the network's state `macs` and `creators`. Its state
        number is taken now: a deferred write of an older state (taken before) never
        lands over it."""
        self._version += 1
        return Change(network, macs, creators, self._version, result, self)

    def import_macs(self, network: str, entries: dict[str, str]) -> int:
        """Take in 'vm' (NIC 0) or 'vm/nic' -> mac entries; all or nothing."""
        return self.plan_import(network, entries).make()

    def plan_import(self, network: str, entries: dict[str, str]) -> Change:
        """import_macs, checked and planned (see Change): how many entries it takes in."""
        validate_network_name(network)
        macs = dict(self.data.get(network, {}))
        holders = {m: k for k, m in macs.items()}
        seen: dict[str, str] = {}  # mac -> key
        rows: dict[str, str] = {}  # key -> mac
        for text, mac in entries.items():
            k = key(*parse_key(text))
            mac = validate_mac(mac)
            if k in rows:
                raise InvalidArgument(f"VM '{k.rsplit('/', 1)[0]}' NIC {k.rsplit('/', 1)[1]} "
                                      "is given twice.")
            if mac in seen:
                raise Exists(f"The MAC {mac} is given twice, to '{seen[mac]}' and '{k}'.")
            seen[mac] = k
            holder = holders.get(mac)
            if holder is not None and holder != k:
                raise Exists(f"The MAC {mac} already belongs to '{holder}' on {network}.")
            rows[k] = mac
        new = sum(1 for k in rows if k not in macs)
        if new and len(macs) + new > self.limit:
            raise self._full(network, len(macs), new)
        if new and self.total() + new > self.total_limit:
            self._check_room(network, 0, "", new)  # raises: the whole registry is full
        macs.update(rows)
        return self._plan(network, macs, dict(self.creators.get(network, {})), len(rows))

    def export(self, network: str, uid: int | None = None) -> dict[str, str]:
        """The network's entries, 'vm/nic' -> mac: what import_macs takes back; with `uid`,
        only those of the VMs that uid registered."""
        return dict(sorted(self._entries(network, uid)))

    def _entries(self, network: str, uid: int | None) -> list[tuple[str, str]]:
        macs = self.data.get(network, {}).items()
        if uid is None:
            return list(macs)
        mine = self.creators.get(network, {})
        return [(k, mac) for k, mac in macs if mine.get(split_key(k)[0]) == uid]

    def forget(self, network: str, vm: str) -> int:
        """Drop every NIC entry of a VM on a network; how many there were."""
        return self.plan_forget(network, vm).make()

    def plan_forget(self, network: str, vm: str) -> Change:
        """forget, checked and planned (see Change)."""
        validate_network_name(network)
        validate_vm_name(vm)
        macs = self.data.get(network, {})
        gone = [k for k in macs if split_key(k)[0] == vm]
        if not gone:
            raise NotFound(f"VM '{vm}' has no MAC in the registry of network {network}.")
        kept = {k: m for k, m in macs.items() if k not in gone}
        owners = {v: u for v, u in self.creators.get(network, {}).items() if v != vm}
        return self._plan(network, kept, owners, len(gone))

    def transfer(self, network: str, vm: str, uid: int) -> int | None:
        """Make `uid` the owner of a VM name (its MACs go with it); the owner it had (None:
        it had none). A VM vnetd knows nothing of on that network is NotFound."""
        return self.plan_transfer(network, vm, uid).make()

    def plan_transfer(self, network: str, vm: str, uid: int) -> Change:
        """transfer, checked and planned (see Change)."""
        validate_network_name(network)
        validate_vm_name(vm)
        before = self.owner_uid(network, vm)
        has_macs = self._index(network).per_vm[vm] > 0
        if before is None and not has_macs:
            raise NotFound(f"VM '{vm}' is not known on network {network}: it has neither an "
                           "owner nor a MAC in the registry.")
        owners = {**self.creators.get(network, {}), vm: uid}
        return self._plan(network, dict(self.data.get(network, {})), owners, before)

    def export_ether_conf(self, network: str, uid: int | None = None) -> str:
        """qemu-vlan's ether.conf: ether_<i>=MAC. VMs named <network>_<i> (the original's tap
        names, which is what an import creates) keep their index; others follow. With `uid`,
        only the VMs that uid registered."""
        indexed: dict[int, tuple[str, str]] = {}
        rest: list[tuple[str, str]] = []
        prefix = f"{network}_"
        for k, mac in sorted(self._entries(network, uid)):
            vm, nic = split_key(k)
            if nic == 0 and vm.startswith(prefix) and vm[len(prefix):].isdigit():
                indexed[int(vm[len(prefix):])] = (k, mac)
            else:
                rest.append((k, mac))
        nxt = max(indexed, default=0) + 1
        for k, mac in rest:
            indexed[nxt] = (k, mac)
            nxt += 1
        lines = [f"# ether.conf for {network}, written by qemu-vnet"]
        for i in sorted(indexed):
            k, mac = indexed[i]
            vm, nic = split_key(k)
            note = "" if vm == f"{prefix}{i}" and nic == 0 else f"  # vm {vm} nic {nic}"
            lines.append(f"ether_{i}={mac}{note}")
        return "\n".join(lines) + "\n"


def valid_creators(data: Any) -> bool:
    """{network: {vm: uid}}"""
    return isinstance(data, dict) and all(
        isinstance(n, str) and isinstance(m, dict)
        and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in m.items())
        for n, m in data.items())


def valid(data: Any) -> bool:
    """{network: {"vm/nic": mac}}: the registry's shape, checked before it is trusted."""
    return isinstance(data, dict) and all(
        isinstance(n, str) and isinstance(m, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
        for n, m in data.items())


def valid_file(data: Any) -> bool:
    """A network's file: {"macs": {"vm/nic": mac}, "creators": {vm: uid}}."""
    return (isinstance(data, dict) and set(data) <= {"macs", "creators"}
            and valid({"": data.get("macs", {})})
            and valid_creators({"": data.get("creators", {})}))


def file_name(network: str) -> str:
    return network + SUFFIX


def saver(store) -> Save:
    """save(network, entries, owners) into `store`'s state directory (vnetd.store.Store):
    the network's file, written atomically and durably; removed once it holds nothing."""
    def save(network: str, macs: dict[str, str], creators: dict[str, int]) -> None:
        if macs or creators:
            store.save_json(file_name(network), {"macs": macs, "creators": creators})
        else:
            store.remove_json(file_name(network))
    return save


def load(store) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, int]]]:
    """The registry's entries and owners from `store`'s state directory. A file that is
    damaged is replaced by its last good copy (Store.load_json). The single files of
    earlier versions, if any, are split into one file per network first (the networks they
    hold take their entries from them: a crash may have come in the middle of a split), and
    removed once every network's file is written."""
    data: dict[str, dict[str, str]] = {}
    creators: dict[str, dict[str, int]] = {}
    names = set()
    for entry in os.scandir(store.state_dir):
        for suffix in (SUFFIX, SUFFIX + ".prev"):  # (a file gone with its copy left)
            if entry.name.endswith(suffix) and len(entry.name) > len(suffix):
                names.add(entry.name[:-len(suffix)])
    for network in sorted(names):
        try:
            validate_network_name(network)
        except VnetError:
            log.warning("MAC registry: ignoring %s: '%s' is no network name",
                        file_name(network), network)
            continue
        d = store.load_json(file_name(network), None, valid=valid_file)
        if d:
            _put(data, creators, network, d.get("macs", {}), d.get("creators", {}))
    legacy = store.load_json(LEGACY, None, valid=valid)
    legacy_creators = store.load_json(LEGACY_CREATORS, None, valid=valid_creators)
    if legacy is None and legacy_creators is None:
        return data, creators
    save = saver(store)
    moved = 0
    for network in sorted(set(legacy or {}) | set(legacy_creators or {})):
        try:
            validate_network_name(network)
        except VnetError:
            log.warning("MAC registry: dropping the entries of '%s' in %s: no network name",
                        network, LEGACY)
            continue
        # an old file that is there holds all of its part; one that is gone was removed by
        # a split cut short after it had written every network's file, which then holds it
        macs = (legacy.get(network, {}) if legacy is not None
                else data.get(network, {}))
        owners = (legacy_creators.get(network, {}) if legacy_creators is not None
                  else creators.get(network, {}))
        save(network, macs, owners)
        _put(data, creators, network, macs, owners)
        moved += 1
    store.remove_json(LEGACY)  # (only once every network's own file is written)
    store.remove_json(LEGACY_CREATORS)
    log.info("MAC registry: split %s and %s into a file per network (%d networks)", LEGACY,
             LEGACY_CREATORS, moved)
    return data, creators


def _put(data: dict[str, dict[str, str]], creators: dict[str, dict[str, int]],
         network: str, macs: dict[str, str], owners: dict[str, int]) -> None:
    """A network's entries and owners, as held in memory (no empty map is kept)."""
    if macs:
        data[network] = dict(macs)
    else:
        data.pop(network, None)
    if owners:
        creators[network] = dict(owners)
    else:
        creators.pop(network, None)
