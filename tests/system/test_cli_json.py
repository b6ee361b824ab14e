"""Every vnet-client command honours --json: its output is one JSON document (a script never
has to parse sentences), its errors one JSON object on stderr, and its exit codes are those
of the plain form."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness.daemon import run_client

NET = "vnet6"
DATA = Path(__file__).resolve().parents[1] / "data" / "qemu-vlan"


def j(*args: str, code: int = 0):
    r = run_client(*args, "--json")
    assert r.returncode == code, (args, r.returncode, r.stdout, r.stderr)
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"{' '.join(args)} --json printed no JSON: {r.stdout!r}") from None


def test_every_command_prints_json(vnetd, tmp_path):
    assert j("define", NET, "--dhcp=dnsmasq")["name"] == NET
    assert any(n["name"] == NET for n in j("list"))
    exported = j("export", NET)
    assert exported["mode"] == "nat"
    src = tmp_path / "copy.toml"
    src.write_text(run_client("export", NET, check=True).stdout.replace(
        "172.16.16.", "172.16.26."))
    assert j("define", "vnet16", "--from", str(src))["name"] == "vnet16"
    assert j("undefine", "vnet16") == {"name": "vnet16", "done": "undefine"}
    assert j("autostart", NET, "on") == {"name": NET, "autostart": True}
    assert j("autostart", NET, "off") == {"name": NET, "autostart": False}
    assert j("start", NET) == {"name": NET, "done": "start"}
    edited = tmp_path / "edited.toml"
    edited.write_text(run_client("export", NET, check=True).stdout + "allow-host = true\n")
    out = j("edit", NET, "--from", str(edited))
    assert out["notes"] == [f"{NET}: changed while it runs: allow-host."], out
    assert out["network"]["allow-host"] is True and "+allow-host = true" in out["diff"]
    assert j("show", NET)["state"] == "running"
    assert isinstance(j("ports"), list)
    assert isinstance(j("leases", NET), list)
    host = j("host", "add", NET, "--vm", "web1", "--ip", "172.16.16.5", "--mac",
             "52:54:00:16:00:05")
    assert host["ip"] == "172.16.16.5"
    assert [h["vm"] for h in j("host", "list", NET)] == ["web1"]
    assert j("host", "remove", NET, "--vm", "web1")["removed"] is True
    assert j("forward", "add", NET, "tcp", "8086", "172.16.16.7:80")
    assert len(j("forward", "list", NET)) == 1
    assert j("forward", "remove", NET, "tcp", "8086")["removed"] is True
    mac = j("mac", f"--br={NET}", "--vm=web2")["mac"]
    assert j("mac", "export", NET)["web2/0"] == mac
    assert j("mac", "transfer", NET, "web2", "0")["uid"] == 0
    assert j("mac", "forget", NET, "web2")["forgotten"] == 1
    assert j("reload") == {"problems": []}
    assert j("stop", NET) == {"name": NET, "done": "stop"}
    assert j("undefine", NET) == {"name": NET, "done": "undefine"}


def test_the_qemu_vlan_forms_print_json(vnetd):
    started = j("--br=vnet7", "-n", "1", "--start")
    assert started["name"] == "vnet7" and started["state"] == "running"
    assert j("--br=vnet7", "--stop") == {"name": "vnet7", "done": "stop"}
    assert j("undefine", "vnet7")["done"] == "undefine"
    imp = j("import-qemu-vlan", "--dry-run", str(DATA / "samples" / "vnet1"))
    assert imp["network"] == "vnet1" and imp["not-carried-over"]
    assert imp["definition"]["mode"]


def test_errors_are_json_on_stderr_with_the_plain_exit_code(vnetd):
    r = run_client("show", "nosuchnet", "--json")
    plain = run_client("show", "nosuchnet")
    assert r.returncode == plain.returncode == 1
    assert r.stdout == ""
    err = json.loads(r.stderr)
    assert err["error"] == "org.qemuvnet.Vnet1.Error.NotFound" and "nosuchnet" in err["message"]
    r = run_client("mac", "transfer", "vnet2", "x", "no-such-user-here", "--json")
    assert r.returncode == 2 and json.loads(r.stderr)["error"] == "Usage"


def test_define_start_that_fails_to_start_says_the_definition_stays(vnetd):
    r = run_client("define", "lan8", "--mode=bridged", "--if=nosuchnic0", "--start")
    assert r.returncode == 1
    assert "Defined network lan8, but starting it failed" in r.stderr
    assert "nosuchnic0" in r.stderr and "vnet-client undefine lan8" in r.stderr
    assert any(n["name"] == "lan8" and n["state"] == "stopped" for n in j("list"))
    run_client("undefine", "lan8", check=True)


def test_monitor_prints_one_json_line_per_event(vnetd):
    import subprocess
    import time

    from tests.harness.daemon import ALICE, CLIENT, as_user

    mon = subprocess.Popen(as_user(ALICE, [str(CLIENT), "monitor", "vnet9", "--json",
                                           "--count", "3"]),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # its match rule is in place
        run_client("define", "vnet19", check=True)  # another network's: not shown
        run_client("define", "vnet9", check=True)
        run_client("start", "vnet9", check=True)
        run_client("stop", "vnet9", check=True)
        out, err = mon.communicate(timeout=10)
    finally:
        if mon.poll() is None:
            mon.kill()
        run_client("undefine", "vnet9")
        run_client("undefine", "vnet19")
    assert mon.returncode == 0, err
    # watched before it exists: said once on stderr (a typo would otherwise wait silently)
    assert "no network 'vnet9' is defined (yet)" in err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["event"], e["network"]) for e in events] == [("NetworkChanged", "vnet9")] * 3
    assert [e["state"] for e in events] == ["defined", "running", "stopped"], events


def test_define_dry_run_checks_everything_and_defines_nothing(vnetd):
    files = sorted(p.name for p in (vnetd.config_dir / "networks").glob("*"))
    n = j("define", "vnet17", "--mode=host-only", "--dry-run")
    assert (n["name"], n["subnet"], n["mode"], n["state"]) == (
        "vnet17", "172.16.27.0/24", "host-only", "not defined")
    assert not any(x["name"] == "vnet17" for x in j("list"))
    r = run_client("define", "vnet17", "--dry-run")
    assert r.returncode == 0 and "nothing was defined" in r.stdout
    # what define would refuse, the dry run refuses with the same error
    run_client("define", "vnet18", check=True)
    clash = ["vnet38", "--subnet=172.16.28.0/24"]  # vnet18 has 172.16.28.0/24
    dry, real = run_client("define", *clash, "--dry-run"), run_client("define", *clash)
    assert dry.returncode == real.returncode == 1 and dry.stderr == real.stderr, (dry, real)
    run_client("undefine", "vnet18", check=True)
    assert sorted(p.name for p in (vnetd.config_dir / "networks").glob("*")) == files
