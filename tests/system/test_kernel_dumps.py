"""The hand-read rtnetlink dumps (vnetd.kernel.links) in a network namespace made here: an
address dump asked for one interface holds that interface's addresses and no other's, the
same as the whole dump picked through (the kernel filters it: `show` on a host with hundreds
of networks reads one bridge's addresses, not every address of the host)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

from tests.harness.scratch import run_in

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

SCRIPT = textwrap.dedent(r'''
    import json, socket, sys
    sys.path[:0] = [sys.argv[1] + "/helper", sys.argv[1] + "/common"]
    from vnetd.kernel.links import dump_addresses
    every = dump_addresses()
    out = {}
    for name in ("va", "vb"):
        i = socket.if_nametoindex(name)
        out[name] = {"one": [[a[0], a[1], a[2].hex(), a[3]] for a in dump_addresses(index=i)],
                     "picked": [[a[0], a[1], a[2].hex(), a[3]] for a in every if a[0] == i],
                     "index": i}
    out["every"] = len(every)
    print(json.dumps(out))
''')



def test_an_address_dump_for_one_interface_holds_its_addresses_alone(netns):
    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", netns, *args], check=True)
    ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
    ip("addr", "add", "10.61.0.1/24", "dev", "va")
    ip("addr", "add", "10.61.1.1/24", "dev", "va")
    ip("addr", "add", "fd61::1/64", "dev", "va", "nodad")
    ip("addr", "add", "10.62.0.1/24", "dev", "vb")
    ip("link", "set", "lo", "up")
    r = run_in(netns, SCRIPT)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert len(res["va"]["one"]) == 3 and len(res["vb"]["one"]) == 1
    for name in ("va", "vb"):
        assert res[name]["one"] == res[name]["picked"]
        assert all(a[0] == res[name]["index"] for a in res[name]["one"])
    assert res["every"] > 4  # lo's too: the whole dump held more than the two asked for
