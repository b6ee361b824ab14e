"""Generated references stay in step with the code."""

from __future__ import annotations

from pathlib import Path

from vnetd import api

ROOT = Path(__file__).resolve().parents[2]


def test_dbus_api_reference_is_current():
    assert (ROOT / "docs/dbus-api.md").read_text() == api.markdown(), (
        "docs/dbus-api.md is stale: run 'cd helper && python3 -m vnetd.api --markdown "
        "> ../docs/dbus-api.md'")


def test_every_cli_subcommand_is_documented():
    from vnet_client.cli import build_parser

    text = (ROOT / "docs/cli.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    for name in sub.choices:
        assert f"vnet-client {name}" in text, f"docs/cli.md does not describe '{name}'"
