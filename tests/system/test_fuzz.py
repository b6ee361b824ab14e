"""Fuzzing the D-Bus API.

Hypothesis generates batches of calls for every method of the contract (read from
dbus/org.qemuvnet.Vnet1.xml, so new methods are fuzzed too): arguments of the right types,
aimed at the networks that exist or hostile (overlong, '/', '..', control and odd Unicode
characters, shell metacharacters, host interface names, edge and huge numbers, option dicts
with random keys and wrongly typed or deeply nested variants), wrong signatures, empty bodies,
unix fds nobody asked for, calls off the contract and signals sent straight to the service.
Each batch is sent by root, by vnet-test-alice (group vnet) or by vnet-test-bob (outside it).

Properties: the daemon never dies and keeps answering ListNetworks; every refusal is a named
error (org.qemuvnet.Vnet1.Error.*, or InvalidArgs, UnknownMethod, AccessDenied,
InteractiveAuthorizationRequired), never an internal error, NoReply or a timeout; nothing is
allowed without its polkit action; the daemon keeps no fd it was sent; no Traceback in its log;
and once everything the fuzzer defined is stopped and undefined, the namespace holds exactly
what it held before (links, addresses, nft tables, child processes) and no definition file is
left.

Profiles: VNET_FUZZ_CALLS (default 1500, the CI size; the nightly size is 10000) calls in
batches of 20; VNET_FUZZ_SEED makes a run reproducible (a random seed otherwise, printed with
every failure); VNET_FUZZ_TRACE=FILE appends every call and its outcome to FILE.

The tests after the fuzzer are the smallest reproducers of what it found, kept so that each
bug has a plain, deterministic test of its own.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.harness.daemon import ALICE, uid_of
from tests.harness.fuzz import (
    FLAG_NO_REPLY,
    MANAGER_PATH,
    MTYPE_SIGNAL,
    Worker,
    abbreviate,
    any_call,
    fd_count,
    foreign_log_lines,
    judge,
    load_contract,
    pick,
)

CALLS = int(os.environ.get("VNET_FUZZ_CALLS") or 1500)
SEED = int(os.environ.get("VNET_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
BATCH = 20
FD_SLACK = 24  # fds the daemon may hold for ports a worker still holds (pidfds...) and the like
CALLERS = ("root",) * 9 + ("alice",) * 9 + ("bob",) * 2
GONE = ("org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner")  # what a caller gets when the daemon died
TRACE = os.environ.get("VNET_FUZZ_TRACE")  # a file to append every call and outcome to


class DaemonDied(Exception):
    pass


def tables(vnetd) -> list[tuple[str, str]]:
    out = json.loads(vnetd.exec("nft", "-j", "list", "tables").stdout or "{}")
    return sorted((t["table"]["family"], t["table"]["name"])
                  for t in out.get("nftables", []) if "table" in t)


def children(vnetd) -> list[int]:
    return sorted(p for p in vnetd.children() if p != vnetd.proc.pid)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


def world_networks() -> dict[str, tuple[list, bool]]:
    """The networks the fuzzer aims at: name -> (options, running). Put back after every
    batch, so that root's Stop/Undefine calls leave the other callers something to use."""
    return {
        "vnet2": ([], True),  # nat, dnsmasq
        "vnet3": ([["mode", ["s", "host-only"]], ["dhcp", ["s", "none"]], ["taps", ["i", 2]],
                   ["tap-user", ["u", uid_of(ALICE)]]], True),  # pre-created taps alice owns
        "vnet4": ([["dhcp", ["s", "none"]]], False),  # defined, stopped
    }


def manager_call(member: str, sig: str, body: list) -> dict:
    return {"kind": "contract", "mode": "typed", "method": f"Manager.{member}",
            "path": MANAGER_PATH, "iface": "org.qemuvnet.Vnet1.Manager", "member": member,
            "sig": sig, "body": body}


def restore(root: Worker) -> list[tuple[dict, dict]]:
    """Define and start what is missing of world_networks(); the calls made and their
    outcomes. (They may be refused: the fuzzer may have defined a network in the way, say.
    The caller judges them like the fuzzer's own.)"""
    nets = root.call("ListNetworks", want_body=True)
    if not nets.get("ok"):
        return [(manager_call("ListNetworks", "", []), nets)]
    state = {n["name"]: n.get("state") for n in nets["body"][0]}
    done = []
    for name, (opts, running) in world_networks().items():
        if name not in state:
            call = manager_call("Define", "sa{sv}", [name, opts])
            done.append((call, root.run([call])[0]))
            if not done[-1][1].get("ok"):
                continue
        if running and state.get(name) != "running":
            call = manager_call("Start", "s", [name])
            done.append((call, root.run([call])[0]))
    return done


@pytest.fixture(scope="module")
def world(vnetd):
    """An interface vnetd did not make, and what the namespace held before any network."""
    vnetd.ip("link", "add", "hostnic0", "type", "veth", "peer", "name", "hostnic0p")
    return {"snapshot": vnetd.snapshot(), "tables": tables(vnetd), "children": children(vnetd)}


def raise_problems(problems: list[tuple[str, dict, str]], errors: dict[str, str]) -> None:
    if not problems:
        return
    with tempfile.NamedTemporaryFile("w", prefix=f"vnet-fuzz-{SEED}-", suffix=".json",
                                     delete=False) as f:
        json.dump([{"where": w, "call": c, "problem": p} for w, c, p in problems], f, indent=1)
    shown = "\n".join(f"- {w}: {p}\n    {json.dumps(abbreviate(c))}" for w, c, p in problems[:25])
    raise AssertionError(
        f"{len(problems)} problem(s) with VNET_FUZZ_SEED={SEED} VNET_FUZZ_CALLS={CALLS} "
        f"(every failing call, in full: {f.name}; worker stderr: "
        f"{ {k: v[-500:] for k, v in errors.items() if v} }):\n{shown}")


def test_fuzz_the_api(vnetd, world):
    print(f"vnet fuzz: VNET_FUZZ_SEED={SEED} VNET_FUZZ_CALLS={CALLS}")
    t0 = time.monotonic()
    methods = load_contract()
    specs = {m.short: m for m in methods}
    workers = {who: Worker(who) for who in ("root", "alice", "bob")}
    pid = vnetd.proc.pid
    log_start = len(vnetd.log())
    problems: list[tuple[str, dict, str]] = []  # (where, call, what is wrong)
    stats: Counter = Counter()
    callers: Counter = Counter()
    progress = {"calls": 0, "batches": 0, "dead": False, "fd_max": 0}
    fd_base = 0

    def health(where: str) -> None:
        if not vnetd.alive():
            problems.append((where, {}, f"vnetd died:\n{vnetd.log()[-3000:]}"))
            progress["dead"] = True
            return
        probe = workers["root"].call("ListNetworks")
        if not probe.get("ok"):
            problems.append((where, {"member": "ListNetworks"}, f"ListNetworks failed: {probe}"))
        n = fd_count(pid)
        progress["fd_max"] = max(progress["fd_max"], n)
        if n > fd_base + FD_SLACK and not progress.get("fd_reported"):
            progress["fd_reported"] = True  # once; the count at the end is checked too
            problems.append((where, {}, f"vnetd holds {n} fds (it held {fd_base} at the start)"))

    pending: dict[str, list[dict]] = {who: [] for who in workers}
    trace = open(TRACE, "a") if TRACE else None  # noqa: SIM115

    def run_batch(who: str) -> None:
        calls, pending[who] = pending[who], []
        progress["batches"] += 1
        where = f"batch {progress['batches']} as {who}"
        outcomes = workers[who].run(calls)
        for i, (call, outcome) in enumerate(zip(calls, outcomes, strict=True)):
            progress["calls"] += 1
            spec = specs.get(call["method"]) if call["kind"] == "contract" else None
            kind = ("ok" if outcome.get("ok") else "sent" if outcome.get("sent")
                    else outcome.get("err", "?").rsplit(".", 1)[-1])
            stats[(call["method"], kind)] += 1
            callers[who] += 1
            wrong = judge(call, outcome, who, spec)
            if trace:
                trace.write(json.dumps({"who": who, "call": abbreviate(call),
                                        "outcome": outcome, "wrong": wrong}) + "\n")
            if wrong and outcome.get("err") in GONE and not vnetd.alive():
                # The daemon died during this batch: name the calls that led up to it (the
                # calls sent without waiting for a reply were still being handled).
                before = range(max(0, i - 6), i + 1)
                last = "\n      ".join(
                    f"{calls[j]['method']} {json.dumps(abbreviate(calls[j]['body']))} "
                    f"flags={calls[j]['flags']} -> {outcomes[j]}" for j in before)
                problems.append((f"{where}, call {i}", call, (
                    f"vnetd died (exit status {vnetd.proc.poll()}); the calls before:\n      "
                    f"{last}\n  its log ends:\n{vnetd.log()[-1500:]}")))
                progress["dead"] = True
                return
            if wrong:
                problems.append((f"{where}, call {i}", call, wrong))
            if "timeout" in outcome:
                progress["dead"] = True  # hung: the worker skipped the rest of the batch
                return
        workers[who].flush()  # the ports this caller attached go away
        health(where)
        if not progress["dead"]:
            for call, outcome in restore(workers["root"]):
                wrong = judge(call, outcome, "root", specs.get(call["method"]))
                if wrong:
                    problems.append((f"{where}, restoring the networks", call, wrong))

    # One call per example: hypothesis then makes every example new (batches drawn in one
    # example would mostly repeat earlier ones). The calls go out in batches per caller.
    @seed(SEED)
    @settings(max_examples=CALLS, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(data=st.data())
    def fuzz(data):
        who = data.draw(pick(CALLERS), label="caller")
        call = data.draw(call_strategy, label="call")
        if progress["dead"]:
            raise DaemonDied  # ends the run (after one more example, which hypothesis replays)
        pending[who].append(call)
        if len(pending[who]) >= BATCH:
            run_batch(who)

    call_strategy = any_call(methods)
    try:
        for call, outcome in restore(workers["root"]):
            assert outcome.get("ok"), (call, outcome)
        progress["fd_max"] = fd_base = fd_count(pid)  # with the networks up
        try:
            fuzz()
        except DaemonDied:
            pass
        for who in workers:
            if pending[who] and not progress["dead"]:
                run_batch(who)
        fuzz_time = time.monotonic() - t0
        for w in workers.values():
            w.flush()
        if progress["dead"]:
            vnetd.kill()  # dead, or hung
            vnetd.start()  # for the next tests; this run's end state says nothing more
        else:
            problems += undo_and_compare(vnetd, world, workers["root"], fd_base)
            log = vnetd.log()[log_start:]
            if "Traceback" in log:
                i = log.index("Traceback")
                problems.append(("vnetd log", {}, "a Traceback:\n" + log[max(0, i - 300):i + 3000]))
            foreign = foreign_log_lines(log)
            if foreign:
                problems.append(("vnetd log", {}, f"{len(foreign)} line(s) its logger did not "
                                 "start (a caller's text with a newline, logged raw?): "
                                 + "; ".join(repr(x[:100]) for x in foreign[:5])))
    finally:
        errors = {who: w.errors() for who, w in workers.items()}
        if trace:
            trace.close()
        for w in workers.values():
            w.close()

    ok = sum(v for (_, kind), v in stats.items() if kind == "ok")
    print(f"vnet fuzz: {progress['calls']} calls in {progress['batches']} batches, "
          f"{fuzz_time:.1f} s fuzzing, {time.monotonic() - t0:.1f} s in all; {ok} accepted; "
          f"vnetd fds {fd_base} -> max {progress['fd_max']}; callers {dict(callers)}")
    for (method, kind), v in sorted(stats.items()):
        print(f"  {method:28} {kind:36} {v}")
    raise_problems(problems, errors)
    assert progress["calls"] >= CALLS, (
        f"only {progress['calls']} of {CALLS} calls were made (VNET_FUZZ_SEED={SEED})")


def undo_and_compare(vnetd, world: dict, root: Worker, fd_base: int) -> list[tuple[str, dict, str]]:
    """Stop and undefine every network (as root), then compare the namespace with the start."""
    problems = []
    nets = root.call("ListNetworks", want_body=True)
    if not nets.get("ok"):
        return [("cleanup", {}, f"ListNetworks failed: {nets}")]
    running = [n for n in nets["body"][0] if n.get("state") == "running"]
    kids = children(vnetd)
    if len(kids) > 2 * len(running):  # dnsmasq, or dhcpd and a DNS-only dnsmasq
        problems.append(("after the run", {}, f"{len(kids)} child processes for "
                         f"{len(running)} running networks: " + "; ".join(map(cmdline, kids))))
    for name in [n["name"] for n in nets["body"][0]]:
        root.call("Stop", "s", [name])
        r = root.call("Undefine", "s", [name])
        if not r.get("ok"):
            problems.append(("cleanup", {"member": "Undefine", "body": [name]},
                             f"could not undefine {name}: {r}"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ports = root.call("ListPorts", want_body=True)
        if ports.get("ok") and not ports["body"][0] and not children(vnetd):
            break
        time.sleep(0.2)
    if not vnetd.alive():
        return [*problems, ("cleanup", {}, f"vnetd died:\n{vnetd.log()[-3000:]}")]
    ports = root.call("ListPorts", want_body=True)
    if not ports.get("ok") or ports["body"][0]:
        problems.append(("cleanup", {}, f"ports left after every fd was closed: {ports}"))
    if vnetd.snapshot() != world["snapshot"]:
        problems.append(("cleanup", {}, "the namespace differs from the start:\n"
                         f"  before {world['snapshot']}\n  after  {vnetd.snapshot()}"))
    if tables(vnetd) != world["tables"]:
        problems.append(("cleanup", {}, f"nft tables {tables(vnetd)}, before {world['tables']}"))
    left = children(vnetd)
    if left != world["children"]:
        problems.append(("cleanup", {}, "child processes left: " + "; ".join(map(cmdline, left))))
    files = sorted(p.name for p in (vnetd.config_dir / "networks").glob("*"))
    if files:
        problems.append(("cleanup", {}, f"definition files left: {files}"))
    pid = vnetd.proc.pid
    if fd_count(pid) > fd_base + 4:
        fds = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
        problems.append(("cleanup", {}, f"vnetd holds {len(fds)} fds, {fd_base} at the start: "
                         + ", ".join(fds)))
    return problems


def test_fds_sent_off_the_methods_are_not_kept(vnetd, world):
    """What the fuzzer found first, as small as it gets: a unix fd attached to a message for
    vnetd that is not a call of one of its methods (a signal sent to it, a call on an object
    path outside /org/qemuvnet/Vnet1) must be closed like any other, or any local user makes
    the root daemon hold fds until it can open no more (no tap, no netlink socket)."""
    bob = Worker("bob")
    pid = vnetd.proc.pid
    cases = {
        "signal to the manager object": {"path": MANAGER_PATH, "mtype": MTYPE_SIGNAL,
                                         "iface": "org.qemuvnet.Vnet1.Manager",
                                         "member": "NetworkChanged"},
        "call on /org/qemuvnet/Vnet2": {"path": "/org/qemuvnet/Vnet2", "iface": None,
                                        "member": "Start"},
        "call on /x": {"path": "/x", "iface": "org.example.X", "member": "Y"},
    }
    kept = {}
    try:
        for name, c in cases.items():
            call = {"kind": "raw", "sig": "", "body": [], "extra_fds": 1, **c}
            before = fd_count(pid)
            outcomes = bob.run([call] * 10)
            time.sleep(0.2)
            kept[name] = fd_count(pid) - before
            assert all(judge(call, o, "bob", None) is None for o in outcomes), outcomes
    finally:
        bob.close()
    assert vnetd.alive()
    assert all(n <= 0 for n in kept.values()), (
        f"vnetd kept fds sent by an unprivileged user (10 messages of 1 fd each): {kept}")


def test_reads_in_flight_together_do_not_kill_the_daemon(vnetd, world):
    """What the fuzzer found next, as small as it gets: GetNetwork of a running network, a few
    at once (the first ones sent with NO_REPLY_EXPECTED, so the next follows without waiting),
    by a user outside group vnet ('info' is granted to anyone). Each call reads the nft
    counters through the one libnftables context, from a worker thread of its own; libnftables
    is not made for that (it garbles the netlink exchange and exits the process). The daemon
    must answer them all and live."""
    root, bob = Worker("root"), Worker("bob")
    call = {"kind": "contract", "mode": "typed", "method": "Manager.GetNetwork",
            "path": MANAGER_PATH, "iface": "org.qemuvnet.Vnet1.Manager", "member": "GetNetwork",
            "sig": "s", "body": ["vnet2"]}
    try:
        for c, outcome in restore(root):
            assert outcome.get("ok"), (c, outcome)
        for _ in range(100):
            outcomes = bob.run([{**call, "flags": FLAG_NO_REPLY}] * 3 + [call])
            if not vnetd.alive():
                break
            assert outcomes[-1].get("ok"), outcomes
        alive, status, log = vnetd.alive(), vnetd.proc.poll(), vnetd.log()
    finally:
        root.close()
        bob.close()
        if not vnetd.alive():
            vnetd.kill()
            vnetd.start()  # for the next tests
    assert alive, f"vnetd died (exit status {status}):\n{log[-1500:]}"


def test_calls_nobody_answers_leave_no_traceback(vnetd, world):
    """Found by the fuzzer too: a call that expects no reply (NO_REPLY_EXPECTED), of the
    standard Properties interface with a member or signature it does not have, on an object
    path vnetd leaves to dbus-fast ('/', or one outside its tree). Any local user may send it;
    it must be dropped quietly, not logged as an 'Unexpected error' with a Traceback."""
    bob = Worker("bob")
    calls = [{"kind": "raw", "path": path, "iface": "org.freedesktop.DBus.Properties",
              "member": member, "sig": "", "body": [], "flags": FLAG_NO_REPLY}
             for path in ("/", "/x") for member in ("Get", "Undefine")]
    start = len(vnetd.log())
    try:
        bob.run(calls)
        assert bob.call("ListNetworks").get("ok")  # the calls above were handled by now
    finally:
        bob.close()
    assert vnetd.alive()
    new = vnetd.log()[start:]
    assert "Traceback" not in new, new[-2000:]


def test_a_callers_text_cannot_forge_log_lines(vnetd, world):
    """Found by the fuzzer: an Attach option key is echoed raw into the refusal and the log
    line that records it, so a member of group vnet can write a line of their choosing into
    vnetd's audit log (here: that root detached a port). Caller text in sentences and log lines
    must be quoted/escaped, as the model's own messages already are."""
    forged = "INFO vnetd.bus: uid=0 sender=:1.1 pid=1 Detach('vnet2-abcdef'): ok"
    root, alice = Worker("root"), Worker("alice")
    start = len(vnetd.log())
    try:
        for c, outcome in restore(root):
            assert outcome.get("ok"), (c, outcome)
        call = {"kind": "contract", "mode": "typed", "method": "Manager.Attach",
                "path": MANAGER_PATH, "iface": "org.qemuvnet.Vnet1.Manager", "member": "Attach",
                "sig": "ssa{sv}", "body": ["vnet2", "vm1", [[f"x\n{forged}\n", ["b", True]]]]}
        outcome = alice.run([call])[0]
    finally:
        root.close()
        alice.close()
    log = vnetd.log()[start:]
    assert outcome.get("err") == "org.qemuvnet.Vnet1.Error.InvalidArgument", outcome
    assert forged not in log.splitlines(), "a caller wrote a line of its own into vnetd's log"
    assert not foreign_log_lines(log), foreign_log_lines(log)
    assert "\n" not in outcome["text"], outcome["text"]


def test_an_fd_is_not_taken_for_a_number(vnetd, world):
    """Found by the fuzzer: no method takes a unix fd, yet an option given as a variant of type
    'h' (a file descriptor) is read as the fd's index in the message, a plain integer: here
    Attach takes it as the NIC number and succeeds. A value of the wrong D-Bus type must be
    refused (and the fd closed, which it is)."""
    root, alice = Worker("root"), Worker("alice")
    try:
        for c, outcome in restore(root):
            assert outcome.get("ok"), (c, outcome)
        call = {"kind": "contract", "mode": "typed", "method": "Manager.Attach",
                "path": MANAGER_PATH, "iface": "org.qemuvnet.Vnet1.Manager", "member": "Attach",
                "sig": "ssa{sv}", "body": ["vnet2", "fdvm", [["nic", ["h", 0]]]]}
        outcome = alice.run([call])[0]
        alice.flush()
    finally:
        root.close()
        alice.close()
    assert outcome.get("err") == "org.qemuvnet.Vnet1.Error.InvalidArgument", outcome
