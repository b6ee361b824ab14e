"""Reader of qemu-bridge-helper's `/etc/qemu/bridge.conf` (and the files it includes), and
the polkit rules that give the same groups the same networks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vnet_common.limits import MAX_IFNAME
from vnet_common.names import IFNAME_RE as _IFNAME_RE
from vnet_common.toml import comment as _comment
from vnet_common.wire import ATTACH

from .records import Finding, MigrationError
from .text import _read_text, _short


@dataclass
class BridgeAcl:
    """Who may attach to which bridge, per group: `allow` lines of a file belong to the group
    that owns the file (qemu-bridge-helper's convention: bridge.conf root:qemu 0640, an
    included bob.conf root:bob 0640). A deny wins over an allow, as in the helper."""

    allow: dict[str, set[str]] = field(default_factory=dict)  # group -> bridges ("*": all)
    deny: dict[str, set[str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def networks(self, group: str) -> tuple[list[str] | None, list[str]]:
        """(the networks `group` may attach to, None for every network; the networks
        excepted from 'every')."""
        allow, deny = self.allow.get(group, set()), self.deny.get(group, set())
        if "*" in deny or not allow:
            return [], []
        if "*" in allow:
            return None, sorted(deny)
        return sorted(allow - deny), []


def read_bridge_conf(path: str | Path, group_of: Any,
                     group: str | None = None) -> BridgeAcl:
    """Read bridge.conf and the files it includes. `group_of(path)` names the group owning a
    file (the caller looks it up; this reader opens files only); `group` overrides it for
    every file. Raises MigrationError naming the line for what is not an ACL line."""
    acl = BridgeAcl()
    seen: set[Path] = set()

    def one(p: Path, depth: int) -> None:
        if depth > 8:
            raise MigrationError(p, 0, "includes nest more than 8 deep (a loop?).")
        if p.resolve() in seen:
            acl.findings.append(Finding(str(p), 0, "", "included again: read once."))
            return
        seen.add(p.resolve())
        file = str(p)
        text = _read_text(p, file)
        g = group or group_of(p)
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            words = line.split()
            if len(words) != 2 or words[0] not in ("allow", "deny", "include"):
                raise MigrationError(file, n, f"'{_short(line, 40)}' is not 'allow BRIDGE', "
                                     "'deny BRIDGE' or 'include FILE'.")
            kw, arg = words
            if kw == "include":
                inc = Path(arg) if Path(arg).is_absolute() else p.parent / arg
                if not inc.is_file():
                    acl.findings.append(Finding(file, n, raw.strip(), f"{arg} does not exist: "
                                                "nothing read from it."))
                    continue
                one(inc, depth + 1)
                continue
            if arg != "all" and (not _IFNAME_RE.fullmatch(arg)
                                 or len(arg.encode()) > MAX_IFNAME):
                raise MigrationError(file, n, f"'{_short(arg)}' is not a bridge name.")
            if g is None:
                acl.findings.append(Finding(file, n, raw.strip(), "the file's group has no "
                                            "name here: not carried over (give --group)."))
                continue
            target = acl.allow if kw == "allow" else acl.deny
            target.setdefault(g, set()).add("*" if arg == "all" else arg)
            if kw == "allow" and arg != "all":
                acl.findings.append(Finding(file, n, raw.strip(), f"members of group {g} may "
                                            f"attach VMs to {arg}."))

    one(Path(path), 0)
    return acl


def render_bridge_acl_rules(acl: BridgeAcl, source: str) -> str:
    """A polkit rules file (JavaScript) that gives the same groups the attach action on the
    same networks. It only grants: a user it does not match falls through to the next rules
    file (50-qemu-vnet.rules: group vnet)."""
    lines = [f"// qemu-vnet: who may attach VMs to which network, from {_comment(source)}",
             "// (qemu-bridge-helper's access list), written by vnet-client import-bridge-conf.",
             "// Install as /etc/polkit-1/rules.d/40-qemu-vnet-bridge-conf.rules.",
             "polkit.addRule(function(action, subject) {",
             f'    if (action.id != "{ATTACH}") {{',
             "        return polkit.Result.NOT_HANDLED;",
             "    }",
             '    var network = action.lookup("network");']
    for g in sorted(set(acl.allow) | set(acl.deny)):
        allow, deny = acl.allow.get(g, set()), acl.deny.get(g, set())
        if not allow or "*" in deny:
            continue
        if "*" in allow:
            test = "true" if not deny else \
                f"{_js_list(sorted(deny))}.indexOf(network) < 0"
        else:
            names = sorted(allow - deny)
            if not names:
                continue
            test = f"{_js_list(names)}.indexOf(network) >= 0"
        lines += [f"    if (subject.isInGroup({_js_str(g)}) && {test}) {{",
                  "        return polkit.Result.YES;",
                  "    }"]
    lines += ["    return polkit.Result.NOT_HANDLED;", "});"]
    return "\n".join(lines) + "\n"


def _js_str(s: str) -> str:
    return '"' + "".join(c if c.isalnum() or c in "_.-" else f"\\u{ord(c):04x}" for c in s) + '"'


def _js_list(names: list[str]) -> str:
    return "[" + ", ".join(_js_str(n) for n in names) + "]"
