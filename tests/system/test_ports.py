"""Tap hand-off with the real kernel: who may attach, what they get, how long it lives."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.harness.daemon import ALICE, BOB, VENV, as_user, run_client, uid_of
from tests.harness.users import HOLDER, read_json, read_line, run_as, spawn_as


@pytest.fixture(scope="module", autouse=True)
def networks(vnetd):
    run_client("define", "vnet2", check=True)
    run_client("start", "vnet2", check=True)
    run_client("define", "vnet3", "-n", "2", f"--user={ALICE}", check=True)
    run_client("start", "vnet3", check=True)
    run_client("define", "vnet4", check=True)  # never started
    yield


def wait_gone(vnetd, ifname: str, timeout: float = 3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ifname not in vnetd.link_names():
            return True
        time.sleep(0.05)
    return False


def ports_of(user: str | None) -> list[dict]:
    return json.loads(run_client("ports", "--json", user=user, check=True).stdout)


def release_and_wait(holder, vnetd, ifname: str) -> None:
    """The holder exits; wait until the tap is gone and vnetd has forgotten the port."""
    holder.stdin.write("exit\n")
    holder.stdin.flush()
    holder.wait(10)
    assert wait_gone(vnetd, ifname)
    deadline = time.monotonic() + 3
    while ports_of(ALICE) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_alice_attaches_and_the_port_lives_as_long_as_her_fd(vnetd):
    holder = spawn_as(ALICE, HOLDER, "vnet2", "web1")
    try:
        got = read_json(holder)
        ifname = got["ifname"]
        assert got["tun"] == [ifname]  # TUNGETIFF names the interface we were given
        assert ifname.startswith("vnet2-") and len(ifname) <= 15
        assert got["mac"].startswith("52:54:00:")
        assert got["info"]["vhost"] is False and "vhost-reason" in got["info"]
        link = vnetd.ipj("-d", "link", "show", ifname)[0]
        assert link["master"] == "vnet2" and "UP" in link["flags"]
        assert link["linkinfo"]["info_kind"] == "tun"
        assert link["linkinfo"]["info_data"]["pi"] is False
        assert link["linkinfo"]["info_data"]["vnet_hdr"] is True
        assert link["linkinfo"]["info_data"]["persist"] is False
        assert link["linkinfo"]["info_data"]["user"] in (ALICE, str(uid_of(ALICE)))
        assert link["mtu"] == 1500
        assert [p["ifname"] for p in ports_of(ALICE)] == [ifname]
        assert ports_of(BOB) == []
        assert ifname in [p["ifname"] for p in ports_of(None)]  # root sees everyone's
        release_and_wait(holder, vnetd, ifname)
        assert ports_of(ALICE) == []
    finally:
        holder.kill()


def test_multi_queue_gives_one_fd_per_queue(vnetd):
    holder = spawn_as(ALICE, HOLDER, "vnet2", "mq1", "4")
    try:
        got = read_json(holder)
        assert got["fds"] == 4 and got["tun"] == [got["ifname"]] * 4
        link = vnetd.ipj("-d", "link", "show", got["ifname"])[0]
        assert link["linkinfo"]["info_data"]["multi_queue"] is True
    finally:
        holder.kill()
        holder.wait()


def test_bob_is_refused(vnetd):
    before = vnetd.snapshot()
    r = run_as(BOB, """
async def main():
    async with Client() as c:
        try:
            await c.attach("vnet2", "web1")
        except VnetClientError as e:
            print(e.name)
asyncio.run(main())
""")
    assert r.stdout.strip() == "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired", r
    assert vnetd.snapshot() == before
    r = run_client("attach", "--br=vnet2", "--vm=web1", "--", "true", user=BOB)
    assert r.returncode == 4


def test_a_second_identical_attach_is_busy(vnetd):
    holder = spawn_as(ALICE, HOLDER, "vnet2", "dup1")
    try:
        read_json(holder)
        second = spawn_as(ALICE, HOLDER, "vnet2", "dup1")
        got = read_json(second)
        second.kill()
        assert got["error"] == "org.qemuvnet.Vnet1.Error.Busy"
        assert "already attached" in got["message"]
    finally:
        holder.kill()
        holder.wait()


def test_persistent_tap_is_removed_on_detach(vnetd):
    holder = spawn_as(ALICE, HOLDER, "vnet2", "pers1")
    try:
        ifname = read_json(holder)["ifname"]
        holder.stdin.write("persist\nclose\n")
        holder.stdin.flush()
        read_json(holder)
        read_json(holder)
        time.sleep(0.2)
        assert ifname in vnetd.link_names()  # persistent: outlives the fd
        r = run_client("detach", ifname, user=BOB, env={})
        assert r.returncode in (1, 4)  # not his
        assert ifname in vnetd.link_names()
        r = run_client("detach", ifname, user=ALICE)
        assert r.returncode == 0, r.stderr
        assert wait_gone(vnetd, ifname)
    finally:
        holder.kill()
        holder.wait()


def test_persistent_tap_is_removed_when_its_holder_exits(vnetd):
    holder = spawn_as(ALICE, HOLDER, "vnet2", "pers2")
    ifname = read_json(holder)["ifname"]
    holder.stdin.write("persist\n")
    holder.stdin.flush()
    read_json(holder)
    holder.stdin.write("exit\n")
    holder.stdin.flush()
    holder.wait(10)
    assert wait_gone(vnetd, ifname), "the persistent tap outlived its holder"


def test_ports_survive_a_daemon_restart_and_are_still_tracked(vnetd):
    holder = spawn_as(ALICE, HOLDER, "vnet2", "adopt1")
    try:
        ifname = read_json(holder)["ifname"]
        vnetd.kill()
        vnetd.start()
        assert ifname in vnetd.link_names()
        assert [p["ifname"] for p in ports_of(ALICE)] == [ifname]
        release_and_wait(holder, vnetd, ifname)
        assert ports_of(ALICE) == []
    finally:
        holder.kill()


def test_quota(vnetd):
    vnetd.stop()
    vnetd.start(["--max-ports-per-user", "2"])
    holders = []
    try:
        for i in range(2):
            holders.append(spawn_as(ALICE, HOLDER, "vnet2", f"q{i}"))
            assert "ifname" in read_json(holders[-1])
        third = spawn_as(ALICE, HOLDER, "vnet2", "q2")
        got = read_json(third)
        third.kill()
        assert got["error"] == "org.qemuvnet.Vnet1.Error.QuotaExceeded"
    finally:
        for h in holders:
            h.kill()
            h.wait()
        vnetd.stop()
        vnetd.start()


def test_macs_are_stable_across_restarts_and_unique_across_1000_vms(vnetd):
    code = """
async def main():
    async with Client() as c:
        macs = [await c.get_mac("vnet2", f"vm{i}") for i in range(1000)]
        print(json.dumps(macs))
asyncio.run(main())
"""
    first = json.loads(run_as(ALICE, code, timeout=120).stdout)
    assert len(set(first)) == 1000
    assert all(m.startswith("52:54:00:") for m in first)
    vnetd.kill()
    vnetd.start()
    again = json.loads(run_as(ALICE, code, timeout=120).stdout)
    assert again == first
    r = run_client("mac", "--br=vnet2", "--vm=vm7", user=ALICE, check=True)
    assert r.stdout.strip() == first[7]
    r = run_client("mac", "--br=vnet2", "--vm=vm7", "--nic=1", user=ALICE, check=True)
    assert r.stdout.strip() != first[7]


def test_ether_conf_import_and_export(vnetd, tmp_path):
    conf = tmp_path / "vnet4" / "ether.conf"
    conf.parent.mkdir()
    conf.write_text("# from qemu-vlan\nether_1=52:54:00:aa:00:01\nether_2=52:54:00:AA:00:02\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(conf.parent, 0o755)
    r = run_client("import-ether-conf", str(conf))
    assert r.returncode == 0, r.stderr
    assert run_client("mac", "--br=vnet4", "--vm=vnet4_2").stdout.strip() == "52:54:00:aa:00:02"
    out = run_client("mac", "--br=vnet4", "--export-ether-conf").stdout
    assert "ether_1=52:54:00:aa:00:01" in out and "ether_2=52:54:00:aa:00:02" in out
    bad = tmp_path / "bad.conf"
    bad.write_text("ether_1=52:54:00:aa:00:09\nether_x=zz\n")
    r = run_client("import-ether-conf", str(bad), "--br=vnet4")
    assert r.returncode == 1 and "bad.conf:2" in r.stderr
    dup = tmp_path / "dup.conf"
    dup.write_text("ether_5=52:54:00:aa:00:01\n")  # already vnet4_1's
    r = run_client("import-ether-conf", str(dup), "--br=vnet4")
    assert r.returncode == 1 and "Exists" in r.stderr and "vnet4_1" in r.stderr


@pytest.mark.parametrize("argv, error", [
    (["--br=nosuch", "--vm=a"], "NotFound"),
    (["--br=vnet4", "--vm=a"], "NotRunning"),
    (["--br=vnet2", "--vm=a b"], "InvalidArgument"),
    (["--br=vnet2", "--vm=../x"], "InvalidArgument"),
    (["--br=vnet2", "--vm=" + "x" * 65], "InvalidArgument"),
    (["--br=vnet2", "--vm=a", "--mac=01:00:5e:00:00:01"], "InvalidArgument"),
])
def test_attach_bad_input(vnetd, argv, error):
    before = vnetd.snapshot()
    r = run_client("attach", *argv, "--", "true", user=ALICE)
    assert r.returncode == 1, r.stderr
    assert f"org.qemuvnet.Vnet1.Error.{error}" in r.stderr
    assert vnetd.snapshot() == before


@pytest.mark.parametrize("argv, says", [
    (["--br=vnet2", "--vm=a", "--queues=0"], "--queues must be between 1 and 8"),
    (["--br=vnet2", "--vm=a", "--queues=9"], "--queues must be between 1 and 8"),
    (["--br=vnet2", "--vm=a", "--nic=99"], "--nic must be between 0 and 31"),
])
def test_attach_numbers_out_of_range_are_usage_errors(vnetd, argv, says):
    """The command line knows the ranges (vnet_common.limits, vnetd's own): a usage error,
    and nothing asked of vnetd."""
    before = vnetd.snapshot()
    r = run_client("attach", *argv, "--", "true", user=ALICE)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert vnetd.snapshot() == before


def test_attach_command_not_found_makes_no_tap(vnetd):
    """As a shell says a command was not found: exit 127."""
    before = vnetd.snapshot()
    r = run_client("attach", "--br=vnet2", "--vm=a", "--", "/no/such/qemu", user=ALICE)
    assert r.returncode == 127 and "command not found" in r.stderr
    assert vnetd.snapshot() == before


def test_attach_runs_the_command_with_the_fds(vnetd):
    shell = (
        "readlink /proc/self/fd/{fd0}; readlink /proc/self/fd/{fd1}; "
        "echo {mac0} {ifname0} {mac1} {ifname1} {fds1}"
    )
    r = run_client("attach", "--vm=multi", "--br=vnet2", "--br=vnet3", "--queues=2", "--",
                   "sh", "-c", shell, user=ALICE)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "/dev/net/tun" and lines[1] == "/dev/net/tun"
    mac0, if0, mac1, if1, fds1 = lines[2].split()
    assert if0.startswith("vnet2-") and if1.startswith("vnet3-")
    assert len(fds1.split(":")) == 2
    assert mac0 == run_client("mac", "--br=vnet2", "--vm=multi", user=ALICE).stdout.strip()
    # sh exited: the taps went with it
    assert wait_gone(vnetd, if0) and wait_gone(vnetd, if1)


def test_ifup_and_ifdown_move_the_callers_own_tap(vnetd):
    ifup, ifdown = str(VENV / "bin/vnet-ifup"), str(VENV / "bin/vnet-ifdown")
    r = subprocess.run(as_user(ALICE, [ifdown, "vnet3_1"]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "master" not in vnetd.ipj("link", "show", "vnet3_1")[0]
    r = subprocess.run(as_user(BOB, [ifup, "vnet3_1"]), capture_output=True, text=True)
    assert r.returncode in (1, 4)
    assert "master" not in vnetd.ipj("link", "show", "vnet3_1")[0]
    r = subprocess.run(as_user(ALICE, [ifup, "vnet3_1"]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert vnetd.ipj("link", "show", "vnet3_1")[0]["master"] == "vnet3"
    # on the bridge, her tap is guarded and counted like any port of hers
    assert [(p["ifname"], p["kind"]) for p in ports_of(ALICE)] == [("vnet3_1", "ifup")]
    r = subprocess.run(as_user(ALICE, [ifup, "vnet2"]), capture_output=True, text=True)
    assert r.returncode == 1 and "does not name its network" in r.stderr
    r = subprocess.run(as_user(ALICE, [ifdown, "vnet3_1"]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ports_of(ALICE) == []


FAKE_QEMU = """
# Stands in for QEMU: runs the helper the way net/tap.c does and receives the fd.
import socket, subprocess
helper = sys.argv[1]
bridge = sys.argv[2]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
p = subprocess.Popen([helper, "--use-vnet", f"--fd={b.fileno()}", f"--br={bridge}"],
                     pass_fds=[b.fileno()])
b.close()
msg, fds, flags, addr = socket.recv_fds(a, 1, 1)
p.wait()
if not fds:
    print(json.dumps({"rc": p.returncode}), flush=True)
    sys.exit(0)
print(json.dumps({"rc": p.returncode, "tun": tap_name(fds[0])}), flush=True)
sys.stdin.readline()
"""


def test_bridge_helper_hands_the_fd_to_qemu(vnetd):
    helper = str(VENV / "bin/vnet-bridge-helper")
    qemu_args = ["-name", "guest=helpervm,debug-threads=on",
                 "-netdev", "bridge,id=n0,br=vnet2",
                 "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:99"]
    fake = spawn_as(ALICE, FAKE_QEMU, helper, "vnet2", *qemu_args)
    try:
        got = read_json(fake)
        assert got["rc"] == 0
        ports = ports_of(ALICE)
        assert [p["ifname"] for p in ports] == [got["tun"]]
        assert ports[0]["vm"] == "helpervm" and ports[0]["mac"] == "52:54:00:12:34:99"
        assert ports[0]["holder-pid"] == fake.pid or ports[0]["holder-pid"] > 0
    finally:
        fake.kill()
        fake.wait()
    fake = spawn_as(BOB, FAKE_QEMU, helper, "vnet2", *qemu_args)
    try:
        got = read_json(fake)
        assert got["rc"] != 0
    finally:
        fake.kill()
        fake.wait()


def test_client_sees_no_socket_leak(vnetd):
    """The service closes its copies of handed-out fds: its fd count does not grow."""
    pid = vnetd.proc.pid
    before = len(os.listdir(f"/proc/{pid}/fd"))
    code = """
async def main():
    async with Client() as c:
        for i in range(50):
            a = await c.attach("vnet2", f"leak{i % 5}")
            a.close()
asyncio.run(main())
"""
    r = run_as(ALICE, code)
    assert r.returncode == 0, r.stderr
    time.sleep(0.3)
    after = len(os.listdir(f"/proc/{pid}/fd"))
    assert after <= before + 2, (before, after)


def pidfds_of(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]"
        except OSError:
            pass  # closed meanwhile
    return n


def test_holders_that_closed_their_ports_hold_no_pidfd(vnetd):
    """A user's processes that attach, close the tap and live on (exec'ing something else)
    must not leave vnetd holding a pidfd each: pidfds go with a holder's last port."""
    pid = vnetd.proc.pid
    before = pidfds_of(pid)
    code = """
import time
r, w = os.pipe()
children = []
for i in range(30):
    child = os.fork()
    if child == 0:
        async def one():
            async with Client() as c:
                a = await c.attach("vnet2", f"vm{900 + i}")  # alice's already, or new
                a.close()
        try:
            asyncio.run(one())
            os.write(w, b"x")
        except BaseException as e:
            os.write(w, b"e")
            print(f"child {i}: {e!r}", file=sys.stderr, flush=True)
        time.sleep(120)
        os._exit(0)
    children.append(child)
got = b""
while len(got) < 30:
    got += os.read(r, 30)
print("ready" if got == b"x" * 30 else f"failed {got.count(b'e')}", flush=True)
sys.stdin.readline()
for c in children:
    os.kill(c, 9)
"""
    holder = spawn_as(ALICE, code)
    try:
        line = read_line(holder, 60)
        assert line is not None, "the holders did not report in 60 s"
        assert line.strip() == "ready", line
        deadline = time.monotonic() + 5  # the taps' deletion reaches vnetd as link events
        while pidfds_of(pid) > before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pidfds_of(pid) <= before, (before, pidfds_of(pid))
        assert not [p for p in ports_of(ALICE) if p["vm"] in {f"vm{900 + i}" for i in range(30)}]
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_a_detached_port_leaves_none_of_its_guard_behind(vnetd):
    """Detach removes the tap and every firewall element of its port (its guard keyed by
    its name, its VM's addresses and MAC): a user who attaches and detaches in a loop grows
    neither the kernel's sets nor vnetd (each attach takes a fresh name from a spare). (The
    kernel's event of the tap's removal took them away too, when vnetd read it before
    Detach forgot the port; the engine's own test covers the other order.)"""
    from tests.harness.crash import nft_sets

    def elements() -> str:
        return json.dumps(list(nft_sets(vnetd).values()))

    counts = {k: len(v) for k, v in nft_sets(vnetd).items()}
    names = []
    for i in range(3):
        holder = spawn_as(ALICE, HOLDER, "vnet2", f"det{i}")
        try:
            ifname = read_json(holder)["ifname"]
            names.append(ifname)
            deadline = time.monotonic() + 3  # its guard follows the answer
            while f'"{ifname}"' not in elements() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert f'"{ifname}"' in elements()
            r = run_client("detach", ifname, user=ALICE)
            assert r.returncode == 0, r.stderr
            assert wait_gone(vnetd, ifname)
        finally:
            holder.kill()
            holder.wait()
    time.sleep(0.3)
    after = elements()
    assert not [n for n in names if f'"{n}"' in after], "a detached port's guard is left"
    # (the spare taps' pending holds come and go with the spares, whatever the ports do)
    grown = {f"{k[0]} {k[1]}": (len(v), counts.get(k, 0)) for k, v in nft_sets(vnetd).items()
             if len(v) > counts.get(k, 0) and k[1] != "pending"}
    assert grown == {}  # set: (elements now, before)
