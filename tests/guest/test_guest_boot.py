"""Boot the real test guest (tests/guest/build_guest.py) on a bridge in a private netns."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.guest import build_guest as bg

pytestmark = pytest.mark.guest

QEMU = "qemu-system-x86_64"
SUBNET = "172.16.99"
GATEWAY = f"{SUBNET}.1"


def _require_root_and_qemu() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, tap devices)")
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")


def sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> bg.Guest:
    try:
        return bg.build_guest(tmp_path_factory.mktemp("guest") / "cache")
    except bg.GuestBuildError as exc:
        pytest.skip(str(exc))


class Netns:
    """A private network namespace with bridge ``gbr0`` (GATEWAY/24) and taps on it."""

    def __init__(self) -> None:
        self.name = f"vnetguest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        sh("ip", "netns", "add", self.name)
        self.ip("link", "set", "lo", "up")
        self.ip("link", "add", "gbr0", "type", "bridge", "forward_delay", "0")
        self.ip("addr", "add", f"{GATEWAY}/24", "dev", "gbr0")
        self.ip("link", "set", "gbr0", "up")

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return sh("ip", "-n", self.name, *args)

    def add_tap(self, name: str) -> str:
        self.ip("tuntap", "add", "dev", name, "mode", "tap")
        self.ip("link", "set", name, "master", "gbr0", "up")
        return name

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def netns():
    _require_root_and_qemu()
    ns = Netns()
    try:
        yield ns
    finally:
        ns.delete()


def boot_argv(guest: bg.Guest, ns: Netns, tap: str, mac: str, cmdline: dict) -> list[str]:
    argv = bg.qemu_argv(
        guest,
        netdevs=[f"tap,id=n0,ifname={tap},script=no,downscript=no"],
        devices=[f"virtio-net-pci,netdev=n0,mac={mac}"],
        cmdline=cmdline,
    )
    return ns.exec_argv(argv)


def show(name: str, text: str) -> str:
    return f"--- console of {name} ---\n{text[-4000:]}"


# --------------------------------------------------------------------------


def test_parse_results():
    text = (
        "[    1.2] some kernel noise\r\n"
        "VNET-RESULT mac=52:54:00:12:34:56\r\n"
        "VNET-RESULT ip=172.16.12.40/24\r\n"
        "VNET-RESULT dhcp=ok router=172.16.12.1 dns=172.16.12.1,172.16.12.2 domain=none\r\n"
        "VNET-RESULT ready\r\n"
        "VNET-RESULT ping 172.16.12.1=ok\r\n"
        "VNET-RESULT ping 172.16.12.9=fail\r\n"
        "VNET-RESULT resolve web1.vnet2=172.16.12.5\r\n"
        "VNET-RESULT error=insmod-foo\r\n"
        "VNET-RESULT done\r\n"
    )
    assert bg.parse_results(text) == {
        "mac": "52:54:00:12:34:56",
        "ip": "172.16.12.40/24",
        "dhcp": "ok",
        "router": "172.16.12.1",
        "dns": "172.16.12.1,172.16.12.2",
        "domain": "none",
        "ready": True,
        "ping": {"172.16.12.1": "ok", "172.16.12.9": "fail"},
        "resolve": {"web1.vnet2": "172.16.12.5"},
        "error": ["insmod-foo"],
        "done": True,
    }
    assert bg.parse_results("no results here") == {}


def test_kernel_cmdline_and_argv(tmp_path):
    line = bg.kernel_cmdline(
        {"ip": "10.0.0.2/24", "ping": ["10.0.0.1", "10.0.0.3"], "ipv6.disable": 1}
    )
    assert line.startswith("console=ttyS0 quiet panic=-1")
    assert line.endswith("vnet.ip=10.0.0.2/24 vnet.ping=10.0.0.1,10.0.0.3 ipv6.disable=1")
    assert bg.kernel_cmdline("vnet.dhcp=1").endswith(" vnet.dhcp=1")
    with pytest.raises(ValueError):
        bg.kernel_cmdline({"resolve": "a b"})

    g = bg.Guest(kernel=tmp_path / "k", initrd=tmp_path / "i")
    argv = bg.qemu_argv(
        g, netdevs=["tap,id=n0,fd=5"], devices=["virtio-net-pci,netdev=n0"], cmdline={"dhcp": 1}
    )
    assert argv[0] == QEMU
    for opt in ("-nographic", "-no-reboot", "-nodefaults"):
        assert opt in argv
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-kernel") + 1] == str(g.kernel)
    assert argv[argv.index("-initrd") + 1] == str(g.initrd)
    assert argv[-4:] == ["-netdev", "tap,id=n0,fd=5", "-device", "virtio-net-pci,netdev=n0"]
    # No NIC but the caller's: no default/user-mode networking sneaks in.
    assert argv.count("-netdev") == 1 and argv.count("-device") == 1
    assert not {"-net", "-nic"} & set(argv)


def test_build_is_cached_and_world_readable(tmp_path):
    cache = tmp_path / "a" / "guest"
    t0 = time.perf_counter()
    first = bg.build_guest(cache)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    second = bg.build_guest(cache)
    cached_s = time.perf_counter() - t0
    assert second == first
    assert cached_s < 0.05, f"cached build_guest took {cached_s:.3f}s (first build {build_s:.3f}s)"

    for d in (cache, cache.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    for f in (first.kernel, first.initrd, cache / "stamp.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert sorted(p.name for p in cache.iterdir()) == ["initrd.img", "stamp.json", "vmlinuz"]
    assert first.kernel.read_bytes() == bg.find_kernel()[0].read_bytes()
    with first.initrd.open("rb") as f:
        assert f.read(2) == b"\x1f\x8b"

    # A stale stamp triggers a rebuild (new inode from the atomic rename).
    inode = first.initrd.stat().st_ino
    (cache / "stamp.json").write_text("{}")
    bg.build_guest(cache)
    assert first.initrd.stat().st_ino != inode
    assert bg.build_guest(cache) == first

    # The CLI reuses the cache too.
    out = subprocess.run(
        [sys.executable, str(Path(bg.__file__)), "--cache-dir", str(cache)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert f"initrd={first.initrd}" in out


def test_two_guests_on_a_bridge(guest, netns, record_property):
    tap_a, tap_b = netns.add_tap("tapA"), netns.add_tap("tapB")
    mac_a, mac_b = "52:54:00:99:00:0a", "52:54:00:99:00:0b"
    ip_a, ip_b = f"{SUBNET}.10", f"{SUBNET}.11"

    argv_a = boot_argv(guest, netns, tap_a, mac_a, {"ip": f"{ip_a}/24", "gw": GATEWAY, "wait": 90})
    argv_b = boot_argv(guest, netns, tap_b, mac_b, {"ip": f"{ip_b}/24", "ping": [GATEWAY, ip_a]})
    with bg.start_guest(argv_a) as a:
        assert a.wait_for_result("ready", 60), show("A", a.text)
        with bg.start_guest(argv_b) as b:
            rc_b, text_b, res_b = b.wait(60)
            boot_b = b.boot_seconds
        # B is done: end A's vnet.wait early through its console.
        a.release()
        rc_a, text_a, res_a = a.wait(30)

    assert rc_b == 0, show("B", text_b)
    assert res_b.get("done") is True, show("B", text_b)
    assert res_b["mac"] == mac_b
    assert res_b["ip"] == f"{ip_b}/24"
    assert res_b["ping"] == {GATEWAY: "ok", ip_a: "ok"}, show("B", text_b)
    assert "error" not in res_b, show("B", text_b)

    assert rc_a == 0, show("A", text_a)
    assert res_a == {
        "mac": mac_a,
        "ip": f"{ip_a}/24",
        "gw": GATEWAY,
        "ready": True,
        "waiting": "90",
        "wait": "released",
        "done": True,
    }, show("A", text_a)

    record_property("boot_seconds_b", boot_b)
    print(f"\nguest B: QEMU start to 'VNET-RESULT done' in {boot_b:.2f}s")
    assert boot_b is not None and boot_b < 30


def test_unreachable_ping_fails_and_guest_exits(guest, netns):
    tap = netns.add_tap("tapC")
    argv = boot_argv(
        guest,
        netns,
        tap,
        "52:54:00:99:00:0c",
        {"ip": f"{SUBNET}.12/24", "ping": f"{SUBNET}.250", "ping_tries": 2},
    )
    rc, text, res = bg.run_guest(argv, timeout=60)
    assert rc == 0, show("C", text)
    assert res["ping"] == {f"{SUBNET}.250": "fail"}, show("C", text)
    assert res["done"] is True


def test_dhcp_and_resolve(guest, netns, tmp_path):
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not os.path.exists(dnsmasq):
        pytest.skip("dnsmasq is not installed")
    tap = netns.add_tap("tapD")
    server = subprocess.Popen(
        netns.exec_argv(
            [
                dnsmasq,
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--interface=gbr0",
                "--except-interface=lo",
                "--user=root",
                "--pid-file=",
                f"--dhcp-leasefile={tmp_path / 'leases'}",
                f"--dhcp-range={SUBNET}.100,{SUBNET}.150,255.255.255.0,1h",
                "--domain=vnet2",
                "--address=/web1.vnet2/172.16.99.5",
                "--log-facility=-",
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        argv = boot_argv(
            guest,
            netns,
            tap,
            "52:54:00:99:00:0d",
            {"dhcp": 1, "hostname": "vm-d", "resolve": "web1.vnet2", "ping": GATEWAY},
        )
        rc, text, res = bg.run_guest(argv, timeout=60)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=10)
    assert rc == 0, show("D", text) + "\n" + err
    assert res["dhcp"] == "ok", show("D", text) + "\n" + err
    ip, _, prefix = res["ip"].partition("/")
    assert ip.startswith(f"{SUBNET}.") and 100 <= int(ip.rsplit(".", 1)[1]) <= 150
    assert prefix == "24"
    assert res["router"] == GATEWAY and res["dns"] == GATEWAY and res["server"] == GATEWAY
    assert res["domain"] == "vnet2"
    assert res["ping"] == {GATEWAY: "ok"}
    assert res["resolve"] == {"web1.vnet2": "172.16.99.5"}, show("D", text)
    assert "vm-d" in (tmp_path / "leases").read_text()
