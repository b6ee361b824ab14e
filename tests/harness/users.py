"""Run Python snippets as the test users (with the venv's interpreter, outside /root)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import textwrap
import time

from .daemon import PY, as_user

SCRIPT_DIR = tempfile.mkdtemp(prefix="vnet-test-scripts-")
os.chmod(SCRIPT_DIR, 0o755)

PRELUDE = """\
import asyncio, fcntl, json, os, struct, sys
from vnet_client import Client, VnetClientError
TUNGETIFF, TUNSETPERSIST = 0x800454D2, 0x400454CB
def tap_name(fd):
    return struct.unpack("16sH22x", fcntl.ioctl(fd, TUNGETIFF, bytes(40)))[0]\
.rstrip(b"\\0").decode()
"""


def script(code: str) -> str:
    path = tempfile.mktemp(dir=SCRIPT_DIR, suffix=".py")
    with open(path, "w") as f:
        f.write(PRELUDE + textwrap.dedent(code))
    os.chmod(path, 0o644)
    return path


def run_as(user: str | None, code: str, *args: str, timeout: float = 60,
           input: str | None = None) -> subprocess.CompletedProcess:
    argv = [str(PY), script(code), *args]
    if user:
        argv = as_user(user, argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)


def spawn_as(user: str | None, code: str, *args: str) -> subprocess.Popen:
    """A long-lived process; it reads commands from stdin, answers JSON lines on stdout."""
    argv = [str(PY), script(code), *args]
    if user:
        argv = as_user(user, argv)
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)


class _Lines:
    """A child's stdout split into lines, read from its raw descriptor.

    select() on the pipe and then readline() on the buffered file loses lines: when two lines
    arrive in one read, readline() returns the first and keeps the second in its buffer, and
    the next select() waits for bytes that already came (a reply that came right behind its
    'sent' mark looked lost). This keeps its own buffer, so a line read early is never waited
    for again."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = b""
        self.eof = False

    def line(self, timeout: float | None) -> str | None:
        """The next line (with its newline), '' once the child closed its end, None if none
        came in `timeout` seconds (None: wait as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf and not self.eof:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if chunk:
                self.buf += chunk
            else:
                self.eof = True
        if b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            return line.decode(errors="replace") + "\n"
        line, self.buf = self.buf, b""
        return line.decode(errors="replace")


def read_line(proc: subprocess.Popen, timeout: float | None = None) -> str | None:
    """The next line `proc` printed: '' once it closed stdout, None after `timeout` seconds
    with none. Read every line of one process through this (never proc.stdout.readline())."""
    lines = proc.__dict__.get("_vnet_lines")
    if lines is None:
        lines = proc.__dict__["_vnet_lines"] = _Lines(proc.stdout.fileno())
    return lines.line(timeout)


def read_json(proc: subprocess.Popen, timeout: float | None = None) -> dict:
    line = read_line(proc, timeout)
    if line is None:
        raise AssertionError(f"process {proc.pid} printed nothing in {timeout} s")
    if not line:
        raise AssertionError(f"process ended: {proc.stderr.read()}")
    return json.loads(line)


# A holder: attaches, reports, then obeys 'persist' / 'exit' lines on stdin.
HOLDER = """
network, vm = sys.argv[1], sys.argv[2]
queues = int(sys.argv[3]) if len(sys.argv) > 3 else 1
learn = len(sys.argv) > 4 and sys.argv[4] == "learn"
async def main():
    async with Client() as c:
        try:
            a = await c.attach(network, vm, queues=queues, vhost=True, learn_mac=learn)
        except VnetClientError as e:
            print(json.dumps({"error": e.name, "message": e.message}), flush=True)
            return
        print(json.dumps({"ifname": a.ifname, "mac": a.mac, "fds": len(a.fds),
                          "tun": [tap_name(fd) for fd in a.fds], "info": a.info,
                          "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "persist":
            fcntl.ioctl(a.fds[0], TUNSETPERSIST, 1)
            print(json.dumps({"persist": True}), flush=True)
        elif cmd.startswith("write "):  # a raw frame, after the 10-byte virtio-net header
            os.write(a.fds[0], bytes(10) + bytes.fromhex(cmd[6:]))
            print(json.dumps({"written": True}), flush=True)
        elif cmd == "close":
            a.close()
            print(json.dumps({"closed": True}), flush=True)
        elif cmd == "exit":
            break
asyncio.run(main())
"""
