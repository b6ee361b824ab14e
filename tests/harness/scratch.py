"""A network namespace of a test's own, and a Python script run in it with the project's
modules: for tests of vnetd's kernel adapters without a daemon."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).parents[2]


@contextlib.contextmanager
def scratch_netns(prefix: str) -> Iterator[str]:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_in(netns: str, script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`script` run by this interpreter in `netns`, the repository's path as its argv[1]."""
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script,
                           str(REPO)], capture_output=True, text=True, timeout=timeout)
