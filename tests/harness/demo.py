"""`sudo make demo`: the main job on the default network, for a person to watch.

Starts the NAT network vnet2 (defining it if needed), boots the small test guest as the user
who ran sudo (or a demo user in group vnet) through `vnet-client attach`, shows what the guest
got, and lets it power off (its tap goes with it).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

from tests.guest import build_guest as bg

CLIENT = "/usr/local/bin/vnet-client"
DEMO_USER = "vnet-demo"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(argv), flush=True)
    return subprocess.run(argv, **kw)


def demo_user() -> str:
    user = os.environ.get("SUDO_USER")
    if user and user != "root":
        groups = subprocess.run(["id", "-nG", user], capture_output=True, text=True).stdout.split()
        if "vnet" not in groups:
            say(f"Adding {user} to group vnet (attach without a password; takes effect at the "
                "next login, the demo uses it right away)")
            run(["usermod", "-aG", "vnet", user], check=True)
        return user
    try:
        pwd.getpwnam(DEMO_USER)
    except KeyError:
        run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", "-G", "vnet",
             DEMO_USER], check=True)
    return DEMO_USER


def main() -> int:
    say("The default NAT network vnet2")
    shown = run([CLIENT, "show", "vnet2"], capture_output=True, text=True)
    if shown.returncode != 0:
        run([CLIENT, "define", "vnet2", "--mode=nat"], check=True)
    if '"state": "running"' not in run([CLIENT, "show", "vnet2", "--json"],
                                        capture_output=True, text=True).stdout:
        run([CLIENT, "start", "vnet2"], check=True)
    run([CLIENT, "show", "vnet2"], check=True)

    say("Building the demo guest (a Debian kernel and a busybox initramfs; cached)")
    guest = bg.build_guest()
    user = demo_user()
    argv = bg.qemu_argv(guest, netdevs=["tap,id=n0,fd={fd}"],
                        devices=["virtio-net-pci,netdev=n0,mac={mac}"],
                        cmdline={"dhcp": 1, "hostname": "demo1", "ping": "172.16.12.1",
                                 "resolve": "demo1.vnet2"})
    say(f"Booting it as user '{user}' (not root) through vnet-client attach")
    cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--",
           CLIENT, "attach", "--br=vnet2", "--vm=demo1", "--", *argv]
    print("$ " + " ".join(cmd[:9]) + " -- qemu-system-x86_64 ... -netdev tap,id=n0,fd={fd} "
          "-device virtio-net-pci,netdev=n0,mac={mac} ...", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    sys.stderr.write(r.stderr)
    res = bg.parse_results(r.stdout)
    say("What the guest saw")
    for line in r.stdout.splitlines():
        if line.startswith("VNET-RESULT"):
            print("  " + line)
    say("Leases on vnet2")
    run([CLIENT, "leases", "vnet2"])
    ok = r.returncode == 0 and res.get("dhcp") == "ok" and res.get("ping", {}).get(
        "172.16.12.1") == "ok"
    say("Demo " + ("succeeded: the guest got " + res.get("ip", "?") + " and reached its gateway;"
                   " it has powered off and its tap is gone." if ok else "FAILED (see above)"))
    print("Next: vnet-client --help, docs/cli.md. The network vnet2 keeps running; "
          "'vnet-client stop vnet2' stops it.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
