"""Limits: who owns a network or a forward, kept in vnetd's files and never taken from
a caller's options; the per-user limits on networks and forwards (root has none); the bound on
a network's MAC registry, ForgetMac, and the registry's export/import across hosts ('vm/nic'
keys). Pure code and the engine over a stub of the kernel: no root, no bus."""

from __future__ import annotations

import asyncio
import json
import time
import tomllib
from dataclasses import replace

import pytest
from vnet_client import cli
from vnet_common.toml import render_toml
from vnetd import main as vnetd_main
from vnetd.engine import Engine
from vnetd.errors import Busy, Exists, InvalidArgument, NotFound, QuotaExceeded
from vnetd.macs import MacRegistry, derive_mac, parse_key
from vnetd.model import Network, parse_forward
from vnetd.ports import Port
from vnetd.store import Store

ALICE, BOB = 4001, 4002  # uids without a passwd entry: sentences name them 'uid N'
FWD = {"proto": "tcp", "port": "8080", "target": "172.16.12.5", "target-port": 80}


# --- owners in the model and the store ---------------------------------------------------------
def test_a_caller_cannot_give_an_owner_in_define_options():
    with pytest.raises(InvalidArgument, match="'owner'") as e:
        Network.from_options("vnet2", {"owner": 1000})
    assert e.value.message.endswith(".")
    with pytest.raises(InvalidArgument, match="'owner'"):
        Network.from_options("vnet2", {"forwards": [{**FWD, "owner": 1000}]})
    with pytest.raises(InvalidArgument, match="'owner'"):
        parse_forward(Network.from_options("vnet2", {}), {**FWD, "owner": 0})


def test_stored_definitions_carry_their_owner_and_the_forwards_theirs():
    n = Network.from_options("vnet2", {"owner": ALICE, "forwards": [{**FWD, "owner": BOB}]},
                             stored=True)
    assert n.owner == ALICE and n.forwards[0].owner == BOB
    d = n.to_dict()
    assert d["owner"] == ALICE and d["forwards"][0]["owner"] == BOB
    assert Network.from_options("vnet2", tomllib.loads(render_toml(d)), stored=True) == n
    with pytest.raises(InvalidArgument, match="owner uid"):
        Network.from_options("vnet2", {"owner": -1}, stored=True)


def test_root_and_old_definitions_have_owner_0_and_write_none():
    n = Network.from_options("vnet2", {"forwards": [FWD]})
    assert n.owner == 0 and n.forwards[0].owner == 0
    assert "owner" not in n.to_dict() and "owner" not in n.to_dict()["forwards"][0]
    assert Network.from_options("vnet2", n.to_dict()) == n  # what root stores reads back


def test_an_export_leaves_the_owners_out_and_defines_again():
    n = Network.from_options("vnet2", {"owner": ALICE, "forwards": [{**FWD, "owner": ALICE}]},
                             stored=True)
    d = n.to_dict(owner=False)
    assert "owner" not in d and "owner" not in d["forwards"][0]
    d.pop("name")
    again = Network.from_options("vnet2", tomllib.loads(render_toml(d)))
    assert again == n.with_changes(owner=0, forwards=tuple(replace(f, owner=0)
                                                            for f in n.forwards))


def test_the_store_keeps_owners_across_a_restart(tmp_path):
    st = Store(tmp_path / "etc", tmp_path / "var")
    n = Network.from_options("vnet2", {}).with_changes(owner=ALICE)
    st.save(n)
    f = replace(parse_forward(n, FWD), owner=BOB)
    st.save_forward("vnet2", f)
    assert f"owner = {ALICE}" in st.path_of("vnet2").read_text()
    assert f"owner = {BOB}" in next(st.forwards_dir("vnet2").glob("*.toml")).read_text()
    nets, problems = Store(st.config_dir, st.state_dir).load_all()
    assert problems == []
    assert nets["vnet2"].owner == ALICE and nets["vnet2"].forwards[0].owner == BOB


# --- the engine's limits, over a stub of the kernel --------------------------------------------
class NoLinks:
    """A host with no interfaces at all: every name is free, no address is taken."""

    async def get(self, name=None, index=None):
        return None

    async def all_addresses(self):
        return []

    async def overlapping(self, subnet):
        return []


@pytest.fixture
def engine(tmp_path):
    st = Store(tmp_path / "etc", tmp_path / "var", tmp_path / "run")
    return Engine(st, NoLinks(), max_networks_per_user=2, max_forwards_per_user=3,
                  max_macs_per_network=3)


def net(name: str, **opts) -> Network:
    n = int(name[-1])
    return Network.from_options(name, {"subnet": f"10.{n}.0.0/24", **opts})


async def test_a_user_may_own_max_networks_then_is_refused_with_nothing_made(engine):
    await engine.definitions.define(net("n1"), ALICE)
    await engine.definitions.define(net("n2"), ALICE)
    with pytest.raises(QuotaExceeded) as e:
        await engine.definitions.define(net("n3"), ALICE)
    msg = e.value.message
    assert f"uid {ALICE}" in msg and "owns 2 networks" in msg and "limit is 2" in msg
    assert "--max-networks-per-user" in msg and "undefine" in msg and msg.endswith(".")
    assert "n3" not in engine.defs and not engine.store.path_of("n3").exists()
    await engine.definitions.define(net("n4"), BOB)  # another user is not affected
    await engine.definitions.define(net("n5"), 0)  # nor is root
    await engine.definitions.define(net("n6"), 0)
    await engine.definitions.define(net("n7"), 0)
    assert {n: d.owner for n, d in engine.defs.items()} == {
        "n1": ALICE, "n2": ALICE, "n4": BOB, "n5": 0, "n6": 0, "n7": 0}
    await engine.definitions.undefine("n1")  # undefining one makes room
    await engine.definitions.define(net("n3"), ALICE)


async def test_forwards_count_per_owner_across_networks(engine):
    await engine.definitions.define(net("n1"), 0)
    await engine.definitions.define(net("n2"), 0)
    for i, network in enumerate(("n1", "n2", "n1")):
        f = await engine.forwards.add(network, {**FWD, "port": str(8000 + i),
                                               "target": f"10.{network[-1]}.0.5"}, ALICE)
        assert f.owner == ALICE
    with pytest.raises(QuotaExceeded) as e:
        await engine.forwards.add("n2", {**FWD, "target": "10.2.0.5"}, ALICE)
    msg = e.value.message
    assert "owns 3 port forwards" in msg and "limit is 3" in msg
    assert "--max-forwards-per-user" in msg and msg.endswith(".")
    assert len(list(engine.store.forwards_dir("n2").glob("*.toml"))) == 1  # nothing new
    assert [f.owner for f in engine.defs["n2"].forwards] == [ALICE]
    await engine.forwards.add("n2", {**FWD, "target": "10.2.0.5"}, BOB)
    for port in range(9000, 9005):
        await engine.forwards.add("n2", {**FWD, "port": str(port), "target": "10.2.0.5"}, 0)
    listed = engine.forwards.list("n2")
    assert sorted({d["owner"] for d in listed}) == [0, ALICE, BOB]
    await engine.forwards.remove("n1", {"proto": "tcp", "port": "8000"})
    await engine.forwards.add("n2", {**FWD, "port": "7000", "target": "10.2.0.5"}, ALICE)


async def test_define_counts_inline_forwards_and_keeps_them_one_file_each(engine):
    rows = [{**FWD, "port": str(8000 + i), "target": "10.1.0.5"} for i in range(4)]
    with pytest.raises(QuotaExceeded, match="would add 4"):
        await engine.definitions.define(net("n1", forwards=rows), ALICE)
    assert not engine.store.path_of("n1").exists()
    n = await engine.definitions.define(net("n1", forwards=rows[:3]), ALICE)
    assert n.owner == ALICE and {f.owner for f in n.forwards} == {ALICE}
    assert len(list(engine.store.forwards_dir("n1").glob("*.toml"))) == 3
    nets, _ = engine.store.load_all()  # a restart keeps them, and who owns them
    assert [f.owner for f in nets["n1"].forwards] == [ALICE] * 3
    with pytest.raises(Exists, match="already forwarded"):
        await engine.definitions.define(
            net("n2", forwards=[{**FWD, "port": "8000", "target": "10.2.0.5"}]))
    assert not engine.store.path_of("n2").exists()


async def test_summary_and_forward_lists_show_the_owner_and_export_does_not(engine):
    await engine.definitions.define(net("n1"), ALICE)
    assert engine.queries.summary(engine.defs["n1"])["owner"] == ALICE
    assert "owner" not in engine.defs["n1"].to_dict(owner=False)


def test_vnetd_takes_the_limits_as_options():
    a = vnetd_main.parse_args([])
    assert (a.max_networks_per_user, a.max_forwards_per_user, a.max_macs_per_network) == (
        8, 64, 4096)
    a = vnetd_main.parse_args(["--max-networks-per-user", "1", "--max-forwards-per-user=0",
                               "--max-macs-per-network", "10"])
    assert (a.max_networks_per_user, a.max_forwards_per_user, a.max_macs_per_network) == (
        1, 0, 10)
    with pytest.raises(SystemExit):
        vnetd_main.parse_args(["--max-networks-per-user", "-1"])


# --- the MAC registry ---------------------------------------------------------------------
class Saved:
    """The registry's writes, a network's file each: its entries in `writes`, its owners in
    `owners`."""

    def __init__(self):
        self.writes: list[dict] = []
        self.owners: list[dict] = []

    def __call__(self, network, macs, creators):
        self.writes.append({network: json.loads(json.dumps(macs))})
        self.owners.append({network: json.loads(json.dumps(creators))})


def registry(limit: int = 3, data=None) -> tuple[MacRegistry, Saved]:
    saved = Saved()
    return MacRegistry(data or {}, saved, limit=limit), saved


def test_a_full_registry_refuses_new_vms_but_answers_known_ones():
    r, saved = registry(3)
    macs = [r.get("vnet2", f"vm{i}", 0) for i in range(3)]
    with pytest.raises(QuotaExceeded) as e:
        r.get("vnet2", "vm3", 0)
    msg = e.value.message
    assert "MAC registry of network vnet2 holds 3 entries, its limit" in msg
    assert "vnet-client mac forget vnet2 VM" in msg and msg.endswith(".")
    assert [r.get("vnet2", f"vm{i}", 0) for i in range(3)] == macs
    assert len(saved.writes) == 3  # nothing written for the refusal nor for known ones
    assert r.get("other", "vm3", 0)  # the limit is per network


def test_forget_frees_every_nic_of_the_vm_and_is_saved():
    r, saved = registry(3)
    r.get("vnet2", "a", 0)
    r.get("vnet2", "a", 1)
    b = r.get("vnet2", "b", 0)
    assert r.forget("vnet2", "a") == 2
    assert saved.writes[-1] == {"vnet2": {"b/0": b}}
    assert r.get("vnet2", "c", 0) and r.get("vnet2", "d", 0)
    with pytest.raises(NotFound, match="VM 'a' has no MAC"):
        r.forget("vnet2", "a")
    with pytest.raises(InvalidArgument):
        r.forget("vnet2", "a/0")
    assert r.forget("vnet2", "b") == 1 and r.forget("vnet2", "c") == 1
    r.forget("vnet2", "d")
    assert "vnet2" not in r.data  # an emptied network leaves no trace


def test_export_and_import_carry_every_nic_to_another_host():
    old, _ = registry(10)
    for vm, nic in (("web", 0), ("web", 1), ("db", 0), ("db", 3)):
        old.get("vnet2", vm, nic)
    exported = old.export("vnet2")
    assert sorted(exported) == ["db/0", "db/3", "web/0", "web/1"]
    new, saved = registry(10)
    assert new.import_macs("vnet2", exported) == 4
    assert new.export("vnet2") == exported
    assert new.get("vnet2", "db", 3) == exported["db/3"]
    assert saved.writes[-1] == {"vnet2": exported}


def test_import_takes_bare_vm_keys_as_nic_0():
    r, _ = registry()
    assert r.import_macs("vnet3", {"vnet3_1": "52:54:00:AA:00:01", "web/2": "52:54:00:aa:00:02"})
    assert r.lookup("vnet3", "vnet3_1", 0) == "52:54:00:aa:00:01"
    assert r.lookup("vnet3", "web", 2) == "52:54:00:aa:00:02"


@pytest.mark.parametrize("key", ["web/", "web/32", "web/01", "web/-1", "web/x", "web/0/0",
                                 "/0", "", "a b/0", "../x"])
def test_import_refuses_keys_that_are_not_vm_or_vm_slash_nic(key):
    r, saved = registry()
    with pytest.raises(InvalidArgument):
        r.import_macs("vnet2", {"ok": "52:54:00:00:00:01", key: "52:54:00:00:00:02"})
    assert r.data == {} and saved.writes == []


def test_parse_key():
    assert parse_key("web") == ("web", 0)
    assert parse_key("web/0") == ("web", 0)
    assert parse_key("web.1/31") == ("web.1", 31)


def test_import_is_all_or_nothing_and_bounded():
    r, saved = registry(3)
    r.get("vnet2", "a", 0)
    with pytest.raises(InvalidArgument, match="given twice"):
        r.import_macs("vnet2", {"b": "52:54:00:00:00:01", "b/0": "52:54:00:00:00:02"})
    with pytest.raises(Exists, match="already belongs to 'a/0'"):
        r.import_macs("vnet2", {"b": r.lookup("vnet2", "a", 0)})
    with pytest.raises(QuotaExceeded) as e:
        r.import_macs("vnet2", {f"n{i}": f"52:54:00:00:00:0{i}" for i in range(1, 4)})
    assert "holds 1 entries and the import would add 3 new ones, past its limit of 3" in \
        e.value.message
    assert list(r.data["vnet2"]) == ["a/0"] and len(saved.writes) == 1
    # replacing known entries adds none: allowed at the limit
    r.import_macs("vnet2", {"b": "52:54:00:00:00:01", "c/1": "52:54:00:00:00:02"})
    assert r.import_macs("vnet2", {"b": "52:54:00:00:00:03"}) == 1
    assert r.lookup("vnet2", "b", 0) == "52:54:00:00:00:03"


async def test_forget_mac_is_refused_while_the_vm_is_attached(engine):
    await engine.definitions.define(net("n1"), 0)
    await engine.vms.get_mac("n1", "web", 0)

    port = Port(ifname="n1-abcdef", ifindex=77, network="n1", vm="web", nic=0, uid=0,
                mac=await engine.vms.get_mac("n1", "web", 0), mac_known=True, holder_pid=None,
                queues=1, created=0.0)
    engine.ports._add(port)
    with pytest.raises(Busy, match="n1-abcdef"):
        await engine.vms.forget_mac("n1", "web")
    engine.ports._drop(port)
    assert await engine.vms.forget_mac("n1", "web") == 1
    await engine.definitions.undefine("n1")
    engine.macs.get("n1", "old", 0)  # the MACs of an undefined network can still be forgotten
    assert await engine.vms.forget_mac("n1", "old") == 1


async def test_forget_mac_is_refused_while_a_static_host_uses_it(engine):
    await engine.definitions.define(net("n1"), 0)
    mac = await engine.vms.get_mac("n1", "db", 0)
    await engine.hosts.add("n1", "db", {"ip": "10.1.0.5"})
    with pytest.raises(Busy, match="static host.*host remove n1 --vm db"):
        await engine.vms.forget_mac("n1", "db")
    assert engine.macs.lookup("n1", "db", 0) == mac  # nothing forgotten
    await engine.hosts.remove("n1", "db")
    assert await engine.vms.forget_mac("n1", "db") == 1


async def test_the_engine_bounds_the_registry_for_getmac(engine):
    await engine.definitions.define(net("n1"), 0)
    for i in range(3):
        await engine.vms.get_mac("n1", f"vm{i}", 0)
    with pytest.raises(QuotaExceeded):
        await engine.vms.get_mac("n1", "vm3", 0)
    assert await engine.vms.get_mac("n1", "vm0", 0) == derive_mac("n1", "vm0", 0)
    assert sorted(engine.vms.export_macs("n1")) == ["vm0/0", "vm1/0", "vm2/0"]
    with pytest.raises(NotFound):
        engine.vms.export_macs("nosuch")


async def test_a_new_vms_mac_is_written_off_the_event_loop_before_the_answer(engine):
    """Naming a new VM writes the registry (two fsynced files, as large as the registry):
    on a slow disk, written in the event loop, one user naming VMs would hold up every
    other call meanwhile. The loop goes on while the files are written, and the answer
    comes once they are on disk."""
    await engine.definitions.define(net("n1"), 0)
    real = engine.store.save_json

    def slow_disk(name, data):
        time.sleep(0.3)  # an fsync that takes its time
        real(name, data)

    engine.store.save_json = slow_disk
    ticks = 0

    async def others():  # everyone else's calls, meanwhile
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    beside = asyncio.ensure_future(others())
    try:
        mac = await engine.vms.get_mac("n1", "web", 0, ALICE)
    finally:
        beside.cancel()
    assert ticks >= 10, f"the event loop stood still while the registry was written ({ticks})"
    on_disk = engine.store.load_json("n1.macs.json", {})
    assert on_disk["macs"]["web/0"] == mac  # written before the answer
    assert on_disk["creators"]["web"] == ALICE


async def test_lease_events_of_a_network_wait_for_one_pass(engine):
    """Guests decide how often leases change, and each change re-checks every port of the
    network: events that come while a pass waits for the lock join it (one pass per
    network), instead of one pass each queued behind the lock without end."""
    passes = []

    async def counted(network):
        passes.append(network)

    engine.firewall.leases_changed = counted
    async with engine.lock:  # (something else holds it: the passes wait)
        for _ in range(100):
            engine._lease_event("n1", None, "renewed")
        engine._lease_event("n2", None, "added")
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert sorted(passes) == ["n1", "n2"]
    engine._lease_event("n1", None, "renewed")  # after the pass: a pass of its own
    await asyncio.sleep(0.05)
    assert sorted(passes) == ["n1", "n1", "n2"]


async def test_getmac_waits_for_its_own_write_not_for_everyone_elses(engine):
    """Others naming VMs all the while keep the registry's writer busy: a GetMac waits for
    the round of writes that takes its own entry, not until the writer has nothing left
    (which, under steady load, would be never: its call would time out)."""
    await engine.definitions.define(net("n1"), 0)
    engine.macs.limit = engine.macs.per_user = 10_000  # (the fixture's is 3)
    real = engine.store.save_json

    def slow_disk(name, data):
        time.sleep(0.1)
        real(name, data)

    engine.store.save_json = slow_disk
    busy = True

    async def others():
        i = 0
        while busy:
            asyncio.ensure_future(engine.vms.get_mac("n1", f"other{i}", 0, BOB))
            i += 1
            await asyncio.sleep(0.01)

    beside = asyncio.ensure_future(others())
    try:
        await asyncio.sleep(0.3)  # the writer is busy by now, and stays so
        mac = await asyncio.wait_for(engine.vms.get_mac("n1", "web", 0, ALICE), 2.0)
        assert not beside.done()  # (the others went on all the while)
    finally:
        busy = False
        await beside
    assert engine.store.load_json("n1.macs.json", {})["macs"]["web/0"] == mac
    await engine.flush()  # and at exit, everything is written
    assert len(engine.store.load_json("n1.macs.json", {})["macs"]) == len(engine.macs.data["n1"])


# --- the command line --------------------------------------------------------------------------
def parse(argv):
    return cli.build_parser().parse_args(argv)


def test_mac_actions_parse():
    a = parse(["mac", "export", "vnet2", "--json"])
    assert (a.cmd, a.mac_cmd, a.network, a.json) == ("mac", "export", "vnet2", True)
    a = parse(["mac", "import", "vnet2", "-"])
    assert (a.mac_cmd, a.network, a.file) == ("import", "vnet2", "-")
    a = parse(["mac", "forget", "vnet2", "web1"])
    assert (a.mac_cmd, a.network, a.forget_vm, a.vm) == ("forget", "vnet2", "web1", None)
    a = parse(["mac", "--br=vnet2", "--vm", "web1", "--nic=1"])
    assert (a.mac_cmd, a.br, a.vm, a.nic) == (None, "vnet2", "web1", 1)
    assert not cli.is_compat(["mac", "--br=vnet2", "--vm", "web1"])


@pytest.mark.parametrize("argv", [["mac"], ["mac", "--vm", "x"],
                                  ["mac", "--br=vnet2", "forget", "vnet2", "x"],
                                  ["mac", "forget", "vnet2"], ["mac", "import", "vnet2"],
                                  ["mac", "frobnicate", "vnet2"]])
def test_mac_usage_errors_exit_2_without_a_bus(argv, capsys, monkeypatch):
    monkeypatch.setenv("VNET_BUS_ADDRESS", "unix:path=/nonexistent/vnet-unit-test-bus")
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_mac_help_teaches_the_registry_actions(capsys):
    with pytest.raises(SystemExit):
        cli.main(["mac", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out
    for words in ("mac export vnet2", "mac import vnet2", "mac forget vnet2 web1", "--vm=web1"):
        assert words in out, words


def test_export_text_reads_back_and_json_too(tmp_path):
    macs = {"web/0": "52:54:00:00:00:01", "web/1": "52:54:00:00:00:02",
            "db.1/0": "52:54:00:00:00:03"}
    text = cli.render_mac_table("vnet2", macs)
    assert text.splitlines()[1:] == ["db.1/0 52:54:00:00:00:03", "web/0 52:54:00:00:00:01",
                                     "web/1 52:54:00:00:00:02"]
    (tmp_path / "t").write_text(text + "\n  # a comment\nold 52:54:00:00:00:04  # from ether\n")
    assert cli.read_mac_table(str(tmp_path / "t")) == {**macs, "old": "52:54:00:00:00:04"}
    (tmp_path / "j").write_text(json.dumps(macs, indent=2))
    assert cli.read_mac_table(str(tmp_path / "j")) == macs


@pytest.mark.parametrize("text, words", [
    ("web/0\n", ":1: not a 'VM/NIC MAC' line"),
    ("web/0 52:54:00:00:00:01 extra\n", ":1:"),
    ("a 52:54:00:00:00:01\na 52:54:00:00:00:02\n", ":2: a is given a second time"),
    ("# nothing\n\n", "holds no MACs"),
    ('{"a": 1}', "MAC strings"),
    ('["a"]', ":1: not a 'VM/NIC MAC' line"),
    ("{broken", "not valid JSON"),
])
def test_reading_a_bad_table_names_the_line(tmp_path, text, words):
    (tmp_path / "t").write_text(text)
    with pytest.raises(cli.Failure, match=words.replace("(", r"\(")):
        cli.read_mac_table(str(tmp_path / "t"))
    with pytest.raises(cli.Failure, match="cannot read"):
        cli.read_mac_table(str(tmp_path / "missing"))


def test_show_and_forward_list_name_the_owner(capsys):
    cli.print_network({"name": "vnet2", "state": "stopped", "owner": 0})
    out = capsys.readouterr().out
    assert "owner:" in out and "root (0)" in out


# --- the registry's per-user and total bounds ----------------------------------------------
def _reg(**kw):
    from vnetd.macs import MacRegistry

    saved: dict = {"macs": {}, "creators": {}}
    return MacRegistry({}, lambda n, m, c: (saved["macs"].update({n: m}),
                                            saved["creators"].update({n: c})),
                       creators={}, **kw), saved


def test_each_vm_has_one_dns_name_and_no_user_takes_anothers_in_another_case():
    """A VM's first NIC is named as the VM, in lower case, where that is a DNS label; names
    differing only in case are one name in DNS, so another user cannot register one (it
    would take the name, or make it ambiguous)."""
    from vnetd.errors import NotOwner

    reg, _ = _reg(limit=100, per_user=10)
    changed: list[str] = []
    reg.on_change = changed.append
    web = reg.get("vnet2", "Web1", 0, uid=1000)
    assert changed == ["vnet2"]
    reg.get("vnet2", "Web1", 1, uid=1000)  # a second NIC: no name of its own
    reg.get("vnet2", "Web1", 0, uid=1000)  # known: nothing changed
    assert changed == ["vnet2"]
    snake = reg.get("vnet2", "db_1", 0, uid=1000)  # not a DNS label: no name
    for vm in ("web1", "WEB1"):
        with pytest.raises(NotOwner, match="differ only in case"):
            reg.get("vnet2", vm, 0, uid=1001)
        with pytest.raises(NotOwner, match="differ only in case"):
            reg.claim("vnet2", vm, 1001)
    reg.claim("vnet2", "web1", 1000)  # its owner may
    mine = reg.get("vnet2", "web1", 0, uid=1000)
    names = reg.dns_names("vnet2")
    assert names[mine] == "web1" and web not in names and snake not in names
    assert sorted(names.values()) == ["web1"]
    assert reg.get("vnet2", "web1", 0, uid=1000) == mine
    assert reg.get("other", "web1", 0, uid=1001)  # another network: another name space
    assert changed[-1] == "other"
    roots = reg.get("vnet2", "WEB1", 0, uid=0)  # root may use any name
    assert reg.dns_names("vnet2") == {mine: "web1"}  # named exactly so: it keeps the name
    reg.forget("vnet2", "web1")
    assert reg.dns_names("vnet2") == {roots: "web1"}  # then the first in order ('WEB1')
    # names clients look up to configure themselves are nobody's (whoever held wpad would
    # be every guest's web proxy)
    for vm in ("wpad", "ISATAP", "localhost"):
        assert reg.get("vnet2", vm, 0, uid=1002) not in reg.dns_names("vnet2")


def test_a_user_keeps_its_own_names_in_every_case_where_others_share_one():
    """Where an administrator (ImportMacs, TransferVm) left two users with names that
    differ only in case, each may still use its own in any case; a third may not."""
    from vnetd.errors import NotOwner

    reg, _ = _reg(limit=100, per_user=10)
    reg.get("vnet2", "web", 0, uid=1000)
    reg.get("vnet2", "Web", 0, uid=0)
    assert reg.transfer("vnet2", "Web", 1001) == 0
    reg.claim("vnet2", "WEB", 1000)
    reg.claim("vnet2", "wEB", 1001)
    with pytest.raises(NotOwner, match="differ only in case"):
        reg.claim("vnet2", "weB", 1002)


def test_one_user_cannot_crowd_a_network_out():
    from vnetd.errors import QuotaExceeded

    reg, saved = _reg(limit=100, per_user=3)
    for i in range(3):
        reg.get("vnet2", f"junk{i}", 0, uid=1000)
    with pytest.raises(QuotaExceeded, match="uid 1000 has brought 3 MACs.*--max-macs-per-user"):
        reg.get("vnet2", "junk3", 0, uid=1000)
    assert reg.get("vnet2", "real", 0, uid=1001)  # another user is unaffected
    assert reg.get("vnet2", "junk9", 0, uid=0)  # root is exempt
    assert reg.get("vnet2", "junk0", 0, uid=1000)  # a known entry is still answered
    assert saved["creators"]["vnet2"]["junk0"] == 1000
    assert reg.forget("vnet2", "junk0") == 1
    assert "junk0" not in reg.creators["vnet2"]
    assert reg.get("vnet2", "junk4", 0, uid=1000)  # room again


def test_a_vm_name_belongs_to_who_registered_it_first():
    from vnetd.errors import NotOwner

    reg, _ = _reg(limit=100, per_user=1)
    reg.get("vnet2", "web1", 0, uid=1000)
    with pytest.raises(NotOwner, match="belongs to another user \\(uid 1000\\)"):
        reg.get("vnet2", "web1", 1, uid=1001)
    with pytest.raises(NotOwner):
        reg.claim("vnet2", "web1", 1001)
    assert reg.get("vnet2", "web1", 1, uid=0)  # root may; web1 stays 1000's
    assert reg.creators["vnet2"]["web1"] == 1000
    reg.forget("vnet2", "web1")  # an administrator forgets it: free to name again
    reg.claim("vnet2", "web1", 1001)
    assert reg.creators["vnet2"]["web1"] == 1001


def test_naming_vms_is_bounded_per_user():
    from vnetd.errors import QuotaExceeded

    reg, _ = _reg(limit=100, per_user=2)
    reg.claim("vnet2", "a", 1000)
    reg.claim("vnet2", "b", 1000)
    with pytest.raises(QuotaExceeded, match="named 2 VMs"):
        reg.claim("vnet2", "c", 1000)


def test_the_whole_registry_is_bounded_across_networks():
    from vnetd.errors import QuotaExceeded

    reg, _ = _reg(limit=100, total_limit=4)
    for n in ("vnet2", "vnet3"):
        reg.get(n, "a", 0)
        reg.get(n, "b", 0)
    with pytest.raises(QuotaExceeded, match="all networks together.*--max-macs"):
        reg.get("vnet4", "a", 0)
    with pytest.raises(QuotaExceeded, match="all networks together"):
        reg.import_macs("vnet4", {"x": "52:54:00:00:00:01"})


def test_vnetd_takes_the_mac_bounds():
    from vnetd.main import parse_args

    a = parse_args(["--max-macs", "10", "--max-macs-per-user", "2"])
    assert (a.max_macs, a.max_macs_per_user) == (10, 2)


@pytest.mark.parametrize("value, words", [
    ("-1", "negative"), ("17", "more than the 16"), ("two", "not a whole number")])
def test_vnetd_refuses_a_bad_number_of_spare_taps(value, words, capsys):
    from vnetd.main import parse_args

    assert parse_args(["--spare-taps", "0"]).spare_taps == 0
    assert parse_args([]).spare_taps == 2
    with pytest.raises(SystemExit):
        parse_args(["--spare-taps", value])
    err = capsys.readouterr().err
    assert "--spare-taps" in err and words in err


# --- the attach path's deferred writes --------------------------------------------------------
def test_a_deferred_new_vm_is_written_later_and_never_over_a_newer_state():
    writes: list[tuple[str, dict, dict]] = []
    reg = MacRegistry({}, lambda n, m, c: writes.append((n, *json.loads(json.dumps([m, c])))),
                      creators={})
    reg.defer = True
    mac = reg.get("vnet2", "web1", 0, uid=1000)
    reg.defer = False
    assert writes == [] and reg.dirty == {"vnet2"}
    jobs = reg.take_dirty()
    assert reg.dirty == set() and len(jobs) == 1
    reg.get("vnet2", "web2", 0, uid=1001)  # a later change, written at once: one write
    assert len(writes) == 1
    for job in jobs:  # the deferred job, run after: its older copy is not written
        job()
    assert writes == [("vnet2", {"web1/0": mac, "web2/0": reg.lookup("vnet2", "web2", 0)},
                       {"web1": 1000, "web2": 1001})]
    reg.defer = True
    reg.get("vnet2", "web3", 0, uid=1000)
    reg.defer = False
    jobs = reg.take_dirty()
    reg.data["vnet2"]["later/0"] = "52:54:00:00:00:99"  # the copy is the job's own
    for job in jobs:
        job()
    assert writes[-1][0] == "vnet2" and "web3/0" in writes[-1][1]
    assert writes[-1][2] == {"web1": 1000, "web2": 1001, "web3": 1000}
    assert "later/0" not in json.dumps(writes)


def test_a_change_writes_its_own_networks_file_only():
    """The registry is a file per network: however many networks and entries the host
    holds, a new VM's round writes (and copies) the one network it changed."""
    writes: list[tuple[str, dict, dict]] = []
    reg = MacRegistry({f"n{i}": {f"vm{j}/0": f"52:54:00:00:{i:02x}:{j:02x}" for j in range(50)}
                       for i in range(20)},
                      lambda n, m, c: writes.append((n, dict(m), dict(c))), creators={},
                      limit=100, total_limit=10_000)
    reg.defer = 1
    reg.get("n7", "new", 0, uid=1000)
    reg.get("n7", "new", 1, uid=1000)
    reg.claim("n9", "named", 1001)
    reg.defer = 0
    jobs = reg.take_dirty()
    assert sorted(j.network for j in jobs) == ["n7", "n9"]
    for job in jobs:
        job()
    assert [w[0] for w in writes] == ["n7", "n9"]
    assert len(writes[0][1]) == 52 and writes[0][2] == {"new": 1000}
    assert writes[1] == ("n9", reg.data["n9"], {"named": 1001})
    reg.forget("n3", "vm0")  # written at once, its own network's file
    assert writes[-1][0] == "n3" and "vm0/0" not in writes[-1][1] and len(writes[-1][1]) == 49


def test_an_adopted_port_gives_back_an_owner_but_never_takes_one():
    saved: dict = {"macs": {}, "creators": {}}
    reg = MacRegistry({}, lambda n, m, c: (saved["macs"].update({n: m}),
                                           saved["creators"].update({n: c})),
                      creators={"vnet2": {"db": 1001}})
    reg.remember("vnet2", "web1", 1000)
    assert reg.owner_uid("vnet2", "web1") == 1000 and saved["creators"]["vnet2"]["web1"] == 1000
    reg.remember("vnet2", "db", 1000)  # owned by another: unchanged
    assert reg.owner_uid("vnet2", "db") == 1001
    assert reg.data == {}  # a port whose MAC is not the registry's brings no entry
    reg.remember("vnet2", "web1", 1000, 1, "52:54:00:00:00:07")
    assert reg.lookup("vnet2", "web1", 1) == "52:54:00:00:00:07" == saved["macs"]["vnet2"]["web1/1"]
    reg.remember("vnet2", "web2", 1000, 0, "52:54:00:00:00:07")  # held by another entry
    assert reg.lookup("vnet2", "web2", 0) is None
    reg.remember("vnet2", "web1", 1000, 1, "52:54:00:00:00:08")  # an entry is never changed
    assert reg.lookup("vnet2", "web1", 1) == "52:54:00:00:00:07"


def test_vnetd_raises_its_limit_of_open_files_to_the_hard_one():
    """A host with hundreds of networks holds more descriptors than the 1,024 a service
    starts with: vnetd raises its soft limit (up to 65,536), never past the hard one."""
    import subprocess
    import sys

    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, int(sys.argv[1])))\n"
            "from vnetd.main import raise_fd_limit\n"
            "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = min(hard, 1 << 16) if hard != resource.RLIM_INFINITY else 1 << 16
    r = subprocess.run([sys.executable, "-c", code, str(hard)], capture_output=True,
                       text=True, check=True)
    assert want > 256 and r.stdout.split() == [str(want), str(want)]


def test_a_new_vms_mac_is_never_one_held_outside_the_registry():
    """MACs derive from names anyone chooses: a user could search for a name whose MAC is the
    one another VM's port holds without a registry entry (given with mac=, or learned), and
    its port would then be locked to that VM's MAC. Such a MAC is skipped, as a registry
    one is."""
    from vnetd.macs import derive_mac

    reg, _ = registry(limit=10)
    held = {derive_mac("vnet2", "squatter", 0), derive_mac("vnet2", "squatter", 0, 1)}
    reg.holder = lambda network, mac: "alicevm" if network == "vnet2" and mac in held else None
    mac = reg.get("vnet2", "squatter", 0, uid=1001)
    assert mac not in held and mac == derive_mac("vnet2", "squatter", 0, 2)
    # on another network (another segment) the same MAC is free
    assert reg.get("vnet3", "squatter", 0, uid=1001) == derive_mac("vnet3", "squatter", 0)
    # a VM's own MAC outside the registry (its static host's, after `mac forget`) stays its own
    own = derive_mac("vnet2", "web", 0)
    reg.holder = lambda network, mac: "web" if mac == own else None
    assert reg.get("vnet2", "web", 0, uid=1001) == own

