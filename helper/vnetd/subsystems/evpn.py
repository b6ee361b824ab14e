"""BGP EVPN through FRR: vnetd renders one configuration fragment for all of this host's
EVPN networks and applies it with FRR's own tool (vtysh). FRR itself (zebra and bgpd) is
started by the system, not by vnetd; vnetd checks that it is there and says so when not.

The fragment (render/frr.py) is the iBGP instance with `address-family l2vpn evpn`,
`advertise-all-vni` and the networks' peers as neighbours; zebra learns the VNIs from the
kernel's VXLAN devices on our bridges. The applied fragment is kept in the runtime directory:
a change removes what is no longer wanted and sends the whole fragment again. vnetd removes
the `router bgp` instance only if it made it; in an instance the admin made, it touches only
its own neighbours and advertise-all-vni.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import Busy, Failed, NotRunning
from ..model import Network
from ..render import frr
from ..store import atomic_write

if TYPE_CHECKING:
    from ..networks import Running

log = logging.getLogger("vnetd.evpn")


class Evpn:
    def __init__(self, runtime_dir: Path, pathspace: str | None = None):
        self.path = Path(runtime_dir) / "frr-evpn.conf"  # for people: what FRR was given
        self.state = Path(runtime_dir) / "frr-evpn.json"  # for vnetd: what to diff against
        self.pathspace = pathspace
        self.lock = asyncio.Lock()
        self.nets: dict[str, Network] = {}  # the running EVPN networks, by name

    # --- the subsystem protocol (subsystems/__init__.py) -----------------------------------------
    name = "evpn"

    @staticmethod
    def concerns(net: Network) -> bool:
        return net.overlay is not None and net.overlay.control == "evpn"

    async def apply(self, run: Running) -> None:
        """FRR advertises the network's VNI (and peers with its peers); on failure FRR
        keeps what it had and so does this record."""
        if not self.concerns(run.net):
            return await self.remove(run.name)
        before = self.nets.get(run.name)
        self.nets[run.name] = run.net
        try:
            await self.push()
        except BaseException:
            if before is None:
                self.nets.pop(run.name, None)
            else:
                self.nets[run.name] = before
            raise

    async def remove(self, name: str) -> None:
        if self.nets.pop(name, None) is not None:
            await self.push()

    async def adopt(self, run: Running) -> None:
        if self.concerns(run.net):
            self.nets[run.name] = run.net

    async def sync(self) -> None:
        """Also gives FRR back what a restart of its own lost."""
        await self.push()

    async def status(self, name: str) -> dict | None:
        """What bgpd says of its EVPN peers, for `show`."""
        if name not in self.nets:
            return None
        try:
            text = await self._run("-c", "show bgp l2vpn evpn summary json", timeout=5)
        except (Failed, NotRunning) as e:
            return {"frr": f"unreachable: {e.message}"}
        return frr.parse_summary(text)

    async def push(self) -> None:
        await self.apply_networks([n for _, n in sorted(self.nets.items())])

    def _vtysh(self) -> list[str]:
        argv = [frr.VTYSH]
        if self.pathspace:
            argv += ["-N", self.pathspace]
        return argv

    async def _run(self, *args: str, timeout: float = 20) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._vtysh(), *args, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            raise NotRunning("FRR is not installed (no vtysh): EVPN needs FRR's zebra and "
                             "bgpd (apt install frr; bgpd=yes in /etc/frr/daemons).") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise Failed("vtysh did not answer in time.") from None
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            why = (text + err.decode(errors="replace")).strip()
            raise Failed(f"vtysh failed ({proc.returncode}): {why[:300]}")
        return text

    async def check(self) -> None:
        """zebra and bgpd must be running (FRR is the system's, not ours)."""
        try:
            text = await self._run("-c", "show daemons", timeout=5)
        except Failed as e:
            raise NotRunning(f"FRR is not running here (vtysh cannot reach it: {e.message}): "
                             "start it with zebra and bgpd (bgpd=yes in /etc/frr/daemons, "
                             "then 'systemctl restart frr').") from None
        running = set(text.split())
        missing = [d for d in ("zebra", "bgpd") if d not in running]
        if missing:
            raise NotRunning(f"FRR runs without {' and '.join(missing)}: EVPN needs both "
                             "(set bgpd=yes in /etc/frr/daemons and restart FRR).")

    def applied(self) -> frr.Fragment | None:
        try:
            return frr.Fragment.parse(self.state.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def apply_networks(self, networks: list[Network]) -> None:
        """Make FRR hold exactly the fragment for `networks` (all running EVPN networks).
        The whole fragment is sent each time (idempotent: no session resets), so FRR gets it
        back after a restart of its own."""
        async with self.lock:
            want = frr.fragment(networks)
            have = self.applied()
            if want is None and have is None:
                return
            if want is not None:
                await self.check()
                want = await self._ownership(have, want)
            commands = frr.diff(have, want)
            args: list[str] = []
            for c in ["configure terminal", *commands]:
                args += ["-c", c]
            try:
                await self._run(*args)
            except NotRunning:
                if want is not None:
                    raise
            except Failed:
                self._save(frr.merged(have, want))  # a later removal covers what was sent
                raise
            self._save(want)
            log.info("evpn: FRR configuration applied (%d command(s))", len(commands))

    async def _ownership(self, have: frr.Fragment | None, want: frr.Fragment) -> frr.Fragment:
        """vnetd owns the BGP instance only if it made it. An admin's own `router bgp` (an
        underlay's BGP, say) in the same AS is shared: vnetd then adds and removes only its
        neighbours and advertise-all-vni, never the instance or its router id."""
        if have is not None and have.asn == want.asn:
            return replace(want, owned=have.owned)
        existing = frr.instances(await self._run("-c", "show running-config", timeout=10))
        mine = have.asn if have is not None and have.owned else None
        others = [a for a in existing if a != mine]
        if others and others != [want.asn]:
            raise Busy(f"FRR already runs BGP as AS {others[0]}, and FRR allows one BGP "
                       f"instance: define the EVPN networks with --asn {others[0]}.")
        return replace(want, owned=not others)

    def _save(self, fragment: frr.Fragment | None) -> None:
        if fragment is None:
            self.path.unlink(missing_ok=True)
            self.state.unlink(missing_ok=True)
        else:
            atomic_write(self.path, fragment.render().encode())
            atomic_write(self.state, fragment.dumps().encode())
