"""The bridge's index on the attach path: one ioctl on a kept socket, the same answer as
socket.if_nametoindex, and no answer for a name the kernel would have cut short."""

from __future__ import annotations

import socket

import pytest
from vnetd.kernel import links


def test_ifindex_is_if_nametoindex():
    assert links.ifindex("lo") == socket.if_nametoindex("lo")
    assert links.ifindex("lo") == socket.if_nametoindex("lo")  # (the kept socket, again)


@pytest.mark.parametrize("name", ["", "no-such-link0", "lo" + "x" * 14, "l\0o"])
def test_no_index_for_a_missing_or_impossible_name(name):
    with pytest.raises(OSError):
        links.ifindex(name)
