"""A multi-queue tap has no owner between its creation and TUNSETOWNER, and the kernel lets
anyone attach a queue to a tap that has none: another local user who watches for new links
could join a port that way, before it is the caller's, and read and send its guest's frames.
Attach counts the tap's queues once it has its owner (then no one else can join): a tap that
holds more than vnetd attached is deleted, which kills the other user's queue, and the attach
fails. Here Bob (not in group vnet, no privilege) joins a new multi-queue tap in that window,
in a network namespace made for the test, with the real kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.harness.daemon import BOB, PY, ensure_users, uid_of
from tests.harness.scratch import REPO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

SCRIPT = textwrap.dedent(r'''
    import asyncio, fcntl, json, os, subprocess, sys, time
    sys.path[:0] = [sys.argv[1] + "/helper", sys.argv[1] + "/common"]
    from types import SimpleNamespace
    from vnetd.errors import Failed
    from vnetd.kernel import tap
    from vnetd.kernel.links import FastLinkSetter, delete_link
    from vnetd.ports import Ports

    py, bob, alice = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    flags = tap.IFF_TAP | tap.IFF_NO_PI | tap.IFF_VNET_HDR | tap.IFF_MULTI_QUEUE
    first = tap.open_tap("mq0", flags | tap.IFF_TUN_EXCL)  # as vnetd makes a port's tap
    index = int(open("/sys/class/net/mq0/ifindex").read())
    # Bob joins it before it has an owner
    joiner = subprocess.Popen(
        ["setpriv", f"--reuid={bob}", f"--regid={bob}", "--clear-groups", py, "-c",
         "import fcntl, os, struct, sys, time\n"
         "fd = os.open('/dev/net/tun', os.O_RDWR)\n"
         f"fcntl.ioctl(fd, {tap.TUNSETIFF}, struct.pack('16sH22x', b'mq0', {flags}))\n"
         "print('joined', flush=True)\n"
         "sys.stdin.readline()\n"
         "try:\n"
         "    os.write(fd, bytes(64))\n"
         "    print('still sends', flush=True)\n"
         "except OSError as e:\n"
         "    print('cut', e.errno, flush=True)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {"bob": joiner.stdout.readline().strip()}
    fcntl.ioctl(first, tap.TUNSETOWNER, alice)  # from here on, no one else may join
    second = tap.open_tap("mq0", flags)
    setter = FastLinkSetter()
    out["queues"] = setter.tun_queues(index)

    class Links:
        fast = setter

        async def delete(self, i):
            return await asyncio.to_thread(delete_link, i)

    ports = Ports(links=Links(), macs=None, store=SimpleNamespace(runtime_dir="/tmp"))
    try:
        asyncio.run(ports._check_queues("mq0", index, 2, alice))
        out["check"] = "passed"
    except Failed as e:
        out["check"] = e.message
    out["tap_left"] = os.path.exists("/sys/class/net/mq0")
    joiner.stdin.write("\n")
    joiner.stdin.flush()
    out["bob_after"] = joiner.stdout.readline().strip()
    joiner.wait(10)
    # a tap that holds only vnetd's queues passes
    third = tap.open_tap("mq1", flags | tap.IFF_TUN_EXCL)
    fcntl.ioctl(third, tap.TUNSETOWNER, alice)
    fourth = tap.open_tap("mq1", flags)
    i1 = int(open("/sys/class/net/mq1/ifindex").read())
    asyncio.run(ports._check_queues("mq1", i1, 2, alice))
    out["ours"] = setter.tun_queues(i1)
    print(json.dumps(out))
''')


def test_a_user_who_joins_a_new_multiqueue_tap_before_it_has_an_owner_is_cut_off(netns):
    ensure_users()
    r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SCRIPT, str(REPO),
                        str(PY), str(uid_of(BOB)), "4001"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bob"] == "joined"  # the kernel lets him: the window is real
    assert out["queues"] == 3  # vnetd's two and Bob's
    assert out["check"].startswith("Another process joined the new tap 'mq0'")
    assert out["tap_left"] is False
    assert out["bob_after"].startswith("cut ")  # his queue died with the tap
    assert out["ours"] == 2  # a tap with vnetd's queues alone passes
