"""Run Python snippets as the test users (with the venv's interpreter, outside /root)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import textwrap

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


def read_json(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
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
