"""nftables listings (`nft -j list ...`) in a form two of them can be compared in."""

from __future__ import annotations

import json


def normalized(listing: dict) -> list:
    """A listing without handles and with set elements sorted (hash order is not stable)."""

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k != "handle"}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    out = []
    for o in listing["nftables"]:
        if "metainfo" in o:
            continue
        o = strip(o)
        for kind in ("set", "map"):
            if kind in o and "elem" in o[kind]:
                o[kind]["elem"] = sorted(o[kind]["elem"], key=json.dumps)
        out.append(o)
    return out
