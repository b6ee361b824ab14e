"""The qemu-vlan compatible form, one test per option, variable and configuration key of
qemu-vlan 1.0.0 against what the original did (its usage text and code, as its documentation
in the reference material describes): the definition it asks for, its defaults (-n 4, no DHCP
server without -d, group qemu), its order (defaults < environment < options < configuration
file), --start on an existing definition and --macaddr's count. Pure: no bus."""

from __future__ import annotations

import re

import pytest
from vnet_client import cli
from vnetd.model import Network

NO_BUS = "unix:path=/nonexistent/vnet-unit-test-bus"


@pytest.fixture(autouse=True)
def _no_system_bus(monkeypatch):
    monkeypatch.setenv("VNET_BUS_ADDRESS", NO_BUS)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", NO_BUS)


def req(argv, env=None, qemu_group=False):
    a = cli.build_compat_parser().parse_args(argv)
    return a, cli.compat_request(a, env or {}, lambda g: qemu_group and g == "qemu")


def opts(argv, env=None, qemu_group=False):
    a, r = req(argv, env, qemu_group)
    return cli.compat_define_opts(a, r)


def accepted(name, o):
    """vnetd's model takes what the compatible form asks for."""
    return Network.from_options(name, {k: v for k, v in o.items() if v is not None})


# --- each option, short and long ---------------------------------------------------------------
@pytest.mark.parametrize("argv", [["-b", "vnet3", "-s"], ["--br=vnet3", "--start"],
                                  ["-bvnet3", "-s"], ["--br", "vnet3", "-s"]])
def test_b_br_names_the_bridge(argv):
    assert cli.is_compat(argv)
    a, r = req(argv)
    assert (a.br, a.start, r.br) == ("vnet3", True, "vnet3")


@pytest.mark.parametrize("flag", [["-s"], ["--start"]])
def test_s_start(flag):
    a, _ = req(["-b", "vnet3", *flag])
    assert (a.start, a.stop, a.macaddr) == (True, False, False)


@pytest.mark.parametrize("flag", [["-S"], ["--stop"]])
def test_S_stop(flag):
    a, _ = req(["-b", "vnet3", *flag])
    assert (a.start, a.stop, a.macaddr) == (False, True, False)


@pytest.mark.parametrize("flag", [["-m"], ["--macaddr"], ["--addr"]])
def test_m_macaddr_makes_8_macs_per_tap_or_32_with_vde(flag):
    a, r = req(["-b", "vnet3", *flag])
    assert a.macaddr and cli.compat_macaddr_count(r) == 4 * 8  # -n defaults to 4
    _, r = req(["-b", "vnet3", "-n", "2", "-v", *flag])
    assert cli.compat_macaddr_count(r) == 2 * 32


@pytest.mark.parametrize("argv", [["-n", "6"], ["-n6"], ["--num=6"], ["--num", "6"],
                                  ["--taps=6"]])
def test_n_num_is_the_tap_count_named_from_0(argv):
    o = opts(["-b", "vnet3", *argv, "-s"])
    assert o["taps"] == 6
    assert accepted("vnet3", o).tap_names == [f"vnet3_{i}" for i in range(6)]


def test_n_defaults_to_4_as_in_1_0_0():
    assert opts(["-b", "vnet3", "-s"])["taps"] == 4


@pytest.mark.parametrize("flag", [["-d", "dnsmasq"], ["--dhcp=dnsmasq"], ["-ddnsmasq"],
                                  ["--dhcp=dnsmask"]])
def test_d_dnsmasq_is_a_nat_network_with_dnsmasq(flag):
    o = opts(["-b", "vnet3", *flag, "-s"])
    assert (o["mode"], o["dhcp"]) == ("nat", "dnsmasq")
    accepted("vnet3", o)


@pytest.mark.parametrize("flag", [["-d", "dhcpd"], ["--dhcp=dhcpd"]])
def test_d_dhcpd_is_a_host_only_network_as_the_importer_makes(flag):
    o = opts(["-b", "vnet3", *flag, "-s"])
    assert (o["mode"], o["dhcp"]) == ("host-only", "dhcpd")
    accepted("vnet3", o)


def test_no_d_runs_no_dhcp_server_as_the_original():
    o = opts(["-b", "vnet3", "-s"])
    assert (o["mode"], o["dhcp"]) == ("nat", "none")


def test_d_client_needs_if_and_is_bridged():
    with pytest.raises(cli.Usage, match="--if=NIC"):
        req(["-b", "vnet3", "-d", "dhcpcd", "-s"])
    a, r = req(["-b", "vnet3", "-d", "dhclient", "-i", "eth0", "-s"])
    assert any("no DHCP client" in n for n in r.notes)
    o = cli.compat_define_opts(a, r)
    assert (o["mode"], o["if"], o["dhcp"]) == ("bridged", "eth0", None)
    with pytest.raises(cli.Usage, match="dnsmasq, dhcpd or none"):
        req(["-b", "vnet3", "-d", "udhcpd", "-s"])


@pytest.mark.parametrize("flag", [["-i", "eth0"], ["--if=eth0"], ["-ieth0"]])
def test_i_if_is_a_bridged_network(flag):
    o = opts(["-b", "vnet3", *flag, "-s"])
    assert (o["mode"], o["if"], o["dhcp"]) == ("bridged", "eth0", None)
    accepted("vnet3", o)


@pytest.mark.parametrize("flag", [["-v"], ["--vde"]])
def test_v_vde_runs_a_switch_per_tap(flag):
    o = opts(["-b", "vnet3", *flag, "-s"])
    assert o["vde"] is True and o["taps"] == 4
    assert accepted("vnet3", o).vde


@pytest.mark.parametrize("flag", [["-u", "0"], ["--user=0"], ["-u", "root"]])
def test_u_user_owns_the_taps(flag):
    assert opts(["-b", "vnet3", *flag, "-s"])["tap-user"] == 0


def test_u_unknown_user_is_a_usage_error():
    with pytest.raises(cli.Usage, match="no user named"):
        opts(["-b", "vnet3", "-u", "no-such-user-zz", "-s"])


@pytest.mark.parametrize("flag", [["-g", "root"], ["--group=root"]])
def test_g_group_of_the_taps(flag):
    assert opts(["-b", "vnet3", *flag, "-s"])["tap-group"] == "root"


def test_group_defaults_to_qemu_when_it_exists_else_vnet_with_a_note():
    _, r = req(["-b", "vnet3", "-s"], qemu_group=True)
    assert (r.values["group"], r.source["group"]) == ("qemu", "default")
    assert "group" not in r.given()
    _, r = req(["-b", "vnet3", "-s"], qemu_group=False)
    assert r.values["group"] is None and any("no group 'qemu'" in n for n in r.notes)


@pytest.mark.parametrize("flag", [["-h"], ["--help"]])
def test_h_help_prints_usage_and_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["-b", "vnet3", *flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for short, long in (("-b", "--br"), ("-c", "--cf"), ("-d", "--dhcp"), ("-i", "--if"),
                        ("-g", "--group"), ("-m", "--macaddr"), ("-n", "--num"),
                        ("-s", "--start"), ("-S", "--stop"), ("-u", "--user"), ("-v", "--vde")):
        assert re.search(rf"{short}( \S+)?, {long}\b", out), (short, long)
    for word in ("--use-vnet", "QEMU_VLAN_NUM", "QEMU_VLAN_DHCP", "QEMU_VLAN_IF",
                 "QEMU_VLAN_VDE", "QEMU_VLAN_CF"):
        assert word in out, word


def test_use_vnet_is_accepted_and_ignored():
    a, _ = req(["-b", "vnet3", "--use-vnet", "-s"])
    assert a.use_vnet and opts(["-b", "vnet3", "--use-vnet", "-s"]) == opts(["-b", "vnet3", "-s"])


@pytest.mark.parametrize("argv", [["-b", "vnet3"], ["-b", "vnet3", "-s", "-S"],
                                  ["-b", "vnet3", "-n", "four", "-s"], ["-b"],
                                  ["-b", "vnet3", "-s", "-x"]])
def test_usage_errors_exit_2(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert "usage: vnet-client --br=BRIDGE" in capsys.readouterr().err


# --- the environment ---------------------------------------------------------------------------
def test_QEMU_VLAN_NUM():
    assert opts(["-b", "vnet3", "-s"], {"QEMU_VLAN_NUM": "8"})["taps"] == 8
    assert opts(["-b", "vnet3", "-n", "2", "-s"], {"QEMU_VLAN_NUM": "8"})["taps"] == 2
    with pytest.raises(cli.Usage, match="QEMU_VLAN_NUM"):
        req(["-b", "vnet3", "-s"], {"QEMU_VLAN_NUM": "many"})


@pytest.mark.parametrize("word,on", [("true", True), ("YES", True), ("On", True), ("1", True),
                                     ("enable", True), ("false", False), ("no", False),
                                     ("off", False), ("0", False)])
def test_QEMU_VLAN_VDE_takes_the_originals_yes_no_words(word, on):
    o = opts(["-b", "vnet3", "-s"], {"QEMU_VLAN_VDE": word})
    assert bool(o.get("vde")) is on


def test_QEMU_VLAN_VDE_nonsense_is_refused():
    with pytest.raises(cli.Usage, match="neither yes nor no"):
        req(["-b", "vnet3", "-s"], {"QEMU_VLAN_VDE": "maybe"})


def test_QEMU_VLAN_DHCP_and_the_option_wins():
    assert opts(["-b", "vnet3", "-s"], {"QEMU_VLAN_DHCP": "dhcpd"})["mode"] == "host-only"
    o = opts(["-b", "vnet3", "-d", "dnsmasq", "-s"], {"QEMU_VLAN_DHCP": "dhcpd"})
    assert (o["mode"], o["dhcp"]) == ("nat", "dnsmasq")


def test_QEMU_VLAN_IF():
    o = opts(["-b", "vnet3", "-s"], {"QEMU_VLAN_IF": "eth1"})
    assert (o["mode"], o["if"]) == ("bridged", "eth1")


def test_GROUP():
    assert opts(["-b", "vnet3", "-s"], {"GROUP": "root"})["tap-group"] == "root"


# --- the configuration file ------------------------------------------------------------------
def test_c_cf_and_QEMU_VLAN_CF_are_read_and_win_over_options(tmp_path):
    cf = tmp_path / "vnet3.conf"
    cf.write_text("# qemu-vlan\nnum=6\nvde=true\ndhcp=dnsmasq\ngateway=10.3.0.1\n"
                  "netmask=255.255.0.0\nether=52:54:00:aa:bb:cc\n")
    for argv, env in ((["-b", "vnet3", "-c", str(cf), "-n", "2", "-s"], {}),
                      (["-b", "vnet3", f"--cf={cf}", "-n", "2", "-s"], {}),
                      (["-b", "vnet3", "-n", "2", "-s"], {"QEMU_VLAN_CF": str(cf)})):
        a, r = req(argv, env)
        assert r.source["taps"] == f"{cf}:2"
        assert any("num=6 wins over -n (2)" in n for n in r.notes)
        o = cli.compat_define_opts(a, r)
        assert (o["taps"], o["vde"], o["dhcp"], o["subnet"]) == (6, True, "dnsmasq",
                                                                 "10.3.0.0/16")
        accepted("vnet3", o)


def test_cf_missing_or_unreadable_is_named(tmp_path):
    with pytest.raises(cli.Failure, match="does not exist"):
        req(["-b", "vnet3", "-c", str(tmp_path / "nope.conf"), "-s"])
    bad = tmp_path / "bad.conf"
    bad.write_text("num=4\nrm -rf /\n")
    with pytest.raises(cli.Failure, match="bad.conf:2"):
        req(["-b", "vnet3", "-c", str(bad), "-s"])
    odd = tmp_path / "odd.conf"
    odd.write_text("gateway=10.3.0.7\n")
    with pytest.raises(cli.Failure, match="first address"):
        req(["-b", "vnet3", "-c", str(odd), "-s"])


# --- --start on a network that exists --------------------------------------------------------
def test_start_on_an_existing_definition_compares_only_what_was_asked():
    d = Network.from_options("vnet3", {"taps": 8, "dhcp": "dnsmasq"}).to_dict()
    _, r = req(["-b", "vnet3", "-s"])
    assert cli.compat_differences(r, d, lambda u: 0) == []  # defaults ask for nothing
    _, r = req(["-b", "vnet3", "-n", "8", "-d", "dnsmasq", "-s"])
    assert cli.compat_differences(r, d, lambda u: 0) == []
    _, r = req(["-b", "vnet3", "-n", "4", "-d", "dhcpd", "-v", "-s"])
    diff = cli.compat_differences(r, d, lambda u: 0)
    assert "taps is 8, -n asks for 4" in diff
    assert "dhcp is dnsmasq, --dhcp asks for dhcpd" in diff
    assert "vde is False, --vde asks for True" in diff
    assert "mode is nat, --dhcp means host-only" in diff
    _, r = req(["-b", "vnet3", "-s"], {"QEMU_VLAN_NUM": "2"})
    assert cli.compat_differences(r, d, lambda u: 0) == ["taps is 8, $QEMU_VLAN_NUM asks for 2"]
