"""`make demo`: the whole alert lifecycle against the simulator and a local SMTP capture.

Runs the real `poller once` command (a subprocess each step) against the built-in Cekura API
simulator and an in-process SMTP server, on a throw-away SQLite database, and shows what each
step did and the emails that arrived. It checks its own story and exits 1 if the story is not
what happened. No account and no network needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from poller.devtools.simulator import SimulatedApi, SimulatorServer
    from poller.devtools.smtp_capture import SmtpCapture
except ModuleNotFoundError as exc:  # aiohttp or aiosmtpd: not in a plain install
    if (exc.name or "").startswith("poller"):
        raise
    sys.exit("poller demo: needs the devtools extra: pip install 'poller[devtools]'")

TOKEN = "demo-token"

ORGS = [
    {
        "id": 101,
        "name": "Acme Voice",
        "credits_remaining": "5000.00",
        "notify_low_credits": True,
        "low_credits_threshold": "1000.00",
        "members": [
            {"name": "Dana Ops", "email": "dana@acme.example", "role": "admin"},
            {"name": "Sam Finance", "email": "sam@acme.example", "role": "admin"},
            {"name": "Lee Dev", "email": "lee@acme.example", "role": "member"},
        ],
    },
    {
        "id": 102,
        "name": "Globex Calls",
        "credits_remaining": "5000.00",
        "notify_low_credits": False,
        "low_credits_threshold": "1000.00",
        "members": [{"name": "Hank Scorpio", "email": "hank@globex.example", "role": "admin"}],
    },
    {
        "id": 103,
        "name": "Initech Support",
        "credits_remaining": "250.00",
        "notify_low_credits": True,
        "low_credits_threshold": "500.00",
        "is_send_emails_enabled": False,
        "members": [{"name": "Bill L.", "email": "bill@initech.example", "role": "admin"}],
    },
]

# (what happens, balances to set before the cycle, emails expected from this cycle)
STEPS = [
    (
        "First cycle: Acme and Globex have plenty. Initech is already low, but its "
        "organization has emails switched off, so the breach is recorded as suppressed.",
        {},
        0,
    ),
    (
        "Acme drops to 800 credits, below its 1,000 threshold: one email to its two admins.",
        {101: "800.00"},
        1,
    ),
    ("Acme is still below (650): nothing more is sent.", {101: "650.00"}, 0),
    ("Globex drops below its threshold, but its alerts are off: no email.", {102: "10.00"}, 0),
    ("Acme tops up to 3,000: the alert re-arms, no email.", {101: "3000.00"}, 0),
    ("Acme drops again to 400: a new breach, a new email.", {101: "400.00"}, 1),
]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="poller-demo-") as tmp:
        seed = Path(tmp) / "seed.json"
        seed.write_text(json.dumps({"token": TOKEN, "organizations": ORGS}))
        with SimulatorServer(SimulatedApi.from_seed_file(str(seed))) as sim, SmtpCapture() as smtp:
            env = _poller_env(sim.url, smtp.port, Path(tmp) / "demo.db")
            story_ok = _walk_through(sim, smtp, env)
            print("\n== poller status ==")
            print(_poller(env, "status").stdout)
            _show_emails(smtp)
    print(
        "Demo finished: the lifecycle matched the story."
        if story_ok
        else "Demo finished, but the lifecycle did NOT match the story (see above)."
    )
    return 0 if story_ok else 1


def _poller_env(api_url: str, smtp_port: int, db_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLLER_")}
    env.update(
        POLLER_API_URL=api_url,
        POLLER_API_TOKEN=TOKEN,
        POLLER_DATABASE_URL=f"sqlite:///{db_path}",
        POLLER_SMTP_HOST="127.0.0.1",
        POLLER_SMTP_PORT=str(smtp_port),
        # The capture server is local and has no TLS; real servers keep the default starttls.
        POLLER_SMTP_SECURITY="none",
        POLLER_MAIL_FROM="Cekura credit alerts <alerts@poller.example>",
        POLLER_LOG_FORMAT="console",
    )
    return env


def _poller(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poller", "-q", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _walk_through(sim: SimulatorServer, smtp: SmtpCapture, env: dict[str, str]) -> bool:
    story_ok = True
    for number, (story, balances, expected) in enumerate(STEPS, start=1):
        for org_id, balance in balances.items():
            sim.api.set_balance(org_id, balance)
        before = len(smtp.messages)
        result = _poller(env, "once")
        arrived = smtp.messages[before:]
        print(f"\n== step {number}: {story}")
        print(f"   poller once -> exit {result.returncode}; emails: {len(arrived)}")
        for message in arrived:
            print(f"   - to {message['To']}: {message['Subject']}")
        if result.stderr.strip():
            print("   " + result.stderr.strip().replace("\n", "\n   "))
        if len(arrived) != expected or result.returncode != 0:
            print(f"   !! expected {expected} email(s) and exit 0")
            story_ok = False
    return story_ok


def _show_emails(smtp: SmtpCapture) -> None:
    print(f"== {len(smtp.messages)} email(s) captured by the local SMTP server ==")
    if not smtp.messages:
        return
    first = smtp.messages[0]
    print(
        "The first one in full (text part; an HTML part with an 'Add credits' button "
        "travels with it):\n"
    )
    for header in ("From", "To", "Subject", "Date", "Message-ID"):
        print(f"{header}: {first[header]}")
    text = next(p for p in first.walk() if p.get_content_type() == "text/plain")
    print()
    print(text.get_content())


if __name__ == "__main__":
    sys.exit(main())
