"""vnetd.bus pure helpers: plain values <-> D-Bus variants, and network names as object-path
elements."""

from __future__ import annotations

import io
import re

import pytest
from dbus_fast import Message, Variant
from dbus_fast.validators import is_object_path_valid
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from vnetd import api
from vnetd.bus import (
    MAX_DEPTH,
    Budget,
    label_escape,
    label_unescape,
    network_path,
    to_asv,
    to_variant,
    unwrap,
)
from vnetd.errors import InvalidArgument
from vnetd.model import validate_ifname

# Bounded and without the explain phase, so that the unit suite stays fast even when a
# property fails (explain would re-run it many times and write patch files).
FAST = settings(max_examples=100, deadline=None, database=None,
                phases=(Phase.explicit, Phase.generate, Phase.shrink))
NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", fullmatch=True)


def wire(body_value: dict, signature: str = "a{sv}"):
    """Marshal a message carrying the value and unmarshal it again, as the bus would."""
    from dbus_fast._private.unmarshaller import Unmarshaller

    msg = Message(destination="org.qemuvnet.Vnet1", path="/org/qemuvnet/Vnet1",
                  interface="org.qemuvnet.Vnet1.Manager", member="Define",
                  signature=signature, body=[body_value], serial=1)
    un = Unmarshaller(io.BytesIO(bytes(msg._marshall(False))))
    assert un.unmarshall()
    return un.message.body[0]


# --- to_variant / unwrap -------------------------------------------------------------------
@pytest.mark.parametrize("value,sig", [
    (True, "b"), (False, "b"), (0, "i"), (-(2**31), "i"), (2**31 - 1, "i"), (2**31, "x"),
    (-(2**31) - 1, "x"), (2**63 - 1, "x"), ("", "s"), ("vnet2", "s"), ("é€", "s"),
    ({"a": 1}, "a{sv}"), ([{"a": 1}], "aa{sv}"), (["a", "b"], "as"), ([], "as"),
    ([1, 2**40], "ax"), (("a", "b"), "as"),
])
def test_to_variant_signatures(value, sig):
    v = to_variant(value)
    assert isinstance(v, Variant)
    assert v.signature == sig
    back = unwrap(v)
    assert back == (list(value) if isinstance(value, tuple) else value)
    assert type(back) is type(value) or isinstance(value, tuple)


def test_bool_is_not_encoded_as_int():
    assert to_variant(True).signature == "b"
    with pytest.raises(TypeError):
        to_variant([True, 1])  # booleans are not integers here


def test_variants_pass_through():
    v = Variant("u", 7)
    assert to_variant(v) is v


@pytest.mark.parametrize("value", [None, 1.5, b"bytes", object(), [1, "a"], {1, 2}, 2**64])
def test_unencodable_values_are_refused(value):
    with pytest.raises(Exception):  # noqa: B017  (TypeError, or dbus-fast's range error)
        to_variant(value)


def test_to_asv_drops_none():
    d = to_asv({"a": 1, "b": None, "c": "x"})
    assert set(d) == {"a", "c"}
    assert unwrap(d) == {"a": 1, "c": "x"}


NETWORK_INFO = {
    "name": "vnet2", "state": "active", "mode": "nat", "subnet": "172.16.12.0/24",
    "gateway": "172.16.12.1", "mtu": 1500, "autostart": False, "taps": 4,
    "tap-names": ["vnet2_1", "vnet2_2", "vnet2_3", "vnet2_4"], "tap-user": 4294967294,
    "hosts": [{"mac": "52:54:00:01:02:03", "ip": "172.16.12.5"}], "empty": [],
    "dhcp": {"range": {"start": "172.16.12.32", "end": "172.16.12.254"}},
}


def test_to_asv_unwrap_round_trip_over_the_wire():
    encoded = to_asv(NETWORK_INFO)
    assert unwrap(encoded) == NETWORK_INFO
    assert unwrap(wire(encoded)) == NETWORK_INFO


# D-Bus strings: no NUL
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
SCALAR = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), TEXT)
LEAF = st.one_of(SCALAR, st.lists(TEXT, max_size=4),
                 st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=4))
TABLE = st.dictionaries(TEXT, LEAF, max_size=4)
# What the API carries: options and network info (a{sv}) whose values are scalars, lists,
# a table, a list of tables (forwards, hosts), or a table of tables.
VALUE = st.one_of(LEAF, TABLE, st.lists(TABLE, min_size=1, max_size=3),
                  st.dictionaries(TEXT, TABLE, max_size=3))


@FAST
@given(st.dictionaries(TEXT, VALUE, max_size=5))
def test_round_trip_property(d):
    encoded = to_asv(d)
    assert unwrap(encoded) == d
    assert unwrap(wire(encoded)) == d


def nested_variant(levels: int) -> Variant:
    v: Variant = Variant("s", "x")
    for _ in range(levels):
        v = Variant("v", v)
    return v


def test_moderate_nesting_is_accepted():
    assert unwrap({"a": {"b": Variant("a{sv}", {"c": Variant("s", "d")})}}) == \
        {"a": {"b": {"c": "d"}}}
    assert unwrap(nested_variant(MAX_DEPTH - 1)) == "x"


@pytest.mark.parametrize("levels", [MAX_DEPTH + 2, 20, 64, 500])
def test_deep_variant_nesting_is_refused(levels):
    with pytest.raises(InvalidArgument) as ei:
        unwrap({"options": nested_variant(levels)})
    assert ei.value.message.endswith(".")
    assert "nested" in ei.value.message


def test_deep_list_and_dict_nesting_is_refused():
    deep: object = "x"
    for _ in range(50):
        deep = [deep]
    with pytest.raises(InvalidArgument):
        unwrap(deep)
    deep = "x"
    for _ in range(50):
        deep = {"k": deep}
    with pytest.raises(InvalidArgument):
        unwrap(deep)


def test_deep_nesting_from_the_wire_is_refused():
    deep = nested_variant(40)
    got = wire({"options": deep})
    with pytest.raises(InvalidArgument):
        unwrap(got)


# --- object path labels --------------------------------------------------------------------
LABEL = re.compile(r"[A-Za-z0-9_]+")


@pytest.mark.parametrize("name,label", [
    ("vnet2", "vnet2"), ("br-lan", "br_2dlan"), ("a.b", "a_2eb"), ("x_y", "x_5fy"),
    ("A9", "A9"),
])
def test_label_escape_examples(name, label):
    assert label_escape(name) == label
    assert label_unescape(label) == name


def test_label_of_empty_string():
    assert LABEL.fullmatch(label_escape(""))


@FAST
@given(NAMES)
def test_label_round_trip_for_valid_network_names(name):
    assert validate_ifname(name) == name
    label = label_escape(name)
    assert LABEL.fullmatch(label), label
    assert label_unescape(label) == name
    path = network_path(name)
    assert path == f"{api.NETWORK_PATH}/{label}"
    assert is_object_path_valid(path)


@FAST
@given(NAMES, NAMES)
def test_labels_of_different_names_differ(a, b):
    if a != b:
        assert label_escape(a) != label_escape(b)


def test_every_allowed_character_escapes_to_a_valid_label():
    chars = "".join(chr(c) for c in range(128) if re.fullmatch(r"[A-Za-z0-9_.-]", chr(c)))
    for c in chars:
        name = "a" + c
        assert LABEL.fullmatch(label_escape(name))
        assert label_unescape(label_escape(name)) == name


def test_one_calls_arguments_are_bounded_together():
    """Each argument within its own bounds, but all of one call's together too: items and
    characters of text are counted across the arguments sharing a Budget."""
    budget = Budget()
    unwrap(Variant("as", ["x"] * 40000), 0, budget)
    with pytest.raises(InvalidArgument, match="more than 65536 items in all"):
        unwrap(Variant("as", ["x"] * 40000), 0, budget)
    budget = Budget()
    unwrap({"a": Variant("s", "y" * 4000)}, 0, budget)
    with pytest.raises(InvalidArgument, match="more than 1048576 characters of text"):
        unwrap({f"k{i}": Variant("s", "y" * 4000) for i in range(300)}, 0, budget)
    # what a real call carries at its largest (an import of a full network's MACs) passes
    macs = {f"vm{i}/0": f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}" for i in range(4096)}
    assert unwrap(macs, 0, Budget()) == macs


def test_a_path_too_long_to_name_a_network_is_not_read():
    """An object path may be as long as a message (32 MiB on the system bus), and `_` is a
    path character: unescaping a few MiB of them held the event loop for seconds, before
    any limit of vnetd's. A path element longer than any network name makes is no
    network's, unread."""
    import time

    from vnetd.bus import LABEL_MAX, network_of

    longest = network_path("a" * 15)
    assert network_of(longest) == "a" * 15
    escaped = network_path("-" * 15)
    assert len(escaped) - len(api.NETWORK_PATH) - 1 == LABEL_MAX
    assert network_of(escaped) == "-" * 15
    t = time.perf_counter()
    assert network_of(api.NETWORK_PATH + "/" + "_" * (8 << 20)) is None
    assert time.perf_counter() - t < 0.05


def test_an_unknown_method_error_repeats_what_the_caller_named_clipped():
    """The error names the interface, member and path the caller gave, each clipped: one
    near the bus's largest message would have made a reply larger than the bus takes, which
    costs vnetd its connection."""
    from types import SimpleNamespace

    from vnetd.bus import Service

    msg = Message(destination="org.qemuvnet.Vnet1", path="/x/" + "y" * (1 << 20),
                  interface="a.b", member="M" * 255, serial=7, sender=":1.5")
    fake = SimpleNamespace(_error=lambda m, name, text: Message.new_error(m, name, text))
    err = Service._unknown(fake, msg)
    assert len(err.body[0]) < 400 and err.body[0].startswith("No method a.b.MMM")


def test_bytes_count_against_a_calls_budget():
    """No method takes bytes, but an option may hold them (`ay` in a variant): they count as
    text does, so a call cannot carry 30 MiB past the budget (and hold them while polkit is
    asked)."""
    unwrap({"x": Variant("ay", bytes(1000))}, 0, Budget())
    with pytest.raises(InvalidArgument, match="text and bytes"):
        unwrap({"x": Variant("ay", bytes(30 << 20))}, 0, Budget())
