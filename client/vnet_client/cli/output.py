"""Output: tables, user names, times, and errors (a sentence, or one JSON object)."""

from __future__ import annotations

import functools
import json
import os
import pwd
import sys
import time

from .parser import Failure, wants_json


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [head, *rows])


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str:
    """A uid as people read it: 'alice (1000)', or the number alone."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except (KeyError, TypeError, OverflowError):
        return str(uid)


def when(expiry: int) -> str:
    if not expiry:
        return "never"
    left = expiry - int(time.time())
    return f"in {left // 60} min" if left > 0 else "expired"


def say_error(argv: list[str], name: str, message: str, code: int) -> int:
    """An error on stderr: the sentence, or with --json one object {"error", "message"}."""
    if wants_json(argv):
        print(json.dumps({"error": name, "message": message}), file=sys.stderr)
    else:
        print(f"vnet-client: {message}", file=sys.stderr)
        if os.environ.get("VNET_CLIENT_DEBUG") and "." in name:
            print(f"  ({name})", file=sys.stderr)
    return code


def read_text(path: str) -> str:
    """A UTF-8 text file's text; Failure, in one sentence, for one that cannot be read or is
    not UTF-8 (naming the file, and the line of the first byte that is not)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise Failure(f"cannot read {path}: {e.strerror or e}.") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise Failure(f"cannot read {path}: it is not UTF-8 text (line {line} has the byte "
                      f"0x{raw[e.start]:02x}).") from None
