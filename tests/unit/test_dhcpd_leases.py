"""dhcpd.leases read as dhcpd writes it. A guest chooses the hostname it sends, and dhcpd
writes it inside quotes with only '"', '\\' and unprintable bytes escaped: braces and
semicolons in it are text. Read with a pattern that ended a lease block at the first '}', a
hostname forged a lease of another guest's address for the sender's MAC (its port then bound
to that address, the other's port losing its own) or removed any lease."""

from __future__ import annotations

from vnetd.render.dhcpd import parse_leases

HEAD = """\
# The format of this file is documented in the dhcpd.leases(5) manual page.
# This lease file was written by isc-dhcp-4.4.3-P1

# authoring-byte-order entry is generated, DO NOT DELETE
authoring-byte-order little-endian;

server-duid "\\000\\001\\000\\001-\\223\\031\\2424\\3560Z\\247";
"""


def block(ip: str, mac: str, hostname: str, state: str = "active") -> str:
    return f"""\
lease {ip} {{
  starts 1 2026/12/07 17:00:00;
  ends 1 2026/12/07 18:00:00;
  cltt 1 2026/12/07 17:00:00;
  binding state {state};
  next binding state free;
  rewind binding state free;
  hardware ethernet {mac};
  uid "\\001RT\\000\\252\\252\\252";
  client-hostname "{hostname}";
}}
"""


ALICE = ("172.16.12.50", "52:54:00:aa:aa:aa")
BOB = ("172.16.12.60", "52:54:00:bb:bb:bb")


def test_leases_as_dhcpd_writes_them():
    leases = parse_leases(HEAD + block(*ALICE, "alicevm") + block(*BOB, "bobvm"))
    assert [(le.ip, le.mac, le.hostname) for le in leases] == [
        (*ALICE, "alicevm"), (*BOB, "bobvm")]
    assert leases[0].expiry == 1796666400  # 2026-12-07 18:00:00 UTC


def test_a_later_block_for_an_address_wins_and_a_freed_one_goes():
    text = HEAD + block(*ALICE, "alicevm") + block(ALICE[0], BOB[1], "bobvm")
    assert [(le.ip, le.mac) for le in parse_leases(text)] == [(ALICE[0], BOB[1])]
    assert parse_leases(text + block(*ALICE, "alicevm", state="free")) == []


def test_a_hostname_cannot_forge_or_remove_another_guests_lease():
    for forged in (
        f"x}} lease {ALICE[0]} {{ binding state active; hardware ethernet {BOB[1]};",
        f"x}} lease {ALICE[0]} {{ }}",
        "x}} lease 172.16.12.70 {{ binding state active; hardware ethernet 52:54:00:cc:cc:cc;",
    ):
        text = HEAD + block(*ALICE, "alicevm") + block(*BOB, forged.replace('"', ""))
        leases = {le.ip: le for le in parse_leases(text)}
        assert sorted(leases) == [ALICE[0], BOB[0]], forged
        assert leases[ALICE[0]].mac == ALICE[1] and leases[BOB[0]].mac == BOB[1]
        assert leases[BOB[0]].hostname == ""  # not a hostname: not shown


def test_a_quoted_hostname_keeps_its_escapes_inside_the_quotes():
    text = HEAD + block(*BOB, 'a\\"} lease 172.16.12.50 { binding state active;') \
        + block(*ALICE, "alicevm")
    leases = {le.ip: le for le in parse_leases(text)}
    assert leases[ALICE[0]].mac == ALICE[1] and leases[BOB[0]].mac == BOB[1]
