"""Reader of ISC dhcpd's `dhcpd.conf`: its tokens and statements (`Token`, `Statement`)."""

from __future__ import annotations

from .records import MigrationError, Statement, Token


def _dhcpd_tokens(text: str, file: str) -> list[Token]:
    toks: list[Token] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{};,":
            toks.append(Token(c, c, line))
            i += 1
        elif c == '"':
            start_line, j, buf = line, i + 1, []
            while True:
                if j >= n:
                    raise MigrationError(file, start_line, 'unterminated string (").')
                if text[j] == "\\" and j + 1 < n:
                    buf.append(text[j + 1])
                    j += 2
                    continue
                if text[j] == '"':
                    break
                if text[j] == "\n":
                    line += 1
                buf.append(text[j])
                j += 1
            toks.append(Token("string", "".join(buf), start_line))
            i = j + 1
        else:
            j = i
            while j < n and text[j] not in " \t\r\n#{};,\"":
                j += 1
            toks.append(Token("word", text[i:j], line))
            i = j
    return toks


def _dhcpd_parse(toks: list[Token], file: str) -> list[Statement]:
    pos = 0

    def block(depth: int, opened: int) -> list[Statement]:
        nonlocal pos
        out: list[Statement] = []
        words: list[Token] = []
        while pos < len(toks):
            tk = toks[pos]
            pos += 1
            if tk.kind == ";":
                if words:
                    out.append(Statement(words, None, words[0].line))
                words = []
            elif tk.kind == "{":
                if not words:
                    raise MigrationError(file, tk.line, "a '{' block without a declaration "
                                         "before it.")
                inner = block(depth + 1, tk.line)
                out.append(Statement(words, inner, words[0].line))
                words = []
            elif tk.kind == "}":
                if depth == 0:
                    raise MigrationError(file, tk.line, "'}' without a matching '{'.")
                if words:
                    raise MigrationError(file, words[0].line, "statement not ended with ';' "
                                         "before '}'.")
                return out
            else:
                words.append(tk)
        if depth:
            raise MigrationError(file, opened, "the block opened here ('{') is never closed.")
        if words:
            raise MigrationError(file, words[0].line, "statement not ended with ';'.")
        return out

    return block(0, 0)
