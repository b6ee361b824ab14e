"""The MAC registry's key: one writer, one reader, for vnetd's registry and its imports."""

import pytest
from vnet_common.errors import InvalidArgument
from vnet_common.names import key, parse_key, split_key


def test_key_and_split_key_are_inverse():
    for vm, nic in (("web1", 0), ("db.lab-2", 31), ("a_b", 7)):
        assert split_key(key(vm, nic)) == (vm, nic)
    assert key("web1", 3) == "web1/3"


def test_split_key_without_a_nic_is_nic_0():
    assert split_key("web1") == ("web1", 0)
    assert split_key("web1/x") == ("web1/x", 0)


def test_parse_key_checks_what_an_import_gives():
    assert parse_key("web1") == ("web1", 0)
    assert parse_key("web1/31") == ("web1", 31)
    for bad in ("web1/32", "web1/01", "web1/", "-x/0", 5):
        with pytest.raises(InvalidArgument):
            parse_key(bad)
