"""The floor: the same billing requests made by the simplest keep-alive client there is.

One requests.Session per worker thread, the same concurrency as the poller, no parsing, no
retries, no rate limit: what the simulator and the HTTP stack allow on this machine. The
poller's fetch phase cannot beat it; the gap is the poller's own overhead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import requests

BILLING_PATH = "/test_framework/billing/info/"


def measure_floor(api_url: str, token: str, org_ids: Sequence[int], concurrency: int) -> float:
    """Seconds for one billing request per org id; raises if any answer is not 200."""
    local = threading.local()
    sessions: list[requests.Session] = []
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    url = api_url + BILLING_PATH

    def fetch(org_id: int) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            sessions.append(session)
        response = session.get(url, params={"organization_id": org_id}, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"floor request for org {org_id}: HTTP {response.status_code}")

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in pool.map(fetch, org_ids):
            pass
    elapsed = time.monotonic() - started
    for session in sessions:
        session.close()
    return elapsed
