"""Shell completion and the manual page, generated from vnet-client's parser (shtab,
argparse-manpage, and the module's own fish generator): the bash and fish scripts are sourced
in a real bash and a real fish and complete subcommands, options, choices, and network and VM
names asked of the running service."""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="module")
def fish_script(tmp_path_factory):
    if shutil.which("fish") is None:
        pytest.fail("fish is not installed: the fish completion is tested in a real fish "
                    "(Debian package fish; sudo make install-test-deps installs it)")
    path = tmp_path_factory.mktemp("completion") / "vnet-client.fish"
    path.write_text(generated("fish"))
    return path


def fish_complete(script, line: str, cwd=None, described: bool = False) -> list[str]:
    """What fish offers for `line` (`complete -C`: the words, or with `described` the words
    with their descriptions after a tab), the script sourced in a fish with no
    configuration."""
    home = script.parent / "home"
    env = dict(os.environ, PATH=f"{VENV / 'bin'}:{os.environ['PATH']}",
               XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"))
    r = subprocess.run(["fish", "--no-config", "-c", "source $argv[1]; complete -C $argv[2]",
                        str(script), line], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr.lower(), r.stderr
    lines = [w for w in r.stdout.split("\n") if w]
    return lines if described else [w.split("\t")[0] for w in lines]


def test_fish_script_is_generated_the_same_each_time_and_parses(fish_script):
    assert generated("fish") == fish_script.read_text()
    r = subprocess.run(["fish", "--no-config", "-n", str(fish_script)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = fish_script.read_text()
    assert "complete -c vnet-client" in text and "__vnet_client_networks" in text


def test_fish_completes_commands_options_and_choices(fish_script, tmp_path):
    assert fish_complete(fish_script, "vnet-client sta") == ["start"]
    assert fish_complete(fish_script, "vnet-client st") == ["start", "stop"]
    assert fish_complete(fish_script, "vnet-client sto", described=True) == [
        "stop\tstop a network and remove what start made"]
    assert "--no-ask-password" in fish_complete(fish_script, "vnet-client --n")
    # nested subcommands, and options by subcommand (attach's from its usage line)
    assert fish_complete(fish_script, "vnet-client host a") == ["add"]
    assert fish_complete(fish_script, "vnet-client mac f") == ["forget"]
    assert fish_complete(fish_script, "vnet-client overlay add") == ["add-peer"]
    assert fish_complete(fish_script, "vnet-client attach --b") == ["--br", "--bus-address"]
    assert fish_complete(fish_script, "vnet-client attach --br=x --v") == [
        "--vde", "--vhost", "--vm"]
    assert fish_complete(fish_script, "vnet-client stop --f") == ["--force"]
    assert fish_complete(fish_script, "vnet-client show --f") == []
    # an option's value (its own word or after =), and a short option with a value skipped
    assert fish_complete(fish_script, "vnet-client define --mode h") == ["host-only"]
    assert fish_complete(fish_script, "vnet-client define --mode=b") == ["--mode=bridged"]
    assert "--force" in fish_complete(fish_script, "vnet-client define lab -n 4 --")
    # positional choices by their place, after a flag
    assert fish_complete(fish_script, "vnet-client forward add lab -6 ") == ["tcp", "udp"]
    assert fish_complete(fish_script, "vnet-client autostart lab o") == ["off", "on"]
    # files only where a file goes, directories where a directory goes
    (tmp_path / "lab.toml").write_text("")
    (tmp_path / "labdir").mkdir()
    for line in ("vnet-client define lab --from la", "vnet-client mac import lab la"):
        assert sorted(fish_complete(fish_script, line, cwd=tmp_path)) == [
            "lab.toml", "labdir/"], line
    assert fish_complete(fish_script, "vnet-client import-qemu-vlan la", cwd=tmp_path) == [
        "labdir/"]
    assert fish_complete(fish_script, "vnet-client list la", cwd=tmp_path) == []
    # after attach's --, the command completes as itself
    assert "echo" in fish_complete(fish_script, "vnet-client attach --br x -- ech")


def test_fish_completes_network_and_vm_names_from_the_service(vnetd, fish_script):
    assert fish_complete(fish_script, "vnet-client show comp") == [NET]
    assert fish_complete(fish_script, "vnet-client forward list comp") == [NET]
    assert fish_complete(fish_script, "vnet-client mac export comp") == [NET]
    assert fish_complete(fish_script, "vnet-client mac --br comp") == [NET]
    assert fish_complete(fish_script, "vnet-client attach --br=comp") == [f"--br={NET}"]
    assert fish_complete(fish_script, "vnet-client define comp") == []  # a new name
    assert fish_complete(fish_script, "vnet-client autostart compl5 comp") == []  # on/off
    holder = spawn_as(ALICE, HOLDER, NET, "complvm1")
    try:
        assert "ifname" in read_json(holder)
        assert fish_complete(fish_script, "vnet-client host add compl5 --vm compl") == [
            "complvm1"]
        assert fish_complete(fish_script, "vnet-client attach --br compl5 --vm compl") == [
            "complvm1"]
    finally:
        holder.kill()
        holder.wait()
