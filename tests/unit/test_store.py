"""vnetd.store: atomic writes, definitions with last good copies, JSON state with a .prev copy.

Nothing is lost, and the store's own promise: a crash leaves the old or the
new file, never half of one, and a definition an admin truncated or mangled is reported and the
last good copy is used instead.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tomllib

import pytest
from vnet_common.toml import render_toml
from vnetd import store as store_mod
from vnetd.errors import InvalidArgument, VnetError
from vnetd.model import Network
from vnetd.store import HEADER, Store, atomic_write


@pytest.fixture
def st(tmp_path):
    return Store(tmp_path / "etc", tmp_path / "var")


def mode_of(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def full_net(name="vnet3") -> Network:
    return Network.from_options(name, {
        "mode": "host-only", "subnet": "10.1.2.0/24", "subnet6": "fd00:1::/64", "mtu": 9000,
        "autostart": True, "taps": 12, "tap-user": 1000, "tap-group": "kvm", "dhcp": "dhcpd",
    })


# --- atomic writes -------------------------------------------------------------------------
def test_atomic_write_writes_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "x.toml"
    atomic_write(target, b"one\n")
    assert target.read_bytes() == b"one\n"
    for i in range(20):
        atomic_write(target, f"v{i}\n".encode() * 1000, 0o600)
    assert target.read_bytes() == b"v19\n" * 1000
    assert mode_of(target) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["x.toml"]


def test_atomic_write_sets_the_mode_even_with_a_restrictive_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "a", b"x", 0o644)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "a") == 0o644


def test_atomic_write_large_data(tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    atomic_write(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "vnet2.toml"
    atomic_write(target, b"old\n")

    def disk_full(fd, data):
        os.write(fd, bytes(data)[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "_write_all", disk_full)
    with pytest.raises(OSError):
        atomic_write(target, b"new content\n")
    assert target.read_bytes() == b"old\n"
    assert sorted(os.listdir(tmp_path)) == ["vnet2.toml"], "a temporary file was left behind"


def test_failed_rename_leaves_no_temp(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(OSError):
        atomic_write(tmp_path / "adir", b"data")
    assert sorted(os.listdir(tmp_path)) == ["adir"], "a temporary file was left behind"


# --- definitions ---------------------------------------------------------------------------
def test_runtime_files_are_roots_alone_whatever_the_umask(tmp_path):
    """A port's record names its VM, MAC and user, a registry's last copy every VM's: other
    users read neither (they were 0644 under vnetd's umask 0022), not even a file an older
    vnetd left with a wider mode."""
    old = os.umask(0o022)
    try:
        path = tmp_path / "port.json"
        Store.write_runtime_file(path, b'{"vm": "secret"}')
        assert mode_of(path) == 0o600 and path.read_bytes() == b'{"vm": "secret"}'
        (tmp_path / ".port.json.tmp").write_bytes(b"left over")
        os.chmod(tmp_path / ".port.json.tmp", 0o644)
        path.chmod(0o644)
        Store.write_runtime_file(path, b"{}")
        assert mode_of(path) == 0o600 and path.read_bytes() == b"{}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["port.json"]
    finally:
        os.umask(old)


def test_a_new_runtime_file_is_made_in_place_and_an_old_one_replaced(tmp_path):
    """A new port's record is made in place (O_EXCL, no rename), still root's alone; one a
    crash left under the same name is replaced atomically, whatever its mode."""
    old = os.umask(0o022)
    try:
        path = tmp_path / "vnet2-p1.json"
        Store.write_runtime_file(path, b'{"vm": "a"}', new=True)
        assert mode_of(path) == 0o600 and path.read_bytes() == b'{"vm": "a"}'
        assert sorted(p.name for p in tmp_path.iterdir()) == ["vnet2-p1.json"]
        path.chmod(0o644)
        Store.write_runtime_file(path, b'{"vm": "b"}', new=True)
        assert mode_of(path) == 0o600 and path.read_bytes() == b'{"vm": "b"}'
        assert sorted(p.name for p in tmp_path.iterdir()) == ["vnet2-p1.json"]
    finally:
        os.umask(old)


def test_the_registrys_last_copy_is_roots_alone(st):
    st.save_json("macs.json", {"vnet2": {"web1/0": "52:54:00:00:00:01"}})
    st.save_json("macs.json", {})
    assert mode_of(st.state_dir / "macs.json.prev") == 0o600
    assert mode_of(st.state_dir / "macs.json") == 0o600


def test_store_creates_its_directories(st):
    assert st.networks_dir.is_dir() and st.good_dir.is_dir()
    assert mode_of(st.networks_dir) == 0o755
    assert mode_of(st.good_dir) == 0o700


def test_save_and_load_round_trip(st):
    nets = [full_net("vnet3"), Network.from_options("vnet0", {}),
            Network.from_options("lab", {"subnet": "10.7.0.0/24", "subnet6": "fd00:7::/64"}),
            Network.from_options("a" * 15, {"subnet": "192.168.5.0/24", "mtu": 576})]
    for n in nets:
        st.save(n)
    loaded, problems = st.load_all()
    assert problems == []
    assert loaded == {n.name: n for n in nets}
    # A second store over the same directories (a restart) sees the same.
    again, problems = Store(st.config_dir, st.state_dir).load_all()
    assert again == loaded and problems == []
    assert sorted(p.name for p in st.networks_dir.iterdir()) == \
        sorted(f"{n.name}.toml" for n in nets)


def test_saved_file_is_commented_toml_that_reads_back(st):
    n = full_net()
    st.save(n)
    path = st.path_of(n.name)
    assert path == st.networks_dir / "vnet3.toml"
    text = path.read_text()
    assert text.startswith("# qemu-vnet network definition.")
    assert text == render_toml(n.to_dict(), HEADER)
    assert tomllib.loads(text) == n.to_dict()
    assert mode_of(path) == 0o644
    good = st.good_dir / "vnet3.toml"
    assert good.read_text() == text
    assert mode_of(good) == 0o600
    assert [p.name for p in st.networks_dir.iterdir()] == ["vnet3.toml"]
    assert [p.name for p in st.good_dir.iterdir()] == ["vnet3.toml"]


def test_save_overwrites(st):
    st.save(full_net())
    n2 = full_net().with_changes(mtu=1400)
    st.save(n2)
    assert st.load_all() == ({"vnet3": n2}, [])


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "a/b", "a b", ".", ""])
def test_path_of_refuses_bad_names(st, name):
    with pytest.raises(InvalidArgument):
        st.path_of(name)


def test_delete(st):
    st.save(full_net())
    st.delete("vnet3")
    assert not (st.networks_dir / "vnet3.toml").exists()
    assert not (st.good_dir / "vnet3.toml").exists()
    st.delete("vnet3")  # already gone: no error
    assert st.load_all() == ({}, [])


def _one_problem(problems, path):
    assert len(problems) == 1, problems
    assert str(path) in problems[0]
    return problems[0]


@pytest.mark.parametrize("content", [
    b'name = "vnet3"\nmode = "nat',  # cut inside a string
    b"this is not toml at all ][",
    b'name = "vnet3"\nmtu = 10\n',  # valid TOML, invalid definition
    b'name = "vnet3"\nmode = "bridged"\n',
    b'name = "vnet4"\n',  # says another name
    b'bogus-key = 1\n',
    b"\xff\xfe\x00garbage",  # not UTF-8
])
def test_broken_file_is_reported_and_the_last_good_copy_used(st, content):
    n = full_net()
    st.save(n)
    path = st.path_of("vnet3")
    path.write_bytes(content)
    nets, problems = st.load_all()
    assert nets == {"vnet3": n}
    msg = _one_problem(problems, path)
    assert "last good" in msg
    assert path.read_bytes() == content, "the admin's file must not be overwritten"
    assert (st.good_dir / "vnet3.toml").read_text() == render_toml(n.to_dict(), HEADER)


def test_every_truncation_that_breaks_the_file_falls_back_to_the_good_copy(st):
    n = full_net("lab3")
    st.save(n)
    path = st.path_of(n.name)
    full = path.read_bytes()
    checked = 0
    for cut in range(1, len(full)):
        text = full[:cut]
        try:
            Store.parse(n.name, text.decode())
            continue  # still a valid (different) definition: not detectable as truncation
        except (VnetError, UnicodeDecodeError):
            pass
        path.write_bytes(text)
        nets, problems = st.load_all()
        assert nets == {n.name: n}, cut
        assert "last good" in _one_problem(problems, path)
        checked += 1
    assert checked > len(full) // 4


def test_file_truncated_to_zero_bytes_is_reported_and_the_good_copy_kept(st):
    # A crash during a non-atomic save (an editor, 'cat > file') leaves an empty file. For a
    # network like vnet3 an empty table would parse as all defaults; the definition must not
    # silently change, and the last good copy must survive.
    n = full_net("vnet3")
    st.save(n)
    path = st.path_of("vnet3")
    path.write_bytes(b"")
    nets, problems = st.load_all()
    assert nets == {"vnet3": n}
    _one_problem(problems, path)
    assert (st.good_dir / "vnet3.toml").read_text() == render_toml(n.to_dict(), HEADER)


def test_broken_file_without_a_good_copy_is_reported_and_skipped(st):
    (st.networks_dir / "vnet5.toml").write_text('mode = "nat\n')
    st.save(Network.from_options("vnet6", {}))
    nets, problems = st.load_all()
    assert list(nets) == ["vnet6"]
    msg = _one_problem(problems, st.networks_dir / "vnet5.toml")
    assert "cannot be used" in msg


def test_broken_file_and_broken_good_copy(st):
    st.save(full_net())
    st.path_of("vnet3").write_text("mtu = ")
    (st.good_dir / "vnet3.toml").write_text("also = broken = ")
    nets, problems = st.load_all()
    assert nets == {}
    assert "no good copy" in _one_problem(problems, st.path_of("vnet3"))


def test_hand_edit_is_loaded_and_becomes_the_good_copy(st):
    st.save(full_net())
    path = st.path_of("vnet3")
    path.write_text(path.read_text().replace("mtu = 9000", "mtu = 1400"))
    nets, problems = st.load_all()
    assert problems == [] and nets["vnet3"].mtu == 1400
    path.write_text("broken = ")
    nets, problems = st.load_all()
    assert nets["vnet3"].mtu == 1400  # the edited version, not the one saved before
    assert len(problems) == 1


def test_hand_written_file_without_a_good_copy_is_adopted(st):
    (st.networks_dir / "vnet4.toml").write_text('mode = "host-only"\n')
    nets, problems = st.load_all()
    assert problems == []
    assert nets["vnet4"] == Network.from_options("vnet4", {"mode": "host-only"})
    assert (st.good_dir / "vnet4.toml").exists()


@pytest.mark.parametrize("filename", ["a b.toml", "waytoolongname1234.toml", ".hidden.toml",
                                      "-x.toml", "x;y.toml", "vnetä.toml", "$(id).toml"])
def test_file_with_a_bad_name_is_ignored_with_a_problem(st, filename):
    st.save(Network.from_options("vnet2", {}))
    bad = st.networks_dir / filename
    bad.write_text('mode = "nat"\nsubnet = "10.0.0.0/24"\n')
    nets, problems = st.load_all()
    assert list(nets) == ["vnet2"]
    msg = _one_problem(problems, bad)
    assert "ignored" in msg
    assert bad.exists()


@pytest.mark.parametrize("filename", ["vnet2.toml~", ".vnet2.toml.swp", "vnet2.bak",
                                      "README", ".vnet2.toml.tmp123"])
def test_other_files_are_not_definitions(st, filename):
    (st.networks_dir / filename).write_text("whatever = ")
    assert st.load_all() == ({}, [])


# --- JSON state ----------------------------------------------------------------------------
def test_json_round_trip_and_default(st):
    assert st.load_json("macs.json", {"d": 1}) == {"d": 1}
    data = {"vnet2": {"vm1/0": "52:54:00:01:02:03"}, "n": [1, 2, 3], "ok": True}
    st.save_json("macs.json", data)
    assert st.load_json("macs.json", None) == data
    assert mode_of(st.state_dir / "macs.json") == 0o600


def test_json_keeps_the_previous_version(st):
    st.save_json("ports.json", {"v": 1})
    assert not (st.state_dir / "ports.json.prev").exists()
    st.save_json("ports.json", {"v": 2})
    assert json.loads((st.state_dir / "ports.json.prev").read_text()) == {"v": 1}
    st.save_json("ports.json", {"v": 3})
    assert json.loads((st.state_dir / "ports.json.prev").read_text()) == {"v": 2}
    assert st.load_json("ports.json", None) == {"v": 3}
    leftovers = [p for p in os.listdir(st.state_dir) if ".tmp" in p]
    assert leftovers == []


@pytest.mark.parametrize("corrupt", [b"", b"{", b'{"v": 3', b"\xff\xfe", b"nul\x00l"])
def test_corrupt_json_falls_back_to_prev(st, corrupt):
    st.save_json("ports.json", {"v": 1})
    st.save_json("ports.json", {"v": 2})
    (st.state_dir / "ports.json").write_bytes(corrupt)
    assert st.load_json("ports.json", {"default": True}) == {"v": 1}
    # The unreadable file is kept for a person to look at, not thrown away.
    assert (st.state_dir / "ports.json.bad").read_bytes() == corrupt


def test_corrupt_json_without_prev_gives_the_default(st):
    st.save_json("ports.json", {"v": 1})
    (st.state_dir / "ports.json").write_text("{")
    assert st.load_json("ports.json", {"default": True}) == {"default": True}


def test_corrupt_json_and_corrupt_prev_give_the_default(st):
    st.save_json("ports.json", {"v": 1})
    st.save_json("ports.json", {"v": 2})
    (st.state_dir / "ports.json").write_text("{")
    (st.state_dir / "ports.json.prev").write_text("[")
    assert st.load_json("ports.json", []) == []


def test_save_after_a_fallback_works(st):
    st.save_json("ports.json", {"v": 1})
    st.save_json("ports.json", {"v": 2})
    (st.state_dir / "ports.json").write_text("{")
    assert st.load_json("ports.json", None) == {"v": 1}
    st.save_json("ports.json", {"v": 4})
    assert st.load_json("ports.json", None) == {"v": 4}


# --- the MAC registry on disk: a file per network -------------------------------------------
def _registry(st):
    from vnetd import macs as macs_mod

    data, owners = macs_mod.load(st)
    return macs_mod.MacRegistry(data, macs_mod.saver(st), creators=owners), macs_mod


def test_the_registry_of_earlier_versions_is_split_into_a_file_per_network(st, caplog):
    """macs.json and mac-creators.json of an earlier version: each network gets its own
    file with its entries and owners, and the single files go, once all are written."""
    old = {"vnet2": {"web/0": "52:54:00:00:00:01", "web/1": "52:54:00:00:00:02"},
           "lab": {"db/0": "52:54:00:00:00:03"}, "no way": {"x/0": "52:54:00:00:00:04"}}
    st.save_json("macs.json", old)
    st.save_json("macs.json", old)  # (its last good copy too, which must go with it)
    st.save_json("mac-creators.json", {"vnet2": {"web": 1000}, "gone": {"old": 1001}})
    reg, _ = _registry(st)
    assert reg.data == {"vnet2": old["vnet2"], "lab": old["lab"]}  # ("no way": no network)
    assert reg.creators == {"vnet2": {"web": 1000}, "gone": {"old": 1001}}
    names = sorted(p.name for p in st.state_dir.iterdir() if "macs" in p.name)
    assert names == ["gone.macs.json", "lab.macs.json", "vnet2.macs.json"]
    assert json.loads((st.state_dir / "vnet2.macs.json").read_text()) == {
        "macs": old["vnet2"], "creators": {"web": 1000}}
    assert mode_of(st.state_dir / "vnet2.macs.json") == 0o600
    assert not (st.state_dir / "mac-creators.json").exists()
    assert "no network name" in caplog.text
    again, _ = _registry(st)  # and the next start reads the same from the new files
    assert (again.data, again.creators) == (reg.data, reg.creators)


def test_a_registry_split_cut_short_is_done_again_from_the_old_files(st):
    """A crash after some networks' files were written and before the old files went: the
    old files still hold everything, and their networks take their entries from them."""
    st.save_json("macs.json", {"vnet2": {"web/0": "52:54:00:00:00:01"}})
    st.save_json("vnet2.macs.json", {"macs": {"stale/0": "52:54:00:00:00:09"}, "creators": {}})
    st.save_json("lab.macs.json", {"macs": {"db/0": "52:54:00:00:00:03"}, "creators": {}})
    reg, _ = _registry(st)
    assert reg.data == {"vnet2": {"web/0": "52:54:00:00:00:01"},
                        "lab": {"db/0": "52:54:00:00:00:03"}}
    assert not (st.state_dir / "macs.json").exists()


def test_a_damaged_network_file_falls_back_to_its_last_good_copy(st, caplog):
    reg, _ = _registry(st)
    mac = reg.get("vnet2", "web", 0, 1000)
    reg.get("lab", "db", 0, 1000)
    reg.get("vnet2", "web2", 0, 1000)  # (the last good copy holds web alone)
    (st.state_dir / "vnet2.macs.json").write_text('{"macs": {"web/0": 7}}')  # wrong shape
    again, _ = _registry(st)
    assert again.data["vnet2"] == {"web/0": mac} and again.creators["vnet2"] == {"web": 1000}
    assert again.data["lab"] == reg.data["lab"]  # the other networks are untouched
    assert (st.state_dir / "vnet2.macs.json.bad").exists() and "unreadable" in caplog.text


def test_a_network_whose_last_vm_is_forgotten_leaves_no_file(st):
    reg, _ = _registry(st)
    reg.get("vnet2", "web", 0, 1000)
    reg.get("vnet2", "web", 1, 1000)
    assert (st.state_dir / "vnet2.macs.json").exists()
    assert reg.forget("vnet2", "web") == 2
    assert not [p.name for p in st.state_dir.iterdir() if "vnet2" in p.name]
    again, _ = _registry(st)  # (nor a last copy to bring it back)
    assert again.data == {} and again.creators == {}


def test_a_registry_file_whose_name_is_no_network_is_left_alone(st, caplog):
    (st.state_dir / "x y.macs.json").write_text('{"macs": {"a/0": "52:54:00:00:00:01"}}')
    (st.state_dir / ".macs.json").write_text("{}")
    reg, _ = _registry(st)
    assert reg.data == {} and "'x y' is no network name" in caplog.text
    assert (st.state_dir / "x y.macs.json").exists()


def test_a_registry_split_cut_between_removing_the_old_files_keeps_every_entry(st):
    """The split removes macs.json, then mac-creators.json: a crash between the two leaves
    the owners' old file alone, and the entries are in the network files by then. Taking
    the missing old file for 'no entries' would have emptied them."""
    st.save_json("macs.json", {"vnet2": {"web/0": "52:54:00:00:00:01"}})
    st.save_json("mac-creators.json", {"vnet2": {"web": 1000}})
    first, _ = _registry(st)
    st.save_json("mac-creators.json", {"vnet2": {"web": 1000}})  # (as the crash left it)
    again, _ = _registry(st)
    assert again.data == first.data == {"vnet2": {"web/0": "52:54:00:00:00:01"}}
    assert again.creators == {"vnet2": {"web": 1000}}
    assert not (st.state_dir / "mac-creators.json").exists()


@pytest.mark.parametrize("key", ['[[forwards]]', '[["forward\\u0073"]]'])
def test_forwards_written_inline_move_to_their_directory_however_the_key_is_spelled(st, key):
    """A forward written inline by hand moves to its own file on loading, and is kept there
    (the definition is then saved without it). TOML spells a key in several ways; one that
    never has the word 'forwards' in the file is still the key `forwards`."""
    st.save(Network.from_options("lab", {"subnet": "10.7.0.0/24"}))
    path = st.path_of("lab")
    path.write_text(path.read_text() + f'\n{key}\nproto = "udp"\nport = "8078"\n'
                    'target = "10.7.0.77"\ntarget-port = 8078\n')
    nets, problems = st.load_all()
    assert problems == []
    assert [(f.proto, f.port_lo, f.target) for f in nets["lab"].forwards] == [
        ("udp", 8078, "10.7.0.77")]
    assert (st.forwards_dir("lab") / "udp4-any-any-8078.toml").exists()
    assert "forward" not in path.read_text()
    again, _ = Store(st.config_dir, st.state_dir).load_all()  # a restart keeps it
    assert again == nets
