"""Fixtures of the system tests that need no daemon."""

from __future__ import annotations

import pytest

from tests.harness.scratch import scratch_netns


@pytest.fixture
def netns():
    """A network namespace of the test's own (tests/harness/scratch.py), gone after it."""
    with scratch_netns("vnet-scratch") as name:
        yield name
