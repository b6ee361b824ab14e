"""BGP EVPN through FRR: vnetd renders one configuration fragment for all of this host's
EVPN networks and applies it with FRR's own tool (vtysh). FRR itself (zebra and bgpd) is
started by the system, not by vnetd; vnetd checks that it is there and says so when not.

The fragment (backends/frr.py) is the iBGP instance with `address-family l2vpn evpn`,
`advertise-all-vni` and the networks' peers as neighbours; zebra learns the VNIs from the
kernel's VXLAN devices on our bridges. Only what vnetd applied is ever removed: the applied
fragment is kept in the runtime directory, and a change sends FRR the difference.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from .backends import frr
from .errors import Failed, NotRunning
from .model import Network
from .store import atomic_write

log = logging.getLogger("vnetd.evpn")


class Evpn:
    def __init__(self, runtime_dir: Path, pathspace: str | None = None):
        self.path = Path(runtime_dir) / "frr-evpn.conf"  # for people: what FRR was given
        self.state = Path(runtime_dir) / "frr-evpn.json"  # for vnetd: what to diff against
        self.pathspace = pathspace
        self.lock = asyncio.Lock()

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

    async def apply(self, networks: list[Network]) -> None:
        """Make FRR hold exactly the fragment for `networks` (all running EVPN networks)."""
        async with self.lock:
            want = frr.fragment(networks)
            have = self.applied()
            if want == have:
                return
            if want is not None:
                await self.check()
            commands = frr.diff(have, want)
            if commands:
                args: list[str] = []
                for c in ["configure terminal", *commands]:
                    args += ["-c", c]
                try:
                    await self._run(*args)
                except NotRunning:
                    if want is not None:
                        raise
            if want is None:
                self.path.unlink(missing_ok=True)
                self.state.unlink(missing_ok=True)
            else:
                atomic_write(self.path, want.render().encode())
                atomic_write(self.state, want.dumps().encode())
            log.info("evpn: FRR configuration applied (%d command(s))", len(commands))

    async def status(self) -> dict:
        """What bgpd says of its EVPN peers, for `show`."""
        try:
            text = await self._run("-c", "show bgp l2vpn evpn summary json", timeout=5)
        except (Failed, NotRunning) as e:
            return {"frr": f"unreachable: {e.message}"}
        return frr.parse_summary(text)

