"""Reader of the shell files qemu-vlan sourced (`<br>.conf`, a `-c/--cf` file): their
assignments as `Assignment` records."""

from __future__ import annotations

import bisect
import re
from pathlib import Path

from .records import Assignment, MigrationError
from .text import _NAME_RE, _read_text, _short


class _Shell:
    """Reads the assignments of a shell file the original script sourced: `KEY=value`,
    `export KEY=value`, several on a line, '...' and "..." quoting (over several lines too),
    backslash escapes and continuations, `$KEY`/`${KEY}` of keys set earlier, `# comments`,
    and `: ${KEY:=value}` defaults. Anything else is a command it cannot run: MigrationError."""

    def __init__(self, path: Path, text: str, env: dict[str, str]):
        self.file = str(path)
        self.text = text
        self.env = dict(env)
        self.lines = text.splitlines()
        self.starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
        self.out: list[Assignment] = []
        self.pending: list[Assignment] = []

    def line_of(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos)

    def line_text(self, n: int) -> str:
        return self.lines[n - 1].strip() if 0 < n <= len(self.lines) else ""

    def error(self, pos: int, message: str) -> MigrationError:
        return MigrationError(self.file, self.line_of(pos), message)

    def parse(self) -> list[Assignment]:
        t, pos, n = self.text, 0, len(self.text)
        while pos < n:
            c = t[pos]
            if c in " \t\r\n;":
                pos += 1
            elif c == "#":
                pos = self._eol(pos)
            elif t.startswith("\\\n", pos):
                pos += 2
            else:
                pos = self._statement(pos)
        return self.out

    def _eol(self, pos: int) -> int:
        end = self.text.find("\n", pos)
        return len(self.text) if end < 0 else end

    def _blanks(self, pos: int) -> int:
        t = self.text
        while pos < len(t):
            if t[pos] in " \t\r":
                pos += 1
            elif t.startswith("\\\n", pos):
                pos += 2
            else:
                break
        return pos

    def _statement(self, pos: int) -> int:
        t = self.text
        first = True
        mode = "assign"
        while True:
            pos = self._blanks(pos)
            if pos >= len(t) or t[pos] in "\n;":
                return pos
            if t[pos] == "#":
                return self._eol(pos)
            start = pos
            raw_end = self._raw_end(pos)
            raw = t[start:raw_end]
            if first and raw in ("export", "readonly"):
                mode, first, pos = "export", False, raw_end
                continue
            if first and raw == ":":
                mode, first, pos = "noop", False, raw_end
                continue
            first = False
            m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)=", raw)
            if mode == "noop":
                value, problem, _, pos = self._word(start)  # only ${KEY:=value} matters
            elif m:
                value, problem, lines, pos = self._word(start)
                key = m.group(1)
                cut = len(key) + 1
                line = self.line_of(start)
                self._record(Assignment(key, value[cut:], line, self.line_text(line), problem,
                                     lines[cut:]))
            elif mode == "export" and _NAME_RE.fullmatch(raw):
                pos = raw_end  # `export KEY`: nothing assigned
            else:
                raise self.error(start, f"'{_short(raw, 40)}' is not a KEY=VALUE assignment: a "
                                 "qemu-vlan configuration file holds only assignments and "
                                 "comments (a command here cannot be carried over).")
            self._flush()

    def _record(self, a: Assignment) -> None:
        self._flush()
        self.out.append(a)
        if a.problem is None:
            self.env[a.key] = a.value
        else:
            self.env.pop(a.key, None)

    def _flush(self) -> None:
        while self.pending:
            a = self.pending.pop(0)
            self.out.append(a)
            self.env[a.key] = a.value

    def _raw_end(self, pos: int) -> int:
        """Where the word starting at pos ends, without interpreting it (quotes skipped)."""
        t = self.text
        while pos < len(t) and t[pos] not in " \t\r\n;":
            c = t[pos]
            if c == "\\":
                pos += 2
            elif c in "'\"":
                end = self._close_quote(pos)
                pos = end + 1
            elif t.startswith("${", pos):
                end = t.find("}", pos)
                pos = len(t) if end < 0 else end + 1
            else:
                pos += 1
        return min(pos, len(t))

    def _close_quote(self, pos: int) -> int:
        t, q = self.text, self.text[pos]
        i = pos + 1
        while i < len(t):
            if t[i] == q:
                return i
            if q == '"' and t[i] == "\\":
                i += 1
            i += 1
        kind = "single" if q == "'" else "double"
        raise self.error(pos, f"unterminated {kind} quote ({q}): the value opened here is never "
                         "closed.")

    def _word(self, pos: int) -> tuple[str, str | None, list[int], int]:
        """Reads one word from pos: (value, problem, the line of each value char, end)."""
        t = self.text
        out: list[str] = []
        lines: list[int] = []
        problem: str | None = None

        def put(s: str, at: int) -> None:
            ln = self.line_of(at)
            out.append(s)
            lines.extend([ln] * len(s))

        while pos < len(t):
            c = t[pos]
            if c in " \t\r\n;":
                break
            if c in "|&<>()":
                raise self.error(pos, f"'{c}' is shell syntax a configuration file reader does "
                                 "not run: only KEY=VALUE assignments and comments are read.")
            if c == "\\":
                if pos + 1 < len(t) and t[pos + 1] != "\n":
                    put(t[pos + 1], pos + 1)
                pos += 2
            elif c == "'":
                end = self._close_quote(pos)
                for i in range(pos + 1, end):
                    put(t[i], i)
                pos = end + 1
            elif c == '"':
                end = self._close_quote(pos)
                i = pos + 1
                while i < end:
                    ch = t[i]
                    if ch == "\\" and t[i + 1] in '$`"\\\n':
                        if t[i + 1] != "\n":
                            put(t[i + 1], i + 1)
                        i += 2
                    elif ch in "$`":
                        at = i
                        i, val, prob = self._dollar(i, end)
                        put(val, at)
                        problem = problem or prob
                    else:
                        put(ch, i)
                        i += 1
                pos = end + 1
            elif c in "$`":
                at = pos
                pos, val, prob = self._dollar(pos, len(t))
                put(val, at)
                problem = problem or prob
            else:
                put(c, pos)
                pos += 1
        return "".join(out), problem, lines, pos

    def _dollar(self, pos: int, limit: int) -> tuple[int, str, str | None]:
        """An expansion at pos ($KEY, ${KEY}, ${KEY:-x}, ${KEY:=x}, $(..), `..`):
        (end, value, problem or None)."""
        t = self.text
        if t[pos] == "`":
            end = t.find("`", pos + 1, limit)
            if end < 0:
                raise self.error(pos, "unterminated command substitution (`).")
            return end + 1, "", f"it runs a command ({_short(t[pos:end + 1], 40)})"
        nxt = t[pos + 1] if pos + 1 < limit else ""
        if nxt == "(":
            depth, i = 0, pos + 1
            while i < limit:
                if t[i] == "(":
                    depth += 1
                elif t[i] == ")":
                    depth -= 1
                    if depth == 0:
                        return i + 1, "", f"it runs a command ({_short(t[pos:i + 1], 40)})"
                i += 1
            raise self.error(pos, "unterminated command substitution $(.")
        if nxt == "{":
            end = t.find("}", pos + 2, limit)
            if end < 0:
                raise self.error(pos, "unterminated ${ expansion.")
            inner = t[pos + 2:end]
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-=])(.*))?", inner, re.DOTALL)
            if not m:
                return end + 1, "", f"it uses the shell expansion ${{{_short(inner, 30)}}}"
            name, colon, op, word = m.groups()
            have = self.env.get(name)
            if op is None:
                if have is None:
                    return end + 1, "", f"it uses ${name}, which this file does not set"
                return end + 1, have, None
            word = word.strip("'\"") if word and "$" not in word else (word or "")
            if "$" in word or "`" in word:
                return end + 1, "", f"it uses the shell expansion ${{{_short(inner, 30)}}}"
            unset = have is None or (colon == ":" and have == "")
            if not unset:
                return end + 1, have or "", None
            if op == "=":
                line = self.line_of(pos)
                self.pending.append(Assignment(name, word, line, self.line_text(line), None,
                                            [line] * len(word)))
            return end + 1, word, None
        m = _NAME_RE.match(t, pos + 1, limit)
        if m:
            name = m.group()
            if name not in self.env:
                return m.end(), "", f"it uses ${name}, which this file does not set"
            return m.end(), self.env[name], None
        if nxt and (nxt.isdigit() or nxt in "@*#?$!-"):
            return pos + 2, "", f"it uses the shell parameter ${nxt}"
        return pos + 1, "$", None


def read_shell_assignments(path: str | Path, br: str) -> dict[str, tuple[str, int]]:
    """The KEY=value assignments of a file qemu-vlan sourced (its `-c/--cf` file), the last
    of each key, with its line: what the compatible command line reads. A value that needs
    a shell (a command, an unknown variable) or a line that is not an assignment raises
    MigrationError naming the line."""
    p = Path(path)
    text = _read_text(p, str(p))
    out: dict[str, tuple[str, int]] = {}
    for a in _Shell(p, text, {"br": br}).parse():
        if a.problem is not None:
            raise MigrationError(p, a.line, f"'{a.key}' cannot be read without running a "
                                 f"shell ({a.problem}).")
        out[a.key] = (a.value, a.line)
    return out
