"""Test harness: a real system bus, real polkitd with the project's policy, test users, and a
vnetd from the working tree (installed into /opt/qemu-vnet by `make test`) in a fresh network
namespace per test module."""

from __future__ import annotations

import os
import signal

import pytest

from tests.harness import daemon as hd
from tests.harness import services


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # A run stopped with SIGTERM (a CI time limit, `kill`) unwinds as an interrupted one:
    # the tests' context managers and fixtures clean up (a polkit rule granting a test user
    # more, left in /etc, would outlive the session) instead of the process just ending.
    signal.signal(signal.SIGTERM, _terminated)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/system/" in str(item.fspath) or "/guest/" in str(item.fspath):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session")
def system_services(request):
    if os.geteuid() != 0:
        pytest.fail("the system tests need root: run 'sudo make test'")
    if not hd.PY.exists():
        pytest.fail(f"{hd.PY} is missing: run 'sudo make test' (it installs first)")
    lock = services.exclusive()
    lock.__enter__()
    request.addfinalizer(lambda: lock.__exit__(None, None, None))
    services.start(with_vnetd=False)
    stale = hd.sweep_stale_rules()
    if stale:  # (reported: a session that ended without cleaning up says so)
        print(f"removed polkit rules a killed test session left: {', '.join(stale)}")
    stale = hd.sweep_stale_namespaces()
    if stale:
        print(f"removed network namespaces a killed test session left: {', '.join(stale)}")
    # One daemon owns org.qemuvnet.Vnet1 at a time: a host vnetd yields to the tests and is
    # started again afterwards.
    host_vnetd = services.stop_vnetd()
    # While tests stop and kill their daemons, a stray call must not D-Bus-activate a vnetd
    # in the host's namespace: park the activation file for the session.
    with services.activation_parked():
        hd.ensure_users()
        yield
    if host_vnetd:
        services.ensure_vnetd()


@pytest.fixture(scope="module")
def vnetd(system_services, request):
    d = hd.Daemon(request.module.__name__.rsplit(".", 1)[-1].replace("test_", ""))
    d.start()
    yield d
    try:
        log = d.log()
        if "Traceback" in log:
            print(f"--- vnetd log ({d.netns}) ---\n{log}")
    finally:
        d.close()


@pytest.fixture
def client():
    return hd.run_client
