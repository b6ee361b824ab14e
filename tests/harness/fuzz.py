"""A D-Bus fuzzer for vnetd: every method of the contract called with random and hostile
arguments, of the right D-Bus types and of wrong ones, by root and by unprivileged users.

Calls are generated in the test process with hypothesis strategies and described as JSON.
Values travel along their D-Bus signature: a variant is `[signature, value]`, a dict a list of
`[key, value]` pairs, `ay` a hex string, and an `h` is a fresh file descriptor the worker opens.
The worker (WORKER), run as the caller with the venv's interpreter, decodes a batch, sends each
call on its own bus connection with dbus-fast, and answers one JSON line of outcomes.

The contract is read from dbus/org.qemuvnet.Vnet1.xml, so a method added there is fuzzed
without touching this file (with generic values by type for arguments it does not know).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from .daemon import ALICE, BOB, PY, as_user
from .users import read_line, script

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "dbus/org.qemuvnet.Vnet1.xml"
BUS_NAME = "org.qemuvnet.Vnet1"
MANAGER_PATH = "/org/qemuvnet/Vnet1"
NETWORK_PATH = MANAGER_PATH + "/network"
ACTION_ANNOTATION = "org.qemuvnet.Vnet1.PolkitAction"

ERR_PREFIX = "org.qemuvnet.Vnet1.Error."
DBUS_ERR = "org.freedesktop.DBus.Error."
INVALID_ARGUMENT = ERR_PREFIX + "InvalidArgument"
# The standard refusals any call may get (LimitsExceeded: too many calls in flight at once).
STANDARD_REFUSALS = frozenset(DBUS_ERR + n for n in (
    "InvalidArgs", "UnknownMethod", "AccessDenied", "InteractiveAuthorizationRequired",
    "LimitsExceeded"))
AUTH_REFUSALS = frozenset(DBUS_ERR + n
                          for n in ("AccessDenied", "InteractiveAuthorizationRequired"))
# What dbus-fast's standard handlers answer for calls off the contract (unknown object paths,
# interfaces, the Properties interface of objects without properties).
ROUTING_REFUSALS = frozenset(DBUS_ERR + n for n in (
    "UnknownObject", "UnknownInterface", "UnknownProperty", "NotSupported"))

# Words that mark a refusal as the daemon's own failure rather than the caller's mistake or a
# kernel's verdict on a request (libnftables confused by a garbled netlink exchange included).
INTERNAL_MARKERS = ("internal error", "traceback", "cache initialization failed",
                    "kernel abi is broken")

CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # no place in a sentence, nor in a log line
# A line vnetd's logging writes: level, logger, message (anything else was smuggled in).
LOG_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")

FLAG_NO_REPLY = 0x1
FLAG_NO_AUTO_START = 0x2
FLAG_INTERACTIVE = 0x4
MTYPE_CALL, MTYPE_SIGNAL = 1, 4

# The world the fuzzer aims at (the test makes it): networks that exist, names that may be
# defined, interfaces vnetd did not make, VMs.
FIXED_NETWORKS = ("vnet2", "vnet3", "vnet4")
NEW_NETWORKS = ("vnet5", "vnet6", "vnet7", "fz8", "Vnet9", "vnet11")
HOST_IFACES = ("lo", "hostnic0", "hostnic0p")
VMS = ("vm1", "vm2", "web", "db.1", "a-b_c", "vnet2_1", "vnet2_2")
PORT_PLACEHOLDER = "@PORT"  # the worker puts the name of a port it holds here

# Which polkit actions each caller has without a password (the project's policy and rules).
GRANTED = {
    "root": {"info", "attach", "manage", "forward"},
    "alice": {"info", "attach"},
    "bob": {"info"},
}
USERS = {"root": None, "alice": ALICE, "bob": BOB}


# --- the contract ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    iface: str
    name: str
    args: tuple[tuple[str, str], ...]  # (name, signature) of the in arguments
    out_sig: str
    action: str  # the last word of the polkit action: info, attach, manage, forward

    @property
    def in_sig(self) -> str:
        return "".join(sig for _, sig in self.args)

    @property
    def short(self) -> str:
        return f"{self.iface.rsplit('.', 1)[-1]}.{self.name}"

    @property
    def on_network_object(self) -> bool:
        return self.iface.endswith(".Network")


def load_contract(path: Path = CONTRACT) -> list[MethodSpec]:
    out = []
    for iface in ET.parse(path).getroot().findall("interface"):
        for m in iface.findall("method"):
            action = next((a.get("value") for a in m.findall("annotation")
                           if a.get("name") == ACTION_ANNOTATION), "")
            args = tuple((a.get("name"), a.get("type")) for a in m.findall("arg")
                         if a.get("direction", "in") == "in")
            out_sig = "".join(a.get("type") for a in m.findall("arg")
                              if a.get("direction") == "out")
            out.append(MethodSpec(iface.get("name"), m.get("name"), args, out_sig,
                                  action.rsplit(".", 1)[-1]))
    return out


def label_escape(name: str) -> str:
    """A network name as one object-path element, as vnetd spells it (systemd style)."""
    return "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name) or "_"


# --- signatures -----------------------------------------------------------------------------
def split_signature(sig: str) -> list[str]:
    """The complete types of a signature ('sa{sv}as' -> ['s', 'a{sv}', 'as'])."""
    out, i = [], 0
    while i < len(sig):
        j = _complete_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def _complete_end(sig: str, i: int) -> int:
    c = sig[i]
    if c == "a":
        return _complete_end(sig, i + 1)
    if c in "({":
        close = ")" if c == "(" else "}"
        j = i + 1
        while sig[j] != close:
            j = _complete_end(sig, j)
        return j + 1
    return i + 1


INT_RANGES = {
    "y": (0, 2**8 - 1), "n": (-(2**15), 2**15 - 1), "q": (0, 2**16 - 1),
    "i": (-(2**31), 2**31 - 1), "u": (0, 2**32 - 1),
    "x": (-(2**63), 2**63 - 1), "t": (0, 2**64 - 1),
}
BASIC = "ybnqiuxtdsog"
INT_EDGES = (0, 1, -1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 63, 64, 65, 255, 256, 575, 576, 1500,
             9216, 9217, 65535, 65536, 2**22, 2**31 - 1, -(2**31), 2**31, 2**32 - 2, 2**32 - 1,
             2**32, 2**40, -(2**40), 2**63 - 1, -(2**63), 2**64 - 1)


def ints(code: str, edges: tuple[int, ...] = INT_EDGES) -> st.SearchStrategy[int]:
    lo, hi = INT_RANGES[code]
    inside = sorted({e for e in (*edges, lo, hi) if lo <= e <= hi})
    return st.one_of(st.sampled_from(inside), st.integers(lo, hi))


# Hypothesis steers generation toward choices it has not tried yet, so a small set of options
# (sampled_from, one_of, booleans) soon counts as explored and is then seldom drawn. The mix of
# aimed and hostile values is therefore picked from a wide integer instead, which stays new.
# (Hypothesis favours small integers too: they are spread by a multiplicative hash.)
WIDE = 2**24 - 1


def _spread(n: int, size: int) -> int:
    return ((n * 2654435761) % 2**32) * size >> 32


def pick(pool: tuple | list) -> st.SearchStrategy[Any]:
    """One of `pool`, each about as likely as another, however many examples came before."""
    return st.integers(0, WIDE).map(lambda n: pool[_spread(n, len(pool))])


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, with the given weights."""
    total = sum(w for w, _ in choices)

    def choose(n: int) -> st.SearchStrategy[Any]:
        n = _spread(n, total)
        for w, s in choices:
            if n < w:
                return s
            n -= w
        raise AssertionError("unreachable")

    return st.integers(0, WIDE).flatmap(choose)


# --- strings ----------------------------------------------------------------------------------
# D-Bus strings are UTF-8 without NUL: everything else goes, including C0 controls, DEL,
# bidi overrides, zero-width and non-characters.
UNICODE = st.characters(codec="utf-8", exclude_characters="\x00")
ODD_STRINGS = (
    "", " ", ".", "..", "/", "//", "../", "../../../../etc/passwd", "/etc/shadow",
    "vnet2/../vnet3", "./vnet2", "vnet2/", "vnet2\x01", "\x01", "\x7f", "vnet2\x7f",
    "\x1b[31mred\x1b[0m", "\r\n", "vnet2\n", "\nvnet2", "\tvnet2", "vnet2 ", " vnet2", "-n",
    "--help", "-", "-x1", "$(id)", "`id`", "${IFS}id", ";reboot", "|cat /etc/shadow", "&&true",
    "x;rm -rf /", "'", '"', "\\", "*", "?", "~root", "%s%s%n", "{0}", "{}", "<x/>", "&amp;",
    "\u202evnet2", "\u200fvnet2", "vnet2\u200e", "\u200b", "\ufeffvnet2", "\uff56net2",
    "vnet\u0662", "vnet\u00b2", "\U0001f600", "vnet2\U0001f600", "\U0010fffd", "\ufffe",
    "\uffff", "\u0130", "\u00df", "e\u0301", "VNET2", "vnet02", "vnet2.", "vnet2-",
    "vnet2_1", "vnet3_2", "vnet3_99", "vnet2-000000", "lo", "hostnic0", "eth0", "bonding_masters",
    "all", "default", "none", "null", "true", "0", "-1", "4294967296", "1e9",
)
OVERLONG_UNITS = ("A", "vnet2", "\u00e9", "\U0001f600", "../", "$(id)", "a\x01", "\u202e")
# kilobytes mostly; now and then hundreds (D-Bus allows up to 128 MiB per message)
OVERLONG_LENGTHS = (15, 16, 17, 63, 64, 65, 255, 256, 1024, 4097) * 4 + (65536, 262144)


def _repeat(unit: str, n: int) -> str:
    return (unit * (n // len(unit) + 1))[:n]


overlong = st.builds(_repeat, st.sampled_from(OVERLONG_UNITS), st.sampled_from(OVERLONG_LENGTHS))
ifname_like = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,17}", fullmatch=True)
hostile_strings = st.one_of(
    st.sampled_from(ODD_STRINGS),
    st.text(UNICODE, max_size=24),
    ifname_like,
    overlong,
    st.builds(lambda a, b: a + b, st.sampled_from(FIXED_NETWORKS + VMS),
              st.sampled_from(ODD_STRINGS)),
)


def role_strings(pool: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Mostly names that mean something to the daemon, often hostile ones."""
    return weighted((60, pick(pool)), (40, hostile_strings))


NETWORK_NAMES = ("vnet2",) * 4 + ("vnet3",) * 3 + FIXED_NETWORKS + NEW_NETWORKS + HOST_IFACES
network_names = role_strings(NETWORK_NAMES)
vm_names = role_strings(VMS)
ifnames = role_strings((PORT_PLACEHOLDER, PORT_PLACEHOLDER, "vnet3_1", "vnet3_2", "vnet2")
                       + HOST_IFACES)

OBJECT_PATHS = ("/", MANAGER_PATH, NETWORK_PATH, NETWORK_PATH + "/vnet2", "/org/freedesktop/DBus",
                "/a/b/c", "/_", "/" + "x" * 300)
object_paths = st.one_of(st.sampled_from(OBJECT_PATHS),
                         st.from_regex(r"(/[A-Za-z0-9_]{1,12}){1,6}", fullmatch=True))
SIGNATURES = ("", "s", "a{sv}", "v", "aaaaai", "(((s)))", "a{s(iav)}", "h", "ah", "g", "o" * 200)
signatures_g = st.sampled_from(SIGNATURES)
doubles = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -0.0, 1.5, 1500.0, 1e308, -1e308, 5e-324]))


# --- values of any type, by signature ---------------------------------------------------------
def _sig_strategy(depth: int) -> st.SearchStrategy[str]:
    base = st.sampled_from(tuple(BASIC) + ("v",))
    if depth == 0:
        return base
    sub = _sig_strategy(depth - 1)
    return st.one_of(
        base, base,
        sub.map(lambda s: "a" + s),
        st.tuples(st.sampled_from(BASIC), sub).map(lambda kv: f"a{{{kv[0]}{kv[1]}}}"),
        st.lists(sub, min_size=1, max_size=3).map(lambda xs: "(" + "".join(xs) + ")"),
    )


random_types = _sig_strategy(2)  # one complete type, nesting at most 3 containers


@cache
def typed(sig: str, depth: int = 0) -> st.SearchStrategy[Any]:
    """A JSON-encoded value of the complete type `sig`."""
    c = sig[0]
    if c in INT_RANGES:
        return ints(c)
    if c == "b":
        return st.booleans()
    if c == "d":
        return doubles
    if c == "s":
        return hostile_strings
    if c == "o":
        return object_paths
    if c == "g":
        return signatures_g
    if c == "h":
        return st.just(0)  # the worker opens a fresh fd for each 'h'
    if c == "v":
        return variants(depth + 1)
    if c == "a":
        inner = sig[1:]
        if inner.startswith("{"):
            key_sig, val_sig = split_signature(inner[1:-1])
            return st.lists(st.tuples(typed(key_sig, depth + 1), typed(val_sig, depth + 1))
                            .map(list), max_size=4)
        if inner == "y":
            return st.binary(max_size=64).map(bytes.hex)
        return st.lists(typed(inner, depth + 1), max_size=4)
    if c == "(":
        return st.tuples(*[typed(s, depth + 1) for s in split_signature(sig[1:-1])]).map(list)
    raise ValueError(f"no strategy for signature {sig!r}")


def carries_fd(sig: str, value: Any) -> bool:
    """Whether an encoded value holds a unix fd ('h'), at any depth (variants included)."""
    c = sig[0]
    if c == "h":
        return True
    if c == "v":
        return carries_fd(value[0], value[1])
    if c == "a":
        inner = sig[1:]
        if inner.startswith("{"):
            k, v = split_signature(inner[1:-1])
            return any(carries_fd(k, a) or carries_fd(v, b) for a, b in value)
        return inner != "y" and any(carries_fd(inner, x) for x in value)
    if c == "(":
        return any(carries_fd(t, x) for t, x in zip(split_signature(sig[1:-1]), value,
                                                    strict=True))
    return False


def V(sig: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[list]:  # noqa: N802
    return values.map(lambda v: [sig, v])


def _nest(inner: list, n: int) -> list:
    for _ in range(n):
        inner = ["v", inner]
    return inner


@cache
def variants(depth: int = 0) -> st.SearchStrategy[list]:
    """A variant of a random type: [signature, value]."""
    if depth >= 3:
        return st.one_of(V("s", hostile_strings), V("i", ints("i")), V("b", st.booleans()),
                         V("x", ints("x")))
    anything = random_types.flatmap(lambda s: V(s, typed(s, depth + 1)))
    return st.one_of(
        anything,
        V("s", hostile_strings), V("i", ints("i")), V("u", ints("u")), V("x", ints("x")),
        V("t", ints("t")), V("b", st.booleans()), V("d", doubles), V("y", ints("y")),
        V("as", st.lists(hostile_strings, max_size=3)),
        V("a{sv}", st.lists(st.tuples(hostile_strings, variants(depth + 1)).map(list),
                            max_size=3)),
        V("h", st.just(0)),
        # variants in variants, up to and past vnetd's nesting bound (16) but within D-Bus's
        st.builds(_nest, V("s", st.sampled_from(["nat", "vnet2", "1500"])), st.integers(1, 24)),
    )


# --- options that mean something, with right and wrong types -----------------------------------
def int_variant(edges: tuple[int, ...]) -> st.SearchStrategy[list]:
    e = st.sampled_from(edges)
    in_range = {c: [x for x in edges if INT_RANGES[c][0] <= x <= INT_RANGES[c][1]] for c in "iuxty"}
    choices = [V(c, st.sampled_from(xs) | ints(c)) for c, xs in in_range.items() if xs]
    return st.one_of(
        *choices,
        V("b", st.booleans()), V("d", doubles), V("s", e.map(str)),
        V("ai", st.lists(ints("i"), max_size=3)), V("v", V("i", ints("i"))),
    )


boolish = st.one_of(V("b", st.booleans()), V("s", st.sampled_from(["yes", "true", "1", "on"])),
                    V("i", st.sampled_from([0, 1, 2])), V("u", st.just(1)))
IP4 = ("172.16.12.1", "172.16.12.50", "172.16.12.200", "172.16.13.5", "172.16.14.9", "10.0.0.1",
       "0.0.0.0", "255.255.255.255", "172.16.12.255", "172.16.12.0", "1.2.3.4", "::1", "fd00::5",
       "172.16.12.050", "172.016.12.5", "172.16.12.5/24", " 172.16.12.5", "172.16.12", "1.2.3.4.5",
       "127.0.0.1", "224.0.0.1")
ip4 = st.one_of(st.sampled_from(IP4),
                st.tuples(*[st.integers(0, 300)] * 4).map(lambda t: ".".join(map(str, t))),
                hostile_strings)
SUBNETS = ("10.200.1.0/24", "10.200.2.0/24", "172.16.12.0/24", "172.16.13.0/24", "192.168.0.0/16",
           "0.0.0.0/0", "10.0.0.0/8", "172.16.40.1/24", "127.0.0.0/8", "224.0.0.0/4",
           "10.1.2.0/31", "10.1.2.0/32", "10.1.2.0/30", "169.254.0.0/16", "10.201.0.0/24 ",
           "10.202.0.0/33", "10.203.0.0/-1", "10.204.0.0/024")
subnet4 = st.one_of(st.sampled_from(SUBNETS),
                    st.tuples(ip4, st.integers(-1, 40)).map(lambda t: f"{t[0]}/{t[1]}"),
                    hostile_strings)
subnet6 = st.one_of(st.sampled_from(("fd00:1::/64", "fd00:1::1/64", "fe80::/64", "::/0",
                                     "2001:db8::/32", "fd00::/129", "::1/128", "fd00:2::/48")),
                    hostile_strings)
MACS = ("52:54:00:12:34:56", "52:54:00:AB:CD:EF", "01:00:5e:00:00:01", "00:00:00:00:00:00",
        "ff:ff:ff:ff:ff:ff", "52-54-00-12-34-56", "5254.0012.3456", "52:54:00:12:34",
        "52:54:00:12:34:56:78", "52:54:00:12:34:5g")
macs = st.one_of(st.sampled_from(MACS),
                 st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b)),
                 hostile_strings)
PORTS = ("80", "8080", "8000-8010", "0", "65535", "65536", "-1", "80-70", "1-65535", "08080", " 80",
         "80 ", "0x50", "1e3", "22", "2222", "8000-")
ports = st.one_of(V("s", st.sampled_from(PORTS) | hostile_strings),
                  int_variant((0, 1, 22, 80, 8080, 65535, 65536, -1)))
good_macs = st.builds(lambda b: "52:54:00:" + ":".join(f"{x:02x}" for x in b),
                      st.binary(min_size=3, max_size=3))


@dataclass(frozen=True)
class Key:
    """An option key: values that should be accepted (`good`) and ones aimed at its checks."""

    good: st.SearchStrategy[list] | None  # None: no value a fuzzer can know to be right
    bad: st.SearchStrategy[list]


@st.composite
def options(draw, keys: dict[str, Key]) -> list:
    """An a{sv}. Half the time a plausible one (known keys, good values) so that calls get past
    validation into the engine; otherwise known keys with aimed or wrongly typed values and
    random keys."""
    out = []
    if keys and draw(pick((True, False))):
        sane = sorted(k for k, v in keys.items() if v.good is not None)
        for key in draw(st.lists(pick(sane), unique=True, max_size=4)):
            out.append([key, draw(keys[key].good)])
        return out
    for _ in range(draw(st.integers(0, 6))):
        if keys and draw(pick((True, True, True, False))):
            key = draw(pick(sorted(keys)))
        else:
            key = draw(st.one_of(hostile_strings, st.sampled_from(
                ("name", "Mode", "mode ", "subnet\x01", "taps", "ifname", "uid", "queues"))))
        which = draw(pick((0, 1, 2, 2))) if key in keys else 0
        if which == 1 and keys[key].good is None:
            which = 2
        value = draw(variants() if which == 0 else keys[key].good if which == 1 else keys[key].bad)
        out.append([key, value])
    return out


def nat(lo: int, hi: int, codes: str = "iu") -> st.SearchStrategy[list]:
    """A small whole number as the D-Bus integer types a client might pick."""
    return st.one_of(*[V(c, st.integers(lo, hi)) for c in codes])


yes_no = V("b", st.booleans())
FORWARD_KEYS = {
    "proto": Key(V("s", st.sampled_from(("tcp", "udp"))),
                 V("s", st.sampled_from(("sctp", "TCP", "", "icmp", "tcp ")) | hostile_strings)),
    "family": Key(V("i", st.sampled_from((4, 6))),
                  st.one_of(int_variant((0, 5, -4, 2**32 - 4)),
                            V("s", st.sampled_from(("4", "6", "ipv4", "inet6"))))),
    "port": Key(st.one_of(V("s", st.integers(1024, 9000).map(str)), nat(1024, 9000, "iuq")),
                ports),
    "target": Key(V("s", st.sampled_from(("172.16.12.50", "172.16.12.9", "vm1", "web"))),
                  V("s", st.one_of(st.sampled_from(("172.16.13.50", "10.0.0.1")), ip4,
                                   vm_names))),
    "target-port": Key(nat(1, 65535, "iuq"), ports),
    "ext-addr": Key(V("s", st.sampled_from(("127.0.0.1", "10.99.0.1"))), V("s", ip4)),
    "iface": Key(V("s", st.sampled_from(HOST_IFACES)),
                 V("s", st.sampled_from(("eth0", "vnet2", "")) | hostile_strings)),
}
forward_specs = options(FORWARD_KEYS)
HOST_KEYS = {"vm": Key(V("s", st.sampled_from(VMS)), V("s", vm_names)),
             "mac": Key(V("s", good_macs), V("s", macs)),
             "ip": Key(V("s", st.integers(2, 31).map(lambda n: f"172.16.12.{n}")), V("s", ip4))}
# [overlay]: plausible ones (they define, and fail cleanly at start: 10.99.0.1 is not on the
# fuzzed host) and hostile ones, zoned addresses that could carry text into vtysh included
OVERLAY_ADDRS = ("10.99.0.1", "10.99.0.2", "fe80::1%eth0", "fd00::2%x\nip route 0.0.0.0/0 1.1.1.1",
                 "fd00::2", "0.0.0.0", "224.0.0.1", "127.0.0.1")
OVERLAY_KEYS = {
    "vni": Key(nat(1, 16777215, "iu"), int_variant((0, -1, 16777216, 2**32 - 1, 2**40))),
    "local": Key(V("s", st.just("10.99.0.1")), V("s", st.sampled_from(OVERLAY_ADDRS) | ip4)),
    "peers": Key(V("as", st.lists(st.sampled_from(("10.99.0.2", "10.99.0.3")), max_size=2,
                                  unique=True)),
                 st.one_of(V("as", st.lists(st.sampled_from(OVERLAY_ADDRS) | ip4, max_size=3)),
                           variants())),
    "dev": Key(None, V("s", st.sampled_from(("ul0", "lo", "../x", "")) | hostile_strings)),
    "port": Key(nat(1024, 65535), ports),
    "role": Key(V("s", st.sampled_from(("gateway", "member"))), V("s", hostile_strings)),
    "control": Key(V("s", st.sampled_from(("static", "evpn"))), V("s", hostile_strings)),
    "asn": Key(None, int_variant((0, 65000, 2**32, -1))),
    "route-reflector": Key(None, boolish),
}
DEFINE_KEYS = {
    "mode": Key(V("s", st.sampled_from(("nat", "host-only"))),
                V("s", st.sampled_from(("NAT", "bridge", "routed", "")) | hostile_strings)),
    "subnet": Key(V("s", st.integers(1, 9).map(lambda n: f"10.200.{n}.0/24")), V("s", subnet4)),
    "subnet6": Key(V("s", st.integers(1, 9).map(lambda n: f"fd00:{n}::/64")), V("s", subnet6)),
    "mtu": Key(nat(576, 9216), int_variant((575, 9217, 0, -1, 2**31 - 1, 2**32 - 1, 2**40,
                                             -(2**63)))),
    "autostart": Key(yes_no, boolish),
    "taps": Key(nat(1, 3), int_variant((0, 64, 65, 100, -1, 2**31 - 1))),
    "tap-user": Key(nat(0, 1000), int_variant((65534, 2**32 - 2, 2**32 - 1, -1, 2**40))),
    "tap-group": Key(V("s", st.just("vnet")),
                     V("s", st.sampled_from(("root", "nogroup", "wheel", "", "Vnet", "-g",
                                             "a" * 33, "no_such_group")) | hostile_strings)),
    "dhcp": Key(V("s", st.sampled_from(("dnsmasq", "none", "dhcpd"))),
                V("s", st.sampled_from(("udhcpd", "", "DNSMASQ")) | hostile_strings)),
    "dhcp-start": Key(V("s", st.just("10.200.1.100")), V("s", ip4)),
    "dhcp-end": Key(V("s", st.just("10.200.1.200")), V("s", ip4)),
    "domain": Key(V("s", st.sampled_from(("lan", "example.com"))),
                  V("s", st.sampled_from(("a..b", "-x.com", "x" * 64, "\u00e4.de", "local.",
                                          "localhost")) | hostile_strings)),
    "hosts": Key(V("aa{sv}", st.just([])),
                 st.one_of(V("aa{sv}", st.lists(options(HOST_KEYS), max_size=3)), variants())),
    "forwards": Key(V("aa{sv}", st.just([])),
                    st.one_of(V("aa{sv}", st.lists(forward_specs, max_size=2)), variants())),
    "overlay": Key(V("a{sv}", options(OVERLAY_KEYS)), variants()),
    "allow-host": Key(yes_no, boolish),
    "routed-with": Key(V("as", st.lists(st.sampled_from(FIXED_NETWORKS), max_size=2)),
                       st.one_of(V("as", st.lists(network_names, max_size=3)), variants())),
    "spoof-protection": Key(yes_no, boolish),
    "name": Key(V("s", st.sampled_from(NEW_NETWORKS)), V("s", network_names)),
}
ATTACH_KEYS = {
    "nic": Key(nat(0, 3), int_variant((32, -1, 2**32 - 1))),
    "queues": Key(nat(1, 4, "i"), int_variant((0, 9, -1, 256))),
    "vhost": Key(yes_no, boolish),
    "mac": Key(V("s", good_macs), V("s", macs)),
    "learn-mac": Key(yes_no, boolish),
    "holder-pid": Key(None, int_variant((0, 1, 2, 2**22 - 1, 2**22, -1, 300))),
}
ADDHOST_KEYS = {"ip": HOST_KEYS["ip"], "mac": HOST_KEYS["mac"]}

# (method, argument) -> the a{sv} keys it understands; other a{sv} get random keys
OPTION_KEYS = {
    ("Define", "options"): DEFINE_KEYS,
    ("Attach", "options"): ATTACH_KEYS,
    ("AddHost", "options"): ADDHOST_KEYS,
    ("AddForward", "forward"): FORWARD_KEYS,
    ("RemoveForward", "forward"): FORWARD_KEYS,
}
ROLES = {"name": network_names, "network": network_names, "vm": vm_names, "ifname": ifnames}
# ImportMacs keys: 'VM' (NIC 0) or 'VM/NIC', and near misses of the second form
mac_keys = st.one_of(st.sampled_from(VMS), vm_names,
                     st.tuples(st.sampled_from(VMS), st.sampled_from(
                         ("0", "1", "31", "32", "01", "-1", "", "x", "0/0", " 1"))).map("/".join))
mac_tables = st.lists(st.tuples(mac_keys, macs).map(list), max_size=4)


def argument(method: str, name: str, sig: str) -> st.SearchStrategy[Any]:
    """A value of the right type for an argument, aimed by its name where that means something."""
    if sig == "a{sv}":
        return options(OPTION_KEYS.get((method, name), {}))
    if sig == "s" and name in ROLES:
        return ROLES[name]
    if sig == "a{ss}":
        return st.one_of(mac_tables, typed(sig))
    if sig == "u":
        return ints("u", (0, 1, 2, 31, 32, 2**31, 2**32 - 1))
    return typed(sig)


# --- calls ------------------------------------------------------------------------------------
network_labels = weighted(
    (70, pick([label_escape(n) for n in FIXED_NETWORKS])),
    (15, pick(["_", "vnet2_2e", "vnet_32", "lo", "nosuch", "vnet2_"])),
    (15, hostile_strings.map(label_escape).filter(lambda s: len(s) < 200)),
)
flags = pick((0,) * 12 + (FLAG_INTERACTIVE,) * 2
             + (FLAG_NO_REPLY, FLAG_NO_AUTO_START, FLAG_INTERACTIVE | FLAG_NO_AUTO_START))


def _body(sig: str, method: str = "", names: tuple[str, ...] = ()) -> st.SearchStrategy[list]:
    types = split_signature(sig)
    parts = [argument(method, names[i], t) if i < len(names) else typed(t)
             for i, t in enumerate(types)]
    return st.tuples(*parts).map(list)


def _wrong_signature(right: str) -> st.SearchStrategy[str]:
    types = split_signature(right)
    swaps = {"s": "o", "u": "i", "b": "u", "a{sv}": "a{ss}", "a{ss}": "a{sv}", "i": "u"}
    options_ = [
        st.just(""),
        random_types.map(lambda t: right + t),
        st.lists(random_types, max_size=3).map("".join),
        st.just(right + "h"),
        st.just("h" + right),
    ]
    if types:
        options_.append(st.just("".join(types[:-1])))
        options_.append(st.integers(0, len(types) - 1).map(
            lambda i: "".join(swaps.get(t, "s") if j == i else t for j, t in enumerate(types))))
        options_.append(st.just("v" * len(types)))
    return st.one_of(*options_).filter(lambda s: len(s) < 200)


@st.composite
def contract_call(draw, m: MethodSpec) -> dict:
    """A call of a contract method: right types (aimed or hostile values), a wrong signature,
    or the right one with file descriptors nobody asked for."""
    mode = draw(pick(("typed",) * 7 + ("wrong-sig",) * 2 + ("fds",)))
    if m.on_network_object:
        path = f"{NETWORK_PATH}/{draw(network_labels)}"
    else:
        path = MANAGER_PATH
    iface = draw(pick((m.iface, m.iface, m.iface, None)))
    sig = m.in_sig if mode != "wrong-sig" else draw(_wrong_signature(m.in_sig))
    names = tuple(n for n, _ in m.args) if sig == m.in_sig else ()
    body = draw(_body(sig, m.name, names))
    extra_fds = draw(st.integers(1, 3)) if mode == "fds" else 0
    fd_in_body = any(carries_fd(t, v) for t, v in zip(split_signature(sig), body, strict=True))
    return {"kind": "contract", "mode": mode, "method": m.short, "path": path, "iface": iface,
            "member": m.name, "sig": sig, "body": body, "flags": draw(flags),
            "extra_fds": extra_fds, "mtype": MTYPE_CALL, "fd_in_body": fd_in_body}


RAW_PATHS = ("/", "/org", "/org/qemuvnet", MANAGER_PATH, MANAGER_PATH + "/port",
             MANAGER_PATH + "/port/vnet2_2dabcdef", NETWORK_PATH, NETWORK_PATH + "/nosuch",
             NETWORK_PATH + "/vnet2/extra", NETWORK_PATH + "/vnet2", "/org/freedesktop/DBus",
             "/x/y", "/org/qemuvnet/Vnet2", "/org/qemuvnet/Vnet1x")
RAW_IFACES = (None, "org.qemuvnet.Vnet1.Manager", "org.qemuvnet.Vnet1.Network",
              "org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Peer",
              "org.freedesktop.DBus.Properties", "org.freedesktop.DBus.ObjectManager",
              "org.qemuvnet.Vnet1", "org.qemuvnet.Vnet1.Port", "a.b")
RAW_MEMBERS = ("Introspect", "Ping", "GetMachineId", "Get", "GetAll", "Set", "GetManagedObjects",
               "Nope", "_", "Start", "Define", "Attach", "ListNetworks", "GetInfo", "Stop",
               "Detach")


@st.composite
def raw_call(draw, members: tuple[str, ...]) -> dict:
    """Off the contract: other paths, interfaces and members, standard interfaces, random
    bodies, fds attached, and signals sent straight to the service."""
    sig = draw(weighted((1, st.just("")), (1, st.just("s")), (1, st.just("ss")),
                        (1, st.just("ssv")), (3, st.lists(random_types, max_size=3).map("".join))))
    signal = draw(pick((True, False, False, False)))
    iface = draw(pick(RAW_IFACES))
    if signal and iface is None:
        iface = "org.qemuvnet.Vnet1.Manager"  # a signal needs an interface
    return {"kind": "raw", "mode": "signal" if signal else "raw",
            "method": "raw", "path": draw(pick(RAW_PATHS)), "iface": iface,
            "member": draw(pick(RAW_MEMBERS + members)), "sig": sig,
            "body": draw(_body(sig)), "flags": draw(flags),
            "extra_fds": draw(pick((0, 1, 1, 2))),
            "mtype": MTYPE_SIGNAL if signal else MTYPE_CALL}


def any_call(methods: list[MethodSpec]) -> st.SearchStrategy[dict]:
    """A contract method (each as likely as another), or now and then a call off the contract."""
    members = tuple(sorted({m.name for m in methods}))
    calls = [contract_call(m) for m in methods]
    raw = raw_call(members)
    return weighted((93, pick(calls).flatmap(lambda s: s)), (7, raw))


# --- judging outcomes ---------------------------------------------------------------------------
def judge(call: dict, outcome: dict, who: str, spec: MethodSpec | None) -> str | None:
    """None if the outcome is one the properties allow, else what is wrong with it."""
    if "timeout" in outcome:
        return f"no reply within {outcome['timeout']} s"
    if "local" in outcome:
        return f"the worker could not send it or lost its bus connection: {outcome['local']}"
    if outcome.get("sent") or "skipped" in outcome:
        return None  # no reply expected, or not sent: the call before it is the problem
    typed_call = (call["kind"] == "contract" and spec is not None and call["sig"] == spec.in_sig)
    authorized = spec is not None and spec.action in GRANTED[who]
    if outcome.get("ok"):
        if typed_call and outcome["sig"] != spec.out_sig:
            return f"answered with signature '{outcome['sig']}', the contract says '{spec.out_sig}'"
        if typed_call and not authorized:
            return f"allowed for {who} without the '{spec.action}' authorization"
        if typed_call and call.get("fd_in_body"):
            return "accepted a unix fd (a variant of type 'h') where the contract takes none"
        return None
    name, text = outcome.get("err", ""), outcome.get("text", "")
    if name == DBUS_ERR + "NoReply":
        return f"NoReply: {text}"
    if name.startswith(ERR_PREFIX):
        if any(m in text.lower() for m in INTERNAL_MARKERS):
            return f"internal error {name}: {text}"
        if not text.strip():
            return f"{name} without a sentence"
        if CONTROL.search(text):
            return f"{name} with control characters in its sentence (a caller's, raw?): {text!r}"
        if typed_call and not authorized and name != INVALID_ARGUMENT:
            return (f"{who} reached the method without the '{spec.action}' authorization: "
                    f"{name}: {text}")
        return None
    if name in STANDARD_REFUSALS:
        if not text.strip():
            return f"{name} without a sentence"
        if typed_call and authorized and who == "root" and name in AUTH_REFUSALS:
            return f"root refused: {name}: {text}"
        return None
    if name in ROUTING_REFUSALS and call["kind"] == "raw":
        return None
    return f"unexpected error {name}: {text}"


def abbreviate(value: Any, limit: int = 60) -> Any:
    """A call for a report: long strings shortened, so a reproducer stays readable."""
    if isinstance(value, str) and len(value) > limit:
        return f"<{len(value)} chars: {value[:24]!r}...>"
    if isinstance(value, list):
        return [abbreviate(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: abbreviate(v, limit) for k, v in value.items()}
    return value


# --- the worker -------------------------------------------------------------------------------
WORKER = r'''
import socket
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast import BusType

DEST = "org.qemuvnet.Vnet1"
TIMEOUT = float(sys.argv[1])
PORT_PLACEHOLDER = sys.argv[2]
held = []  # (ifname, [fds]) of ports this worker attached and still holds



def new_fd(fds):
    kind = len(fds) % 3
    if kind == 0:
        fd = os.open("/dev/null", os.O_RDONLY)
    elif kind == 1:
        r, w = os.pipe()
        os.close(w)
        fd = r
    else:
        a, b = socket.socketpair()
        b.close()
        fd = a.detach()
    fds.append(fd)
    return len(fds) - 1


def decode(sig, j, fds):
    c = sig[0]
    if c in "ynqiuxt":
        return int(j)
    if c == "b":
        return bool(j)
    if c == "d":
        return float(j)
    if c == "s":
        if j == PORT_PLACEHOLDER:
            return held[-1][0] if held else "vnet2-000000"
        return j
    if c in "og":
        return j
    if c == "h":
        return new_fd(fds)
    if c == "v":
        vsig, val = j
        return Variant(vsig, decode(vsig, val, fds))
    if c == "a":
        inner = sig[1:]
        if inner.startswith("{"):
            k, v = split_signature(inner[1:-1])
            return {decode(k, a, fds): decode(v, b, fds) for a, b in j}
        if inner == "y":
            return bytes.fromhex(j)
        return [decode(inner, x, fds) for x in j]
    if c == "(":
        return [decode(s, x, fds) for s, x in zip(split_signature(sig[1:-1]), j)]
    raise ValueError(sig)


def plain(v):
    if isinstance(v, Variant):
        return plain(v.value)
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, bytes):
        return v.hex()
    return v


async def one(bus, c):
    fds = []
    try:
        body = [decode(t, v, fds) for t, v in zip(split_signature(c["sig"]), c["body"])]
        for _ in range(c.get("extra_fds", 0)):
            new_fd(fds)
        msg = Message(destination=DEST, path=c["path"], interface=c.get("iface"),
                      member=c["member"], signature=c["sig"], body=body,
                      flags=c.get("flags", 0), unix_fds=fds,
                      message_type=MessageType(c.get("mtype", 1)))
    except Exception as e:
        for fd in fds:
            os.close(fd)
        return {"local": "building the message: " + repr(e)}
    try:
        if c.get("mtype", 1) != 1 or c.get("flags", 0) & 1:
            await asyncio.wait_for(bus.send(msg), TIMEOUT)
            return {"sent": True}
        reply = await asyncio.wait_for(bus.call(msg), TIMEOUT)
    except asyncio.TimeoutError:
        return {"timeout": TIMEOUT}
    except Exception as e:
        return {"local": repr(e)}
    finally:
        for fd in fds:  # after the write (the reply came, or send's future resolved)
            os.close(fd)
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        for fd in reply.unix_fds:
            os.close(fd)
        return {"err": reply.error_name, "text": text[:2000]}
    out = {"ok": True, "sig": reply.signature, "nfds": len(reply.unix_fds)}
    if reply.unix_fds:
        ifname = ""
        if reply.body and isinstance(reply.body[0], dict):
            v = reply.body[0].get("ifname")
            ifname = v.value if isinstance(v, Variant) else ""
        held.append((ifname, list(reply.unix_fds)))
        while len(held) > 4:
            for fd in held.pop(0)[1]:
                os.close(fd)
        out["port"] = ifname
    if c.get("want_body"):
        out["body"] = plain(reply.body)
    return out


async def connect():
    bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
    await bus.connect()
    return bus


async def main():
    bus = await connect()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        req = json.loads(line)
        if "calls" in req:
            outcomes = []
            for c in req["calls"]:
                if outcomes and ("timeout" in outcomes[-1] or "skipped" in outcomes[-1]):
                    outcomes.append({"skipped": "after a call that got no reply"})
                    continue
                if not bus.connected:
                    outcomes.append({"local": "the bus connection was closed"})
                    bus = await connect()
                    continue
                outcomes.append(await one(bus, c))
            print(json.dumps({"outcomes": outcomes}), flush=True)
        elif req.get("flush"):
            n = len(held)
            while held:
                for fd in held.pop()[1]:
                    os.close(fd)
            print(json.dumps({"closed": n}), flush=True)
    bus.disconnect()

asyncio.run(main())
'''
# the worker splits signatures with this module's own functions (one parser, not two)
WORKER_SOURCE = (inspect.getsource(_complete_end) + "\n\n" + inspect.getsource(split_signature)
                 + WORKER)


class Worker:
    """A caller (root or a test user) that sends batches of calls on one bus connection."""

    def __init__(self, who: str, timeout: float = 20.0):
        self.who = who
        self.timeout = timeout
        self.stderr = tempfile.NamedTemporaryFile(prefix=f"vnet-fuzz-{who}-", suffix=".err",
                                                  delete=False)
        argv = [str(PY), script(WORKER_SOURCE), str(timeout), PORT_PLACEHOLDER]
        if USERS[who]:
            argv = as_user(USERS[who], argv)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)

    def _ask(self, req: dict, wait: float) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = read_line(self.proc, wait)
        if line is None:
            raise AssertionError(f"the {self.who} worker did not answer within {wait:.0f} s")
        if not line:
            raise AssertionError(f"the {self.who} worker ended: {self.errors()}")
        return json.loads(line)

    def run(self, calls: list[dict]) -> list[dict]:
        return self._ask({"calls": calls}, len(calls) * (self.timeout + 1) + 10)["outcomes"]

    def call(self, member: str, sig: str = "", body: list | None = None,
             want_body: bool = False) -> dict:
        """One plain Manager call (values need no encoding: only 's' and 'b' arguments)."""
        c = {"kind": "contract", "path": MANAGER_PATH, "iface": "org.qemuvnet.Vnet1.Manager",
             "member": member, "sig": sig, "body": body or [], "want_body": want_body}
        return self.run([c])[0]

    def flush(self) -> int:
        return self._ask({"flush": True}, 30)["closed"]

    def errors(self) -> str:
        try:
            return Path(self.stderr.name).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        os.unlink(self.stderr.name)


def foreign_log_lines(log: str) -> list[str]:
    """Lines of a vnetd log that its logger did not start (tracebacks are reported apart)."""
    out, in_traceback = [], False
    for line in log.splitlines():
        if LOG_LINE.match(line):
            in_traceback = False
        elif line.startswith("Traceback") or in_traceback:
            in_traceback = True
        elif line.strip():
            out.append(line)
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
