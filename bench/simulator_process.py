"""The benchmark's Cekura API: the simulator in a process of its own, so it never shares a GIL
with the poller or with the floor client.

    python -m bench.simulator_process --orgs 100000 --seed 1 --token T --ids-file ids.txt

Prints ``ready <url>`` on stdout once it serves, then runs until SIGTERM/SIGINT. The ids file
lists every organization id (ids have random gaps), so the driver can move balances through
the ``/_sim/`` control endpoints. ``--orgs-file`` also writes, as JSON, what the detection
benchmark needs of each organization: its starting balance, its threshold and whether its
alert goes out by email (alerts on, emails on, at least one admin poller would write to).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading

from poller.cekura.parsing import parse_organization
from poller.devtools.simulator import SimulatedApi, SimulatorServer


def org_facts(api: SimulatedApi) -> list[dict[str, object]]:
    """Per organization: id, balance, threshold (decimal strings), notify, emailed."""
    facts: list[dict[str, object]] = []
    for org_id in api.org_ids():
        org = parse_organization(api.organization(org_id))
        facts.append(
            {
                "id": org_id,
                "balance": str(api.balance(org_id)),
                "threshold": str(org.low_credits_threshold),
                "notify": org.notify_low_credits,
                "emailed": bool(
                    org.notify_low_credits and org.send_emails_enabled and org.alert_recipients()
                ),
            }
        )
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.simulator_process")
    parser.add_argument("--orgs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ids-file", required=True)
    parser.add_argument("--orgs-file", help="write each organization's facts here (JSON)")
    args = parser.parse_args()

    api = SimulatedApi.generate(args.orgs, seed=args.seed, token=args.token)
    # The real API's cost is not poller's: serialise every answer before serving, so that the
    # first cycle's listing and billing reads are as cheap for the simulator as later ones.
    api.prepare_responses()
    with open(args.ids_file, "w", encoding="ascii") as ids:
        ids.writelines(f"{org_id}\n" for org_id in api.org_ids())
    if args.orgs_file:
        with open(args.orgs_file, "w", encoding="utf-8") as orgs:
            json.dump(org_facts(api), orgs)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    with SimulatorServer(api) as server:
        print(f"ready {server.url}", flush=True)
        while not stop.wait(0.5):
            pass


if __name__ == "__main__":
    main()
