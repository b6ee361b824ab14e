"""vnet-client's command line: both forms parse as documented, usage errors exit 2 without a
bus, and the help says what the exit codes are and shows examples."""

from __future__ import annotations

import argparse
import grp
import os
import pwd

import pytest
from vnet_client import cli
from vnetd.model import Network

# A bus that does not exist: nothing in this file may need one. If a code path did try to
# connect, it would fail with exit code 1, never 2, so the assertions would catch it.
NO_BUS = "unix:path=/nonexistent/vnet-unit-test-bus"


@pytest.fixture(autouse=True)
def _no_system_bus(monkeypatch):
    monkeypatch.setenv("VNET_BUS_ADDRESS", NO_BUS)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", NO_BUS)


def exit_code(argv: list[str]) -> int:
    """What the vnet-client process would exit with (main returns it or argparse exits)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1


def parse(argv: list[str]):
    return cli.build_parser().parse_args(argv)


def cparse(argv: list[str]):
    return cli.build_compat_parser().parse_args(argv)


def test_exit_code_constants():
    assert (cli.EXIT_OK, cli.EXIT_FAIL, cli.EXIT_USAGE, cli.EXIT_AUTH) == (0, 1, 2, 4)


# --- subcommands ---------------------------------------------------------------------------
def test_list():
    a = parse(["list"])
    assert a.cmd == "list" and a.json is False and a.no_ask_password is False
    assert a.bus_address is None
    a = parse(["list", "--json", "--no-ask-password", "--bus-address", "unix:path=/x"])
    assert (a.json, a.no_ask_password, a.bus_address) == (True, True, "unix:path=/x")


@pytest.mark.parametrize("cmd", ["show", "start", "stop", "undefine"])
def test_commands_taking_a_name(cmd):
    a = parse([cmd, "vnet2"])
    assert a.cmd == cmd and a.name == "vnet2"
    a = parse([cmd, "vnet2", "--json"])
    assert a.json is True
    assert exit_code([cmd]) == 2
    assert exit_code([cmd, "a", "b"]) == 2


def test_autostart():
    assert (parse(["autostart", "vnet2", "on"]).state,
            parse(["autostart", "vnet2", "off"]).state) == ("on", "off")
    assert parse(["autostart", "vnet2", "on"]).name == "vnet2"
    assert exit_code(["autostart", "vnet2", "maybe"]) == 2
    assert exit_code(["autostart", "vnet2"]) == 2


def test_reload():
    assert parse(["reload"]).cmd == "reload"
    assert exit_code(["reload", "extra"]) == 2


def test_define_defaults():
    a = parse(["define", "vnet2"])
    assert a.cmd == "define" and a.name == "vnet2"
    assert (a.mode, a.subnet, a.subnet6, a.mtu, a.autostart, a.taps, a.user, a.group, a.dhcp,
            a.start) == (None, None, None, None, False, None, None, None, None, False)


def test_define_every_option():
    a = parse(["define", "lab", "--mode=host-only", "--subnet=10.7.0.0/24",
               "--subnet6", "fd00:7::/64", "--mtu=9000", "--autostart", "--taps", "4",
               "--user=alice", "--group=kvm", "--dhcp=dhcpd", "--start", "--json"])
    assert (a.name, a.mode, a.subnet, a.subnet6, a.mtu, a.autostart, a.taps, a.user, a.group,
            a.dhcp, a.start, a.json) == (
        "lab", "host-only", "10.7.0.0/24", "fd00:7::/64", 9000, True, 4, "alice", "kvm",
        "dhcpd", True, True)


@pytest.mark.parametrize("argv,taps", [(["-n4"], 4), (["-n", "4"], 4), (["--taps=64"], 64),
                                       (["-n0"], 0), (["-n", "100000"], 100000)])
def test_define_tap_count_forms(argv, taps):
    # The range 1..64 is the service's to enforce (it answers with a named error).
    assert parse(["define", "vnet3", *argv]).taps == taps


@pytest.mark.parametrize("argv", [
    ["define"], ["define", "vnet2", "--mode=bridge"], ["define", "vnet2", "--dhcp=kea"],
    ["define", "vnet2", "--mtu=big"], ["define", "vnet2", "-n", "four"],
    ["define", "vnet2", "--bogus"], ["define", "vnet2", "--subnet"],
])
def test_define_usage_errors(argv, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err


@pytest.mark.parametrize("argv,attr,value", [
    (["--json", "list"], "json", True),
    (["--no-ask-password", "start", "vnet2"], "no_ask_password", True),
    (["--bus-address", "unix:path=/run/x", "list"], "bus_address", "unix:path=/run/x"),
    (["--bus-address=unix:path=/run/x", "show", "vnet2"], "bus_address", "unix:path=/run/x"),
])
def test_common_options_before_the_subcommand_are_kept(argv, attr, value):
    # The top-level help lists --json/--no-ask-password/--bus-address before COMMAND, so they
    # must take effect there (dropping --no-ask-password would prompt against the user's wish).
    assert getattr(parse(argv), attr) == value


def test_define_options_reach_the_service_with_its_key_names():
    a = parse(["define", "vnet3", "--mode=nat", "--subnet=10.3.0.0/24", "--subnet6=fd00:3::/64",
               "--mtu=1400", "--autostart", "-n2", "--user=0", "--group=root", "--dhcp=none"])
    opts = {k: v for k, v in cli._define_opts(a).items() if v is not None}
    assert opts == {"mode": "nat", "subnet": "10.3.0.0/24", "subnet6": "fd00:3::/64",
                    "mtu": 1400, "autostart": True, "taps": 2, "tap-user": 0,
                    "tap-group": "root", "dhcp": "none"}
    assert set(opts) <= set(Network.KEYS)
    n = Network.from_options("vnet3", opts)
    assert (n.taps, n.tap_user, n.tap_group, n.mtu) == (2, 0, "root", 1400)


def test_define_without_options_sends_nothing_but_the_name():
    opts = {k: v for k, v in cli._define_opts(parse(["define", "vnet3"])).items()
            if v is not None}
    assert opts == {}


def test_user_and_group_names_are_resolved():
    me = pwd.getpwuid(os.getuid())
    a = parse(["define", "vnet3", "-n1", f"--user={me.pw_name}", "--user", "1234"])
    assert cli._define_opts(a)["tap-user"] == 1234
    a = parse(["define", "vnet3", "-n1", f"--user={me.pw_name}"])
    assert cli._define_opts(a)["tap-user"] == me.pw_uid
    g = grp.getgrgid(os.getgid()).gr_name
    assert cli._define_opts(parse(["define", "vnet3", f"--group={g}"]))["tap-group"] == g
    with pytest.raises(cli.Usage, match="no user named"):
        cli._define_opts(parse(["define", "vnet3", "--user=no-such-user-zz"]))
    with pytest.raises(cli.Usage, match="no group named"):
        cli._define_opts(parse(["define", "vnet3", "--group=no-such-group-zz"]))


# --- the qemu-vlan compatible form ---------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["--br=vnet3", "-n4", "--start"], ["--br", "vnet3", "--stop"], ["--br=vnet3"],
    ["--br=vnet3", "--use-vnet", "--start"], ["--no-ask-password", "--br=vnet3", "--stop"],
    ["--json", "--br=vnet3", "--start"], ["-n4", "--br=vnet3", "--start"],
    ["--br=vnet3", "--help"], ["--help", "--br=vnet3"], ["-h", "--br=x"],
    ["--mode=host-only", "--br=vnet3", "--start"],
])
def test_is_compat_true(argv):
    assert cli.is_compat(argv)


@pytest.mark.parametrize("argv", [
    [], ["list"], ["--json", "list"], ["start", "vnet3"], ["define", "vnet3", "--br=x"],
    ["show", "--br"], ["--help"], ["-h"], ["list", "--help"], ["--no-ask-password", "reload"],
])
def test_is_compat_false(argv):
    assert not cli.is_compat(argv)


@pytest.mark.parametrize("argv", [
    ["-n", "4", "--br=vnet3", "--start"],
    ["--bus-address", "unix:path=/x", "--br=vnet3", "--stop"],
    ["--subnet", "10.3.0.0/24", "--br=vnet3", "--start"],
])
def test_is_compat_with_option_values_before_br(argv):
    # Options that take a separate value may come before --br, as with any getopt program.
    assert cli.is_compat(argv)


def test_compat_start():
    a = cparse(["--br=vnet3", "-n4", "--start"])
    assert (a.br, a.taps, a.start, a.stop, a.use_vnet) == ("vnet3", 4, True, False, False)
    a = cparse(["--br=vnet2", "-n8", "--dhcp=dhcpd", "--start", "--use-vnet"])
    assert (a.br, a.taps, a.dhcp, a.start, a.use_vnet) == ("vnet2", 8, "dhcpd", True, True)
    a = cparse(["--br=lab", "--subnet=10.9.0.0/24", "--subnet6=fd00:9::/64", "--mode=host-only",
                "--mtu=1400", "--autostart", "--user=0", "--group=root", "--start"])
    assert (a.subnet, a.subnet6, a.mode, a.mtu, a.autostart, a.user, a.group) == (
        "10.9.0.0/24", "fd00:9::/64", "host-only", 1400, True, "0", "root")


def test_compat_stop():
    a = cparse(["--br=vnet3", "--stop"])
    assert (a.br, a.start, a.stop) == ("vnet3", False, True)
    a = cparse(["--br", "vnet3", "--stop", "--use-vnet", "--no-ask-password"])
    assert a.no_ask_password is True and a.use_vnet is True


@pytest.mark.parametrize("argv", [
    ["--br=vnet3"],  # neither --start nor --stop
    ["--br=vnet3", "-n4"],
    ["--br=vnet3", "--start", "--stop"],  # both
    ["--br=vnet3", "--start", "--bogus"],
    ["--br=vnet3", "-n", "four", "--start"],
    ["--br=vnet3", "--mode=bridge", "--start"],
    ["--br"],
])
def test_compat_usage_errors_exit_2_without_a_bus(argv, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "usage: vnet-client --br=BRIDGE" in err
    assert "error:" in err


# --- main: usage errors and help -----------------------------------------------------------
def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "usage:" in out.err and "COMMAND" in out.err


def test_only_common_options_is_a_usage_error(capsys):
    assert exit_code(["--json"]) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--bogus"], ["frobnicate"], ["list", "--bogus"],
                                  ["-x"], ["list", "extra"]])
def test_unknown_options_and_commands_exit_2(argv, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err


def test_main_help_mentions_exit_codes_and_examples(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert ("Exit codes: 0 ok, 1 failure, 2 usage error, 4 not authorized, 130 interrupted "
            "(Ctrl-C),\n141 the reader of the output went away (as for SIGPIPE); attach: 127 "
            "its COMMAND is not\nfound, 126 it cannot be run.") in out
    assert "examples:" in out
    assert "vnet-client define vnet2" in out
    assert "vnet-client --br=vnet3 -n4 --start" in out
    assert "vnet-client --br=vnet3 --stop" in out
    for cmd in ("list", "show", "define", "start", "stop", "undefine", "autostart", "reload"):
        assert f"    {cmd} " in out, cmd


def test_compat_help_mentions_exit_codes_and_examples(capsys):
    assert exit_code(["--br=vnet3", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: vnet-client --br=BRIDGE" in out
    assert "vnet-client --br=vnet3 -n4 --start" in out
    assert "--use-vnet" in out
    assert "Exit codes" in out or "exit codes" in out


@pytest.mark.parametrize("cmd", ["list", "show", "define", "start", "stop", "undefine",
                                 "autostart", "reload"])
def test_every_subcommand_has_help(cmd, capsys):
    assert exit_code([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vnet-client {cmd}")


def test_mac_transfer_parses_and_names_unknown_users():
    a = parse(["mac", "transfer", "vnet2", "web1", "root", "--json"])
    assert (a.mac_cmd, a.network, a.transfer_vm, a.user, a.json) == (
        "transfer", "vnet2", "web1", "root", True)
    assert cli._uid_of("root") == 0 and cli._uid_of("1234") == 1234
    with pytest.raises(cli.Usage, match="no user named 'no-such-user-here'"):
        cli._uid_of("no-such-user-here")
    with pytest.raises(SystemExit):
        parse(["mac", "transfer", "vnet2", "web1"])  # no user


@pytest.mark.parametrize("before", [["--no-ask-password"], ["--json"],
                                    ["--bus-address", "unix:path=/x"],
                                    ["--bus-address=unix:path=/x", "--json"],
                                    ["--bus", "unix:path=/x"], ["--no-ask", "--js"],
                                    ["--bus=unix:path=/x", "--json"]])
def test_global_options_before_attach(before):
    """Also shortened, as argparse takes them (`--bus`, `--js`)."""
    argv = cli.hoist_global_options([*before, "attach", "--br=vnet2", "--vm", "x", "--", "true"])
    assert argv[0] == "attach"
    groups, command, common = cli.parse_attach(argv[1:])
    assert command == ["true"] and groups[0].network == "vnet2"
    assert common.no_ask_password == any(w.startswith("--no") for w in before)
    assert common.json == any(w.startswith("--js") for w in before)
    assert common.bus_address == ("unix:path=/x" if any(w.startswith("--bus") for w in before)
                                  else None)


@pytest.mark.parametrize("word, words", [
    ("--json", 1), ("--js", 1), ("--no-ask-password", 1), ("--no", 1), ("--bus-address", 2),
    ("--bus", 2), ("--b", 2), ("--bus-address=x", 1), ("--bus=x", 1), ("--json=1", 0),
    ("--", 0), ("-", 0), ("--version", 0), ("--mode", 0), ("list", 0), ("-j", 0),
])
def test_the_options_every_command_takes_and_the_words_they_span(word, words):
    assert cli.global_option_words(word) == words


def test_global_options_before_other_commands_are_left_to_argparse():
    assert cli.hoist_global_options(["--json", "list"]) == ["--json", "list"]
    assert cli.hoist_global_options(["attach", "--json"]) == ["attach", "--json"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    from vnet_client import __version__
    assert capsys.readouterr().out.strip() == f"vnet-client (qemu-vnet) {__version__}"


@pytest.mark.parametrize("argv,suggestion", [
    (["define", "vnet2", "--mode=natt"], "Did you mean 'nat'?"),
    (["lsit"], "Did you mean 'list'?"),
    (["list", "--jsno"], "Did you mean '--json'?"),
    (["host", "ad"], "Did you mean 'add'?"),
])
def test_a_near_miss_gets_a_suggestion_and_no_wall_of_usage(argv, suggestion, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert suggestion in err and "--help'." in err
    assert len(err.splitlines()) == 3, err


def test_every_subcommand_has_a_description():
    def walk(p, path):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    yield " ".join([*path, name]), sp
                    yield from walk(sp, [*path, name])
    missing = [name for name, sp in walk(cli.build_parser(), []) if not sp.description]
    assert not missing, missing


def test_show_labels_the_values_of_its_lists_and_names_users(capsys):
    from vnet_client.cli.network import print_network

    print_network({"name": "ux1", "state": "running", "owner": 0,
                   "servers": [{"name": "dnsmasq[ux1]", "state": "running", "restarts": 0,
                                "pid": 12281}]})
    out = capsys.readouterr().out
    assert "name=dnsmasq[ux1] state=running restarts=0 pid=12281" in out
    assert "root (0)" in out


def test_show_says_how_many_macs_a_bridge_learned_and_where_the_kernel_cannot_count(capsys):
    from vnet_client.cli.network import print_network

    print_network({"name": "ux1", "learned-macs": {"count": 12, "most": 4096}})
    print_network({"name": "ux2", "learned-macs": None})
    print_network({"name": "ux3", "learned-macs": {"count": 3, "most": 0}})
    out = capsys.readouterr().out
    assert "learned-macs: 12 of at most 4096" in out
    assert "learned-macs: 3 (no bound)" in out
    assert "learned-macs: not counted (the kernel cannot bound them before 6.7)" in out


@pytest.mark.parametrize("argv", [
    ["forward", "add", "vnet2", "-6", "tcp", "8080", "[fd00:12::5]:80"],
    ["forward", "add", "-6", "vnet2", "tcp", "8080", "[fd00:12::5]:80"],
    ["forward", "add", "vnet2", "tcp", "-6", "8080", "[fd00:12::5]:80"],
    ["forward", "add", "vnet2", "tcp", "8080", "[fd00:12::5]:80", "-6"],
    ["--json", "forward", "add", "vnet2", "--if", "eth0", "-6", "tcp", "8080", "[fd00:12::5]:80"],
    ["--bus", "unix:path=/x", "forward", "add", "vnet2", "-6", "tcp", "8080", "[fd00:12::5]:80"],
])
def test_forward_add_takes_its_options_anywhere(argv):
    from vnet_client.cli import build_parser, forward_add_options_last

    a = build_parser().parse_args(forward_add_options_last(argv))
    assert (a.network, a.proto, a.external, a.to, a.ipv6) == (
        "vnet2", "tcp", "8080", "[fd00:12::5]:80", True)
    assert a.iface == ("eth0" if "--if" in argv else None)


def test_only_forward_add_is_reordered():
    from vnet_client.cli import forward_add_options_last

    for argv in (["attach", "--br=vnet2", "--vm", "x", "--", "qemu", "-6"],
                 ["attach", "--br=vnet2", "--", "sh", "-c", "x", "forward", "add", "-6", "y"],
                 ["forward", "remove", "vnet2", "tcp", "8080"], ["list", "--json"]):
        assert forward_add_options_last(argv) == argv


@pytest.mark.parametrize("argv", [["--help"], ["define", "--help"], ["attach", "--help"]])
def test_a_closed_output_pipe_ends_quietly(argv):
    """`vnet-client ... | head -1`: the reader goes before the output is written. No
    traceback, and the status a shell shows for SIGPIPE (128 + 13)."""
    import subprocess
    import sys
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "vnet_client.cli", *argv], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=60,
                           env=os.environ | {"VNET_BUS_ADDRESS": NO_BUS})
    finally:
        os.close(w)
    assert p.stderr == ""
    assert p.returncode == 141


def _in_a_fresh_python(code: str, **env: str) -> str:
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=os.environ | env, check=True)
    return p.stdout


def test_building_the_parser_imports_no_shutil_and_asks_gettext_once_a_word():
    """What every command pays before it runs: no shutil (argparse imports it to ask the
    terminal's width at each option), and one gettext lookup per distinct word of argparse's
    (not one per option, each a few stat calls)."""
    out = _in_a_fresh_python(
        "import gettext, sys\n"
        "calls = []\n"
        "real = gettext.gettext\n"
        "gettext.gettext = lambda m: calls.append(m) or real(m)\n"
        "from vnet_client import cli\n"
        "cli.build_parser()\n"
        "print('shutil' in sys.modules, len(calls), len(set(calls)))\n")
    shutil_imported, calls, distinct = out.split()
    assert shutil_imported == "False"
    assert int(calls) == int(distinct) > 0


@pytest.mark.parametrize("columns", [50, 120])
def test_help_is_wrapped_to_the_columns_asked_for(columns):
    out = _in_a_fresh_python(
        "import sys\n"
        "from vnet_client import cli\n"
        "sys.argv = ['vnet-client', 'list', '--help']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    pass\n", COLUMNS=str(columns))
    head, _, rest = out.partition("\n\n")
    options = rest.split("options:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert max(len(line) for line in options) <= columns
    # the usage fits one line of 120, not of 50 (as argparse wraps it: columns - 2)
    assert len(head.splitlines()) == (1 if columns == 120 else 4)


def _options(p: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Each subcommand's option strings and destinations, by name."""
    sub = next(a for a in p._actions if a.dest == "cmd")
    return {name: sorted(o for a in sp._actions for o in (a.option_strings or [a.dest]))
            for name, sp in (sub.choices or {}).items()}


def test_a_command_builds_its_own_options_alone():
    """`vnet-client list` does not build the other commands' options; it builds its own
    as the whole parser has them, and every command is still there by name (for --help and
    for a typo's 'did you mean')."""
    full, only = _options(cli.build_parser()), _options(cli.build_parser(only="list"))
    assert list(only) == list(full) and len(full) > 20
    assert only["list"] == full["list"] and "--json" in only["list"]
    assert all(only[name] == ["--help", "-h"] for name in only if name != "list")
    assert full["define"] != ["--help", "-h"]
    args = cli.build_parser(only="define").parse_args(["define", "lab", "--mode=host-only"])
    assert (args.cmd, args.name, args.mode) == ("define", "lab", "host-only")


@pytest.mark.parametrize("argv, command", [
    (["list"], "list"), (["--json", "show", "x"], "show"),
    (["--bus-address", "unix:path=/x", "define", "x"], "define"),
    (["--bus-address=unix:path=/x", "--no-ask-password", "start", "x"], "start"),
    (["--help"], ""), ([], ""), (["lisst"], "lisst"),
    (["--bus", "unix:path=/x", "list"], "list"), (["--bus-addr", "/x", "show", "lab"], "show"),
    (["--b", "/x", "list"], "list"), (["--bus=unix:path=/x", "list"], "list"),
])
def test_the_command_a_command_line_invokes(argv, command):
    """As argparse reads the line: also with an option's name shortened (`--bus`)."""
    assert cli.invoked(argv) == command
    if command and command != "lisst":
        args = cli.build_parser(only=command).parse_args(argv + (["x"] if command in (
            "show", "define", "start") and argv[-1] == command else []))
        assert args.cmd == command and callable(args.func)


def test_the_top_level_help_lists_every_command_without_building_them(capsys):
    for only in (None, ""):
        with pytest.raises(SystemExit):
            cli.build_parser(only=only).parse_args(["--help"])
    full, bare = capsys.readouterr().out.split("usage: ")[1:]
    assert full == bare and "import-ether-conf" in bare
