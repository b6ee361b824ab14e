"""The MAC registry's counts (entries per owner, names per owner, who holds a MAC) are kept
as it changes instead of counted by walking a network's entries at each new VM: after any
sequence of changes they are what a walk would count, and every check answers as it did."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from vnetd.errors import VnetError
from vnetd.macs import MacRegistry, _Index

NETS = ("n1", "n2")
VMS = ("a", "b", "c", "d")
UIDS = (0, 1000, 1001)

op = st.one_of(
    st.tuples(st.just("get"), st.sampled_from(NETS), st.sampled_from(VMS),
              st.integers(0, 2), st.sampled_from(UIDS)),
    st.tuples(st.just("claim"), st.sampled_from(NETS), st.sampled_from(VMS),
              st.sampled_from(UIDS)),
    st.tuples(st.just("forget"), st.sampled_from(NETS), st.sampled_from(VMS)),
    st.tuples(st.just("transfer"), st.sampled_from(NETS), st.sampled_from(VMS),
              st.sampled_from(UIDS)),
    st.tuples(st.just("reclaim"), st.sampled_from(NETS), st.sampled_from(VMS)),
    st.tuples(st.just("import"), st.sampled_from(NETS), st.sampled_from(VMS),
              st.integers(0, 2), st.integers(0, 255)),
    st.tuples(st.just("remember"), st.sampled_from(NETS), st.sampled_from(VMS),
              st.sampled_from(UIDS), st.integers(0, 255)),
)


def walked(r: MacRegistry, network: str) -> _Index:
    """The counts as a walk over the network's entries makes them."""
    r._changed(network)
    try:
        return r._index(network)
    finally:
        r._changed(network)


def run(r: MacRegistry, o: tuple) -> None:
    kind, network, vm, *rest = o
    try:
        if kind == "get":
            r.get(network, vm, rest[0], rest[1])
        elif kind == "claim":
            r.claim(network, vm, rest[0])
        elif kind == "forget":
            r.forget(network, vm)
        elif kind == "transfer":
            r.transfer(network, vm, rest[0])
        elif kind == "reclaim":
            r.reclaim(network, vm)
        elif kind == "import":
            r.import_macs(network, {f"{vm}/{rest[0]}": f"52:54:00:aa:00:{rest[1]:02x}"})
        else:
            r.remember(network, vm, rest[0], mac=f"52:54:00:bb:00:{rest[1]:02x}")
    except VnetError:
        pass  # a refusal changes nothing: the counts must still be right


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=40))
def test_the_kept_counts_are_what_a_walk_counts(ops):
    r = MacRegistry({}, lambda *written: None, limit=6, per_user=3)
    for o in ops:
        run(r, o)
        for n in NETS:
            kept = r._index(n)
            fresh = walked(r, n)
            assert kept.by_mac == fresh.by_mac, o
            assert +kept.per_vm == +fresh.per_vm, o
            assert +kept.entries_of == +fresh.entries_of, o
            assert +kept.names_of == +fresh.names_of, o
            assert ({v: sorted(m) for v, m in kept.of_vm.items() if m}
                    == {v: sorted(m) for v, m in fresh.of_vm.items()}), o
            for mac, k in fresh.by_mac.items():
                assert r.owner_of(n, mac) == k

