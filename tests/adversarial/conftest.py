"""Frame-level attack tests: real users attack through ports they got the way a VM gets one,
against a vnetd in its own network namespace. They need the system harness (root, bus,
polkitd), so they are system tests."""

from __future__ import annotations

import pytest

from tests.harness.daemon import BOB, PolkitRule, grant_rule

from .lab import Agent, require_tools


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/adversarial/" in str(item.fspath):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="module")
def bob_may_attach(system_services):
    """Bob is not in group vnet; a rule lets him attach so that he can be the attacker."""
    require_tools("ip", "bridge", "setpriv")
    with PolkitRule("60-vnet-adversarial-bob", grant_rule(BOB, "org.qemuvnet.Vnet1.attach")):
        yield


@pytest.fixture
def agents():
    """Make agents; every one is closed when the test ends."""
    made: list[Agent] = []

    def make(user: str, network: str, vm: str, **opts) -> Agent:
        a = Agent.attach(user, network, vm, **opts)
        made.append(a)
        return a

    make.made = made
    yield make
    for a in made:
        a.close()
