"""A polkit text agent for one command, the way systemctl does it.

polkit consults a --fallback agent only through a login session, so where there is none (no
logind, as in containers and CI) the agent is registered for this very process:
`pkttyagent --process <our pid> --notify-fd N`. polkit finds it for our bus name because it
maps the system-bus-name subject to our process. pkttyagent closes the notify fd once it is
registered; only then is the call made.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when an agent starts: most commands never need one
    import subprocess


def _which(name: str) -> str | None:
    import shutil  # (only here: most commands never look for an agent, and shutil costs ms)

    return shutil.which(name)


class TextAgent:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def wanted() -> bool:
        return os.geteuid() != 0 and sys.stdin.isatty() and _which("pkttyagent") is not None

    def start(self) -> bool:
        import subprocess

        exe = _which("pkttyagent")
        if exe is None:
            return False
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [exe, "--process", str(os.getpid()), "--notify-fd", str(w)],
                pass_fds=(w,), stdin=None, stdout=None, stderr=None,
            )
        except OSError:
            os.close(r)
            os.close(w)
            return False
        os.close(w)
        # Wait until it has registered (it closes its end) or died.
        try:
            while os.read(r, 64):
                pass
        finally:
            os.close(r)
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import subprocess

            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> TextAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
