"""Every call the clients make fits the contract (helper/vnetd/api.py's table): the member
exists on the interface at the path it is sent to, the signature is the method's in-signature,
and the body marshals with it. Both clients are held to it, the asyncio library (api.Client,
dbus-fast) and the synchronous one the commands use (blocking.BlockingClient, jeepney), and
each of their public methods is exercised, so a method added to a client without a row here
fails too. Between them the clients reach every method of the Manager interface."""

from __future__ import annotations

import asyncio
import inspect
import socket

import pytest
from dbus_fast import Message, MessageType, Variant
from jeepney.fds import FileDescriptor
from jeepney.low_level import Endianness, Header, HeaderFields
from jeepney.low_level import Message as JMessage
from jeepney.low_level import MessageType as JMessageType
from vnet_client import api, base, blocking
from vnetd import api as contract

BY_NAME = {(m.iface, m.name): m for m in contract.METHODS}
MAC = "52:54:00:00:00:01"
OPTIONS = {"mode": "nat", "taps": 2, "routed_with": ["vnet3"], "autostart": True,
           "overlay": {"vni": 5007, "local": "10.0.0.1", "peers": ["10.0.0.2"]}}
FORWARD = {"proto": "tcp", "external": "8080", "to": "web1:80", "family": 4}
# client method -> the calls made with it (positional args, keyword args)
CALLS: dict[str, list[tuple[tuple, dict]]] = {
    "list_networks": [((), {})],
    "get_network": [(("vnet2",), {})],
    "define": [(("vnet2",), OPTIONS)],
    "check_definition": [(("vnet2",), OPTIONS)],
    "define_from": [(("vnet2", {"mode": "nat", "hosts": [{"vm": "web1", "ip": "10.0.0.5"}]}),
                     {})],
    "export_definition": [(("vnet2",), {})],
    "redefine": [(("vnet2", {"mode": "nat", "autostart": True}), {}),
                 (("vnet2", {"mode": "host-only"}), {"dry_run": True})],
    "undefine": [(("vnet2",), {})],
    "start": [(("vnet2",), {})],
    "stop": [(("vnet2",), {})],
    "set_autostart": [(("vnet2", True), {})],
    "reload": [((), {})],
    "attach": [(("vnet2", "web1"), {}),
               (("vnet2", "web1"), {"nic": 1, "queues": 2, "vhost": True, "mac": MAC,
                                    "learn_mac": True, "holder_pid": 42})],
    "detach": [(("vnet2-abc123",), {})],
    "list_ports": [((), {})],
    "get_mac": [(("vnet2", "web1", 1), {})],
    "vde_socket": [(("vnet2", "web1", 0), {})],
    "export_ether_conf": [(("vnet2",), {})],
    "import_macs": [(("vnet2", {"web1/0": MAC}), {})],
    "export_macs": [(("vnet2",), {})],
    "forget_mac": [(("vnet2", "web1"), {})],
    "transfer_vm": [(("vnet2", "web1", 1000), {})],
    "enslave": [(("vnet2_0",), {})],
    "release": [(("vnet2_0",), {})],
    "add_host": [(("vnet2", "web1"), {"ip": "172.16.12.5", "mac": MAC})],
    "remove_host": [(("vnet2", "web1"), {})],
    "list_hosts": [(("vnet2",), {})],
    "leases": [(("vnet2",), {})],
    "add_forward": [(("vnet2", FORWARD), {})],
    "remove_forward": [(("vnet2", FORWARD), {})],
    "list_forwards": [(("vnet2",), {})],
    "set_peer": [(("vnet2", "10.0.0.2"), {}), (("vnet2", "10.0.0.2"), {"add": False})],
    "open_session": [((), {})],
}
NOT_CALLS = {"connect", "close", "call", "value", "reply", "events", "close_session"}
PORT = {"ifname": "vnet2-abc123", "mac": MAC, "network": "vnet2", "vm": "web1", "nic": 0}


def sample(sig: str, wrap):
    """A value of complete type `sig` for a fake reply; wrap(sig, value) makes a variant."""
    if sig == "a{sv}":
        return {k: wrap("u" if k == "nic" else "s", v) for k, v in PORT.items()}
    if sig.startswith("a{"):
        return {}
    if sig.startswith("a"):
        return []
    if sig == "h":  # a real fd (one end of a socket pair), as a session's would be
        return wrap("h", socket.socketpair()[0].detach())
    return {"s": "x", "o": "/x", "u": 0, "i": 0, "b": False}[sig]


def out_types(member: str) -> list[str]:
    return [a.sig for a in BY_NAME[(contract.MANAGER, member)].returns]


def async_sent(method: str, args: tuple, kwargs: dict) -> list[tuple[str, str, str, str]]:
    c = api.Client()
    sent = []

    async def send(msg: Message, member: str = "") -> Message:
        msg._marshall(True)  # the body must fit the signature
        sent.append((msg.path, msg.interface, msg.member, msg.signature))
        types = out_types(msg.member)
        fds: list[int] = []

        def wrap(sig, v):
            if sig == "h":
                fds.append(v)
                return len(fds) - 1
            return Variant(sig, v)

        body = [sample(t, wrap) for t in types]
        return Message(message_type=MessageType.METHOD_RETURN, reply_serial=1,
                       signature="".join(types), body=body, unix_fds=fds)

    c._send = send
    asyncio.run(getattr(c, method)(*args, **kwargs))
    c.close_session()
    return sent


def sync_sent(method: str, args: tuple, kwargs: dict) -> list[tuple[str, str, str, str]]:
    c = blocking.BlockingClient()
    sent = []

    def send(msg: JMessage, member: str) -> JMessage:
        msg.serialise(serial=1, fds=[])  # the body must fit the signature
        f = msg.header.fields
        sent.append((f[HeaderFields.path], f[HeaderFields.interface], f[HeaderFields.member],
                     f.get(HeaderFields.signature, "")))
        types = out_types(f[HeaderFields.member])
        fields = {HeaderFields.reply_serial: 1, HeaderFields.signature: "".join(types)}
        return JMessage(Header(Endianness.little, JMessageType.method_return, 0, 1, -1, -1,
                               fields),
                        tuple(sample(t, lambda s, v: FileDescriptor(v) if s == "h" else (s, v))
                              for t in types))

    c._send = send
    getattr(c, method)(*args, **kwargs)
    c.close_session()
    return sent


CLIENTS = {"api.Client": (api.Client, async_sent),
           "blocking.BlockingClient": (blocking.BlockingClient, sync_sent)}


@pytest.mark.parametrize("client", CLIENTS)
def test_every_public_method_is_exercised(client):
    cls, _ = CLIENTS[client]
    public = {n for n, f in inspect.getmembers(cls, callable) if not n.startswith("_")}
    assert public - NOT_CALLS == set(CALLS)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("method", CALLS)
def test_calls_fit_the_contract(client, method):
    _, sent_by = CLIENTS[client]
    for args, kwargs in CALLS[method]:
        sent = sent_by(method, args, kwargs)
        assert len(sent) == 1
        path, iface, member, sig = sent[0]
        m = BY_NAME.get((iface, member))
        assert m is not None, f"{member} is not a method of {iface}"
        assert path == contract.MANAGER_PATH
        assert sig == m.in_sig, f"{method} sends {member}({sig}), the contract says ({m.in_sig})"


def test_the_clients_reach_every_manager_method():
    reached = {sent[0][2] for method, calls in CALLS.items() for args, kwargs in calls
               for sent in [sync_sent(method, args, kwargs)]}
    assert reached == {m.name for m in contract.METHODS if m.iface == contract.MANAGER}


def test_names_and_events_are_the_contracts():
    for mod in (api, base):
        assert (mod.BUS_NAME, mod.MANAGER_PATH, mod.MANAGER) == (
            contract.BUS_NAME, contract.MANAGER_PATH, contract.MANAGER)
    signals = {s.name: s for s in contract.SIGNALS}
    for member, fields in base.EVENT_FIELDS.items():
        assert signals[member].iface == contract.MANAGER
        assert len(fields) == len(signals[member].args)
    assert set(base.EVENT_FIELDS) == set(signals)


def test_defines_flags_are_the_option_tables():
    """cli/flags.py is the generated copy of vnet_common.options' flags: regenerate it with
    'python client/vnet_client/cli/gen_flags.py > client/vnet_client/cli/flags.py' (the venv's
    python, where vnet_common is installed)."""
    from pathlib import Path

    from vnet_client.cli import flags, gen_flags

    assert Path(flags.__file__).read_text() == gen_flags.render()


def test_every_flag_of_the_table_reaches_define_with_its_key():
    from vnet_client import cli
    from vnet_common import options

    argv = ["define", "lab"]
    for o in options.OPTIONS:
        if o.flag is None:
            continue
        if o.flag_value is not None:
            argv.append(o.flag)
        else:
            value = {"int": "7", "uid": "0"}.get(o.type, o.choices[-1] if o.choices else "root")
            argv.append(f"{o.flag}={value}")
    opts = cli.define_opts(cli.build_parser().parse_args(argv))
    for o in options.OPTIONS:
        if o.flag is None:
            continue
        got = opts["overlay"][o.key] if o.section == "overlay" else opts[o.key]
        if o.flag_value is not None:
            assert got is o.flag_value, o.key
        else:
            assert got is not None, o.key
    assert opts["tap-user"] == 0 and opts["routed-with"] == ["root"]
