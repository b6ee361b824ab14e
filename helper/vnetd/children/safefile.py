"""Files vnetd opens where a child could have planted something: never follow a symbolic
link, never open anything but a regular file, never read without a bound.

vnetd runs as root (without CAP_DAC_OVERRIDE, CAP_CHOWN, CAP_FOWNER), so a path it follows is
followed with root's ownership: a symbolic link that a compromised child left in a directory
the child may write would make vnetd change, create or read a file of root's choosing. Every
file below is opened with O_NOFOLLOW and checked on the open descriptor (fstat), and changed
through that descriptor (fchown, fchmod), so nothing is looked up twice.

* read_capped: lease files (dnsmasq's, dhcpd's). O_NONBLOCK so a FIFO cannot block the event
  loop; regular files only; at most `cap` bytes.
* prepare_shared_file: dhcpd's lease file, in a directory group vnet-dhcp may write.
* write_pid_file: a child's pid file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from pathlib import Path

log = logging.getLogger("vnetd.files")

LEASE_FILE_CAP = 16 * 1024 * 1024  # far beyond any real lease file (a /16 is a few MiB)

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read_capped(path: Path | str, cap: int = LEASE_FILE_CAP) -> str | None:
    """The text of the regular file `path`, or None: missing, a symbolic link, not a regular
    file, unreadable, or larger than `cap` bytes (each but the first is logged)."""
    try:
        fd = os.open(path, _READ)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            log.warning("%s is a symbolic link: not read", path)
        else:
            log.warning("cannot read %s: %s", path, e.strerror)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.warning("%s is not a regular file: not read", path)
            return None
        if st.st_size > cap:
            log.warning("%s has %d bytes, more than the %d read: ignored", path, st.st_size, cap)
            return None
        chunks: list[bytes] = []
        total = 0
        while True:
            b = os.read(fd, min(1 << 20, cap + 1 - total))
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > cap:  # it grew while being read
                log.warning("%s grew beyond %d bytes: ignored", path, cap)
                return None
    except OSError as e:
        log.warning("cannot read %s: %s", path, e.strerror)
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def prepare_shared_file(path: Path, gid: int, mode: int = 0o664) -> None:
    """Make `path`, in a directory that group `gid` may write, a file that group may append to
    (dhcpd's lease file before its first rewrite).

    * missing: created (O_CREAT|O_EXCL, which never follows a link), given `gid` and `mode`;
    * a regular file of ours with one link: given `gid` and `mode` through its descriptor;
    * a regular file of another user (dhcpd's own, after its first rewrite): left alone;
    * anything else (a symbolic link, a FIFO, a directory, or a file of ours with more than
      one link, which may be a hard link to another of root's files): its name is removed or
      moved aside, with a warning, and a fresh empty file made.
    Raises OSError if that keeps failing (someone keeps planting)."""
    path = Path(path)
    me = os.geteuid()
    for _ in range(5):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if _create(path, gid, mode):
                return
            continue  # planted in between: look again
        if not stat.S_ISREG(st.st_mode):
            _discard(path, "a symbolic link" if stat.S_ISLNK(st.st_mode)
                     else "not a regular file")
            continue
        if st.st_uid != me:
            return  # the child's own file (its rewrite renamed it into place): nothing to do
        try:
            fd = os.open(path, _READ)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno == errno.EACCES:  # ours but mode 0: not one vnetd made
                _discard(path, "a file vnetd cannot read")
                continue
            if e.errno in (errno.ELOOP, errno.ENXIO):
                continue  # replaced since lstat: look again
            raise
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                continue  # replaced since lstat: look again
            if stat.S_ISREG(fst.st_mode) and fst.st_uid == me and fst.st_nlink == 1:
                os.fchown(fd, -1, gid)
                os.fchmod(fd, mode)
                return
            what = f"a file with {fst.st_nlink} links"
        finally:
            os.close(fd)
        _discard(path, what)
    raise OSError(errno.EEXIST, f"{path} keeps being replaced")


def _create(path: Path, gid: int, mode: int) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
    except FileExistsError:
        return False  # planted in between: look again
    try:
        os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)  # the umask took the group's write bit
    finally:
        os.close(fd)
    return True


def _discard(path: Path, what: str) -> None:
    """Remove the name `path` (never what it points to); a directory is moved aside."""
    log.warning("%s is %s (left by a child?): replacing it with a new empty file", path, what)
    try:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    except OSError as e:
        if e.errno not in (errno.EISDIR, errno.EPERM):
            raise
    aside = unique_aside(path, "bad")
    log.warning("moving %s aside to %s", path, aside)
    os.rename(path, aside)


def unique_aside(path: Path, tag: str) -> Path:
    """A free name next to `path` to move it aside to: NAME.TAG-YYYYmmdd-HHMMSS[-N]."""
    path = Path(path)
    base = f"{path.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside = path.with_name(base)
    n = 1
    while os.path.lexists(aside):
        aside = path.with_name(f"{base}-{n}")
        n += 1
    return aside


def write_pid_file(path: Path, pid: int) -> None:
    """Write a child's pid. O_NOFOLLOW: a symbolic link in its place makes this fail (ELOOP)
    instead of writing through it; O_NONBLOCK: a FIFO cannot block; only a regular file is
    truncated and written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                 | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        os.ftruncate(fd, 0)
        os.write(fd, f"{pid}\n".encode())
    finally:
        os.close(fd)
