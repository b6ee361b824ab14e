"""vnetd.devhost (make start/stop/demo where systemd is not PID 1): vnetd is the one of the
virtualenv it is given (default: the running Python's, which is $(VENV) under make), run
inside the unit's capability bounding set with no-new-privs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from vnetd import devhost

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spawned(monkeypatch):
    calls: list[tuple[list[str], str]] = []
    monkeypatch.setattr(devhost, "has_owner", lambda name: False)
    monkeypatch.setattr(devhost, "_spawn", lambda argv, log: calls.append((argv, log)))
    monkeypatch.setattr(devhost, "wait_for", lambda pred, timeout, what: None)
    return calls


def fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/vnetd").write_text("#!/bin/sh\n")
    (venv / "bin/vnetd").chmod(0o755)
    return venv


def test_vnetd_is_the_given_virtualenvs_inside_the_units_limits(tmp_path, spawned):
    venv = fake_venv(tmp_path)
    devhost.ensure_vnetd(venv, ROOT)
    [(argv, log)] = spawned
    assert log == "vnetd.log"
    assert argv[0] == "setpriv" and "--no-new-privs" in argv
    assert argv[-1] == str(venv / "bin/vnetd")
    caps = devhost.unit_capabilities(ROOT)
    assert "net_admin" in caps and "kill" not in caps
    assert f"--bounding-set=-all,{','.join('+' + c for c in caps)}" in argv


def test_the_default_virtualenv_is_the_running_pythons():
    assert devhost.default_venv() == Path(sys.prefix)


def test_a_virtualenv_without_vnetd_is_named(tmp_path, spawned):
    with pytest.raises(RuntimeError, match=str(tmp_path / "none/bin/vnetd")):
        devhost.ensure_vnetd(tmp_path / "none", ROOT)
    assert spawned == []


def test_a_running_vnetd_is_left_alone(tmp_path, spawned, monkeypatch):
    monkeypatch.setattr(devhost, "has_owner", lambda name: name == "org.qemuvnet.Vnet1")
    devhost.ensure_vnetd(fake_venv(tmp_path), ROOT)
    assert spawned == []


def test_the_policy_files_are_the_checkouts(tmp_path, monkeypatch):
    dst = {rel: tmp_path / "installed" / Path(rel).name for rel in devhost.POLICY_FILES}
    monkeypatch.setattr(devhost, "POLICY_FILES", dst)
    assert devhost.install_policy_files(ROOT) is True
    for rel, path in dst.items():
        assert path.read_bytes() == (ROOT / rel).read_bytes()
    assert devhost.install_policy_files(ROOT) is False  # nothing changed the second time
