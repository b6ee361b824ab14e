"""Network definitions: defining, redefining, undefining and reloading them, each checked
against this host (names, subnets, VNI, taps, the driver's checks, forwards and quotas), and a
running network's live settings applied all at once or not at all.

What a new definition means for a running network (live settings, settings refused while it
runs) is revise.py's, pure; this applies it: each subsystem it concerns takes the new record
(`_apply_live`), the files follow (`_save_revision`), and any failure puts back what ran
(`_undo_live`). The engine keeps the lock, the definitions in force (`Engine.defs`,
`Engine._put`) and the quotas.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import model, revise
from .errors import Busy, Exists, Failed, InvalidArgument, VnetError
from .model import Network
from .networks import Running, driver_for, vxlan
from .operations import Operations

if TYPE_CHECKING:
    pass

log = logging.getLogger("vnetd")


def _bare(f: model.Forward) -> model.Forward:
    """A forward without its owner: the same forward whoever wrote it down."""
    return dataclasses.replace(f, owner=0)


def _refuse_restart_only(name: str, keys: builtins.list[str]) -> None:
    """A running network's links are what its mode, subnets, MTU, taps, VDE switches, uplink
    and overlay device make them, and its live settings are checked against them: those
    change only while it is stopped, never under running guests."""
    if keys:
        raise Busy(f"The network '{name}' is running, and {', '.join(keys)} can change only "
                   f"while it is stopped: stop it (vnet-client stop {name}), make the change, "
                   "and start it again; or leave that as it is.")


def _owned_as_before(old: Network, new: Network, uid: int) -> Network:
    """A new definition keeps its network's owner and the owners of the forwards it keeps;
    the forwards it adds belong to `uid`, who wrote them."""
    owners = {_bare(f): f.owner for f in old.forwards}
    return new.with_changes(owner=old.owner, forwards=tuple(
        dataclasses.replace(f, owner=owners.get(_bare(f), uid)) for f in new.forwards))


class Definitions(Operations):
    """Every network's definition as callers change it (`engine.definitions`)."""

    async def check_new_name(self, name: str) -> None:
        """Refuse a name already defined or taken by an interface vnetd did not make."""
        if name in self.engine.defs:
            raise Exists(f"A network named '{name}' is already defined.")
        if await self.links.get(name) is not None:
            raise Exists(
                f"An interface named '{name}' already exists on this host and was not "
                "made by qemu-vnet; choose another network name."
            )

    async def define(self, net: Network, uid: int = 0, dry_run: bool = False) -> Network:
        """Define a network owned by `uid` (its inline forwards too), within uid's limits;
        with `dry_run`, only check all that and change nothing."""
        net = net.with_changes(owner=uid, forwards=tuple(
            dataclasses.replace(f, owner=uid) for f in net.forwards))
        async with self.engine.lock:
            await self.check_new_name(net.name)
            self.engine.check_network_quota(uid)
            await self._verify(net, uid)
            if dry_run:
                return net
            self.store.save(net)
            try:
                for f in net.forwards:  # kept one per file, as AddForward keeps them
                    self.store.save_forward(net.name, f)
            except OSError:
                self.store.delete(net.name)
                raise
            self.engine._put(net)
            for f in net.forwards:
                self.engine.forwards.index.add(net.name, f)
        self.engine._changed(net.name, "defined")
        return net

    async def _verify(self, net: Network, uid: int, old: Network | None = None) -> None:
        """Everything a definition must meet on this host beside its own options, for a new
        network or (`old`) a new definition of one: the caller's forward limit, its taps'
        names, its subnets and VNI against the other networks and the host, its driver's
        checks (the uplink of a bridged network), and its forwards against every other."""
        mine = {_bare(f) for f in old.forwards} if old is not None else set()
        self.engine.check_forward_quota(uid, sum(1 for f in net.forwards
                                                 if f.owner == uid and _bare(f) not in mine))
        known = set(old.tap_names) if old is not None else set()
        for tname in net.tap_names:
            if tname not in known and await self.links.get(tname) is not None:
                raise Exists(f"An interface named '{tname}' already exists on this host.")
        await self.check_subnets(net)
        self._check_vni(net)
        await driver_for(net).verify(self.ctx, net)
        for f in net.forwards:
            if old is not None and _bare(f) not in mine and not self.resolver.knows_vm(
                    net, f.target):  # as 'forward add' checks a new forward
                raise InvalidArgument(
                    f"'{f.target}' is neither an address nor a known VM on {net.name} (an "
                    "unknown VM name): give it a static host or attach it once first.")
            clash = self.engine.forwards.index.clash(f, skip=net.name)
            if clash is not None:
                raise Exists(f"{f.proto} {f.external} is already forwarded to "
                             f"'{clash[1].target}' ({clash[1].describe()}) on network "
                             f"'{clash[0]}'.")

    def _check_vni(self, net: Network) -> None:
        if net.overlay is None:
            return
        for other in self.engine.defs.values():
            if other.name != net.name and other.overlay and other.overlay.vni == net.overlay.vni:
                raise Exists(f"The VNI {net.overlay.vni} already belongs to network "
                             f"'{other.name}' on this host: one network per VNI.")

    async def check_subnets(self, net: Network, ignore: str | None = None) -> None:
        if net.mode == "bridged":
            return  # no subnet of its own
        for other in self.engine.defs.values():
            if other.name in (net.name, ignore) or other.mode == "bridged":
                continue
            for a, b in ((net.subnet, other.subnet), (net.subnet6, other.subnet6)):
                if a is not None and b is not None and model.overlapping(a, b):
                    raise InvalidArgument(
                        f"The subnet {a} overlaps {b} of network '{other.name}'."
                    )
        ours = {n for n in self.engine.running}
        for mine in (net.subnet, net.subnet6):
            if mine is None:
                continue
            for index, iface in await self.links.overlapping(mine):
                if iface.is_loopback:
                    continue
                lk = await self.links.get(index=index)
                if lk is not None and model.network_of_alias(lk.alias) in ours:
                    continue
                raise InvalidArgument(
                    f"The subnet {mine} overlaps {iface} already on interface "
                    f"'{lk.ifname if lk else index}' of this host."
                )

    async def undefine(self, name: str) -> None:
        await self.engine._adopted(name)
        async with self.engine.lock:
            self.engine.get(name)
            if name in self.engine.running:
                raise Busy(f"The network '{name}' is running: stop it first.")
            await self.ports.remove_network_ports(name)  # ports that waited for it
            self.store.delete(name)
            for f in self.engine.defs[name].forwards:
                self.engine.forwards.index.remove(name, f)
            del self.engine.defs[name]
            self.dhcp.forget(name)  # its runtime and state directories, old leases too
        self.engine._changed(name, "undefined")

    async def set_autostart(self, name: str, enabled: bool) -> Network:
        async with self.engine.lock:
            net = self.engine.get(name).with_changes(autostart=bool(enabled))
            self.store.save(net)
            self.engine._put(net)
        return net

    async def redefine(self, net: Network, uid: int = 0, dry_run: bool = False,
                       may_drop: Callable[[model.Forward], None] | None = None
                       ) -> tuple[Network, builtins.list[str]]:
        """A new definition of a defined network (vnet-client edit), checked as define
        checks one. A running network takes its live settings at once, all of them or none
        (a failure puts back what ran); a setting only a restart applies is refused while it
        runs (revise.py). `may_drop` raises for a forward the caller may not remove. Returns
        the definition and what it means, a sentence each."""
        await self.engine._adopted()  # its live change loads the whole ruleset
        async with self.engine.lock:
            old = self.engine.get(net.name)
            net = _owned_as_before(old, net, uid)
            kept = {_bare(f) for f in net.forwards}
            for f in old.forwards:
                if may_drop is not None and _bare(f) not in kept:
                    may_drop(f)
            await self._verify(net, uid, old)
            run = self.engine.running.get(net.name)
            if run is not None:
                _refuse_restart_only(net.name, revise.waits(run.net, net))
            said = revise.notes(net.name, run.net if run else None, old, net)
            if dry_run or not revise.changed(old, net):
                return net, said
            await self._revise(old, net, save=True)
        self.engine._changed(net.name, "redefined")
        return net, said

    async def _revise(self, old: Network, net: Network, save: bool) -> None:
        """Put `net` in the place of `old`: live on the running network first, then in its
        files (`save`; a reload read them), then in memory; any failure undoes the rest."""
        run = self.engine.running.get(net.name)
        before = run.net if run is not None else None
        if run is not None and before is not None:
            try:
                await self._apply_live(run, revise.Plan(before, revise.in_force(before, net)))
            except BaseException:
                await self._undo_live(run, before)
                raise
        if save:
            try:
                self._save_revision(old, net)
            except OSError as e:
                self._save_revision(net, old, quiet=True)
                if run is not None and before is not None:
                    await self._undo_live(run, before)
                raise Failed(f"Cannot write the definition of '{net.name}': "
                             f"{e.strerror or e}; the previous one stays in force.") from None
        self.engine._put(net)
        self.engine.forwards.reindex()

    async def _apply_live(self, run: Running, plan: revise.Plan) -> None:
        """Each subsystem that a changed live setting concerns takes the new record."""
        run.net = plan.new
        if plan.dhcp:
            await self.dhcp.apply(run)  # replaced; its leases stay in their file
        elif plan.hosts:
            await self.dhcp.apply_hosts(plan.new)
        added, removed = plan.peers
        ov = plan.new.overlay
        if ov is not None and (added or removed):
            if ov.control == "static":
                for peer in sorted(added):
                    await vxlan.flood(self.ctx, plan.new, peer, True)
                for peer in sorted(removed):
                    await vxlan.flood(self.ctx, plan.new, peer, False)
            else:
                await self.evpn.apply(run)
        if plan.firewall:
            await self.firewall.sync()  # one transaction: all of it, or none
            if plan.fields & revise.HOSTS:
                await self.firewall.leases_changed(run.name)

    async def _undo_live(self, run: Running, before: Network) -> None:
        """Back to the record that ran (best effort: the log says what could not be)."""
        try:
            await self._apply_live(run, revise.Plan(run.net, before))
        except Exception as e:  # the first failure is the one the caller hears of
            log.error("%s: putting back its previous definition: %s", run.name,
                      e.message if isinstance(e, VnetError) else e)
        finally:
            run.net = before

    def _save_revision(self, old: Network, net: Network, quiet: bool = False) -> None:
        """The definition file and the forwards' files, from `old`'s to `net`'s."""
        try:
            self.store.save(net)
            kept = {_bare(f) for f in net.forwards}
            had = {_bare(f) for f in old.forwards}
            for f in old.forwards:
                if _bare(f) not in kept:
                    self.store.delete_forward(net.name, f)
            for f in net.forwards:
                if _bare(f) not in had:
                    self.store.save_forward(net.name, f)
        except OSError:
            if not quiet:
                raise
            log.error("%s: cannot put its previous definition files back", net.name)

    async def reload(self) -> builtins.list[str]:
        """Re-read the definition files an admin may have edited by hand. Each changed file
        is checked as define checks one and applied as `redefine` applies one; a file that
        fails keeps the previous definition in force, and says why."""
        await self.engine._adopted()
        async with self.engine.lock:
            defs, problems = self.store.load_all()
            for name in list(self.engine.defs):
                if name not in defs and name in self.engine.running:
                    problems.append(f"{name}: its file is gone but it is running: kept until "
                                    "stopped.")
                    defs[name] = self.engine.defs[name]
            changed = []
            for name in [n for n in self.engine.defs if n not in defs]:
                del self.engine.defs[name]
                changed.append(name)
            self.engine.forwards.reindex()
            for name, new in sorted(defs.items()):
                old = self.engine.defs.get(name)
                if old == new:
                    continue
                try:
                    await self._verify(new, new.owner, old)
                    if old is None:
                        self.engine._put(new)
                    else:
                        run = self.engine.running.get(name)
                        if run is not None:
                            _refuse_restart_only(name, revise.waits(run.net, new))
                        await self._revise(old, new, save=False)
                except VnetError as e:
                    problems.append(f"{name}: {e.message} "
                                    + ("The previous definition stays in force; fix the file "
                                       "and reload." if old is not None else
                                       "Not defined; fix the file and reload."))
                    continue
                self.engine.forwards.reindex()
                changed.append(name)
            self.engine.problems[:] = problems
            try:  # also gives back what an FRR restart lost
                await self.evpn.sync()
            except VnetError as e:
                problems.append(f"evpn (reload): {e.message}")
                log.error("evpn (reload): %s", e.message)
            await self.firewall.sync()  # also re-checks a DOCKER-USER chain
        for name in changed:
            self.engine._changed(name, "reloaded" if name in self.engine.defs else "undefined")
        return problems
