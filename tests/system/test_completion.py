"""Shell completion and the manual page, generated from vnet-client's parser (shtab,
argparse-manpage): the bash script is sourced in a real bash and completes subcommands,
options, choices, and network and VM names asked of the running service."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.harness.daemon import ALICE, VENV, run_client
from tests.harness.services import ROOT
from tests.harness.users import HOLDER, read_json, spawn_as

NET = "compl5"
ENV = dict(os.environ, PYTHONPATH=f"{ROOT / 'client'}:{ROOT / 'common'}")


def generated(shell: str) -> str:
    """The script as `make install` and the package make it (the system python, whose
    python3-shtab the Makefile installs)."""
    r = subprocess.run(["/usr/bin/python3", "-m", "vnet_client.cli.completion", shell],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("completion") / "vnet-client.bash"
    path.write_text(generated("bash"))
    return path


def complete(script, line: str, user_env: dict | None = None) -> list[str]:
    """What bash offers for `line` (a trailing space: a new word), through the function the
    script registers for vnet-client."""
    prog = f"""
source {script}
fn=$(complete -p vnet-client | sed 's/.*-F \\([^ ]*\\).*/\\1/')
line={line!r}
read -ra COMP_WORDS <<< "$line"
[[ "$line" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="$line"; COMP_POINT=${{#line}}
"$fn" vnet-client "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = dict(os.environ, PATH=f"{VENV / 'bin'}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.split("\n") if w]


@pytest.fixture(scope="module", autouse=True)
def network(vnetd):
    run_client("define", NET, "--subnet=10.55.5.0/24", check=True)
    run_client("start", NET, check=True)
    yield
    run_client("stop", NET, "--force")
    run_client("undefine", NET)


def test_bash_completes_commands_options_and_choices(bash_script):
    assert complete(bash_script, "vnet-client st") == ["start", "stop"]
    assert complete(bash_script, "vnet-client mac f") == ["forget"]
    assert complete(bash_script, "vnet-client stop --f") == ["--force"]
    assert complete(bash_script, "vnet-client define --mode h") == ["host-only"]
    assert "--no-ask-password" in complete(bash_script, "vnet-client --n")


def test_bash_completes_network_and_vm_names_from_the_service(vnetd, bash_script):
    assert complete(bash_script, "vnet-client show comp") == [NET]
    assert complete(bash_script, "vnet-client forward list comp") == [NET]
    assert complete(bash_script, "vnet-client mac --br comp") == [NET]
    assert NET not in complete(bash_script, "vnet-client define comp")  # a new name
    holder = spawn_as(ALICE, HOLDER, NET, "complvm1")
    try:
        assert "ifname" in read_json(holder)
        assert complete(bash_script, "vnet-client host add compl5 --vm compl") == [
            "complvm1"]
    finally:
        holder.kill()
        holder.wait()


def test_zsh_script_and_manual_page_are_generated_from_the_parser(tmp_path):
    z = generated("zsh")
    assert z.startswith("#compdef vnet-client") and "_vnet_client_networks" in z
    out = tmp_path / "vnet-client.1"
    r = subprocess.run(["/usr/bin/argparse-manpage", "--module", "vnet_client.cli",
                        "--function", "build_parser", "--project-name", "qemu-vnet",
                        "--output", str(out)], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    page = subprocess.run(["man", "-l", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, MANWIDTH="200"), timeout=60).stdout
    for sub in ("attach", "define", "forward", "monitor", "stop"):
        assert f"vnet-client {sub}" in page, sub
