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
import secrets
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from vnet_common.toml import render_toml

from .errors import VnetError
from .model import (
    Forward,
    ForwardIndex,
    Network,
    parse_forward,
    validate_ifname,
    validate_network_name,
)

log = logging.getLogger("vnetd.store")

HEADER = (
    "qemu-vnet network definition. Edit by hand if you like, then run 'vnet-client reload'.\n"
    "Reference: docs/cli.md (keys are the long option names of 'vnet-client define')."
)


FORWARD_HEADER = "qemu-vnet port forward (one per file; 'vnet-client forward' manages them)."


def atomic_write(path: Path, data: bytes, mode: int = 0o644, durable: bool = True,
                 group: int | None = None) -> None:
    """Replace `path` with `data` at once (readers see the old file or the new one, never
    a part). `durable`: also flushed to the disk, file and directory, so a power cut keeps
    it; files in the runtime directory (a tmpfs, /run, made again by every start) skip that,
    since nothing there outlives a power cut anyway, and a process killed mid-way leaves the
    page cache whole. `group`: the file's group (a child's, that reads it after dropping
    root)."""
    path = Path(path)
    # a fresh name, created exclusively and never through a link: safe even in a directory
    # someone else could write into
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            _write_all(fd, data)
            if group is not None:  # (one vnetd is a member of: no CAP_CHOWN needed)
                os.fchown(fd, -1, group)
            os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # nothing half-made is left behind
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """A directory's entries (a file renamed in, or removed) flushed to the disk."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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
        good = self.good_dir / d.name
        good.mkdir(mode=0o700, exist_ok=True)
        # the last good copy is a copy (a hard link would share damage done in place), not
        # fsynced: the file itself is the durable one
        self.write_runtime_file(good / f.file_name, (d / f.file_name).read_bytes())

    def delete_forward(self, name: str, f: Forward) -> None:
        d = self.forwards_dir(name)
        with contextlib.suppress(FileNotFoundError):
            (self.good_dir / d.name / f.file_name).unlink()
        with contextlib.suppress(FileNotFoundError):
            (d / f.file_name).unlink()
            fsync_dir(d)

    def delete(self, name: str) -> None:
        """The definition file goes first (that is the undefine, atomically); its forwards and
        last good copy follow, and load_all() sweeps any a crash left behind."""
        with contextlib.suppress(FileNotFoundError):
            self.path_of(name).unlink()
        shutil.rmtree(self.forwards_dir(name), ignore_errors=True)
        shutil.rmtree(self.good_dir / self.forwards_dir(name).name, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.good_dir / f"{name}.toml").unlink()

    def _sweep_orphans(self) -> None:
        for d in self.networks_dir.glob("*.forwards"):
            toml = self.networks_dir / f"{d.name[:-len('.forwards')]}.toml"
            if d.is_dir() and not toml.exists():
                log.info("removing %s: its network was undefined", d)
                shutil.rmtree(d, ignore_errors=True)
        for g in self.good_dir.glob("*.toml"):
            if not (self.networks_dir / g.name).exists():
                g.unlink(missing_ok=True)
        for g in self.good_dir.glob("*.forwards"):
            if not (self.networks_dir / g.name).exists():
                shutil.rmtree(g, ignore_errors=True)

    @staticmethod
    def parse(name: str, text: str) -> Network:
        if not text.strip():
            # vnetd writes atomically, so an empty file is damage (or a half-done hand edit),
            # never an all-defaults definition
            raise VnetError("it is empty")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise VnetError(f"it is not valid TOML ({e})") from None
        return Network.from_options(name, data, stored=True)

    def _add_forwards(self, net: Network, problems: list[str]) -> Network:
        """The network with the forwards of its directory. Each file stands alone: a damaged
        one is reported and its last good copy used (or it is left out), never the whole
        network refused."""
        d = self.forwards_dir(net.name)
        good_d = self.good_dir / d.name
        index = ForwardIndex()
        forwards: list[Forward] = []
        for path in sorted(d.glob("*.toml")) if d.is_dir() else ():
            f = None
            for source in (path, good_d / path.name):
                try:
                    f = parse_forward(net, tomllib.loads(source.read_text(encoding="utf-8")),
                                      stored=True)
                except FileNotFoundError:
                    break
                except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError, VnetError) as e:
                    reason = e.message if isinstance(e, VnetError) else str(e)
                    problems.append(f"{source}: cannot be used: {reason}" + (
                        "; trying its last good copy." if source == path else "."))
                    continue
                break
            if f is None:
                continue
            clash = index.clash(f)
            if clash is not None:
                problems.append(f"{path}: left out: it overlaps {clash[1].describe()}.")
                continue
            index.add(net.name, f)
            forwards.append(f)
        return replace(net, forwards=tuple(forwards)) if forwards else net

    def load_all(self) -> tuple[dict[str, Network], list[str]]:
        """All definitions, and a sentence for each file that could not be used."""
        nets: dict[str, Network] = {}
        problems: list[str] = []
        self._sweep_orphans()
        for path in sorted(self.networks_dir.glob("*.toml")):
            name = path.stem
            try:
                validate_network_name(name)
            except VnetError as e:
                problems.append(f"{path}: ignored: {e.message}")
                continue
            good = self.good_dir / path.name
            try:
                raw = path.read_bytes()
                text = raw.decode("utf-8")
                parsed = self.parse(name, text)
                net = self._add_forwards(parsed, problems)
            except (VnetError, UnicodeDecodeError, OSError) as e:
                reason = e.message if isinstance(e, VnetError) else str(e)
                if good.exists():
                    try:
                        net = self._add_forwards(
                            self.parse(name, good.read_text(encoding="utf-8")), problems)
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
            if parsed.forwards:
                # forwards written inline by hand move to their directory, one file each
                for f in parsed.forwards:
                    self.save_forward(name, f)
                net = self._add_forwards(net.with_changes(forwards=()), problems)
                nets[name] = net
                self.save(net)
                continue
            try:
                kept = good.read_bytes()
            except FileNotFoundError:
                kept = None
            if kept == raw:
                continue  # its last good copy is this very text (as vnetd writes both)
            data = render_toml(net.to_dict(forwards=False), HEADER).encode()
            if kept != data:
                atomic_write(good, data, 0o600)
        return nets, problems

    # --- small JSON state files (MAC registry, ports, ...) ------------------------------
    def load_json(self, name: str, default: Any, valid=lambda data: True) -> Any:
        """A durable state file. One that is unreadable or of the wrong shape is reported,
        kept as NAME.bad, and its last good copy (NAME.prev) is used and written back at once,
        so a second restart finds it too; a missing file with a .prev left is recovered the
        same way."""
        path = self.state_dir / name
        prev = path.with_name(path.name + ".prev")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if valid(data):
                return data
            raise ValueError("it does not hold what it should")
        except FileNotFoundError:
            if not prev.exists():
                return default
            log.error("state file %s is missing; recovering its last good copy %s", path, prev)
        except (ValueError, OSError) as e:
            backup = path.with_name(path.name + ".bad")
            log.error("state file %s is unreadable (%s); kept it as %s and using %s", path, e,
                      backup, prev)
            with contextlib.suppress(OSError):
                os.replace(path, backup)
        try:
            data = json.loads(prev.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            log.error("no usable last good copy of %s: starting it empty", path)
            return default
        if not valid(data):
            log.error("no usable last good copy of %s: starting it empty", path)
            return default
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode(), 0o600)
        return data

    def save_json(self, name: str, data: Any) -> None:
        path = self.state_dir / name
        # compact: json's C encoder (the MAC registry's files grow to megabytes, and an
        # indented dump, pure Python, holds the interpreter lock twice as long)
        text = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        if path.exists():  # keep the last good copy (a copy: damage in place must not reach it)
            try:
                self.write_runtime_file(path.with_name(path.name + ".prev"), path.read_bytes())
            except OSError:
                pass
        atomic_write(path, text, 0o600)

    def remove_json(self, name: str) -> None:
        """A durable state file gone, and its last good copy first (or load_json would
        bring the file back from it)."""
        path = self.state_dir / name
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + ".prev").unlink()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            fsync_dir(path.parent)

    # --- runtime state (gone at reboot, kept across daemon restarts) ---------------------
    def load_runtime_json(self, name: str, default: Any) -> Any:
        try:
            return json.loads((self.runtime_dir / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return default
        except (ValueError, OSError) as e:
            log.error("runtime file %s is unreadable (%s); starting from empty", name, e)
            return default

    # --- intents: "vnetd is creating this interface" ------------------------------------
    # An interface gets vnetd's alias in a second netlink request after it is created; a
    # crash between the two would leave an interface nobody recognizes. So the name is
    # written down first and crossed out once the alias is on it; reconcile removes any
    # interface still named in an intent and lacking the alias.
    def intent(self, ifname: str) -> contextlib.AbstractContextManager:
        d = self.runtime_dir / "intents"
        d.mkdir(exist_ok=True)
        path = d / validate_ifname(ifname, "interface name")

        @contextlib.contextmanager
        def cm():
            self.write_runtime_file(path, b"")
            try:
                yield
            finally:
                path.unlink(missing_ok=True)
        return cm()

    def intents(self) -> list[str]:
        d = self.runtime_dir / "intents"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def clear_intent(self, ifname: str) -> None:
        (self.runtime_dir / "intents" / ifname).unlink(missing_ok=True)

    @staticmethod
    def write_runtime_file(path: Path, data: bytes, new: bool = False) -> None:
        """Atomic (rename) but not fsynced: runtime state lives on tmpfs. Root's only: a
        port's record names its VM, MAC and user, a registry's last copy every VM's. (A few
        system calls and no file object: a port's record is on the attach path.)

        `new`: the file should not exist yet (a new port's record), so it is made in place,
        in three system calls rather than five. A crash between its creation and its write
        leaves it empty, and the ports' adoption removes an empty record. If it does exist
        (left by a crash), it is replaced atomically as any other."""
        if new:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                pass
            else:
                try:
                    _write_all(fd, data)
                finally:
                    os.close(fd)
                return
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.fchmod(fd, 0o600)  # a file left by an older vnetd keeps its mode otherwise
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def save_runtime_json(self, name: str, data: Any) -> None:
        atomic_write(self.runtime_dir / name, json.dumps(data, sort_keys=True).encode(), 0o600,
                     durable=False)
