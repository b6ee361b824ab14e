"""What a review of the command line found: a subcommand's typo is reported by that
subcommand (its usage, a near miss among its options); the tap options take the same
spellings in define, import-qemu-vlan and the qemu-vlan form; every argument has a line of
help and every command examples (attach's options too), in step with docs/cli.md; the
qemu-vlan form's --macaddr takes at most MAX_TAPS taps and says how far it got; and
`mac --export-ether-conf` and `import-ether-conf` answer --json.

No bus: VNET_BUS_ADDRESS names one that does not exist, and where a reply is needed
BlockingClient._send is a stand-in that records what would have been sent.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest
from jeepney.low_level import Message as JMessage
from vnet_client import cli
from vnet_common.limits import MAX_QUEUES, MAX_TAPS

from tests.unit.cli_support import (  # noqa: F401
    NO_BUS,
    ROOT,
    _no_system_bus,
    exit_code,
    record_sends,
    reply,
)

BR = "zzrev9"  # no /etc/qemu/zzrev9/zzrev9.conf: the qemu-vlan form reads none



ETHER_CONF = ("# ether.conf for vnet3, written by qemu-vnet\n"
              "ether_0=52:54:00:00:00:01\n"
              "ether_1=52:54:00:00:00:02\n"
              "ether_2=52:54:00:00:00:03  # vm web1 nic 0\n")


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, tuple]]:
    """vnetd's stand-in: the calls that reached the wire, (member, body)."""
    def answer(member: str, msg: JMessage, calls: list) -> JMessage:
        if member == "GetMac":
            return reply("s", f"52:54:00:00:{len(calls) // 256:02x}:{len(calls) % 256:02x}")
        if member == "ImportMacs":
            return reply("u", len(msg.body[1]))
        return {"ExportEtherConf": reply("s", ETHER_CONF)}[member]

    return record_sends(monkeypatch, answer)


# --- 1. a typo in a subcommand's options: that subcommand says so -----------------------------
@pytest.mark.parametrize("argv,prog,suggestion", [
    (["define", "vnet9", "--subent", "10.0.0.0/24"], "vnet-client define", "'--subnet'"),
    (["define", "vnet9", "--autostrat"], "vnet-client define", "'--autostart'"),
    (["import-qemu-vlan", "/etc/qemu/vnet3", "--dry-rn"], "vnet-client import-qemu-vlan",
     "'--dry-run'"),
    (["show", "vnet2", "--prots"], "vnet-client show", "'--ports'"),
    (["host", "add", "vnet2", "--vm", "web1", "--mca", "52:54:00:00:00:01"],
     "vnet-client host add", "'--mac'"),
    (["mac", "export", "vnet2", "--jsno"], "vnet-client mac export", "'--json'"),
    (["stop", "vnet2", "--froce"], "vnet-client stop", "'--force'"),
])
def test_a_typo_in_a_subcommands_options_is_reported_by_that_subcommand(argv, prog, suggestion,
                                                                         capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 3, err
    assert lines[0].startswith(f"{prog}: error: unrecognized arguments: ")
    assert lines[0].endswith(f"Did you mean {suggestion}?")
    assert lines[1].startswith(f"usage: {prog} ")
    assert lines[2] == f"See '{prog} --help'."


def test_the_typo_with_json_is_one_object_with_the_suggestion(capsys):
    assert exit_code(["--json", "define", "vnet9", "--subent", "10.0.0.0/24"]) == 2
    obj = json.loads(capsys.readouterr().err)
    assert obj == {"error": "Usage", "message": "unrecognized arguments: --subent 10.0.0.0/24. "
                                                "Did you mean '--subnet'?"}


def test_an_unknown_option_is_reported_by_the_parser_it_was_given_to(capsys):
    assert exit_code(["list", "--jsn"]) == 2  # after the subcommand: the subcommand's
    assert capsys.readouterr().err.startswith("vnet-client list: error: unrecognized "
                                              "arguments: --jsn. Did you mean '--json'?")
    assert exit_code(["--jsn", "list"]) == 2  # before it: the top level's
    err = capsys.readouterr().err
    assert err.startswith("vnet-client: error: unrecognized arguments: --jsn. Did you mean "
                          "'--json'?")
    assert "See 'vnet-client --help'." in err


# --- 2. one set of spellings for the tap options -----------------------------------------------
SPELLINGS = {"taps": (["-n", "3"], ["-n3"], ["--num", "3"], ["--num=3"], ["--taps", "3"]),
             "user": (["-u", "1000"], ["--user", "1000"], ["--user=1000"]),
             "group": (["-g", "kvm"], ["--group", "kvm"], ["--group=kvm"])}
EXPECTED = {"taps": 3, "user": "1000", "group": "kvm"}


def test_define_import_and_the_qemu_vlan_form_take_every_spelling_of_the_tap_options():
    forms = {"define": lambda argv: cli.build_parser().parse_args(["define", "x", *argv]),
             "import-qemu-vlan": lambda argv: cli.build_parser().parse_args(
                 ["import-qemu-vlan", "/etc/qemu/vnet3", *argv]),
             "qemu-vlan form": lambda argv: cli.build_compat_parser().parse_args(
                 [f"--br={BR}", *argv, "--start"])}
    refused = []
    for form, parse in forms.items():
        for what, spellings in SPELLINGS.items():
            attr = "num" if (form, what) == ("import-qemu-vlan", "taps") else what
            for argv in spellings:
                try:
                    assert getattr(parse(argv), attr) == EXPECTED[what], (form, argv)
                except SystemExit:
                    refused.append((form, " ".join(argv)))
    assert not refused, refused


def test_define_short_spellings_mean_what_the_long_ones_do():
    parse = cli.build_parser().parse_args
    short = cli._define_opts(parse(["define", "x", "--num", "2", "-u", "0", "-g", "root"]))
    long = cli._define_opts(parse(["define", "x", "--taps", "2", "--user", "0",
                                   "--group", "root"]))
    assert short == long
    assert (short["taps"], short["tap-user"], short["tap-group"]) == (2, 0, "root")


def test_define_and_import_help_name_every_spelling(capsys):
    for cmd in (["define"], ["import-qemu-vlan"]):
        assert exit_code([*cmd, "--help"]) == 0
        out = capsys.readouterr().out
        for spelling in ("-n COUNT, --num COUNT, --taps COUNT", "-u USER, --user USER",
                         "-g GROUP, --group GROUP"):
            assert spelling in out, (cmd, spelling)


# --- 3. --help that teaches ---------------------------------------------------------------------
def _parsers(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _parsers(sp, (*path, name))


def test_every_argument_has_a_line_of_help():
    missing = [(" ".join(path), a.option_strings or a.dest)
               for path, p in _parsers(cli.build_parser())
               for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert not missing, missing


def test_every_command_shows_examples(capsys):
    without = []
    for cmd in cli.subcommands():
        assert exit_code([cmd, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        m = re.search(r"[Ee]xamples?(?: \([^)]*\))?: (.*)", text)
        if not (m and re.search(rf"vnet-client {re.escape(cmd)}( |$)", m.group(1))):
            without.append(cmd)
    assert not without, without


@pytest.mark.parametrize("cmd,example", [
    ("define", "vnet-client define vnet3 -n 4 -u alice -g kvm"),
    ("import-qemu-vlan", "vnet-client import-qemu-vlan /etc/qemu/vnet3 -n 4 --dry-run"),
    ("import-bridge-conf", "vnet-client import-bridge-conf > "),
    ("show", "vnet-client show vnet2 --ports"),
    ("leases", "vnet-client leases vnet2"),
    ("ports", "vnet-client ports --json"),
    ("stop", "vnet-client stop vnet2 --force"),
])
def test_the_commands_the_review_named_show_examples(cmd, example, capsys):
    assert exit_code([cmd, "--help"]) == 0
    assert example in capsys.readouterr().out


def test_attach_help_explains_each_option(capsys):
    assert exit_code(["attach", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--br NET", "--vm NAME", "--nic N", "--queues N", "--vhost", "--mac MAC",
                 "--vde"):
        assert re.search(rf"(^| ){re.escape(flag)} [a-z]", out), flag
    assert f"1-{MAX_QUEUES}" in out and "{vhostfds}" in out and "{vde_sock}" in out
    # the options are there for --help: attach still reads its own command line
    groups, command, _ = cli.parse_attach(["--br=vnet2", "--vm", "w", "--queues", "4",
                                           "--vhost", "--", "qemu"])
    assert (groups[0].queues, groups[0].vhost, command) == (4, True, ["qemu"])


def test_help_and_docs_name_ctrl_c_and_show_ports(capsys):
    docs = " ".join((ROOT / "docs/cli.md").read_text().split())
    assert "vnet-client show NAME [--ports] [--json]" in docs
    assert "`show NAME --ports` lists them" in docs
    assert "**130** interrupted (Ctrl-C)" in docs
    for argv in (["--help"], [f"--br={BR}", "--help"]):
        assert exit_code(argv) == 0
        assert "130 interrupted (Ctrl-C)" in " ".join(capsys.readouterr().out.split()), argv


def test_docs_give_the_tap_options_every_spelling():
    docs = " ".join((ROOT / "docs/cli.md").read_text().split())
    assert "[-n|--num|--taps COUNT] [-u|--user=USER] [-g|--group=GROUP]" in docs
    assert ("vnet-client import-qemu-vlan DIR [--dry-run] [--start] [--if=NIC] "
            "[-n|--num|--taps COUNT]") in docs


# --- 5. the qemu-vlan form's --macaddr: bounded, and it says how far it got --------------------
@pytest.mark.parametrize("argv,env,said", [
    (["-n", str(MAX_TAPS + 1)], {}, f"-n asks for {MAX_TAPS + 1} taps"),
    (["--num", "100000"], {}, "-n asks for 100000 taps (800000 MACs)"),
    (["-v"], {"QEMU_VLAN_NUM": "1000"}, "$QEMU_VLAN_NUM asks for 1000 taps (32000 MACs)"),
])
def test_macaddr_refuses_more_taps_than_a_network_has_before_any_call(argv, env, said, sent,
                                                                      monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert exit_code([f"--br={BR}", *argv, "--macaddr"]) == 2
    err = capsys.readouterr().err
    assert sent == []
    assert said in err and f"at most {MAX_TAPS} taps" in err
    assert len(err.splitlines()) == 1, err


def test_macaddr_takes_max_taps_from_the_configuration_file_and_no_more(tmp_path, sent,
                                                                          capsys):
    cf = tmp_path / f"{BR}.conf"
    cf.write_text(f"num={MAX_TAPS + 1}\n")
    assert exit_code([f"--br={BR}", "-c", str(cf), "--macaddr"]) == 2
    assert sent == []
    assert f"{cf}:1 asks for {MAX_TAPS + 1} taps" in capsys.readouterr().err
    cf.write_text(f"num={MAX_TAPS}\n")
    (tmp_path / "ether.conf").write_text("")
    assert exit_code([f"--br={BR}", "-c", str(cf), "--macaddr", "--json"]) == 0
    assert len(sent) == MAX_TAPS * 8
    assert json.loads(capsys.readouterr().out)["appended"] == MAX_TAPS * 8


def test_macaddr_says_how_far_it_got_every_100_macs(sent, capsys):
    assert exit_code([f"--br={BR}", "-n", "13", "--macaddr"]) == 0  # 104 MACs
    out, err = capsys.readouterr()
    assert [ln for ln in err.splitlines() if " of 104 MACs" in ln] == [
        "vnet-client: 100 of 104 MACs"]
    assert len(re.findall(r"^ether_\d+=", out, re.M)) == 104
    assert exit_code([f"--br={BR}", "-n", "30", "--macaddr"]) == 0  # 240 MACs
    assert [ln for ln in capsys.readouterr().err.splitlines() if "MACs" in ln] == [
        "vnet-client: 100 of 240 MACs", "vnet-client: 200 of 240 MACs"]
    assert exit_code([f"--br={BR}", "-n", "12", "--macaddr"]) == 0  # 96 MACs: quiet
    assert "MACs" not in capsys.readouterr().err


# --- 6. ether.conf export and import with --json -----------------------------------------------
def test_export_ether_conf_with_json_is_one_object(sent, capsys):
    assert exit_code(["mac", "--br", "vnet3", "--export-ether-conf", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"ether_0": "52:54:00:00:00:01", "ether_1": "52:54:00:00:00:02",
                               "ether_2": "52:54:00:00:00:03"}
    assert [m for m, _ in sent] == ["ExportEtherConf"]
    assert exit_code(["mac", "--br", "vnet3", "--export-ether-conf"]) == 0  # without: the text
    assert capsys.readouterr().out == ETHER_CONF


def test_export_ether_conf_json_has_the_qemu_vlan_forms_shape(sent, capsys):
    assert exit_code([f"--br={BR}", "-n", "1", "--macaddr", "--json"]) == 0
    macaddr = json.loads(capsys.readouterr().out)
    assert exit_code(["mac", "--br", "vnet3", "--export-ether-conf", "--json"]) == 0
    export = json.loads(capsys.readouterr().out)
    assert all(isinstance(v, str) for v in (*macaddr.values(), *export.values()))
    assert set(export) <= set(macaddr)  # ether_0.. both: the same flat object


def test_export_ether_conf_to_a_file_with_json_writes_the_file_and_says_so(tmp_path, sent,
                                                                            capsys):
    target = tmp_path / "ether.conf"
    assert exit_code(["mac", "--br", "vnet3", "--export-ether-conf", str(target),
                      "--json"]) == 0
    assert target.read_text() == ETHER_CONF  # still qemu-vlan's file
    assert json.loads(capsys.readouterr().out) == {"network": "vnet3", "file": str(target),
                                                   "written": 3}


def test_import_ether_conf_with_json_prints_what_mac_import_prints(tmp_path, sent, capsys):
    d = tmp_path / "vnet3"
    d.mkdir()
    (d / "ether.conf").write_text("ether_0=52:54:00:00:00:01\nether_1=52:54:00:00:00:02\n")
    assert exit_code(["import-ether-conf", str(d / "ether.conf"), "--json"]) == 0
    from_ether_conf = json.loads(capsys.readouterr().out)
    (tmp_path / "macs").write_text("vnet3_0/0 52:54:00:00:00:01\nvnet3_1/0 52:54:00:00:00:02\n")
    assert exit_code(["mac", "import", "vnet3", str(tmp_path / "macs"), "--json"]) == 0
    from_mac_import = json.loads(capsys.readouterr().out)
    assert from_ether_conf == from_mac_import == {"network": "vnet3", "imported": 2}
    assert sent[0] == ("ImportMacs", ("vnet3", {"vnet3_0": "52:54:00:00:00:01",
                                                "vnet3_1": "52:54:00:00:00:02"}))
    assert exit_code(["import-ether-conf", str(d / "ether.conf")]) == 0  # without: a sentence
    assert capsys.readouterr().out.startswith("Imported 2 MAC(s) into vnet3")


def test_help_says_export_ether_conf_takes_json(capsys):
    assert exit_code(["mac", "--help"]) == 0
    assert '--json: {"ether_<i>": MAC, ...}' in " ".join(capsys.readouterr().out.split())
