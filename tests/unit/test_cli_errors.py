"""Bad input to the unprivileged commands ends in a named error and one sentence, with the
documented exit code, never a traceback: values D-Bus cannot carry (found before anything is
sent: exit 2), arguments that are not UTF-8, Unicode digits, files that are not UTF-8, output
that cannot be written, argparse's usage errors with --json, a bus address that is not one,
and attach's COMMAND that cannot be run. Also define --from --dry-run defines nothing, the
helpers QEMU runs answer --help and --version, `make unit` runs the virtualenv's Python, and
the docs' script= paths and attach examples work.

No bus: VNET_BUS_ADDRESS names one that does not exist (a command that tried to connect
would fail with exit 1), and where a reply is needed, BlockingClient._send is a stand-in that
records what would have been sent.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from vnet_client import base, blocking, bridge_helper, cli, ifupdown

from tests.unit.cli_support import (  # noqa: F401
    NO_BUS,
    ROOT,
    _no_system_bus,
    exit_code,
    record_sends,
    reply,
)

NOT_UTF8 = b"a\xff".decode("utf-8", "surrogateescape")  # what Python makes of argv b'a\xff'
TOO_BIG = "99999999999999999999"  # past 64 bits



NETWORK = {"name": ("s", "vnet9"), "mode": ("s", "nat"), "subnet": ("s", "172.16.19.0/24"),
           "gateway": ("s", "172.16.19.1"), "state": ("s", "not defined")}
REPLIES = {"CheckDefinition": reply("a{sv}", NETWORK), "Define": reply("s", "vnet9"),
           "Start": reply(), "GetNetwork": reply("a{sv}", NETWORK),
           "ExportEtherConf": reply("s", "ether_0=52:54:00:00:00:01\n"),
           "VdeSocket": reply("ss", "/run/qemu-vnet/vde/vnet2_0", "52:54:00:00:00:01")}


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, tuple]]:
    """vnetd's stand-in: the calls that reached the wire, (member, body), and the replies."""
    return record_sends(monkeypatch, lambda member, _msg, _calls: REPLIES[member])


def toml(tmp_path: Path, text: str | bytes) -> str:
    p = tmp_path / "f.toml"
    if isinstance(text, str):
        p.write_text(text)
    else:
        p.write_bytes(text)
    return str(p)


# --- 1. define --from FILE --dry-run defines nothing ------------------------------------
def test_define_from_with_dry_run_checks_and_defines_nothing(tmp_path, sent, capsys):
    path = toml(tmp_path, 'mode = "nat"\nmtu = 9000\n')
    assert exit_code(["define", "vnet9", "--from", path, "--dry-run"]) == 0
    assert [m for m, _ in sent] == ["CheckDefinition"]
    assert sent[0][1] == ("vnet9", {"mode": ("s", "nat"), "mtu": ("i", 9000)})
    out = capsys.readouterr().out
    assert "Would define network vnet9" in out and "nothing was defined" in out


def test_define_from_with_dry_run_and_json_prints_the_network(tmp_path, sent, capsys):
    path = toml(tmp_path, 'mode = "nat"\n')
    assert exit_code(["define", "vnet9", "--from", path, "--dry-run", "--json"]) == 0
    assert [m for m, _ in sent] == ["CheckDefinition"]
    assert json.loads(capsys.readouterr().out)["state"] == "not defined"


def test_define_from_with_dry_run_and_start_is_refused_as_with_flags(tmp_path, sent, capsys):
    path = toml(tmp_path, 'mode = "nat"\n')
    assert exit_code(["define", "vnet9", "--from", path, "--dry-run", "--start"]) == 2
    assert sent == []
    assert "drop --start" in capsys.readouterr().err


def test_define_from_without_dry_run_still_defines(tmp_path, sent):
    path = toml(tmp_path, 'mode = "nat"\n')
    assert exit_code(["define", "vnet9", "--from", path, "--start"]) == 0
    assert [m for m, _ in sent] == ["Define", "Start"]


# --- 2. values D-Bus cannot carry: usage errors, before anything is sent -----------------
@pytest.mark.parametrize("argv,said", [
    (["mac", "--br", "vnet2", "--vm", "a", "--nic", "-1"], "--nic must be between 0 and 31"),
    (["mac", "--br", "vnet2", "--vm", "a", "--nic", "4294967296"],
     "--nic must be between 0 and 31"),
    (["mac", "transfer", "vnet2", "web1", "4294967296"], "4294967296 is not a uid"),
    (["define", "vnet9", "--dry-run", "--mtu", TOO_BIG], f"--mtu: {TOO_BIG} does not fit"),
    (["define", "vnet9", "--vni", "1", "--local", "10.0.0.1", "--asn", TOO_BIG],
     f"--asn: {TOO_BIG} does not fit"),
    (["--br=vnet9", "-n", TOO_BIG, "--start"], f"{TOO_BIG} does not fit"),
    (["attach", "--br=vnet2", "--vm", "a", "--queues", TOO_BIG, "--", "true"],
     "--queues must be between 1 and"),
    (["attach", "--br=vnet2", "--vm", "a", "--nic", "32", "--", "true"],
     "--nic must be between 0 and 31"),
])
def test_numbers_out_of_range_are_usage_errors_naming_the_flag(argv, said, sent, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert sent == []


@pytest.mark.parametrize("text,said", [
    ("mtu = 1.5\n", "mtu = 1.5 cannot be sent"),
    ("mtu = 1979-05-27\n", "mtu = 1979-05-27 cannot be sent"),
    ('routed-with = ["vnet2", 3]\n', "routed-with = ['vnet2', 3] cannot be sent"),
    (f"mtu = {TOO_BIG}\n", f"mtu = {TOO_BIG} cannot be sent"),
    ('[overlay]\nvni = 5\npeers = [1.5]\n', "overlay.peers = [1.5] cannot be sent"),
    ('[[hosts]]\nvm = "web1"\nip = 1.5\n', "hosts[0].ip = 1.5 cannot be sent"),
])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_definition_file_value_dbus_cannot_carry_is_a_usage_error(tmp_path, text, said,
                                                                     dry_run, sent, capsys):
    path = toml(tmp_path, text)
    assert exit_code(["define", "vnet9", "--from", path, *dry_run]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert sent == []


def test_a_definition_file_value_is_a_usage_error_without_a_bus_too(tmp_path, capsys):
    # the connection is made by the first call, once its values are known to fit
    assert exit_code(["define", "vnet9", "--from", toml(tmp_path, "mtu = 1.5\n")]) == 2
    assert "mtu = 1.5 cannot be sent" in capsys.readouterr().err


def test_with_json_the_unsendable_value_is_a_usage_object(tmp_path, capsys):
    assert exit_code(["define", "vnet9", "--json", "--from", toml(tmp_path, "mtu = 1.5\n")]) == 2
    err = json.loads(capsys.readouterr().err)
    assert err["error"] == "Usage" and "mtu = 1.5" in err["message"]


@pytest.mark.parametrize("argv", [["show", NOT_UTF8], ["mac", "--br", NOT_UTF8, "--vm", "a"],
                                  ["define", "vnet9", "--dry-run", "--domain", NOT_UTF8]])
def test_an_argument_that_is_not_utf8_is_a_usage_error(argv, sent, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert r"The argument 'a\xff' is not valid UTF-8" in err
    assert "connection" not in err and "Traceback" not in err
    assert sent == []


def test_the_client_checks_a_call_before_it_connects_or_sends():
    c = blocking.BlockingClient(NO_BUS)
    with pytest.raises(base.Unsendable, match="not valid UTF-8"):
        c.get_network(NOT_UTF8)
    with pytest.raises(base.Unsendable, match="cannot be sent"):
        c.transfer_vm("vnet2", "web1", -1)
    assert c.conn is None and not c.opened


def test_text_that_is_not_utf8_is_not_taken_for_a_broken_connection():
    class Conn:
        sent = 0

        def send_and_get_reply(self, msg, timeout=None):
            Conn.sent += 1
            msg.serialise(serial=2)  # what jeepney does first: UnicodeEncodeError, a ValueError
            raise AssertionError("not reached")

        def close(self):
            pass

    c = blocking.BlockingClient(NO_BUS)
    c.conn, c.opened = Conn(), True  # type: ignore[assignment]
    with pytest.raises(base.VnetClientError) as e:
        c.get_network(NOT_UTF8)
    assert e.value.name == base.INVALID_ARGS and "broke" not in e.value.message
    assert Conn.sent == 0


def test_vnet_ifup_refuses_an_interface_name_that_is_not_utf8(capsys):
    assert ifupdown._run(False, ["vnet-ifup", NOT_UTF8]) == 2
    assert r"vnet-ifup: The argument 'a\xff' is not valid UTF-8" in capsys.readouterr().err


def test_vnet_bridge_helper_refuses_an_argument_that_is_not_utf8(capsys):
    assert bridge_helper.main([f"--br={NOT_UTF8}", "--fd=3"]) == 2
    assert r"The argument '--br=a\xff' is not valid UTF-8" in capsys.readouterr().err


# --- 3. Unicode digits are not numbers -----------------------------------------------------
def test_a_unicode_digit_is_not_a_uid(capsys):
    with pytest.raises(cli.Usage, match="no user named '²'"):
        cli._uid_of("²")
    assert exit_code(["mac", "transfer", "vnet2", "web1", "²"]) == 2
    assert "no user named '²'" in capsys.readouterr().err


def test_a_unicode_digit_is_not_a_tap_count(monkeypatch, capsys):
    monkeypatch.setenv("QEMU_VLAN_NUM", "²")
    assert exit_code(["--br", "vnet9", "--macaddr"]) == 2
    assert "QEMU_VLAN_NUM='²' is not a tap count" in capsys.readouterr().err


# --- 4. files that are not UTF-8, a file that cannot be written, COMMAND that cannot run ---
def test_an_ether_conf_that_is_not_utf8_is_named(tmp_path, capsys):
    (tmp_path / "e.conf").write_bytes(b"ether_0=52:54:00:00:00:01\nether_1=\xff\n")
    assert exit_code(["import-ether-conf", str(tmp_path / "e.conf")]) == 1
    err = capsys.readouterr().err
    assert f"cannot read {tmp_path / 'e.conf'}: it is not UTF-8 text (line 2" in err
    assert "Traceback" not in err


def test_a_definition_file_that_is_not_utf8_is_named(tmp_path, sent, capsys):
    path = toml(tmp_path, b'mode = "\xff"\n')
    assert exit_code(["define", "vnet9", "--from", path]) == 1
    assert f"cannot read {path}: it is not UTF-8 text (line 1" in capsys.readouterr().err
    assert sent == []


def test_mac_export_ether_conf_to_a_file_that_cannot_be_written(tmp_path, sent, capsys):
    target = tmp_path / "no-such-dir" / "ether.conf"
    assert exit_code(["mac", "--br", "vnet2", "--export-ether-conf", str(target)]) == 1
    assert f"cannot write {target}: No such file or directory." in capsys.readouterr().err


def test_mac_export_ether_conf_writes_the_file(tmp_path, sent):
    target = tmp_path / "ether.conf"
    assert exit_code(["mac", "--br", "vnet2", "--export-ether-conf", str(target)]) == 0
    assert target.read_text() == "ether_0=52:54:00:00:00:01\n"


def test_attach_of_a_command_that_is_not_found_exits_127(sent, capsys):
    assert exit_code(["attach", "--br=vnet2", "--vm", "a", "--", "/nonexistent/qemu"]) == 127
    assert "command not found: /nonexistent/qemu" in capsys.readouterr().err
    assert sent == []  # nothing was attached


@pytest.mark.parametrize("code,status,text", [
    (errno.ENOENT, 127, "No such file or directory"),  # e.g. a #! interpreter that is missing
    (errno.ENOEXEC, 126, "Exec format error"),
    (errno.EACCES, 126, "Permission denied"),
])
def test_attach_of_a_command_that_cannot_be_run(monkeypatch, sent, capsys, code, status, text):
    def execv(path, argv):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "execv", execv)
    argv = ["attach", "--br=vnet2", "--vde", "--vm", "a", "--", "true", "sock={vde_sock}"]
    assert exit_code(argv) == status
    err = capsys.readouterr().err
    assert f"cannot run true: {text}" in err and "Traceback" not in err
    assert [m for m, _ in sent] == ["VdeSocket"]


def test_attach_help_and_docs_give_the_exit_codes_of_a_command_that_cannot_run(capsys):
    assert exit_code(["attach", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "not found exits 127" in out and "126" in out
    doc = " ".join((ROOT / "docs/cli.md").read_text().split())
    assert "the exit code is 127" in doc and "the exit code is 126" in doc


# --- 5. output that cannot be written --------------------------------------------------------
def run_to(path: str, argv: list[str]) -> subprocess.CompletedProcess:
    with open(path, "w") as out:
        return subprocess.run([sys.executable, "-m", "vnet_client.cli", *argv], stdout=out,
                              stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT,
                              env=os.environ | {"VNET_BUS_ADDRESS": NO_BUS})


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("argv", [
    ["--help"],  # more than the buffer: the write itself fails
    ["show", "--help"],  # the final flush fails
    ["--version"],
    ["import-bridge-conf", "BRIDGE_CONF"],  # a command that returns: the final flush fails
])
def test_output_that_cannot_be_written_is_one_sentence_and_exit_1(argv, tmp_path):
    (tmp_path / "bridge.conf").write_text("allow vnet2\n")
    argv = [str(tmp_path / "bridge.conf") if a == "BRIDGE_CONF" else a for a in argv]
    p = run_to("/dev/full", argv)
    assert p.stderr.endswith("vnet-client: cannot write the output: No space left on device\n")
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr
    assert p.returncode == 1


def test_output_that_can_be_written_is_written(tmp_path):
    (tmp_path / "bridge.conf").write_text("allow vnet2\n")
    p = run_to(str(tmp_path / "out"), ["import-bridge-conf", str(tmp_path / "bridge.conf")])
    assert p.returncode == 0, p.stderr
    assert "vnet2" in (tmp_path / "out").read_text()


# --- 6. --json for argparse's usage errors ---------------------------------------------------
@pytest.mark.parametrize("argv,said", [
    (["list", "--json", "--bogus"], "unrecognized arguments: --bogus"),
    (["--json", "show"], "the following arguments are required: name"),
    (["--json", "define", "x", "--mtu", "abc"], "argument --mtu: invalid int value: 'abc'"),
    (["--json", "--br=vnet3", "-n", "four", "--start"], "invalid int value: 'four'"),
    (["list", "--jsno", "--json"], "Did you mean '--json'?"),
])
def test_with_json_a_usage_error_is_one_json_object(argv, said, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    obj = json.loads(err)
    assert obj["error"] == "Usage" and said in obj["message"]


def test_without_json_a_usage_error_stays_text(capsys):
    assert exit_code(["--json", "list", "--bogus"]) == 2
    assert capsys.readouterr().err.startswith("{")
    assert exit_code(["list", "--bogus"]) == 2  # the next command line has no --json
    assert capsys.readouterr().err.startswith("vnet-client list: error: unrecognized argument")
    assert exit_code(["show"]) == 2
    assert capsys.readouterr().err.startswith("vnet-client show: error: the following")


# --- 7. make unit runs the virtualenv's Python -----------------------------------------------
def test_make_unit_runs_the_virtualenvs_python(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    p = subprocess.run(["make", "-n", "-s", "unit", f"VENV={venv}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"{venv}/bin/python -m pytest -q -p no:cacheprovider tests/unit" in p.stdout
    assert "python3 -m pytest" not in p.stdout


# --- 8. the helpers QEMU runs: --help and --version --------------------------------------
def test_bridge_helper_help_goes_to_stdout_with_exit_0(capsys):
    assert bridge_helper.main(["--help"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("usage: vnet-bridge-helper") and out.err == ""
    assert "qemu-bridge-helper" in out.out


@pytest.mark.parametrize("run,prog", [
    (lambda a: bridge_helper.main(a), "vnet-bridge-helper"),
    (lambda a: ifupdown._run(False, ["vnet-ifup", *a]), "vnet-ifup"),
    (lambda a: ifupdown._run(True, ["vnet-ifdown", *a]), "vnet-ifdown"),
])
def test_the_helpers_print_their_version(run, prog, capsys):
    from vnet_client import __version__

    assert run(["--version"]) == 0
    out = capsys.readouterr()
    assert out.out == f"{prog} (qemu-vnet) {__version__}\n" and out.err == ""


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_ifup_help_goes_to_stdout_with_exit_0(flag, capsys):
    assert ifupdown._run(False, ["vnet-ifup", flag]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("usage: vnet-ifup IFNAME") and out.err == ""


def test_ifup_without_an_interface_is_a_usage_error(capsys):
    assert ifupdown._run(False, ["vnet-ifup"]) == 2
    assert capsys.readouterr().err.startswith("usage: vnet-ifup IFNAME")


# --- 9. the docs: script= paths and attach examples ------------------------------------------
DOCS = [ROOT / "docs/cli.md", ROOT / "docs/migrating-from-qemu-vlan.md"]


def test_the_docs_give_script_a_full_path_where_vnet_ifup_is_installed():
    makefile = (ROOT / "Makefile").read_text()
    bindir = re.search(r"^BINDIR\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert re.search(r"for c in [^;]*vnet-ifup[^;]*; do ln -sf \S+ \$\(BINDIR\)", makefile)
    assert "$(PKG)/usr/bin/vnet-ifup" in (ROOT / "debian/rules").read_text()
    for doc in DOCS:
        text = doc.read_text()
        scripts = re.findall(r"(?:down)?script=([^,`\s|]+)", text)
        assert scripts, doc
        for s in scripts:
            if s != "no":
                assert s in (f"{bindir}/vnet-ifup", f"{bindir}/vnet-ifdown"), (doc, s)
        assert "/usr/bin/vnet-ifup" in text, doc


def test_the_docs_attach_examples_parse():
    examples = []
    for doc in DOCS:
        text = " ".join(doc.read_text().split())
        examples += re.findall(r"`vnet-client attach ([^`]*?) -- ", text)
    assert len(examples) >= 3
    for opts in examples:
        words = [w for w in opts.split() if w != "..."]
        if not any(w.startswith("--vm") for w in words):  # left out as '...'
            words = ["--vm", "web1", *words]
        cli.parse_attach([*words, "--", "qemu"])  # raises Usage if the order is wrong


# --- 10. a bus address that is not one --------------------------------------------------------
@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_given_bus_address_is_named_and_the_system_bus_not_blamed(how, monkeypatch, capsys):
    argv = ["list"]
    if how == "flag":
        argv += ["--bus-address", "garbage"]
    else:
        monkeypatch.setenv("VNET_BUS_ADDRESS", "garbage")
    assert exit_code(argv) == 1
    err = capsys.readouterr().err
    assert "'garbage'" in err and "not a valid D-Bus address or cannot be reached" in err
    assert "system bus" not in err


def test_an_unreachable_given_address_is_named(capsys):
    assert exit_code(["list", "--json"]) == 1
    err = json.loads(capsys.readouterr().err)
    assert err["error"] == base.NO_BUS and NO_BUS in err["message"]
    assert "system bus" not in err["message"]


def test_the_helpers_name_a_given_bus_address(monkeypatch, capsys):
    monkeypatch.setenv("VNET_BUS_ADDRESS", "garbage")
    assert ifupdown._run(False, ["vnet-ifup", "vnet2_0"]) == 1
    err = capsys.readouterr().err
    assert "'garbage'" in err and "system bus" not in err
    from vnet_client.helper_call import HelperError, attach_for_helper

    with pytest.raises(HelperError) as e:
        attach_for_helper("vnet2", "web1", [None], 1)
    assert "'garbage'" in e.value.message and "system bus" not in e.value.message
