"""ListNetworks' rows: each network's summary as the bus sends it, made again only when the
network's definition or state changed (a list of 500 networks spent 8 ms making every row
anew, for every caller, every time)."""

from __future__ import annotations

from vnetd.bus import to_asv

from tests.unit.test_limits import engine, net  # noqa: F401 (a fixture)


def _counting(made: list):
    def encode(d):
        made.append(d["name"])
        return to_asv(d)
    return encode


async def test_rows_are_the_summaries_and_only_changed_networks_are_made_again(engine):  # noqa: F811
    for n in ("n1", "n2", "n3"):
        await engine.definitions.define(net(n), 0)
    made: list[str] = []
    encode = _counting(made)
    rows = engine.queries.rows(encode)
    assert rows == [to_asv(d) for d in engine.queries.list()]
    assert made == ["n1", "n2", "n3"]

    made.clear()
    assert engine.queries.rows(encode) == rows and made == []  # nothing changed

    await engine.definitions.set_autostart("n2", True)  # a new definition
    engine.adopting["n3"] = None  # another state
    rows = engine.queries.rows(encode)
    assert made == ["n2", "n3"]
    assert rows == [to_asv(d) for d in engine.queries.list()]
    by_name = {r["name"].value: r for r in rows}
    assert by_name["n2"]["autostart"].value is True
    assert by_name["n3"]["state"].value == "adopting"

    made.clear()
    del engine.adopting["n3"]
    await engine.definitions.undefine("n1")
    rows = engine.queries.rows(encode)
    assert made == ["n3"] and [r["name"].value for r in rows] == ["n2", "n3"]
    assert set(engine.queries._rows) == {"n2", "n3"}  # a network gone leaves no row behind
