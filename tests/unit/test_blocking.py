"""vnet_client.blocking: the synchronous client of the commands (jeepney), against a private
dbus-daemon and a stand-in for vnetd (dbus-fast, in a thread) that owns vnetd's bus name.

Rules under test: replies come back as plain values (variants unwrapped at any depth); Attach
hands back working fds that are ours and not inheritable, with the options sent as Attach's
a{sv}; ALLOW_INTERACTIVE_AUTHORIZATION is set exactly when the client is interactive; an
error reply raises VnetClientError with its name and sentence and closes the fds it carried;
events() yields vnetd's signals of one network; an unreachable bus is NoBus; the bridge helper
tries the next NIC when one is Busy; `vnet-client attach` gives the command the tap fd; the
commands never import dbus-fast, asyncio or other modules they do not need (each costs start-up
time).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from vnet_client import base, blocking, cli, helper_call
from vnet_client.blocking import BlockingClient

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={path}</listen>
  <policy context="default">
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blocking")
    (tmp / "bus.conf").write_text(CONFIG.format(path=tmp / "bus"))
    daemon = subprocess.Popen(
        ["dbus-daemon", f"--config-file={tmp / 'bus.conf'}", "--nofork", "--print-address"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        printed = daemon.stdout.readline().decode().strip()
        assert printed.startswith("unix:"), "dbus-daemon did not start"
        yield f"unix:path={tmp / 'bus'}"
    finally:
        daemon.terminate()
        daemon.wait(10)


class FakeVnetd:
    """Answers a few Manager methods the way vnetd does; remembers what it was sent."""

    def __init__(self, bus: MessageBus):
        self.bus, self.calls, self.readers, self.busy_nics = bus, [], [], set()
        self.sent: list[int] = []  # fds sent, closed after each test (dbus-fast keeps them)

    def handle(self, msg: Message):
        if msg.message_type is not MessageType.METHOD_CALL or msg.interface != base.MANAGER:
            return None
        self.calls.append((msg.member, msg.signature, msg.body, int(msg.flags)))
        if msg.member == "ListNetworks":
            nets = [{"name": Variant("s", "vnet2"), "mtu": Variant("u", 1500),
                     "autostart": Variant("b", True),
                     "overlay": Variant("a{sv}", {"peers": Variant("as", ["10.0.0.2"])}),
                     "hosts": Variant("aa{sv}", [{"vm": Variant("s", "web1")}])}]
            return Message.new_method_return(msg, "aa{sv}", [nets])
        if msg.member == "Attach":
            network, vm, opts = msg.body
            nic = opts["nic"].value
            if nic in self.busy_nics:
                return Message.new_error(msg, base.BUS_NAME + ".Error.Busy", "NIC in use")
            r, w = os.pipe()
            self.readers.append(r)
            self.sent.append(w)
            info = {"ifname": Variant("s", f"{network}-{nic}"),
                    "mac": Variant("s", "52:54:00:00:00:01"),
                    "network": Variant("s", network), "vm": Variant("s", vm),
                    "nic": Variant("u", nic)}
            return Message.new_method_return(msg, "a{sv}ahah", [info, [0], []], [w])
        if msg.member == "Start":  # refused, with an fd that the client must close
            r, w = os.pipe()
            os.close(r)
            self.sent.append(w)
            return Message(destination=msg.sender, message_type=MessageType.ERROR,
                           error_name=base.BUS_NAME + ".Error.NotFound", reply_serial=msg.serial,
                           signature="sh", body=["There is no network 'nope'.", 0], unix_fds=[w])
        if msg.member == "Detach":  # then three signals, one of another network
            for member, sig, body in (("NetworkChanged", "ss", ["vnet9", "running"]),
                                      ("PortChanged", "sss", ["vnet2-0", "vnet2", "detached"]),
                                      ("LeaseChanged", "ss", ["vnet2", "added"])):
                self.bus.send(Message(path=base.MANAGER_PATH, interface=base.MANAGER,
                                      member=member, message_type=MessageType.SIGNAL,
                                      signature=sig, body=body))
            return Message.new_method_return(msg)
        if msg.member == "Undefine":
            return True  # handled, never answered
        return None


@pytest.fixture(scope="module")
def vnetd(address):
    started, state = threading.Event(), {}

    async def main():
        bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
        state["vnetd"] = svc = FakeVnetd(bus)
        bus.add_message_handler(svc.handle)
        await bus.request_name(base.BUS_NAME)
        state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
        started.set()
        await state["stop"].wait()
        bus.disconnect()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10), "the stand-in vnetd did not start"
    yield state["vnetd"]
    state["loop"].call_soon_threadsafe(state["stop"].set)
    thread.join(10)


@pytest.fixture
def fake(vnetd):
    vnetd.calls.clear()
    vnetd.busy_nics = set()
    yield vnetd
    for fd in vnetd.readers + vnetd.sent:
        os.close(fd)
    vnetd.readers.clear()
    vnetd.sent.clear()


def open_fds() -> set[int]:
    return {int(f) for f in os.listdir("/proc/self/fd")}


def test_replies_are_plain_values(address, fake):
    with BlockingClient(address) as c:
        nets = c.list_networks()
    assert nets == [{"name": "vnet2", "mtu": 1500, "autostart": True,
                     "overlay": {"peers": ["10.0.0.2"]}, "hosts": [{"vm": "web1"}]}]
    assert fake.calls[0][:2] == ("ListNetworks", "")


def test_attach_gives_working_fds_that_are_ours(address, fake):
    with BlockingClient(address) as c:
        a = c.attach("vnet2", "web1", nic=1, mac="52:54:00:00:00:01", holder_pid=4242)
    try:
        assert (a.ifname, a.network, a.vm, a.nic) == ("vnet2-1", "vnet2", "web1", 1)
        assert len(a.fds) == 1 and a.vhostfds == []
        assert not os.get_inheritable(a.fds[0])
        os.write(a.fds[0], b"frame")
        assert os.read(fake.readers[-1], 16) == b"frame"
    finally:
        a.close()
    member, sig, (network, vm, opts), _ = fake.calls[-1]
    assert (member, sig, network, vm) == ("Attach", "ssa{sv}", "vnet2", "web1")
    assert {k: (v.signature, v.value) for k, v in opts.items()} == {
        "nic": ("i", 1), "queues": ("i", 1), "vhost": ("b", False),
        "mac": ("s", "52:54:00:00:00:01"), "holder-pid": ("i", 4242)}


@pytest.mark.parametrize("interactive", [True, False])
def test_the_interactive_flag(address, fake, interactive):
    with BlockingClient(address, interactive=interactive) as c:
        c.list_networks()
    assert bool(fake.calls[-1][3] & 0x4) is interactive


def test_an_error_reply_raises_with_its_sentence_and_closes_its_fds(address, fake):
    with BlockingClient(address) as c:
        before = open_fds()
        with pytest.raises(base.VnetClientError) as e:
            c.start("nope")
        assert open_fds() - set(fake.sent) == before
    assert (e.value.short_name, e.value.message) == ("NotFound", "There is no network 'nope'.")
    assert not e.value.is_auth


def test_events_of_one_network(address, fake):
    with BlockingClient(address) as watcher, BlockingClient(address) as actor:
        events = watcher.events("vnet2")
        timer = threading.Timer(0.3, actor.detach, ["vnet2-0"])
        timer.start()
        got = [next(events), next(events)]
        timer.join()
    assert got == [("PortChanged", {"ifname": "vnet2-0", "network": "vnet2", "state": "detached"}),
                   ("LeaseChanged", {"network": "vnet2", "event": "added"})]


def test_an_unreachable_bus_is_nobus():
    with pytest.raises(base.VnetClientError) as e:
        BlockingClient("unix:path=/nonexistent/vnet-unit-test-bus").connect()
    assert e.value.name == base.NO_BUS and "Cannot connect to the system bus" in e.value.message


def test_the_bridge_helper_takes_the_next_nic_when_one_is_busy(address, fake, monkeypatch):
    monkeypatch.setenv("VNET_BUS_ADDRESS", address)
    fake.busy_nics = {0, 1}
    fd = helper_call.attach_for_helper("vnet2", "web1", [None], 777)
    try:
        os.write(fd, b"x")
        assert os.read(fake.readers[-1], 1) == b"x"
    finally:
        os.close(fd)
    nics = [(c[2][2]["nic"].value, "learn-mac" in c[2][2], c[2][2]["holder-pid"].value, c[3] & 4)
            for c in fake.calls]
    assert nics == [(0, True, 777, 4), (1, True, 777, 4), (2, True, 777, 4)]


def test_the_cli_lists_through_the_blocking_client(address, fake, capsys):
    assert cli.main(["list", "--json", "--bus-address", address]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "vnet2"


def test_attach_passes_the_tap_fd_to_the_command(address, fake):
    r = subprocess.run([sys.executable, "-m", "vnet_client.cli", "attach", "--br=vnet2",
                        "--vm", "web1", "--bus-address", address, "--",
                        "sh", "-c", "printf through >&{fd}; echo '{ifname} {mac}'"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "vnet2-0 52:54:00:00:00:01"
    assert os.read(fake.readers[-1], 16) == b"through"


@pytest.mark.parametrize("what", ["vnet_client.cli", "vnet_client.bridge_helper",
                                  "vnet_client.helper_call", "vnet_client.ifupdown"])
def test_the_commands_import_no_asyncio_library(what):
    code = (f"import sys, {what}\n"
            "from vnet_client import cli\n"
            "cli.build_parser(); cli.build_compat_parser()\n"
            "print(' '.join(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    loaded = set(out.stdout.split())
    assert not loaded & {"asyncio", "dbus_fast", "vnet_client.api", "vnet_client.migrate",
                         "subprocess", "difflib", "tomllib", "dataclasses", "inspect"}, loaded


def test_plain_and_variant_round_trip():
    value = {"a": 1, "big": 2**40, "on": True, "names": ["x", "y"],
             "hosts": [{"vm": "web1"}], "overlay": {"vni": 5}}
    sent = blocking.asv(value)
    assert sent["big"] == ("x", 2**40) and sent["on"] == ("b", True)
    assert blocking.plain("a{sv}", sent) == value
    assert blocking._complete_types("sa{sv}(ias)ahv") == ("s", "a{sv}", "(ias)", "ah", "v")
    with pytest.raises(TypeError):
        blocking.variant(1.5)


def test_a_timeout_is_reported_by_whether_the_call_was_a_change(monkeypatch, address, fake):
    monkeypatch.setattr(base, "CALL_TIMEOUT", 0.2)
    with BlockingClient(address) as c:
        t = time.monotonic()
        with pytest.raises(base.VnetClientError) as e:
            c.value("Undefine", "s", ["x"])  # the stand-in never answers it
        assert time.monotonic() - t < 5
    assert e.value.name == base.NO_REPLY and "may or may not have been done" in e.value.message
