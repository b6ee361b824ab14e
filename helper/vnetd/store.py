"""Persistence: network definitions (admin-editable TOML) and daemon state, written atomically.

Every write goes to a temporary file in the same directory, is fsynced, renamed over the old
file, and the directory is fsynced: a crash leaves either the old or the new file, never half
of one. Each definition that loads cleanly is also kept as a last good copy under the state
directory, so a definition an admin truncated or mangled by hand is reported and the last good
copy is used instead of failing the whole service.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

from .errors import VnetError
from .model import Forward, Network, render_toml, validate_network_name

log = logging.getLogger("vnetd.store")

HEADER = (
    "qemu-vnet network definition. Edit by hand if you like, then run 'vnet-client reload'.\n"
    "Reference: docs/cli.md (keys are the long option names of 'vnet-client define')."
)


FORWARD_HEADER = "qemu-vnet port forward (one per file; 'vnet-client forward' manages them)."


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # nothing half-made is left behind
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class Store:
    def __init__(self, config_dir: Path, state_dir: Path, runtime_dir: Path | None = None):
        self.runtime_dir = Path(runtime_dir) if runtime_dir else Path(state_dir) / "run"
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.config_dir = Path(config_dir)
        self.networks_dir = self.config_dir / "networks"
        self.state_dir = Path(state_dir)
        self.good_dir = self.state_dir / "last-good"
        for d, mode in ((self.networks_dir, 0o755), (self.good_dir, 0o700)):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, mode)

    # --- definitions --------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        return self.networks_dir / f"{validate_network_name(name)}.toml"

    def save(self, net: Network) -> None:
        """The definition file; its forwards are kept one per file (save_forward)."""
        text = render_toml(net.to_dict(forwards=False), HEADER).encode()
        atomic_write(self.path_of(net.name), text)
        atomic_write(self.good_dir / f"{net.name}.toml", text, 0o600)

    def forwards_dir(self, name: str) -> Path:
        return self.networks_dir / f"{validate_network_name(name)}.forwards"

    def save_forward(self, name: str, f: Forward) -> None:
        d = self.forwards_dir(name)
        d.mkdir(exist_ok=True)
        atomic_write(d / f.file_name, render_toml(f.to_dict(), FORWARD_HEADER).encode())

    def delete_forward(self, name: str, f: Forward) -> None:
        d = self.forwards_dir(name)
        with contextlib.suppress(FileNotFoundError):
            (d / f.file_name).unlink()
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def delete(self, name: str) -> None:
        for p in (self.path_of(name), self.good_dir / f"{name}.toml"):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        shutil.rmtree(self.forwards_dir(name), ignore_errors=True)

    @staticmethod
    def parse(name: str, text: str, forwards: list[dict[str, Any]] | None = None) -> Network:
        if not text.strip():
            # vnetd writes atomically, so an empty file is damage (or a half-done hand edit),
            # never an all-defaults definition
            raise VnetError("it is empty")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise VnetError(f"it is not valid TOML ({e})") from None
        if forwards:
            data["forwards"] = [*data.get("forwards", []), *forwards]
        return Network.from_options(name, data)

    def _read_forwards(self, name: str, problems: list[str]) -> list[dict[str, Any]]:
        rows = []
        d = self.forwards_dir(name)
        for path in sorted(d.glob("*.toml")) if d.is_dir() else ():
            try:
                rows.append(tomllib.loads(path.read_text(encoding="utf-8")))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
                problems.append(f"{path}: ignored: {e}")
        return rows

    def load_all(self) -> tuple[dict[str, Network], list[str]]:
        """All definitions, and a sentence for each file that could not be used."""
        nets: dict[str, Network] = {}
        problems: list[str] = []
        for path in sorted(self.networks_dir.glob("*.toml")):
            name = path.stem
            try:
                validate_network_name(name)
            except VnetError as e:
                problems.append(f"{path}: ignored: {e.message}")
                continue
            good = self.good_dir / path.name
            forwards = self._read_forwards(name, problems)
            try:
                text = path.read_text(encoding="utf-8")
                net = self.parse(name, text, forwards)
            except (VnetError, UnicodeDecodeError, OSError) as e:
                reason = e.message if isinstance(e, VnetError) else str(e)
                if good.exists():
                    try:
                        net = self.parse(name, good.read_text(encoding="utf-8"), forwards)
                    except VnetError:
                        problems.append(f"{path}: cannot be used: {reason}; no good copy either.")
                        continue
                    problems.append(
                        f"{path}: cannot be used: {reason}; using the last good copy {good}."
                    )
                    nets[name] = net
                else:
                    problems.append(f"{path}: cannot be used: {reason}.")
                continue
            nets[name] = net
            if tomllib.loads(text).get("forwards"):
                # forwards written inline by hand move to their directory, one file each
                for f in net.forwards:
                    self.save_forward(name, f)
                self.save(net)
                continue
            text = render_toml(net.to_dict(forwards=False), HEADER).encode()
            if not good.exists() or good.read_bytes() != text:
                atomic_write(good, text, 0o600)
        return nets, problems

    # --- small JSON state files (MAC registry, ports, ...) ------------------------------
    def load_json(self, name: str, default: Any) -> Any:
        path = self.state_dir / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return default
        except (ValueError, OSError) as e:
            backup = path.with_name(path.name + ".bad")
            log.error("state file %s is unreadable (%s); kept it as %s", path, e, backup)
            os.replace(path, backup)
            prev = path.with_name(path.name + ".prev")
            if prev.exists():
                try:
                    return json.loads(prev.read_text(encoding="utf-8"))
                except ValueError:
                    pass
            return default

    def save_json(self, name: str, data: Any) -> None:
        path = self.state_dir / name
        text = json.dumps(data, indent=1, sort_keys=True).encode()
        if path.exists():  # keep the last good copy: a hard link costs no data write
            prev = path.with_name(path.name + ".prev")
            try:
                prev.unlink(missing_ok=True)
                os.link(path, prev)
            except OSError:
                pass
        atomic_write(path, text, 0o600)

    # --- runtime state (gone at reboot, kept across daemon restarts) ---------------------
    def load_runtime_json(self, name: str, default: Any) -> Any:
        try:
            return json.loads((self.runtime_dir / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return default
        except (ValueError, OSError) as e:
            log.error("runtime file %s is unreadable (%s); starting from empty", name, e)
            return default

    @staticmethod
    def write_runtime_file(path: Path, data: bytes) -> None:
        """Atomic (rename) but not fsynced: runtime state lives on tmpfs."""
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def save_runtime_json(self, name: str, data: Any) -> None:
        atomic_write(self.runtime_dir / name, json.dumps(data, sort_keys=True).encode(), 0o600)
