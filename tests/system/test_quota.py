"""Per-user limits and the MAC registry's bound, through the real bus and polkitd.

Unprivileged users (a polkit rule grants them manage and forward, bob attach too) run into
small limits given to the daemon: the (N+1)th network or forward of one user is refused with
QuotaExceeded and leaves nothing behind (no definition file, no forward file, no nft element),
another user is not affected, root is exempt; owners survive a restart and stay out of
exports. A network's MAC registry at its limit refuses a new VM (GetMac, Attach, ImportMacs)
but answers the VMs it knows; ForgetMac frees room and is refused while the VM is attached;
ExportMacs/ImportMacs carry every NIC's MAC to another network (or host)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness.daemon import ALICE, BOB, CLIENT, PolkitRule, run_client, uid_of
from tests.harness.users import HOLDER, read_json, spawn_as

LIMITS = ["--max-networks-per-user", "2", "--max-forwards-per-user", "2",
          "--max-macs-per-network", "3"]
QUOTA = "org.qemuvnet.Vnet1.Error.QuotaExceeded"
GRANT = ("polkit.addRule(function(action, subject) {\n"
         f'  if (action.id.indexOf("org.qemuvnet.Vnet1.") == 0 && (subject.user == "{ALICE}"'
         f' || subject.user == "{BOB}")) return polkit.Result.YES;\n'
         "});\n")


@pytest.fixture(scope="module", autouse=True)
def limited(vnetd):
    vnetd.stop()
    vnetd.start(LIMITS)
    with PolkitRule("10-vnet-test-quota", GRANT):
        yield
    vnetd.stop()
    vnetd.start()


def restart(vnetd) -> None:
    vnetd.stop()
    vnetd.start(LIMITS)


def refused(r: subprocess.CompletedProcess, name: str = QUOTA) -> str:
    """The sentence of a refusal (vnet-client prints the error name with VNET_CLIENT_DEBUG)."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"({name})" in r.stderr, r.stderr
    return r.stderr


def defined(vnetd) -> set[str]:
    return {p.stem for p in (vnetd.config_dir / "networks").glob("*.toml")}


def client_json(*args: str, user: str | None = None):
    return json.loads(run_client(*args, "--json", user=user, check=True).stdout)


def import_stdin(net: str, text: str) -> subprocess.CompletedProcess:
    """vnet-client mac import NET - (as root), the table on its standard input."""
    env = dict(os.environ, VNET_CLIENT_DEBUG="1")
    env.pop("VNET_BUS_ADDRESS", None)
    return subprocess.run([str(CLIENT), "mac", "import", net, "-"], input=text,
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def shared_dir():
    """A directory the test users can read (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="vnet-test-quota-"))
    d.chmod(0o755)
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


# --- networks ----------------------------------------------------------------------------------
def test_a_users_third_network_is_refused_and_leaves_nothing(vnetd, shared_dir):
    for i in (1, 2):
        run_client("define", f"qa{i}", f"--subnet=10.71.{i}.0/24", "--dhcp=none", user=ALICE,
                   check=True)
    before = defined(vnetd)
    text = refused(run_client("define", "qa3", "--subnet=10.71.3.0/24", user=ALICE))
    assert f"(uid {uid_of(ALICE)}) already owns 2 networks and the limit is 2" in text
    assert "--max-networks-per-user" in text
    assert defined(vnetd) == before and "qa3" not in vnetd.link_names()
    assert "qa3" not in {n["name"] for n in client_json("list")}
    # another user is not affected; root has no limit
    run_client("define", "qb1", "--subnet=10.71.11.0/24", user=BOB, check=True)
    for i in (1, 2, 3):
        run_client("define", f"qr{i}", f"--subnet=10.71.2{i}.0/24", check=True)
    owners = {n["name"]: n["owner"] for n in client_json("list")}
    assert owners == {"qa1": uid_of(ALICE), "qa2": uid_of(ALICE), "qb1": uid_of(BOB),
                      "qr1": 0, "qr2": 0, "qr3": 0}
    # owners are kept in the definition files and survive a restart
    assert f"owner = {uid_of(ALICE)}" in (vnetd.config_dir / "networks/qa1.toml").read_text()
    assert "owner" not in (vnetd.config_dir / "networks/qr1.toml").read_text()
    restart(vnetd)
    assert client_json("show", "qa1")["owner"] == uid_of(ALICE)
    assert "owner:" in run_client("show", "qa1", check=True).stdout
    refused(run_client("define", "qa3", "--subnet=10.71.3.0/24", user=ALICE))
    # an export is portable: no owner; whoever defines it from the file owns it
    export = run_client("export", "qa2", check=True).stdout
    assert "owner" not in export
    path = shared_dir / "qa2.toml"
    path.write_text(export)
    path.chmod(0o644)
    run_client("undefine", "qa2", user=ALICE, check=True)
    run_client("define", "qa2", "--from", str(path), user=BOB, check=True)
    assert client_json("show", "qa2")["owner"] == uid_of(BOB)
    refused(run_client("define", "qb3", "--subnet=10.71.13.0/24", user=BOB))
    # a file that says who owns it is refused, naming the key
    path.write_text(export + f"owner = {uid_of(ALICE)}\n")
    r = run_client("define", "qa3", "--from", str(path), user=ALICE)
    assert "'owner'" in refused(r, "org.qemuvnet.Vnet1.Error.InvalidArgument")
    # undefining one makes room again
    run_client("define", "qa3", "--subnet=10.71.3.0/24", user=ALICE, check=True)
    for name in ("qa1", "qa2", "qa3", "qb1", "qr1", "qr2", "qr3"):
        run_client("undefine", name, check=True)


# --- forwards ----------------------------------------------------------------------------------
def forward_map(vnetd) -> str:
    return vnetd.exec("nft", "list", "map", "inet", "qemu_vnet", "fwd4_port").stdout


def test_a_users_third_forward_is_refused_and_leaves_nothing(vnetd):
    run_client("define", "fq1", "--subnet=10.72.1.0/24", "--dhcp=none", "--start", check=True)
    run_client("define", "fq2", "--subnet=10.72.2.0/24", "--dhcp=none", check=True)
    fdir = vnetd.config_dir / "networks"
    try:
        run_client("forward", "add", "fq1", "tcp", "8101", "10.72.1.5:80", user=ALICE,
                   check=True)
        run_client("forward", "add", "fq2", "tcp", "8102", "10.72.2.5:80", user=ALICE,
                   check=True)  # on another network: counted together
        text = refused(run_client("forward", "add", "fq1", "tcp", "8103", "10.72.1.5:80",
                                  user=ALICE))
        assert "already owns 2 port forwards, and the limit is 2" in text
        assert "--max-forwards-per-user" in text
        assert "8101" in forward_map(vnetd) and "8103" not in forward_map(vnetd)
        assert [p.name for p in (fdir / "fq1.forwards").iterdir()] == ["tcp4-any-any-8101.toml"]
        # bob is not affected, nor is root
        run_client("forward", "add", "fq1", "tcp", "8103", "10.72.1.5:80", user=BOB, check=True)
        for port in (8104, 8105, 8106):
            run_client("forward", "add", "fq1", "tcp", str(port), "10.72.1.5:80", check=True)
        assert "8103" in forward_map(vnetd) and "8106" in forward_map(vnetd)
        want = {"8101": uid_of(ALICE), "8103": uid_of(BOB), "8104": 0, "8105": 0, "8106": 0}
        got = {f["port"]: f["owner"] for f in client_json("forward", "list", "fq1")}
        assert got == want
        assert "owner" not in run_client("export", "fq1", check=True).stdout
        restart(vnetd)  # owners are kept with each forward
        got = {f["port"]: f["owner"] for f in client_json("forward", "list", "fq1")}
        assert got == want
        refused(run_client("forward", "add", "fq1", "tcp", "8107", "10.72.1.5:80", user=ALICE))
        run_client("forward", "remove", "fq2", "tcp", "8102", user=ALICE, check=True)
        run_client("forward", "add", "fq1", "tcp", "8107", "10.72.1.5:80", user=ALICE,
                   check=True)
        assert "8107" in forward_map(vnetd)
    finally:
        run_client("stop", "fq1")
        run_client("undefine", "fq1")
        run_client("undefine", "fq2")


# --- the MAC registry --------------------------------------------------------------------------
def mac_of(net: str, vm: str, user: str | None = ALICE) -> subprocess.CompletedProcess:
    return run_client("mac", f"--br={net}", f"--vm={vm}", user=user)


def wait_for_no_port(vnetd, net: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not client_json("show", net).get("ports"):
            return
        time.sleep(0.1)
    raise AssertionError(f"the port on {net} did not go away")


def test_a_full_registry_refuses_new_vms_answers_known_ones_and_forget_frees_room(vnetd):
    run_client("define", "mq1", "--subnet=10.73.1.0/24", "--dhcp=none", "--start", check=True)
    holder = None
    try:
        known = {vm: mac_of("mq1", vm).stdout.strip() for vm in ("vm0", "vm1")}
        holder = spawn_as(BOB, HOLDER, "mq1", "vm2")  # attach gives vm2 its MAC: 3 of 3
        att = read_json(holder)
        assert "ifname" in att, att
        links = vnetd.link_names()
        text = refused(mac_of("mq1", "vm3"))
        assert "The MAC registry of network mq1 holds 3 entries, its limit" in text
        assert "vnet-client mac forget mq1 VM" in text
        late = spawn_as(ALICE, HOLDER, "mq1", "vm3")
        assert read_json(late)["error"] == QUOTA
        late.wait()
        assert vnetd.link_names() == links  # no tap was made for it
        refused(import_stdin("mq1", "vm4 52:54:00:0a:0b:0c\n"))
        assert {vm: mac_of("mq1", vm).stdout.strip() for vm in known} == known  # still answered
        exported = client_json("mac", "export", "mq1", user=BOB)  # info: anyone may look
        assert exported == {"vm0/0": known["vm0"], "vm1/0": known["vm1"], "vm2/0": att["mac"]}
        # forgetting: refused while attached, NotFound for a VM it does not know
        refused(run_client("mac", "forget", "mq1", "vm2", user=ALICE),
                "org.qemuvnet.Vnet1.Error.Busy")
        refused(run_client("mac", "forget", "mq1", "nosuch", user=ALICE),
                "org.qemuvnet.Vnet1.Error.NotFound")
        r = run_client("mac", "forget", "mq1", "vm0", user=ALICE, check=True)
        assert "Forgot 1 MAC(s) of vm0 on mq1." in r.stdout
        assert mac_of("mq1", "vm3").returncode == 0  # room again
        refused(mac_of("mq1", "vm5"))
        holder.stdin.write("exit\n")
        holder.wait(10)
        wait_for_no_port(vnetd, "mq1")
        assert client_json("mac", "forget", "mq1", "vm2", user=ALICE)["forgotten"] == 1
        restart(vnetd)  # what was forgotten stays forgotten
        assert sorted(client_json("mac", "export", "mq1")) == ["vm1/0", "vm3/0"]
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        run_client("stop", "mq1")
        run_client("undefine", "mq1")


def test_export_and_import_carry_every_nic_to_another_network(vnetd, tmp_path):
    run_client("define", "mx1", "--subnet=10.74.1.0/24", "--dhcp=none", check=True)
    run_client("define", "mx2", "--subnet=10.74.2.0/24", "--dhcp=none", check=True)
    try:
        for vm, nic in (("web", "0"), ("web", "1"), ("db", "0")):
            run_client("mac", "--br=mx1", f"--vm={vm}", f"--nic={nic}", check=True)
        text = run_client("mac", "export", "mx1", check=True).stdout
        lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
        assert [ln.split()[0] for ln in lines] == ["db/0", "web/0", "web/1"]
        r = import_stdin("mx2", text)
        assert r.returncode == 0, r.stderr
        assert "Imported 3 MAC(s)" in r.stdout
        assert client_json("mac", "export", "mx2") == client_json("mac", "export", "mx1")
        assert run_client("mac", "--br=mx2", "--vm=web", "--nic=1", user=ALICE,
                          check=True).stdout.split() == [lines[2].split()[1]]
        # the JSON form too, and a bare VM key is NIC 0; the registry's bound applies
        path = tmp_path / "macs.json"
        path.write_text(json.dumps({"new": "52:54:00:0a:0b:0d"}))
        refused(run_client("mac", "import", "mx2", str(path)))
        run_client("mac", "forget", "mx2", "db", check=True)
        run_client("mac", "import", "mx2", str(path), check=True)
        assert client_json("mac", "export", "mx2")["new/0"] == "52:54:00:0a:0b:0d"
    finally:
        run_client("undefine", "mx1")
        run_client("undefine", "mx2")
