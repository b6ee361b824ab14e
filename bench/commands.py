"""The short-lived commands' cost, as an unprivileged member of group vnet (JSON out):

- `vnet-client list`, `show NET` and `leases NET`: process start to exit, p50 over N runs
  (target <= 50 ms each), list with `--json` too, and `vnet-client --version` (no bus at
  all) for what Python and the imports alone cost;
- vnet-bridge-helper: process start to the tap fd handed back (attach.py's measurement),
  p50 (target <= 60 ms);
- what importing the CLI costs (`python -X importtime`), and that it imports neither
  dbus-fast nor asyncio.

The modules are byte-compiled first (`_common.byte_compile`), as an installed package has
them: in a source checkout the test users cannot write __pycache__, and compiling the CLI's
modules at every start would add about 15 ms.

    sudo /opt/qemu-vnet/bin/python bench/commands.py [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess

from _common import bench_daemon, emit
from attach import HELPER, ms

from tests.harness.daemon import ALICE, VENV, run_client
from tests.harness.users import run_as

COMMAND = """
import subprocess, time
argv, runs = sys.argv[2:], int(sys.argv[1])
samples = []
for i in range(runs):
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    samples.append(time.perf_counter() - t)
print(json.dumps(samples))
"""


def command(runs: int, *argv: str) -> dict:
    r = run_as(ALICE, COMMAND, str(runs), *argv, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr}")
    return ms(json.loads(r.stdout))


def import_cost() -> dict:
    """Microseconds of `import vnet_client.cli` (cumulative), and the heavy modules it pulls."""
    r = subprocess.run([str(VENV / "bin/python"), "-X", "importtime", "-c",
                        "import vnet_client.cli"], capture_output=True, text=True, check=True)
    cost = {}
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            cost[m.group(3)] = int(m.group(1))
    return {"vnet_client.cli_ms": round(cost.get("vnet_client.cli", 0) / 1000, 1),
            "jeepney_ms": round(max(v for k, v in cost.items()
                                    if k.startswith("jeepney")) / 1000, 1),
            "imports_dbus_fast": any(k.startswith("dbus_fast") for k in cost),
            "imports_asyncio": "asyncio" in cost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=50)
    a = ap.parse_args()
    client = str(VENV / "bin/vnet-client")
    with bench_daemon("cmds") as d:
        d.stop()
        d.start()
        run_client("define", "bench1", "--subnet=10.203.0.0/16", "--dhcp=none", check=True)
        run_client("start", "bench1", check=True)
        # one with its DHCP server, for show and leases
        run_client("define", "bench2", "--subnet=10.204.0.0/24", check=True)
        run_client("start", "bench2", check=True)
        out = {"vnet_client_version": command(a.runs, client, "--version"),
               "vnet_client_list": command(a.runs, client, "list"),
               "vnet_client_list_json": command(a.runs, client, "list", "--json"),
               "vnet_client_show": command(a.runs, client, "show", "bench2"),
               "vnet_client_leases": command(a.runs, client, "leases", "bench2")}
        r = run_as(ALICE, HELPER, str(VENV / "bin/vnet-bridge-helper"), str(a.runs),
                   timeout=300)
        out["bridge_helper_start_to_fd"] = ms(json.loads(r.stdout))
        out["import"] = import_cost()
        out["targets"] = {"list_p50_ms": 50, "show_p50_ms": 50, "leases_p50_ms": 50,
                          "bridge_helper_p50_ms": 60}
        out["met"] = {"list_p50": out["vnet_client_list"]["p50_ms"] <= 50,
                      "show_p50": out["vnet_client_show"]["p50_ms"] <= 50,
                      "leases_p50": out["vnet_client_leases"]["p50_ms"] <= 50,
                      "bridge_helper_p50": out["bridge_helper_start_to_fd"]["p50_ms"] <= 60,
                      "no_asyncio_library": not (out["import"]["imports_dbus_fast"]
                                                 or out["import"]["imports_asyncio"])}
    emit("commands", out)


if __name__ == "__main__":
    main()
