"""Unit tests: pure code only, no root, no bus. The packages are imported from the working tree
(`helper/`, `client/` and `common/` first on sys.path), not from an installed copy."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).parents[2]

for _p in (REPO / "common", REPO / "client", REPO / "helper"):
    _s = str(_p)
    if _s in sys.path:
        sys.path.remove(_s)
    sys.path.insert(0, _s)
