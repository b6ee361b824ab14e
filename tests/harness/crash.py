"""Helpers for the crash-consistency test (tests/system/test_crash.py).

- `Driver`: a long-lived client process (root, or a test user) that makes raw D-Bus calls to
  vnetd *without* the client library's retry-on-restart, so that the test knows exactly whether
  a call was answered. It prints a `sent` mark the moment a call is on the bus (the test kills
  vnetd a measured, random delay after it), then the reply or the error. Tap fds from Attach
  stay open in the driver (it is the port's holder) until the test says `close`.
- `Reaper`: makes the test process a child subreaper and reaps the DHCP servers a SIGKILLed
  vnetd leaves behind once they exit. On a real host init (systemd) reaps them at once; the
  PID 1 of these test containers reaps orphans only every second or two, and a replaced server
  would otherwise look alive (a zombie) to the restarted vnetd for that long.
- Readers for what the kernel holds in the daemon's namespace: links, addresses, our nft sets
  and maps, the DHCP server processes.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .users import read_line, spawn_as

PR_SET_CHILD_SUBREAPER = 36


class Reaper:
    """Reap orphaned dnsmasq/dhcpd processes re-parented to this (subreaper) process."""

    NAMES = ("dnsmasq", "dhcpd")

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._libc = ctypes.CDLL(None, use_errno=True)

    def __enter__(self) -> Reaper:
        if self._libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return self  # not fatal: restarts are only slower
        self._thread = threading.Thread(target=self._run, name="crash-reaper", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            self._libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
            deadline = time.monotonic() + 1
            while self.reap_once() and time.monotonic() < deadline:
                time.sleep(0.01)  # servers the daemon fixture just killed are dying

    def _run(self) -> None:
        while not self._stop.is_set():
            self.reap_once()
            time.sleep(0.003)

    def reap_once(self) -> int:
        """Reap the dead ones; return how many of our DHCP-server children are left."""
        me = os.getpid()
        left = 0
        try:
            tids = os.listdir(f"/proc/{me}/task")
        except OSError:
            return 0
        for tid in tids:
            try:
                kids = Path(f"/proc/{me}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for kid in kids:
                try:
                    stat = Path(f"/proc/{kid}/stat").read_text()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                state = stat[stat.rindex(")") + 2:].split()[0]
                if comm not in self.NAMES:
                    continue
                left += 1
                if state == "Z":
                    try:
                        os.waitpid(int(kid), os.WNOHANG)
                    except ChildProcessError:
                        pass
        return left


DRIVER = r"""
from dbus_fast import Message, MessageType
from dbus_fast.signature import SignatureTree
from vnet_client.api import BUS_NAME, MANAGER, MANAGER_PATH, asv, plain

held = {}  # ifname -> tap fds: this process is the holder of the ports it attached

async def main():
    c = await Client().connect()
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": os.getpid(), "name": c.bus.unique_name}), flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        if cmd["op"] == "close":
            for fd in held.pop(cmd["ifname"], []):
                os.close(fd)
            print(json.dumps({"closed": cmd["ifname"]}), flush=True)
            continue
        if cmd["op"] == "held":
            print(json.dumps({"held": sorted(held)}), flush=True)
            continue
        types = [t.signature for t in SignatureTree(cmd["sig"]).types]
        body = [asv(a) if t == "a{sv}" else a for t, a in zip(types, cmd["args"])]
        msg = Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER,
                      member=cmd["member"], signature=cmd["sig"], body=body)
        fut = asyncio.ensure_future(c.bus.call(msg))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if cmd.get("mark"):
            print(json.dumps({"sent": True}), flush=True)
        try:
            reply = await fut
        except Exception as e:
            print(json.dumps({"error": "driver." + type(e).__name__, "message": str(e)}),
                  flush=True)
            continue
        if reply.message_type == MessageType.ERROR:
            for fd in reply.unix_fds:
                os.close(fd)
            print(json.dumps({"error": reply.error_name,
                              "message": str(reply.body[0]) if reply.body else ""}), flush=True)
            continue
        out = [plain(b) for b in reply.body]
        if cmd["member"] == "Attach":
            fds = [reply.unix_fds[i] for i in out[1] + out[2]]
            held[out[0]["ifname"]] = fds
        else:
            for fd in reply.unix_fds:
                os.close(fd)
        print(json.dumps({"ok": out}, default=str), flush=True)

asyncio.run(main())
"""


class DriverError(AssertionError):
    pass


class CallLost(DriverError):
    """A call got no answer at all (neither a reply nor an error from the bus) in time."""


ANSWER_TIMEOUT = 20  # seconds; vnetd answers every call here in well under one


class Driver:
    """One client connection to the system bus, in its own process, as `user`."""

    def __init__(self, user: str | None):
        self.user = user
        self.proc = spawn_as(user, DRIVER)
        first = self._read(20)
        if "ready" not in first:
            raise DriverError(f"driver did not start: {first}")
        self.pid = first["ready"]
        self.name = first.get("name", "")

    def _read(self, timeout: float = 60) -> dict[str, Any]:
        line = read_line(self.proc, timeout)
        if line is None:
            raise CallLost(f"driver ({self.user or 'root'}) gave no answer in {timeout} s")
        if not line:
            raise DriverError(f"driver ({self.user or 'root'}) ended: {self.proc.stderr.read()}")
        return json.loads(line)

    def _send(self, cmd: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def call(self, member: str, sig: str, *args: Any,
             timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        """{'ok': [out args]} or {'error': name, 'message': sentence}."""
        self._send({"op": "call", "member": member, "sig": sig, "args": list(args)})
        return self._read(timeout)

    def ok(self, member: str, sig: str, *args: Any) -> Any:
        r = self.call(member, sig, *args)
        if "ok" not in r:
            raise DriverError(f"{member}{tuple(args)} failed: {r}")
        out = r["ok"]
        return out[0] if len(out) == 1 else (out or None)

    def begin(self, member: str, sig: str, *args: Any) -> None:
        """Send a call and return once it is on the bus; `finish` reads its outcome."""
        self._send({"op": "call", "member": member, "sig": sig, "args": list(args),
                    "mark": True})
        r = self._read(30)
        if "sent" not in r:
            raise DriverError(f"expected the sent mark, got {r}")

    def finish(self, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        return self._read(timeout)

    def close_port(self, ifname: str) -> None:
        self._send({"op": "close", "ifname": ifname})
        self._read()

    def held(self) -> list[str]:
        self._send({"op": "held"})
        return self._read()["held"]

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- what the kernel holds --------------------------------------------------------------------
def nft_sets(vnetd) -> dict[tuple[str, str], list]:
    """{(family, name): elements} of every set and map of our two tables."""
    r = vnetd.exec("nft", "-j", "list", "ruleset", check=False)
    if r.returncode != 0:
        raise AssertionError(f"nft list ruleset failed: {r.stderr}")
    out: dict[tuple[str, str], list] = {}
    for obj in json.loads(r.stdout)["nftables"]:
        for kind in ("set", "map"):
            body = obj.get(kind)
            if body is not None and body.get("table") == "qemu_vnet":
                out[(body["family"], body["name"])] = body.get("elem", [])
    return out


def tables(vnetd) -> set[tuple[str, str]]:
    r = vnetd.exec("nft", "-j", "list", "tables")
    return {(o["table"]["family"], o["table"]["name"])
            for o in json.loads(r.stdout)["nftables"] if "table" in o}


def proc_cmdlines(marker: str) -> dict[int, str]:
    """Live (not zombie) processes whose command line contains marker."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out[int(p)] = cmd
    return out
