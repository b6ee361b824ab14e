"""Starting or stopping one network changes only its elements (and its taps' guards) in the
ruleset, and what that leaves is exactly the whole ruleset vnetd would load for the networks
that run (reload loads it: the listings before and after must be equal)."""

from __future__ import annotations

import json
import subprocess
import time

from tests.harness.daemon import CLIENT, run_client
from tests.harness.nftlist import normalized


def listing(vnetd) -> list:
    """Our two tables, normalized, their objects in a stable order (a chain made later is
    listed later, wherever the whole ruleset would put it)."""
    out = normalized(json.loads(vnetd.exec("nft", "-j", "list", "ruleset").stdout))
    ours = [o for o in out if o[next(iter(o))].get("table", o[next(iter(o))].get("name"))
            == "qemu_vnet"]
    return sorted(json.dumps(o, sort_keys=True) for o in ours)


def same_as_whole(vnetd, what: str) -> None:
    before = listing(vnetd)
    assert before, f"{what}: no table of ours"
    run_client("reload", check=True)  # loads the whole ruleset
    after = listing(vnetd)
    missing = sorted(set(after) - set(before))
    extra = sorted(set(before) - set(after))
    assert not missing and not extra, (f"{what}: the ruleset differs from the whole one:\n"
                                       f"missing {missing[:5]}\nextra {extra[:5]}")


def test_one_network_in_or_out_leaves_the_whole_ruleset(vnetd):
    c = lambda *a: run_client(*a, check=True)  # noqa: E731
    c("define", "inc1", "--subnet=10.71.1.0/24", "--subnet6=fd00:71:1::/64", "-n", "2")
    c("forward", "add", "inc1", "tcp", "8080", "10.71.1.5:80")
    c("forward", "add", "-6", "inc1", "tcp", "8081", "[fd00:71:1::5]:80")
    c("define", "inc2", "--mode=host-only", "--subnet=10.71.2.0/24", "--allow-host",
      "--routed-with=inc1", "-n", "1")
    c("define", "inc3", "--subnet=10.71.3.0/24")
    c("forward", "add", "inc3", "udp", "5353", "10.71.3.9:53")
    c("define", "inc4", "--subnet=10.71.4.0/24", "--no-spoof-protection", "-n", "1")
    log_mark = len(vnetd.log())
    for n in ("inc1", "inc2", "inc3", "inc4"):
        c("start", n)
        same_as_whole(vnetd, f"after starting {n}")
    # a VM attached to inc2 (its port guarded as it attaches), then inc2 stops under it
    vm = subprocess.Popen([str(CLIENT), "attach", "--br=inc2", "--vm", "web", "--", "sleep",
                           "60"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while "web" not in run_client("ports", check=True).stdout:
            assert vm.poll() is None and time.monotonic() < deadline, vm.stderr.read()
            time.sleep(0.05)
        same_as_whole(vnetd, "after an attach to inc2")
        for n in ("inc2", "inc4", "inc1"):
            c("stop", n, "--force")  # VMs attached: their ports wait off the network
            same_as_whole(vnetd, f"after stopping {n}")
    finally:
        vm.kill()
        vm.wait()
    log = vnetd.log()[log_mark:]
    assert "loading the whole ruleset instead" not in log
    # the first network loads the whole ruleset; the others join and leave as elements
    for n in ("inc2", "inc3", "inc4"):
        assert f"{n} joined the ruleset" in log, n
    for n in ("inc2", "inc4", "inc1"):
        assert f"{n} left the ruleset" in log, n
    c("stop", "inc3")  # the last one: no table of ours is left
    assert listing(vnetd) == []
    for n in ("inc1", "inc2", "inc3", "inc4"):
        c("undefine", n)
