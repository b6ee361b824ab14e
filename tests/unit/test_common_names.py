"""The MAC registry's key: one writer, one reader, for vnetd's registry and its imports."""

from vnet_common.names import key, split_key


def test_key_and_split_key_are_inverse():
    for vm, nic in (("web1", 0), ("db.lab-2", 31), ("a_b", 7)):
        assert split_key(key(vm, nic)) == (vm, nic)
    assert key("web1", 3) == "web1/3"


def test_split_key_without_a_nic_is_nic_0():
    assert split_key("web1") == ("web1", 0)
    assert split_key("web1/x") == ("web1/x", 0)
