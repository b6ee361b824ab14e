"""The ports' keyed views (by network, by uid, by holder, by VM NIC) follow every port that
comes and goes, so attach, quota checks and holder exits never scan the host's ports."""

from __future__ import annotations

import os
from types import SimpleNamespace

from vnetd.ports import Port, Ports


def port(ifname: str, network: str, uid: int, holder: int | None, vm: str = "vm", nic: int = 0):
    return Port(ifname=ifname, ifindex=hash(ifname) & 0xFFFF, network=network, vm=vm, nic=nic,
                uid=uid, mac="52:54:00:00:00:01", mac_known=True, holder_pid=holder, queues=1,
                created=0.0)


def test_keyed_views_follow_add_and_drop(tmp_path):
    ports = Ports(links=None, macs=None, store=SimpleNamespace(runtime_dir=tmp_path))
    a = port("n1-a", "n1", 1000, 11, vm="web")
    b = port("n1-b", "n1", 1001, 12, vm="db")
    c = port("n2-c", "n2", 1000, 11, vm="web")
    for p in (a, b, c):
        ports._add(p)
    assert {p.ifname for p in ports.on_network("n1")} == {"n1-a", "n1-b"}
    assert {p.ifname for p in ports.of_uid(1000)} == {"n1-a", "n2-c"}
    assert ports._by_nic[("n1", "web", 0)] is a and ("n1", "web", 1) not in ports._by_nic
    assert set(ports._of_holder[11]) == {"n1-a", "n2-c"}
    ports._drop(a)
    assert [p.ifname for p in ports.on_network("n1")] == ["n1-b"]
    assert [p.ifname for p in ports.of_uid(1000)] == ["n2-c"]
    assert ("n1", "web", 0) not in ports._by_nic
    assert set(ports._of_holder[11]) == {"n2-c"}
    ports._drop(c)
    ports._drop(b)
    assert ports.on_network("n1") == [] and ports.of_uid(1000) == []
    assert ports._on_network == {} and ports._of_uid == {} and ports._of_holder == {}
    assert not ports._drop(b)  # a port dropped twice is no error and changes nothing


def test_port_names_depend_on_a_secret_no_other_user_knows():
    """A VM's port names cannot be computed ahead by another user (who would take them with
    ports of its own): the same (network, vm, nic, attempt) gives different names under
    different keys, and the same name under the same key."""
    from vnetd.ports import port_name
    a, b = os.urandom(16), os.urandom(16)
    names_a = [port_name("vnet2", "web1", 0, i, a) for i in range(16)]
    assert names_a == [port_name("vnet2", "web1", 0, i, a) for i in range(16)]
    assert names_a != [port_name("vnet2", "web1", 0, i, b) for i in range(16)]
    assert all(n.startswith("vnet2-") and len(n) <= 15 for n in names_a)


def test_a_record_left_empty_by_a_crash_is_removed_and_the_rest_read(tmp_path):
    """A new port's record is made in place: a crash between its creation and its write
    leaves it empty (its tap never left vnetd, and died with it). Loading the records
    removes that one and reads the others."""
    from vnetd.store import Store

    store = SimpleNamespace(runtime_dir=tmp_path, write_runtime_file=Store.write_runtime_file)
    ports = Ports(links=None, macs=None, store=store)
    (tmp_path / Ports.DIR).mkdir()
    good = port("n1-a", "n1", 1000, 11, vm="web")
    ports._write(good, new=True)
    ports._record("n1-b").write_bytes(b"")
    assert set(ports.load_records()) == {"n1-a"}
    assert not ports._record("n1-b").exists()  # (no record left without its port)
    again = port("n1-b", "n1", 1001, 12, vm="db")
    ports._write(again, new=True)
    assert set(ports.load_records()) == {"n1-a", "n1-b"}
    assert ports.load_records()["n1-b"].vm == "db"


def test_the_adopted_ports_link_local_set_up_never_stops_the_adoption(monkeypatch, caplog):
    """After a restart, the adoption of every network waits for the adopted ports' link-local
    set-up (a thread with a netlink socket of its own): a socket that cannot be had (fds
    exhausted) or a request that fails is logged, and the rest of the ports still get it."""
    import errno

    from vnetd import ports as ports_mod

    def no_socket():
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(ports_mod, "FastLinkSetter", no_socket)
    ports_mod._forward_link_local([("p1", 1), ("p2", 2)], lambda index: True)
    assert "2 adopted port(s) was not made" in caplog.text

    done: list[int] = []

    class Setter:
        sock = SimpleNamespace(close=lambda: done.append(-1))

        def forward_link_local(self, index: int) -> None:
            if index == 1:
                raise OSError(errno.ENOBUFS, "No buffer space available")
            done.append(index)

    monkeypatch.setattr(ports_mod, "FastLinkSetter", Setter)
    ports_mod._forward_link_local([("p1", 1), ("p2", 2), ("p3", 3)], lambda index: index != 3)
    assert done == [2, -1]  # p3 went meanwhile; the socket is closed
    assert "port p1: its link-local set-up was not made" in caplog.text
