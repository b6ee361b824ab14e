"""vnet_common.names and vnetd.model: validation of everything a caller can send, addressing,
and the TOML round trip.

Rules under test (every name, address and count is validated here): network names are Linux
interface names of 1-15 bytes of [A-Za-z0-9_.-] that are not '.'/'..' (and here never look
like an option); vnetN gets 172.16.(10+N).0/24 with gateway .1 unless a subnet is given;
'-n COUNT' pre-creates taps NAME_1..NAME_COUNT with COUNT 1..64 and tap names that still fit
15 bytes; every refusal is an InvalidArgument whose message is a sentence naming the bad
value; definitions round-trip exactly through TOML.
"""

from __future__ import annotations

import ipaddress
import re
import string
import tomllib

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from vnet_common.limits import MAX_IFNAME, MAX_MTU, MAX_TAPS, MIN_MTU
from vnet_common.names import (
    default_subnet,
    network_number,
    parse_subnet4,
    parse_subnet6,
    validate_ifname,
    validate_network_name,
)
from vnet_common.toml import render_toml
from vnetd import errors
from vnetd.errors import InvalidArgument, VnetError
from vnetd.model import Network, bridge_mac

# Bounded and without the explain phase, so that the unit suite stays fast even when a
# property fails (explain would re-run it many times and write patch files).
FAST = settings(max_examples=100, deadline=None, database=None,
                phases=(Phase.explicit, Phase.generate, Phase.shrink))
ALLOWED = set(string.ascii_letters + string.digits + "_.-")


def shown(value: object) -> list[str]:
    """The ways an error sentence may quote a value: as is, or with non-ASCII escaped."""
    text = value if isinstance(value, str) else repr(value)
    return [text, text.encode("unicode_escape", "backslashreplace").decode("ascii")]


def assert_sentence(message: str, *values: object) -> None:
    """A message a person can read: a capitalised or quoting start, a full stop at the end, no
    Python noise, and each bad value quoted in it."""
    assert isinstance(message, str) and message.strip() == message
    assert len(message) >= 15, message
    assert message[0].isupper() or message[0] in "'\"", message
    assert message.endswith("."), message
    for noise in ("Traceback", "ValueError", "TypeError", "KeyError", "<class", "None."):
        assert noise not in message, message
    for v in values:
        assert any(s in message for s in shown(v)), f"{v!r} not named in: {message}"


def refused(fn, *args, **kw) -> str:
    with pytest.raises(InvalidArgument) as ei:
        fn(*args, **kw)
    e = ei.value
    assert e.message == str(e)
    assert e.dbus_name == "org.qemuvnet.Vnet1.Error.InvalidArgument"
    return e.message


# --- the error classes ---------------------------------------------------------------------
def test_error_classes_have_distinct_dbus_names():
    names = [cls.dbus_name for cls in errors.ALL_ERRORS]
    assert len(set(names)) == len(names)
    for cls in errors.ALL_ERRORS:
        assert issubclass(cls, VnetError)
        assert re.fullmatch(r"org\.(qemuvnet\.Vnet1|freedesktop\.DBus)\.Error\.[A-Za-z]+",
                            cls.dbus_name)
    assert InvalidArgument.dbus_name == "org.qemuvnet.Vnet1.Error.InvalidArgument"
    assert errors.NotFound.dbus_name.endswith(".NotFound")
    assert errors.AccessDenied.dbus_name == "org.freedesktop.DBus.Error.AccessDenied"


# --- names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [
    "a", "0", "vnet0", "vnet3", "br-lan.10", "x_y", "A.b-c_d", "a" * 15, "abcdefghijklmn5",
])
def test_valid_names_are_returned_unchanged(name):
    assert validate_ifname(name) == name
    assert validate_network_name(name) == name
    assert len(name.encode()) <= MAX_IFNAME == 15


@pytest.mark.parametrize("name", ["a" * 16, "vnet" + "0" * 12, "abcdefghijklmnop" + "q" * 10])
def test_names_of_16_bytes_or_more_are_too_long(name):
    msg = refused(validate_network_name, name)
    assert "too long" in msg
    assert "15" in msg
    assert_sentence(msg, name)


def test_15_vs_16_bytes_boundary():
    assert validate_ifname("n" * 15) == "n" * 15
    assert "too long" in refused(validate_ifname, "n" * 16)


def test_unicode_is_counted_in_bytes_not_characters():
    # 8 characters but 16 bytes in UTF-8: too long for IFNAMSIZ.
    name = "é" * 8
    assert len(name) == 8 and len(name.encode()) == 16
    msg = refused(validate_ifname, name)
    assert "too long" in msg
    assert_sentence(msg, name)
    # 5 characters / 15 bytes: fits the length but is outside the allowed set.
    name = "€" * 5
    assert len(name.encode()) == 15
    msg = refused(validate_ifname, name)
    assert "too long" not in msg
    assert_sentence(msg, name)


@pytest.mark.parametrize("name", [
    "../x", "a b", ";rm -rf", "$(x)", "`id`", "x|y", "a&b", "a/b", "a:b", "a\\b", "a\tb",
    "a\nb", "vnet0\n", "a\x00b", "-x", "--help", ".", "..", ".x", "vnetä", "ǅ",
])
def test_bad_names_are_refused_and_named(name):
    msg = refused(validate_network_name, name)
    assert_sentence(msg, name)
    with pytest.raises(InvalidArgument):
        Network.from_options(name, {"subnet": "10.0.0.0/24"})


def test_empty_name_is_refused():
    msg = refused(validate_network_name, "")
    assert_sentence(msg)
    assert "empty" in msg


@pytest.mark.parametrize("value", [None, 42, 3.5, b"vnet0", ["vnet0"], {"vnet0": 1}])
def test_non_string_names_are_refused(value):
    refused(validate_network_name, value)
    with pytest.raises(InvalidArgument):
        Network.from_options(value, {"subnet": "10.0.0.0/24"})


@pytest.mark.parametrize("value", [42, b"vnet0", ["vnet0"]])
def test_non_string_name_message_names_the_value_and_does_not_claim_it_is_empty(value):
    msg = refused(validate_network_name, value)
    assert "empty" not in msg, msg
    assert_sentence(msg, value)


@FAST
@given(st.one_of(
    st.text(max_size=20),
    st.text(alphabet=sorted(ALLOWED) + ["/", " ", "é", "\x00", "$", ";"], max_size=18),
    st.from_regex(r"[A-Za-z0-9_.-]{1,17}", fullmatch=True),
))
def test_anything_validate_ifname_accepts_is_1_to_15_bytes_of_the_allowed_set(name):
    try:
        out = validate_ifname(name)
    except InvalidArgument as e:
        assert e.message.endswith(".")
        return
    assert out == name
    assert 1 <= len(name.encode("utf-8")) <= 15
    assert set(name) <= ALLOWED
    assert name not in (".", "..")
    assert not name.startswith("-")


@FAST
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", fullmatch=True))
def test_every_name_of_the_documented_form_is_accepted(name):
    assert validate_ifname(name) == name


# --- subnets -------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["172.16.12.0/24", "10.0.0.0/8", "192.168.7.4/30",
                                  "10.20.30.0/23"])
def test_valid_ipv4_subnets(text):
    net = parse_subnet4(text)
    assert net == ipaddress.IPv4Network(text)
    n = Network.from_options("lab", {"subnet": text})
    assert n.subnet == net
    assert n.gateway == net.network_address + 1


@pytest.mark.parametrize("text", [
    "abc", "", "172.16.12/24", "172.16.12.0/33", "172.16.12.0/", "300.1.1.0/24",
    "172.16.12.0/24/1", " 172.16.12.0/24", "172.16.12.0/-1", "fd00::/64", "172.16.12.0/x",
])
def test_malformed_ipv4_subnets(text):
    msg = refused(parse_subnet4, text)
    assert_sentence(msg, text)
    with pytest.raises(InvalidArgument):
        Network.from_options("lab", {"subnet": text})


@pytest.mark.parametrize("text", ["172.16.12.1/24", "10.0.0.5/8", "192.168.1.128/24"])
def test_ipv4_subnet_with_host_bits_set(text):
    msg = refused(parse_subnet4, text)
    assert_sentence(msg, text)
    assert "host bits" in msg


def test_ipv4_subnet_without_prefix():
    msg = refused(parse_subnet4, "172.16.12.0")
    assert_sentence(msg, "172.16.12.0")
    assert "prefix" in msg


@pytest.mark.parametrize("text", ["172.16.12.0/31", "172.16.12.1/32", "10.0.0.0/7",
                                  "0.0.0.0/0", "12.0.0.0/6"])
def test_ipv4_prefix_length_bounds(text):
    msg = refused(parse_subnet4, text)
    assert_sentence(msg, "/" + text.split("/")[1])


def test_ipv4_prefix_length_edges_accepted():
    assert parse_subnet4("10.0.0.0/8").prefixlen == 8
    assert parse_subnet4("10.0.0.0/30").prefixlen == 30


@pytest.mark.parametrize("text", ["127.0.0.0/8", "127.1.0.0/16", "224.0.0.0/24",
                                  "239.1.0.0/16", "169.254.0.0/16", "240.0.0.0/8",
                                  "0.0.0.0/8", "255.255.255.0/24"])
def test_special_purpose_ipv4_ranges_refused(text):
    msg = refused(parse_subnet4, text)
    assert_sentence(msg, text)


@pytest.mark.parametrize("value", [42, None, ["10.0.0.0/24"], b"10.0.0.0/24"])
def test_non_string_ipv4_subnet_refused(value):
    refused(parse_subnet4, value)
    with pytest.raises(InvalidArgument):
        Network.from_options("vnet2", {"subnet": value})


@pytest.mark.parametrize("text", ["fd00:12::/64", "2001:db8:1::/48", "fd00::/120",
                                  "fd12:3456:789a:1::/64"])
def test_valid_ipv6_prefixes(text):
    net = parse_subnet6(text)
    assert net == ipaddress.IPv6Network(text)
    n = Network.from_options("vnet2", {"subnet6": text})
    assert n.subnet6 == net
    assert n.gateway6 == net.network_address + 1


@pytest.mark.parametrize("text", ["fd00:::/64", "xyz::/64", "fd00::/129", "", "fd00::/ 64",
                                  "172.16.0.0/24", "fd00::/64/1"])
def test_malformed_ipv6_prefixes(text):
    msg = refused(parse_subnet6, text)
    assert_sentence(msg, text)


def test_ipv6_prefix_with_host_bits_or_without_length():
    msg = refused(parse_subnet6, "fd00:12::1/64")
    assert_sentence(msg, "fd00:12::1/64")
    msg = refused(parse_subnet6, "fd00:12::")
    assert_sentence(msg, "fd00:12::")
    assert "length" in msg


@pytest.mark.parametrize("text", ["fd00::/47", "fd00::/121", "fd00::1/128", "::/0"])
def test_ipv6_prefix_length_bounds(text):
    msg = refused(parse_subnet6, text)
    assert_sentence(msg, "/" + text.split("/")[1])


@pytest.mark.parametrize("text", ["ff02::/64", "ff00::/64", "fe80::/64", "::1/128",
                                  "::/64", "::ffff:0:0/96"])
def test_special_purpose_ipv6_ranges_refused(text):
    # '::/64' would make the gateway ::1, the loopback address; '::ffff:0:0/96' is the
    # IPv4-mapped range, never valid on a link.
    msg = refused(parse_subnet6, text)
    assert_sentence(msg)


def test_subnet6_is_optional_and_absent_means_none():
    n = Network.from_options("vnet2", {})
    assert n.subnet6 is None and n.gateway6 is None
    assert "subnet6" not in n.to_dict()


# --- addressing from the name --------------------------------------------------------------
@pytest.mark.parametrize("name,subnet", [
    ("vnet0", "172.16.10.0/24"), ("vnet2", "172.16.12.0/24"), ("vnet3", "172.16.13.0/24"),
    ("vmnet12", "172.16.22.0/24"), ("vnet007", "172.16.17.0/24"),
    ("vnet245", "172.16.255.0/24"),
])
def test_default_subnet_from_qemu_vlan_names(name, subnet):
    assert default_subnet(name) == ipaddress.IPv4Network(subnet)
    n = Network.from_options(name, {})
    assert str(n.subnet) == subnet
    assert str(n.gateway) == subnet.replace("0/24", "1")
    assert n.bridge == name


def test_network_number():
    assert network_number("vnet0") == 0
    assert network_number("vnet42") == 42
    assert network_number("vnet") is None
    assert network_number("vnet2a") is None


@pytest.mark.parametrize("name", ["lab", "vnet", "vnet2a", "br-x", "vnet2."])
def test_name_without_trailing_digits_needs_a_subnet(name):
    msg = refused(Network.from_options, name, {})
    assert_sentence(msg, name)
    assert "subnet" in msg
    assert Network.from_options(name, {"subnet": "10.9.0.0/24"}).subnet == \
        ipaddress.IPv4Network("10.9.0.0/24")


@pytest.mark.parametrize("name,number", [("vnet246", "246"), ("vnet999", "999"),
                                         ("vnet99999999999", "99999999999")])
def test_too_large_network_number_needs_a_subnet(name, number):
    msg = refused(Network.from_options, name, {})
    assert_sentence(msg, number)
    assert Network.from_options(name, {"subnet": "10.9.0.0/24"}).name == name


def test_explicit_subnet_overrides_the_default():
    n = Network.from_options("vnet2", {"subnet": "10.7.0.0/24", "subnet6": "fd00:7::/64"})
    assert str(n.subnet) == "10.7.0.0/24"
    assert str(n.gateway) == "10.7.0.1"
    assert str(n.gateway6) == "fd00:7::1"


# --- taps ----------------------------------------------------------------------------------
def test_no_taps_by_default():
    n = Network.from_options("vnet3", {})
    assert n.taps == 0 and n.tap_names == []
    assert "taps" not in n.to_dict()


@pytest.mark.parametrize("count", [1, 4, 63, MAX_TAPS])
def test_tap_counts_accepted(count):
    n = Network.from_options("vnet3", {"taps": count})
    assert n.taps == count
    assert n.tap_names == [f"vnet3_{j}" for j in range(count)]  # qemu-vlan's NAME_0..
    assert len(set(n.tap_names)) == count
    for t in n.tap_names:
        assert validate_ifname(t, "tap name") == t


@pytest.mark.parametrize("count", [0, 65, 100000, -1, 2**40])
def test_tap_counts_refused(count):
    msg = refused(Network.from_options, "vnet3", {"taps": count})
    assert_sentence(msg, str(count))
    assert "64" in msg


@pytest.mark.parametrize("value", ["4", True, 4.0, None, [4]])
def test_tap_count_must_be_a_whole_number(value):
    refused(Network.from_options, "vnet3", {"taps": value})


@pytest.mark.parametrize("name", ["br5", "10", "a1b2", "lab3", "vnet", "myvnet2", "vnet2x",
                                  "vnet2_1"])
def test_other_names_get_no_subnet_from_their_digits(name):
    """Only qemu-vlan's vnetN/vmnetN derive a subnet: 'lab3' taking 172.16.13.0/24 unasked
    would block vnet3; a bridged network needs none."""
    msg = refused(Network.from_options, name, {})
    assert_sentence(msg, f"'{name}' needs one")
    assert "--subnet=" in msg
    assert str(Network.from_options(name, {"subnet": "10.9.0.0/24"}).subnet) == "10.9.0.0/24"
    br = Network.from_options(name, {"mode": "bridged", "if": "eth0"})
    assert "subnet" not in br.to_dict() and "dhcp-start" not in br.to_dict()
    assert Network.from_options(name, br.to_dict(), stored=True) == br
    msg = refused(Network.from_options, name, {"mode": "bridged", "if": "eth0",
                                               "dhcp-start": "10.0.0.5"})
    assert_sentence(msg, "no DHCP range")


def test_tap_names_must_fit_15_bytes():
    name13 = "abcdefghijklm"
    assert Network.from_options(name13, {"subnet": "10.0.0.0/24", "taps": 10}).tap_names[-1] \
        == "abcdefghijklm_9"
    msg = refused(Network.from_options, name13, {"subnet": "10.0.0.0/24", "taps": 11})
    assert_sentence(msg, "abcdefghijklm_10")
    assert "15" in msg
    msg = refused(Network.from_options, name13, {"subnet": "10.0.0.0/24", "taps": 10,
                                                 "tap-base": 1})
    assert_sentence(msg, "abcdefghijklm_10")
    name12 = "abcdefghijk1"
    assert Network.from_options(name12, {"subnet": "10.0.0.0/24", "taps": 64}).tap_names[
        -1] == "abcdefghijk1_63"
    assert "a" * 15 == validate_ifname("a" * 15)
    refused(Network.from_options, "a" * 15, {"subnet": "10.0.0.0/24", "taps": 1})
    refused(Network.from_options, "a" * 14, {"subnet": "10.0.0.0/24", "taps": 1})
    assert Network.from_options("a" * 13, {"subnet": "10.0.0.0/24", "taps": 1}).taps == 1


def test_tap_owner_and_group():
    n = Network.from_options("vnet3", {"taps": 2, "tap-user": 1000, "tap-group": "kvm"})
    assert n.tap_user == 1000 and n.tap_group == "kvm"
    assert Network.from_options("vnet3", {"taps": 2, "tap-user": 0}).tap_user == 0
    for bad in (-1, 2**32 - 1, 2**32, "1000", True):
        refused(Network.from_options, "vnet3", {"taps": 2, "tap-user": bad})
    for bad in ("Bad Group", "", "-x", "a" * 33, "x;y", 5):
        msg = refused(Network.from_options, "vnet3", {"taps": 2, "tap-group": bad})
        if isinstance(bad, str) and bad:
            assert_sentence(msg, bad)


# --- mtu, mode, dhcp, autostart, keys ------------------------------------------------------
@pytest.mark.parametrize("mtu", [MIN_MTU, 1500, 9000, MAX_MTU])
def test_mtu_in_bounds(mtu):
    assert Network.from_options("vnet2", {"mtu": mtu}).mtu == mtu


@pytest.mark.parametrize("mtu", [MIN_MTU - 1, MAX_MTU + 1, 0, -1, 65536])
def test_mtu_out_of_bounds(mtu):
    msg = refused(Network.from_options, "vnet2", {"mtu": mtu})
    assert_sentence(msg, str(mtu))
    assert str(MIN_MTU) in msg and str(MAX_MTU) in msg


@pytest.mark.parametrize("mtu", ["1500", True, 1500.0, None])
def test_mtu_must_be_a_whole_number(mtu):
    refused(Network.from_options, "vnet2", {"mtu": mtu})


def test_defaults():
    n = Network.from_options("vnet2", {})
    assert (n.mode, n.mtu, n.autostart, n.taps, n.tap_user, n.tap_group, n.dhcp) == \
        ("nat", 1500, False, 0, None, "vnet", "dnsmasq")


@pytest.mark.parametrize("key,good,bad", [
    ("mode", ["nat", "host-only"], ["NAT", "", "vde", "bridge"]),
    ("dhcp", ["dnsmasq", "dhcpd", "none"], ["kea", "DNSMASQ", ""]),
])
def test_enumerated_options(key, good, bad):
    for v in good:
        assert getattr(Network.from_options("vnet2", {key: v}), key) == v
    for v in bad:
        msg = refused(Network.from_options, "vnet2", {key: v})
        assert_sentence(msg, v)
        for g in good:
            assert g in msg


def test_autostart_must_be_boolean():
    assert Network.from_options("vnet2", {"autostart": True}).autostart is True
    for bad in ("yes", 1, 0, None):
        refused(Network.from_options, "vnet2", {"autostart": bad})


@pytest.mark.parametrize("key,value", [
    ("mtu", "big"), ("taps", "four"), ("subnet", 4242), ("subnet6", 4242), ("autostart", "yes"),
    ("tap-user", "bob"),
])
def test_type_errors_name_the_bad_value(key, value):
    opts = {key: value}
    if key == "tap-user":
        opts["taps"] = 1
    msg = refused(Network.from_options, "vnet2", opts)
    assert_sentence(msg, value)


@pytest.mark.parametrize("opts,named", [
    ({"bogus": 1}, ["bogus"]),
    ({"tap_user": 1}, ["tap_user"]),
    ({"subnet_6": "fd00::/64"}, ["subnet_6"]),
    ({"zz": 1, "aa": 2, "mtu": 1500}, ["zz", "aa"]),
    ({"macaddr": "52:54:00:00:00:01"}, ["macaddr"]),
])
def test_unknown_option_keys_refused(opts, named):
    msg = refused(Network.from_options, "vnet2", opts)
    assert_sentence(msg, *named)
    assert "mtu" in msg  # lists the known keys


def test_options_must_be_a_dictionary():
    for bad in (None, [("mtu", 1500)], "mtu=1500"):
        refused(Network.from_options, "vnet2", bad)


def test_name_key_must_agree_with_the_name():
    assert Network.from_options("vnet2", {"name": "vnet2"}).name == "vnet2"
    msg = refused(Network.from_options, "vnet2", {"name": "vnet3"})
    assert_sentence(msg, "vnet3", "vnet2")


# --- bridge MAC ----------------------------------------------------------------------------
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@pytest.mark.parametrize("name", ["vnet0", "vnet2", "lab", "a", "a" * 15])
def test_bridge_mac_is_a_fixed_locally_administered_unicast_address(name):
    mac = bridge_mac(name)
    assert MAC_RE.fullmatch(mac)
    first = int(mac[:2], 16)
    assert first & 0x01 == 0  # unicast
    assert first & 0x02 == 0x02  # locally administered
    assert mac != "00:00:00:00:00:00"
    assert bridge_mac(name) == mac  # deterministic
    assert Network.from_options(name, {"subnet": "10.0.0.0/24"}).mac == mac


def test_bridge_macs_differ_between_names():
    names = [f"vnet{i}" for i in range(200)] + ["lab", "Lab", "lab.", "lab-", "lab_"]
    macs = [bridge_mac(n) for n in names]
    assert len(set(macs)) == len(names)


@FAST
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", fullmatch=True))
def test_bridge_mac_property(name):
    mac = bridge_mac(name)
    assert MAC_RE.fullmatch(mac)
    assert int(mac[:2], 16) & 0x03 == 0x02
    assert bridge_mac(name) == mac


# --- TOML round trip -----------------------------------------------------------------------
NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", fullmatch=True)


@st.composite
def valid_options(draw):
    name = draw(NAMES)
    opts: dict = {}
    m = re.fullmatch(r"(?:vnet|vmnet)(\d+)", name)
    if m is None or int(m.group(1)) > 245 or draw(st.booleans()):
        plen = draw(st.integers(8, 30))
        addr = draw(st.integers(0, 2**24 - 1)) + (10 << 24)
        opts["subnet"] = str(ipaddress.IPv4Network((addr, plen), strict=False))
    if draw(st.booleans()):
        plen = draw(st.integers(48, 120))
        addr = (0xFD << 120) + draw(st.integers(0, 2**120 - 1))
        opts["subnet6"] = str(ipaddress.IPv6Network((addr, plen), strict=False))
    if draw(st.booleans()):
        opts["mode"] = draw(st.sampled_from(["nat", "host-only"]))
    if draw(st.booleans()):
        opts["mtu"] = draw(st.integers(MIN_MTU, MAX_MTU))
    if draw(st.booleans()):
        opts["autostart"] = draw(st.booleans())
    if draw(st.booleans()):
        opts["dhcp"] = draw(st.sampled_from(["dnsmasq", "dhcpd", "none"]))
    room = MAX_IFNAME - len(name) - 1  # digits left for the tap index
    if room >= 1 and draw(st.booleans()):
        opts["taps"] = draw(st.integers(1, min(MAX_TAPS, 10**room - 1)))
    if draw(st.booleans()):
        opts["tap-user"] = draw(st.integers(0, 2**32 - 2))
    if draw(st.booleans()):
        opts["tap-group"] = draw(st.from_regex(r"[a-z_][a-z0-9_-]{0,31}", fullmatch=True))
    return name, opts


@FAST
@given(valid_options())
def test_definitions_round_trip_exactly_through_toml(case):
    name, opts = case
    n = Network.from_options(name, opts)
    text = render_toml(n.to_dict(), "a header\n\nsecond line")
    back = Network.from_options(n.name, tomllib.loads(text))
    assert back == n
    assert render_toml(back.to_dict()) == render_toml(n.to_dict())
    assert set(n.to_dict()) <= set(Network.KEYS) | {"name"}
    for t in n.tap_names:
        validate_ifname(t, "tap name")


def test_tap_owner_survives_the_round_trip_without_taps():
    # 'vnet-client define vnet2 --user=1000 --group=kvm' (no -n) is accepted; what was
    # accepted must be what is stored.
    n = Network.from_options("vnet2", {"tap-user": 1000, "tap-group": "kvm"})
    back = Network.from_options("vnet2", tomllib.loads(render_toml(n.to_dict())))
    assert back == n


def test_full_definition_round_trip_text():
    n = Network.from_options("vnet3", {
        "mode": "host-only", "subnet": "10.1.2.0/24", "subnet6": "fd00:1::/64", "mtu": 9000,
        "autostart": True, "taps": 4, "tap-user": 1000, "tap-group": "kvm", "dhcp": "dhcpd",
    })
    text = render_toml(n.to_dict(), "header")
    assert text.startswith("# header\n")
    assert 'subnet = "10.1.2.0/24"' in text
    assert "tap-user = 1000" in text
    assert "autostart = true" in text
    assert Network.from_options("vnet3", tomllib.loads(text)) == n


SCALARS = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=30))


@FAST
@given(st.dictionaries(
    st.text(min_size=0, max_size=12),
    st.one_of(SCALARS, st.lists(SCALARS, max_size=4),
              st.lists(st.dictionaries(st.text(max_size=8), SCALARS, max_size=3),
                       min_size=1, max_size=3)),
    max_size=6,
))
def test_render_toml_is_read_back_exactly(data):
    assert tomllib.loads(render_toml(data)) == data


def test_bridged_mode_needs_an_interface_and_no_dhcp_or_forwards():
    n = Network.from_options("vnet2", {"mode": "bridged", "if": "eth0"})
    assert (n.mode, n.uplink, n.dhcp, n.force) == ("bridged", "eth0", "none", False)
    for opts, words in (({"mode": "bridged"}, "--if"),
                        ({"mode": "bridged", "if": "eth0", "dhcp": "dnsmasq"}, "DHCP"),
                        ({"mode": "bridged", "if": "a b"}, "not allowed"),
                        ({"mode": "nat", "if": "eth0"}, "bridged"),
                        ({"mode": "bridged", "if": "eth0",
                          "forwards": [{"proto": "tcp", "port": 1, "target": "x"}]}, "forward")):
        with pytest.raises(InvalidArgument, match=words):
            Network.from_options("vnet2", opts)
    n = Network.from_options("vnet2", {"mode": "bridged", "if": "eth0", "force": True})
    assert Network.from_options("vnet2", n.to_dict()) == n


@pytest.mark.parametrize("name", ["vde", "ports", "intents", "last-good", "vx5007", "macs.json",
                                  "macs.json.prev", "n.macs.json.bad", "bridged-x",
                                  "frr-evpn", "dhcpd"])
def test_names_vnetd_uses_itself_are_reserved(name):
    from vnetd.model import validate_network_name

    with pytest.raises(InvalidArgument, match="reserved"):
        validate_network_name(name)


def test_ordinary_names_are_not_reserved():
    from vnetd.model import validate_network_name

    for name in ("vnet2", "vdenet", "vx", "lab.net", "ports2"):
        assert validate_network_name(name) == name


def test_tap_base_keeps_definitions_stored_with_one_based_names():
    """New definitions name their taps NAME_0..NAME_{n-1}, as qemu-vlan; a definition vnetd
    stored before (no tap-base in the file) keeps NAME_1..NAME_n; tap-base = 1 asks for them."""
    new = Network.from_options("vnet3", {"taps": 2})
    assert (new.tap_base, new.tap_names) == (0, ["vnet3_0", "vnet3_1"])
    assert new.to_dict()["tap-base"] == 0
    assert Network.from_options("vnet3", new.to_dict(), stored=True) == new
    old_file = {"name": "vnet3", "mode": "nat", "taps": 2, "tap-group": "vnet"}
    old = Network.from_options("vnet3", old_file, stored=True)
    assert old.tap_names == ["vnet3_1", "vnet3_2"]
    assert Network.from_options("vnet3", old.to_dict(), stored=True) == old
    assert Network.from_options("vnet3", {"taps": 2, "tap-base": 1}).tap_names == \
        ["vnet3_1", "vnet3_2"]
    assert "tap-base" not in Network.from_options("vnet3", {}).to_dict()
    for bad in (2, -1, "0", True):
        msg = refused(Network.from_options, "vnet3", {"taps": 2, "tap-base": bad})
        assert "tap-base" in msg


def test_vde_macs_one_per_switch():
    ok = {"taps": 2, "vde": True, "vde-macs": ["52:54:00:AA:00:01", "52:54:00:aa:00:02"]}
    n = Network.from_options("vnet4", ok)
    assert n.vde_macs == ("52:54:00:aa:00:01", "52:54:00:aa:00:02")
    assert Network.from_options("vnet4", n.to_dict(), stored=True) == n
    for bad, word in ((dict(ok, **{"vde-macs": ["52:54:00:aa:00:01"]}), "one per tap"),
                      (dict(ok, vde=False), "vde = true"),
                      (dict(ok, **{"vde-macs": ["52:54:00:aa:00:01"] * 2}), "two switches"),
                      (dict(ok, **{"vde-macs": ["01:54:00:aa:00:01", "52:54:00:aa:00:02"]}),
                       "multicast"),
                      (dict(ok, **{"vde-macs": "52:54:00:aa:00:01"}), "list"),
                      (dict(ok, **{"vde-switch-args": ["--macaddr", "52:54:00:aa:00:09"]}),
                       "not both")):
        msg = refused(Network.from_options, "vnet4", bad)
        assert word in msg, msg


def test_forward_interface_has_two_named_meanings():
    from vnetd.model import expand_forward_words, parse_forward

    """qemu-vlan's rule interface meant traffic to the interface's addresses (-d ADDRESS):
    that is what a rule means by default (addr-of); interface-means = "incoming" matches
    traffic arriving on it (iface). Each is named in the forward and kept in its file."""
    net = Network.from_options("vnet3", {})
    rule = "eth0,tcp,8080,172.16.13.5:80"
    f = parse_forward(net, expand_forward_words({"rule": rule}))
    assert (f.addr_of, f.iface, f.ext_addr) == ("eth0", None, None)
    assert f.to_dict()["addr-of"] == "eth0" and "eth0's addresses" in f.describe()
    assert parse_forward(net, f.to_dict()) == f
    g = parse_forward(net, expand_forward_words({"rule": rule, "interface-means": "incoming"}))
    assert (g.addr_of, g.iface) == (None, "eth0")
    assert f.file_name != g.file_name
    assert parse_forward(net, expand_forward_words({"rule": ",tcp,8080,172.16.13.5:80"})
                         ).addr_of is None  # no interface: any address of the host
    for bad, word in (({"rule": rule, "interface-means": "to"}, "interface-means"),
                      ({"proto": "tcp", "port": "80", "target": "172.16.13.5",
                        "interface-means": "incoming"}, "goes with 'rule'")):
        with pytest.raises(InvalidArgument, match=word):
            parse_forward(net, expand_forward_words(bad))
    for spec in ({"addr-of": "eth0", "iface": "eth1"}, {"addr-of": "eth0", "ext-addr": "10.0.0.1"}):
        msg = refused(parse_forward, net, {"proto": "tcp", "port": "80",
                                           "target": "172.16.13.5", **spec})
        assert "addr-of" in msg
    refused(parse_forward, net, {"proto": "tcp", "port": "80", "target": "172.16.13.5",
                                 "addr-of": "bad name"})
