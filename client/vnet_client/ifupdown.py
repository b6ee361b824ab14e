"""vnet-ifup / vnet-ifdown: qemu-ifup/qemu-ifdown replacements that need no root.

    -netdev tap,id=n0,ifname=vnet2_1,script=/usr/local/bin/vnet-ifup,\
downscript=/usr/local/bin/vnet-ifdown

QEMU opens the tap you own (made by 'vnet-client define vnet2 -n 4 --user you', or by an
administrator), then runs the script with its name; vnetd puts it on the bridge its name
names (vnet2_1 -> vnet2), or takes it off. QEMU runs script= without searching $PATH: give
the full path (/usr/local/bin after 'make install', /usr/bin from the Debian package).
"""

from __future__ import annotations

import sys

from .base import BusUnreachable, Unsendable, VnetClientError, is_utf8, not_utf8
from .blocking import BlockingClient

USAGE = "usage: {prog} IFNAME   (QEMU runs this with the tap's name, e.g. vnet2_1)"


def _run(release: bool, argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    prog = "vnet-ifdown" if release else "vnet-ifup"
    if len(argv) < 2:
        print(USAGE.format(prog=prog), file=sys.stderr)
        return 2
    if argv[1] in ("-h", "--help"):
        print(USAGE.format(prog=prog) + "\n\n" + __doc__, end="")
        return 0
    if argv[1] == "--version":
        from . import __version__

        print(f"{prog} (qemu-vnet) {__version__}")
        return 0
    ifname = argv[1]
    if not is_utf8(ifname):
        print(f"{prog}: {not_utf8(ifname)}", file=sys.stderr)
        return 2
    try:
        with BlockingClient(interactive=True) as c:
            network = c.release(ifname) if release else c.enslave(ifname)
    except Unsendable as e:
        print(f"{prog}: {e.message}", file=sys.stderr)
        return 2
    except BusUnreachable as e:
        print(f"{prog}: {e.sentence()}", file=sys.stderr)
        return 1
    except VnetClientError as e:
        print(f"{prog}: {e.message}", file=sys.stderr)
        return 4 if e.is_auth else 1
    verb = "took" if release else "put"
    prep = "off" if release else "on"
    print(f"{prog}: {verb} {ifname} {prep} {network}", file=sys.stderr)
    return 0


def ifup_main() -> int:
    return _run(False)


def ifdown_main() -> int:
    return _run(True)
