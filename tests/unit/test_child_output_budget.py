"""A child's output in vnetd's log is budgeted (children/supervisor.py): what dnsmasq or
dhcpd print can follow from what guests send, and a flood would push every line past
journald's rate limit, vnetd's audit lines with them. What is held back is counted."""

from __future__ import annotations

import asyncio
import logging
import re

from vnetd.children import supervisor
from vnetd.children.supervisor import Child


class _Out:
    def __init__(self, lines: list[bytes]):
        self.lines = lines

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for line in self.lines:
            yield line


class _Proc:
    def __init__(self, n: int):
        self.stdout = _Out([f"DHCPREQUEST {i}\n".encode() for i in range(n)])


def test_a_flood_of_child_lines_is_budgeted_and_counted(caplog, tmp_path):
    child = Child("dnsmasq[vnet2]", ["/bin/true"], tmp_path / "pid")
    with caplog.at_level(logging.INFO, logger=supervisor.log.name):
        asyncio.run(child._log_output(_Proc(1000)))
    lines = [r.getMessage() for r in caplog.records]
    said = [m for m in lines if "DHCPREQUEST" in m]
    assert supervisor.OUTPUT_BURST <= len(said) <= supervisor.OUTPUT_BURST + 5
    held = sum(int(n) for m in lines for n in re.findall(r"(\d+) (?:earlier|last) line", m))
    assert len(said) + held == 1000, (len(said), held)
    assert lines[-1].endswith("last line(s) held back: too many")


def test_a_quiet_child_is_logged_in_full(caplog, tmp_path):
    child = Child("dhcpd[vnet5]", ["/bin/true"], tmp_path / "pid")
    with caplog.at_level(logging.INFO, logger=supervisor.log.name):
        asyncio.run(child._log_output(_Proc(10)))
    assert [r.getMessage() for r in caplog.records] == [
        f"dhcpd[vnet5]: DHCPREQUEST {i}" for i in range(10)]
