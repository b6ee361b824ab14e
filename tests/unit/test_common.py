"""vnet_common: the vocabulary vnetd and the client share. It uses the standard library only,
its options table is the one the definition files, export and docs/cli.md follow, and its
TOML writer is read back exactly."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from vnet_common import contract, limits, options, wire
from vnet_common.errors import InvalidArgument
from vnet_common.names import validate_network_name
from vnet_common.toml import render_definition, render_toml
from vnetd.model import Network

REPO = Path(__file__).resolve().parents[2]
MODULES = sorted(p.stem for p in (REPO / "common/vnet_common").glob("*.py"))

BLOCKER = """
import importlib.abc, sys
BLOCKED = ("dbus_fast", "pyroute2", "nftables", "jeepney", "vnetd", "vnet_client")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import importlib
for m in sys.argv[1:]:
    importlib.import_module("vnet_common." + m)
outside = sorted({n.split(".")[0] for n in sys.modules} - set(sys.stdlib_module_names)
                 - {"vnet_common", "__main__"})
print(" ".join(outside))
"""


def test_it_imports_with_only_the_standard_library():
    assert "options" in MODULES and "contract" in MODULES and len(MODULES) >= 7
    out = subprocess.run([sys.executable, "-S", "-c", BLOCKER, *MODULES], check=True,
                         capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO / "common")})
    assert out.stdout.split() == []


def test_the_blocker_does_block():
    code = BLOCKER.replace('importlib.import_module("vnet_common." + m)', "__import__(m)")
    r = subprocess.run([sys.executable, "-S", "-c", code, "dbus_fast"], capture_output=True,
                       text=True, env={"PYTHONPATH": str(REPO / "common")})
    assert r.returncode != 0 and "blocked: dbus_fast" in r.stderr


def test_the_network_keys_are_the_tables():
    assert Network.KEYS == options.NETWORK_KEYS
    assert len(set(options.NETWORK_KEYS)) == len(options.NETWORK_KEYS)
    flags = [o.flag for o in options.OPTIONS if o.flag]
    assert len(set(flags)) == len(flags)
    for o in options.OPTIONS:
        assert o.section in (None, "overlay")
        assert (o.flag is None) or o.flag.startswith("--")


def test_defaults_in_the_table_are_what_vnetd_takes():
    n = Network.from_options("vnet2", {})
    for key, attr in (("mode", "mode"), ("mtu", "mtu"), ("dhcp", "dhcp"),
                      ("tap-group", "tap_group"), ("vde-ports", "vde_ports"),
                      ("spoof-protection", "spoof_protection"), ("autostart", "autostart"),
                      ("allow-host", "allow_host"), ("vde", "vde"), ("taps", "taps")):
        assert options.by_key(key).default == getattr(n, attr), key


def test_an_option_refuses_an_unknown_type_or_mode():
    with pytest.raises(ValueError):
        options.Option("x", "float", 0, None, "x")
    with pytest.raises(ValueError):
        options.Option("x", "int", 0, None, "x", modes=("routed",))
    with pytest.raises(ValueError):
        options.Option("x", "int", 0, "--x", "x")  # a flag with neither metavar nor value


def test_export_writes_keys_in_the_tables_order():
    d = {"dhcp": "none", "overlay": {"local": "10.0.0.1", "vni": 5}, "mode": "nat",
         "name": "vnet2", "subnet": "172.16.12.0/24"}
    text = render_definition(d)
    assert [line.split(" =")[0] for line in text.splitlines()] == [
        "name", "mode", "subnet", "dhcp", "overlay"]
    assert "overlay = { vni = 5, local = " in text
    assert tomllib.loads(text) == d


def test_the_toml_writer_reads_back_and_comments_safely():
    d = {"a": "x\ny\t\"z\"\\\x7f", "b": [1, 2], "c": True, "hosts": [{"vm": "w", "ip": "1"}]}
    text = render_toml(d, "head\x1bline\n\nsecond", gap=True)
    assert text.startswith("# head?line\n#\n# second\n\na = ")
    assert tomllib.loads(text) == d


def test_docs_cli_lists_the_options_table():
    text = (REPO / "docs/cli.md").read_text()
    m = re.search(r"<!-- options table -->\n(.*?)\n<!-- end of options table -->", text, re.S)
    assert m, "docs/cli.md has no options table"
    assert m.group(1) == options.markdown_table(), (
        "docs/cli.md's options table is stale: paste vnet_common.options.markdown_table()")


def test_wire_names_and_signatures():
    assert wire.BUS_NAME == "org.qemuvnet.Vnet1"
    assert wire.MANAGER == wire.BUS_NAME + ".Manager"
    assert {m.iface for m in contract.METHODS} == {wire.MANAGER, wire.NETWORK}
    assert [wire.signature(v) for v in (True, 1, 2**40, "s", {}, [{}], [], ["a"], [1])] \
        == ["b", "i", "x", "s", "a{sv}", "aa{sv}", "as", "as", "ax"]
    with pytest.raises(TypeError):
        wire.signature(1.5)


def test_limits_hold_in_the_validators():
    validate_network_name("a" * limits.MAX_IFNAME)
    with pytest.raises(InvalidArgument):
        validate_network_name("a" * (limits.MAX_IFNAME + 1))
