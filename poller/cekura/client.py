"""Client for the parts of the Cekura API the poller needs.

It reads every organization the configured credentials can see (list + billing info per
org) and returns typed snapshots, with one ``OrgError`` per organization that could not be
read, so one bad org never aborts the others. Only a failure to learn *which* orgs exist
(the listing, or every API key) raises, because then nothing this cycle can be trusted.

The adaptive schedule splits that read in two. ``list_organizations`` reads only the list:
with the bearer token that is the listing's pages and nothing else (N organizations cost
N / page_size requests); an org-scoped API key still costs its billing and organization read,
so those orgs come back whole. ``read_balances`` reads one billing answer per organization
given (exactly one request each with the token; with keys, the key belonging to the org,
learned once per process), each failure an error of its own.

Credentials are never part of a message, a log line or a URL: a key is named by its
position in POLLER_API_KEYS. As defence in depth (config.py already checks api_url) the
client refuses to send a credential over plain http to a non-loopback host, never follows
redirects (that would forward our X-CEKURA-API-KEY header to any host), and follows
pagination links only on the api_url's own scheme, host and port. HTTP itself (keep-alive
pool, proxies, CA bundle) is poller.cekura.transport's job.
"""

from __future__ import annotations

import json
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from functools import partial
from operator import itemgetter
from typing import TypeVar
from urllib.parse import urljoin

import structlog

from poller import __version__
from poller.cekura.parsing import (
    OrganizationBody,
    PageBody,
    ParseError,
    is_id,
    loads_billing,
    loads_json,
    loads_page,
    parse_billing,
    parse_organization,
)
from poller.cekura.ratelimit import RequestRateLimiter
from poller.cekura.transport import (
    HttpResponse,
    HttpTransport,
    ResponseTooLarge,
    TransportError,
    TransportTimeout,
    TransportTlsError,
    origin,
)
from poller.config.settings import ConfigError, Secret, Settings, is_loopback
from poller.engine.cancellation import on_cancel
from poller.engine.model import Billing, Organization, OrgError, OrgSnapshot, utc_now
from poller.engine.ports import SourceError

log = structlog.get_logger(__name__)

LIST_V2_PATH = "/user/v2/organizations/"
LIST_V1_PATH = "/user/organizations/"
ORGANIZATION_PATH = "/user/organizations/{id}/"
BILLING_PATH = "/test_framework/billing/info/"
# Cekura's own tooling uses "up to 200"; the real maximum is undocumented.
DEFAULT_PAGE_SIZE = 200
DEFAULT_MAX_WAIT = 60.0
# The most an answer of each endpoint may weigh, far above what it plausibly carries, so a
# broken or hostile server cannot make a worker buffer without end (each worker holds one).
BILLING_MAX_BYTES = 1024 * 1024  # a few hundred bytes in practice
ORGANIZATION_MAX_BYTES = 4 * 1024 * 1024  # one organization with its members
PAGE_MAX_BYTES = 32 * 1024 * 1024  # up to 200 organizations with their members (~2 KB each)
# The v1 listing (used only where v2 is missing) carries every organization in one body:
# about 130,000 organizations of 2 KB. A fleet larger than that needs the v2 listing.
LIST_V1_MAX_BYTES = 256 * 1024 * 1024
# Pages the v2 listing may take beyond what its announced count needs (the highest count any
# page announced, as organizations may be added meanwhile): organizations that move across a
# page boundary while it is read shift the pages a little, a listing that never ends does not.
LIST_SLACK_PAGES = 2
DEFAULT_BACKOFF_BASE = 0.5
_DETAIL_LIMIT = 300
_KEYS_SETTING = "POLLER_API_KEYS"

T = TypeVar("T")
R = TypeVar("R")

# Hooks for metrics and progress display; this module knows nothing about how they are shown.
# (endpoint, outcome): outcome is the HTTP status ("200", "503") or "timeout" / "connection_error".
RequestObserver = Callable[[str, str], None]
# (organizations read so far, organizations known so far, of them failed, whether the listing
# is still going so more may become known), during one fetch.
ProgressObserver = Callable[[int, int, int, bool], None]


class ApiError(SourceError):
    """The API could not be used as intended. The message is safe to print: no credentials."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(ApiError):
    """401/403: a credential was rejected or lacks permission. Never retried."""


class ApiNotFound(ApiError):
    """404 from an endpoint; not retried."""


class ApiUnavailable(ApiError):
    """The organizations could not be listed at all, even after retries."""


@dataclass
class FetchResult:
    snapshots: list[OrgSnapshot]
    errors: list[OrgError]
    requests: int  # HTTP requests made, retries included (for metrics)


@dataclass
class ListingResult:
    organizations: list[Organization]  # by id; those in ``snapshots`` too
    snapshots: list[OrgSnapshot]  # orgs read whole through their API key
    # An org named here exists but could not be listed this time: it is not unlisted.
    errors: list[OrgError]
    complete: bool  # False when an entry or a key could not be tied to an org id
    requests: int


@dataclass(frozen=True)
class _Credential:
    secret: Secret = field(repr=False)
    position: int | None  # 1-based position in POLLER_API_KEYS; None for the bearer token

    @property
    def label(self) -> str:
        return "the API token" if self.position is None else f"API key #{self.position}"

    def headers(self) -> dict[str, str]:
        if self.position is None:
            return {"Authorization": f"Bearer {self.secret.reveal()}"}
        return {"X-CEKURA-API-KEY": self.secret.reveal()}

    def rejected(self, status: int, detail: str) -> str:
        reason = f" {detail}" if detail else ""
        if self.position is None:
            return f"the Cekura API rejected the API token ({status}):{reason}"
        return f"API key #{self.position} of {_KEYS_SETTING} was rejected ({status}):{reason}"


class _RequestCounter:
    """One fetch's tally (HTTP requests made, organizations read for the progress hook) and
    its limits: the stop request and the deadline every request of the fetch observes."""

    def __init__(
        self,
        on_progress: ProgressObserver | None = None,
        *,
        cancel: threading.Event | None = None,
        timeout: float = math.inf,
    ) -> None:
        self.cancel = cancel
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._lock = threading.Lock()
        self.value = 0
        self._on_progress = on_progress
        self._total = self._done = self._failed = 0
        self._listing = False

    def add(self) -> None:
        with self._lock:
            self.value += 1

    def check(self, what: str) -> None:
        """ApiError if the fetch was asked to stop or ran out of time: ``what`` is not sent."""
        if self.cancel is not None and self.cancel.is_set():
            raise ApiError(f"{what}: not sent: stopping")
        if time.monotonic() >= self.deadline:
            raise ApiError(
                f"{what}: not sent: the fetch took longer than cycle_timeout ({self.timeout:g} s)"
            )

    def expect(self, count: int) -> None:
        with self._lock:
            self._total += count
            self._report()

    @contextmanager
    def listing(self) -> Iterator[None]:
        """While the organizations are still being listed, the total can grow."""
        with self._lock:
            self._listing = True
        try:
            yield
        finally:
            with self._lock:
                self._listing = False
                self._report()

    def finished(self, result: T, *, failed: bool) -> T:
        with self._lock:
            self._done += 1
            self._failed += failed
            self._report()
        return result

    def _report(self) -> None:
        # Under the lock, so an observer sees the numbers in order and never going backwards.
        if self._on_progress is not None:
            self._on_progress(self._done, self._total, self._failed, self._listing)


@dataclass
class _KeyOutcome:
    """What one API key yielded: a snapshot, an error, or an org someone else already read."""

    snapshot: OrgSnapshot | None = None
    error: OrgError | None = None
    failure: str | None = None  # "auth" | "api" | "data" when error is set
    auth_error: AuthError | None = None


class CekuraClient:
    """Thread-safe client; the workers share one pool of keep-alive connections."""

    def __init__(
        self,
        settings: Settings,
        *,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], datetime] = utc_now,
        jitter: Callable[[], float] = random.random,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        max_wait: float = DEFAULT_MAX_WAIT,
        page_size: int = DEFAULT_PAGE_SIZE,
        on_request: RequestObserver | None = None,
        on_progress: ProgressObserver | None = None,
        rate_limiter: RequestRateLimiter | None = None,
    ) -> None:
        settings.require_credentials()
        self._base_url = settings.api_url.rstrip("/")
        self._origin = _checked_origin(self._base_url, settings.allow_insecure_http)
        self._token = (
            _Credential(settings.api_token, None) if settings.api_token is not None else None
        )
        self._keys = tuple(
            _Credential(key, position) for position, key in enumerate(settings.api_keys, 1)
        )
        self._secrets = tuple(
            value for value in (c.secret.reveal() for c in self._credentials()) if value
        )
        self._attempts = 1 + max(0, settings.api_retries)
        self._request_timeout = settings.api_request_timeout
        self._cycle_timeout = settings.cycle_timeout
        self._concurrency = max(1, settings.concurrency)
        # None: real waits, cut short by the fetch's stop request (tests pass their own).
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._backoff_base = backoff_base
        self._max_wait = max_wait
        self._page_size = page_size
        # One budget for every worker: the API's limit is per client, not per connection.
        self._rate_limiter = rate_limiter or RequestRateLimiter(settings.max_requests_per_second)
        # Built last: the checks above must refuse a bad api_url before any connection exists.
        self._http = HttpTransport(
            self._base_url,
            connect_timeout=settings.api_connect_timeout,
            read_timeout=settings.api_read_timeout,
            user_agent=f"poller/{__version__}",
        )
        # Built once: every request of a credential sends the same headers.
        self._headers = {
            credential: {**self._http.headers, "Accept": "application/json", **credential.headers()}
            for credential in self._credentials()
        }
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._key_for_org: dict[int, _Credential] = {}
        self._on_request = on_request
        self._on_progress = on_progress
        self._org_of_key: dict[_Credential, int] = {}
        self._shard = settings.shard

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> CekuraClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    # --- public operations -----------------------------------------------------------------

    def fetch_snapshots(
        self, only_org: int | None = None, *, cancel: threading.Event | None = None
    ) -> FetchResult:
        """Every visible organization of this shard (or just ``only_org``) with its balance.

        Organizations that could not be read come back as errors instead. Setting ``cancel``
        makes every request, wait and retry of the fetch stop at once (requests in flight are
        broken off): what was not read then comes back as errors, or the listing fails.
        """
        counter = _RequestCounter(self._on_progress, cancel=cancel, timeout=self._cycle_timeout)
        # A thread blocked reading an answer can be reached no other way.
        with on_cancel(cancel, self._http.abort):
            return self._fetch_snapshots(only_org, counter)

    def _fetch_snapshots(self, only_org: int | None, counter: _RequestCounter) -> FetchResult:
        snapshots: dict[int, OrgSnapshot] = {}
        errors: list[OrgError] = []
        if self._token is not None:
            for item in self._fetch_with_token(self._token, only_org, counter):
                if isinstance(item, OrgSnapshot):
                    snapshots.setdefault(item.id, item)
                else:
                    errors.append(item)
        if self._keys and (only_org is None or only_org not in snapshots):
            key_snapshots, key_errors = self._fetch_with_keys(
                only_org, set(snapshots), counter, partial(self._owns, only_org=None)
            )
            for snapshot in key_snapshots:
                snapshots.setdefault(snapshot.id, snapshot)
            errors.extend(key_errors)
        # An org read through one credential needs no error about another credential.
        errors = [
            e
            for e in errors
            if e.org_id is None or (e.org_id not in snapshots and self._owns(e.org_id, only_org))
        ]
        _log_errors(errors)
        return FetchResult(
            snapshots=sorted(snapshots.values(), key=lambda s: s.id),
            errors=errors,
            requests=counter.value,
        )

    def list_organizations(self, *, cancel: threading.Event | None = None) -> ListingResult:
        """Every visible organization (every shard) with its settings, no balance read with
        the token; orgs reached only through an API key come with their balance. Raises as
        ``fetch_snapshots`` does when the organizations cannot be listed."""
        counter = _RequestCounter(self._on_progress, cancel=cancel, timeout=self._cycle_timeout)
        with on_cancel(cancel, self._http.abort):
            return self._listing(counter)

    def _listing(self, counter: _RequestCounter) -> ListingResult:
        organizations: dict[int, Organization] = {}
        errors: list[OrgError] = []
        if self._token is not None:
            raw_orgs = self._list_organizations(self._token, counter)
            with counter.listing():
                for org in _listed(raw_orgs, _everyone, counter, errors.append):
                    organizations[org.id] = counter.finished(org, failed=False)
        snapshots: list[OrgSnapshot] = []
        if self._keys:
            snapshots, key_errors = self._fetch_with_keys(
                None, set(organizations), counter, _everyone
            )
            organizations.update((s.id, s.org) for s in snapshots)
            errors.extend(key_errors)
        errors = [e for e in errors if e.org_id is None or e.org_id not in organizations]
        _log_errors(errors)
        return ListingResult(
            organizations=sorted(organizations.values(), key=lambda o: o.id),
            snapshots=sorted(snapshots, key=lambda s: s.id),
            errors=errors,
            complete=all(e.org_id is not None for e in errors),
            requests=counter.value,
        )

    def read_balances(
        self, organizations: Sequence[Organization], *, cancel: threading.Event | None = None
    ) -> FetchResult:
        """The balance of each org given, as given (its settings are not read again): one
        billing read each, with the token or else the org's own API key. Never raises for
        the API: an org that cannot be read, or is not read before ``cancel`` or
        cycle_timeout, is an error of its own."""
        counter = _RequestCounter(self._on_progress, cancel=cancel, timeout=self._cycle_timeout)

        def read(org: Organization) -> OrgSnapshot | OrgError:
            billing = partial(self._billing, org_id=org.id)
            snapshot = _snapshot(org, partial(self._with_org_credential, org.id, billing, counter))
            return counter.finished(snapshot, failed=isinstance(snapshot, OrgError))

        counter.expect(len(organizations))
        with on_cancel(cancel, self._http.abort):
            if self._token is None:
                self._learn_keys(organizations, counter)
            results = self._map(read, organizations)
        errors = [r for r in results if isinstance(r, OrgError)]
        _log_errors(errors)
        return FetchResult(
            snapshots=[r for r in results if isinstance(r, OrgSnapshot)],
            errors=errors,
            requests=counter.value,
        )

    def get_organization(self, org_id: int) -> Organization:
        path = ORGANIZATION_PATH.format(id=org_id)
        data = self._with_org_credential(
            org_id,
            lambda credential, counter: self._request(
                "GET",
                self._url(path),
                credential,
                counter,
                endpoint=path,
                org_id=org_id,
                max_body=ORGANIZATION_MAX_BYTES,
            ),
        )
        return _organization_from_response(data, f"GET {path}")

    def patch_organization(self, org_id: int, changes: dict[str, object]) -> Organization:
        """PATCH the given fields; a 400 becomes an ApiError carrying DRF's field messages."""
        path = ORGANIZATION_PATH.format(id=org_id)
        body = json.dumps(changes, default=_json_value)
        data = self._with_org_credential(
            org_id,
            lambda credential, counter: self._request(
                "PATCH",
                self._url(path),
                credential,
                counter,
                endpoint=path,
                org_id=org_id,
                body=body,
                max_body=ORGANIZATION_MAX_BYTES,
            ),
        )
        return _organization_from_response(data, f"PATCH {path}")

    # --- bearer token ----------------------------------------------------------------------

    def _fetch_with_token(
        self, token: _Credential, only_org: int | None, counter: _RequestCounter
    ) -> list[OrgSnapshot | OrgError]:
        raw_orgs: Iterable[object]
        if only_org is None:
            raw_orgs = self._list_organizations(token, counter)
        else:
            path = ORGANIZATION_PATH.format(id=only_org)
            try:
                raw_orgs = [
                    self._request(
                        "GET",
                        self._url(path),
                        token,
                        counter,
                        endpoint=path,
                        org_id=only_org,
                        max_body=ORGANIZATION_MAX_BYTES,
                    )
                ]
            except ApiNotFound as exc:
                return [OrgError(only_org, f"organization {only_org}: {exc}")]
            except AuthError:
                raise
            except ApiError as exc:
                raise ApiUnavailable(str(exc), status=exc.status) from exc

        results: list[OrgSnapshot | OrgError] = []

        def read(org: Organization) -> OrgSnapshot | OrgError:
            snapshot = _snapshot(org, partial(self._billing, token, counter, org_id=org.id))
            return counter.finished(snapshot, failed=isinstance(snapshot, OrgError))

        # Parsed page by page as the listing arrives, so the billing reads of one page overlap
        # with fetching the next (the listing alone is seconds at 100,000 orgs): _map runs the
        # listing in the calling thread, the billing reads in its workers. If a later page
        # fails, ApiUnavailable ends the whole fetch: the billing reads already made are
        # discarded with it, so nothing of a partly listed cycle is ever stored.
        organizations = _listed(
            raw_orgs, partial(self._owns, only_org=only_org), counter, results.append
        )
        with counter.listing():
            results.extend(self._map(read, organizations))
        return results

    def _list_organizations(self, token: _Credential, counter: _RequestCounter) -> Iterator[object]:
        """The organizations of the v2 (paginated) listing, or v1 if v2 is absent, as
        ``parse_organization`` takes them (decoded structs, or raw JSON objects).

        A generator, so only one page is alive at a time: the caller parses each page before
        the next is read (100,000 raw organizations would take gigabytes).
        """
        url = self._url(LIST_V2_PATH)
        params: dict[str, object] | None = {"page_size": self._page_size}
        followed: set[str] = set()
        announced = listed = 0
        page_size: int | None = None
        while True:
            try:
                page = self._request(
                    "GET",
                    url,
                    token,
                    counter,
                    endpoint=LIST_V2_PATH,
                    params=params,
                    decode=loads_page,
                    max_body=PAGE_MAX_BYTES,
                )
            except ApiNotFound:
                if followed:
                    raise ApiUnavailable(
                        f"GET {LIST_V2_PATH}: a later page answered 404", status=404
                    ) from None
                log.info("api.list_v2_missing", endpoint=LIST_V2_PATH)
                yield from self._list_organizations_v1(token, counter)
                return
            except AuthError:
                raise
            except ApiError as exc:
                raise ApiUnavailable(str(exc), status=exc.status) from exc
            results: Sequence[object]
            if isinstance(page, PageBody):
                results, next_url, count = page.results, page.next, page.count
            elif isinstance(page, dict) and isinstance(page.get("results"), list):
                results, next_url, count = page["results"], page.get("next"), page.get("count")
            else:
                raise ApiUnavailable(f"GET {LIST_V2_PATH}: expected a page with a results list")
            if isinstance(count, int) and not isinstance(count, bool):
                announced = max(announced, count)
            page_size = page_size or max(1, len(results))  # what the server really serves
            listed += len(results)
            if listed > announced + page_size or (
                next_url is not None
                and len(followed) + 1 >= -(-announced // page_size) + LIST_SLACK_PAGES
            ):
                raise ApiUnavailable(
                    f"GET {LIST_V2_PATH}: the listing goes on past the {announced} "
                    f"organizations its count announced ({len(followed) + 1} pages, "
                    f"{listed} organizations so far)"
                )
            # The next link is checked before this page's organizations are handed out: a page
            # pointing elsewhere stops the cycle before any billing read is made for it.
            if next_url is not None:
                next_url = self._next_link(url, next_url)
                if next_url in followed:
                    raise ApiUnavailable(f"GET {LIST_V2_PATH}: the pagination links loop")
                followed.add(next_url)
            yield from results
            if next_url is None:
                return
            url, params = next_url, None

    def _next_link(self, page_url: str, link: object) -> str:
        """The absolute URL of a page's next link; ApiUnavailable unless it is the API's own
        origin, as every parser involved reads it."""
        if not isinstance(link, str):
            raise ApiUnavailable(f"GET {LIST_V2_PATH}: the next link is not a string")
        try:
            url = urljoin(page_url, link)
        except ValueError:  # e.g. an unbalanced "[" where an IPv6 host would be
            url = link
        if not self._same_origin(url):
            raise ApiUnavailable(
                f"GET {LIST_V2_PATH}: refusing to follow a pagination link to "
                f"{_describe_origin(url)}, which is not {_describe_origin(self._base_url)}"
            )
        return url

    def _list_organizations_v1(self, token: _Credential, counter: _RequestCounter) -> list[object]:
        try:
            data = self._request(
                "GET",
                self._url(LIST_V1_PATH),
                token,
                counter,
                endpoint=LIST_V1_PATH,
                max_body=LIST_V1_MAX_BYTES,
            )
        except AuthError:
            raise
        except ApiError as exc:
            raise ApiUnavailable(str(exc), status=exc.status) from exc
        if not isinstance(data, list):
            raise ApiUnavailable(f"GET {LIST_V1_PATH}: expected a JSON array of organizations")
        return data

    # --- org-scoped API keys ---------------------------------------------------------------

    def _fetch_with_keys(
        self,
        only_org: int | None,
        covered: set[int],
        counter: _RequestCounter,
        owns: Callable[[int], bool],
    ) -> tuple[list[OrgSnapshot], list[OrgError]]:
        def wanted(org_id: int) -> bool:
            if only_org is not None:
                return org_id == only_org and org_id not in covered
            return org_id not in covered and owns(org_id)

        def read(key: _Credential) -> _KeyOutcome:
            outcome = self._fetch_with_key(key, wanted, counter)
            return counter.finished(outcome, failed=outcome.error is not None)

        counter.expect(len(self._keys))
        outcomes = self._map(read, self._keys)
        snapshots = [o.snapshot for o in outcomes if o.snapshot is not None]
        failed = [o for o in outcomes if o.error is not None]
        errors = [o.error for o in failed if o.error is not None]
        if only_org is not None:
            if any(s.id == only_org for s in snapshots) or only_org in covered:
                return snapshots, [e for e in errors if e.org_id is not None]
            if not any(e.org_id == only_org for e in errors):
                errors.append(
                    OrgError(
                        only_org,
                        f"organization {only_org}: no API key of {_KEYS_SETTING} belongs to it",
                    )
                )
        # Without a token the keys are the listing: if none worked, nothing can be trusted.
        if self._token is None and len(failed) == len(outcomes):
            if all(o.failure == "auth" for o in failed):
                first = failed[0].auth_error
                if len(failed) == 1 and first is not None:
                    raise first
                raise AuthError(
                    f"every API key of {_KEYS_SETTING} was rejected; "
                    + "; ".join(e.message for e in errors)
                )
            if all(o.failure in ("auth", "api") for o in failed):
                raise ApiUnavailable(
                    "no API key could be used: " + "; ".join(e.message for e in errors)
                )
        return snapshots, errors

    def _fetch_with_key(
        self, key: _Credential, wanted: Callable[[int], bool], counter: _RequestCounter
    ) -> _KeyOutcome:
        with self._lock:
            known_org = self._org_of_key.get(key)
        if known_org is not None and not wanted(known_org):
            # An org-scoped key belongs to one org for good: no need to ask again (daemon).
            return _KeyOutcome()
        try:
            billing = self._billing(key, counter)
        except AuthError as exc:
            return _KeyOutcome(error=OrgError(None, str(exc)), failure="auth", auth_error=exc)
        except ApiError as exc:
            return _KeyOutcome(error=OrgError(None, f"{key.label}: {exc}"), failure="api")
        except ParseError as exc:
            message = f"{key.label}: billing info: {exc}"
            return _KeyOutcome(error=OrgError(None, message), failure="data")
        org_id = billing.organization_id
        if not wanted(org_id):
            return _KeyOutcome()
        path = ORGANIZATION_PATH.format(id=org_id)
        where = f"{key.label}: organization {org_id}"
        try:
            data = self._request(
                "GET",
                self._url(path),
                key,
                counter,
                endpoint=path,
                org_id=org_id,
                max_body=ORGANIZATION_MAX_BYTES,
            )
            org = parse_organization(data)
        except AuthError as exc:
            return _KeyOutcome(
                error=OrgError(org_id, f"organization {org_id}: {exc}"),
                failure="auth",
                auth_error=exc,
            )
        except ApiError as exc:
            return _KeyOutcome(error=OrgError(org_id, f"{where}: {exc}"), failure="api")
        except ParseError as exc:
            return _KeyOutcome(error=OrgError(org_id, f"{where}: {exc}"), failure="data")
        if org.id != org_id:
            message = f"{where}: the API answered with organization {org.id}"
            return _KeyOutcome(error=OrgError(org_id, message), failure="data")
        return _KeyOutcome(
            snapshot=OrgSnapshot(org=org.for_alerts(), balance=billing.credits_remaining)
        )

    def _billing(
        self, credential: _Credential, counter: _RequestCounter, org_id: int | None = None
    ) -> Billing:
        """The token's billing info of ``org_id``, or an org-scoped key's of its own org (the
        key says which: no organization_id is sent, ``org_id`` only names it in logs), which
        is then known as the key's org for good."""
        is_token = credential is self._token
        data = self._request(
            "GET",
            self._url(BILLING_PATH),
            credential,
            counter,
            endpoint=BILLING_PATH,
            org_id=org_id,
            params={"organization_id": org_id} if is_token else None,
            decode=loads_billing,
            max_body=BILLING_MAX_BYTES,
        )
        billing = parse_billing(data)
        if not is_token:
            with self._lock:
                self._key_for_org.setdefault(billing.organization_id, credential)
                self._org_of_key[credential] = billing.organization_id
        return billing

    def _learn_keys(self, organizations: Sequence[Organization], counter: _RequestCounter) -> None:
        """Which org each API key not known yet belongs to, one read per key on the workers,
        when an org given has no known key (a process that has not listed yet). Else every
        worker would try the unknown keys one by one for its own org, many times over."""
        with self._lock:
            if all(org.id in self._key_for_org for org in organizations):
                return
            unknown = [key for key in self._keys if key not in self._org_of_key]

        def learn(key: _Credential) -> None:
            with suppress(ApiError, ParseError):  # the read of that org will say what failed
                self._billing(key, counter)

        self._map(learn, unknown)

    def _key_belonging_to(self, org_id: int, counter: _RequestCounter) -> _Credential | None:
        with self._lock:
            known = self._key_for_org.get(org_id)
            mapped = set(self._org_of_key)
        if known is not None:
            return known
        for key in self._keys:
            if key in mapped:
                continue
            try:
                if self._billing(key, counter).organization_id == org_id:
                    return key
            except (ApiError, ParseError):
                continue
        return None

    def _with_org_credential(
        self,
        org_id: int,
        call: Callable[[_Credential, _RequestCounter], T],
        counter: _RequestCounter | None = None,
    ) -> T:
        """Use the token, or if it cannot reach the org, the API key belonging to the org."""
        if counter is None:
            counter = _RequestCounter()
        if self._token is not None:
            try:
                return call(self._token, counter)
            except (AuthError, ApiNotFound):
                if not self._keys:
                    raise
        key = self._key_belonging_to(org_id, counter)
        if key is None:
            raise ApiError(f"organization {org_id}: no API key of {_KEYS_SETTING} belongs to it")
        return call(key, counter)

    # --- HTTP ------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        credential: _Credential,
        counter: _RequestCounter,
        *,
        endpoint: str,
        org_id: int | None = None,
        params: dict[str, object] | None = None,
        body: str | None = None,
        decode: Callable[[bytes], object] = loads_json,
        max_body: int,
    ) -> object:
        """``decode`` of a 2xx answer's body; retries transient failures (invalid JSON among
        them: ``decode`` raises ValueError for it, and a timeout: each attempt must be answered
        within api_request_timeout), raises ApiError otherwise. A body over ``max_body``
        bytes fails the request at once: asking again would only fetch it again."""
        if not self._same_origin(url):
            raise ApiError(f"{method} {endpoint}: refusing to send a credential to another host")
        headers = self._headers[credential]
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        context = {
            "endpoint": endpoint,
            "method": method,
            "org_id": org_id,
            "credential": credential.label,
        }
        failure = ""
        status: int | None = None
        for attempt in range(1, self._attempts + 1):
            self._pause(self._rate_limiter.delay(), counter)
            counter.check(f"{method} {endpoint}")
            counter.add()
            retry_after: float | None = None
            deadline = min(time.monotonic() + self._request_timeout, counter.deadline)
            try:
                response = self._send(
                    method,
                    url,
                    endpoint,
                    params=params,
                    body=body,
                    headers=headers,
                    max_body=max_body,
                    deadline=deadline,
                )
            except ResponseTooLarge as exc:
                log.warning("api.request_failed", reason=str(exc), attempt=attempt, **context)
                raise ApiError(f"{method} {endpoint}: {exc}") from exc
            except TransportTimeout:
                status, failure = None, "timed out"
            except TransportTlsError:
                # Verification is always on; say how to trust a private CA, not just "failed".
                status, failure = (
                    None,
                    (
                        "TLS failed: the server's certificate could not be verified (a private CA "
                        "can be added with REQUESTS_CA_BUNDLE=/path/to/ca.pem)"
                    ),
                )
            except TransportError as exc:
                status, failure = None, str(exc)
            else:
                status = response.status
                if 200 <= status < 300:
                    try:
                        return decode(response.content)
                    except (ValueError, RecursionError):
                        failure = "the response was not valid JSON"
                elif status in (401, 403):
                    detail = self._detail(response.content)
                    log.warning("api.request_failed", status=status, attempt=attempt, **context)
                    raise AuthError(credential.rejected(status, detail), status=status)
                elif status == 404:
                    raise ApiNotFound(f"{method} {endpoint}: not found (404)", status=404)
                elif status == 429 or status >= 500:
                    failure = f"HTTP {status}"
                    retry_after = _retry_after_seconds(response.retry_after, self._clock())
                else:
                    detail = self._detail(response.content)
                    log.warning("api.request_failed", status=status, attempt=attempt, **context)
                    message = f"{method} {endpoint} was refused ({status})"
                    raise ApiError(f"{message}: {detail}" if detail else message, status=status)
            delay = self._delay(attempt, retry_after)
            if status == 429:
                # Every worker pauses, this one included: the limiter's delay() before the
                # next attempt covers the pause, so sleeping here as well would double it.
                self._rate_limiter.throttled(delay)
            if attempt == self._attempts:
                break
            counter.check(f"{method} {endpoint}")
            log.info(
                "api.retry",
                status=status,
                reason=failure,
                attempt=attempt,
                delay=round(delay, 3),
                **context,
            )
            if status != 429:
                self._pause(delay, counter)
        log.warning(
            "api.request_failed", status=status, reason=failure, attempt=self._attempts, **context
        )
        raise ApiError(
            f"{method} {endpoint} failed after {self._attempts} attempts: {failure}",
            status=status,
        )

    def _send(
        self,
        method: str,
        url: str,
        endpoint: str,
        *,
        headers: dict[str, str],
        params: dict[str, object] | None,
        body: str | None,
        max_body: int,
        deadline: float,
    ) -> HttpResponse:
        """One HTTP attempt, reported to the request observer (for metrics)."""
        try:
            response = self._http.request(
                method,
                url,
                headers=headers,
                params=params,
                body=body,
                max_body=max_body,
                deadline=deadline,
            )
        except TransportTimeout:
            self._observe(endpoint, "timeout")
            raise
        except TransportError:
            self._observe(endpoint, "connection_error")
            raise
        self._observe(endpoint, str(response.status))
        return response

    def _pause(self, seconds: float, counter: _RequestCounter) -> None:
        """Wait before a request, but not past the fetch's deadline, and not once it is asked
        to stop (the caller's next ``counter.check`` then says why it goes no further)."""
        seconds = min(seconds, counter.deadline - time.monotonic())
        if seconds <= 0:
            return
        if self._sleep is not None:
            self._sleep(seconds)
        elif counter.cancel is not None:
            counter.cancel.wait(seconds)
        else:
            time.sleep(seconds)

    def _observe(self, endpoint: str, outcome: str) -> None:
        if self._on_request is not None:
            self._on_request(endpoint, outcome)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self._max_wait, retry_after)
        # Full jitter: spreads the retries of many workers instead of synchronising them.
        return self._jitter() * min(self._max_wait, self._backoff_base * 2.0 ** (attempt - 1))

    def _detail(self, content: bytes) -> str:
        return self._redact(_error_detail(content))

    def _redact(self, text: str) -> str:
        # A hostile or buggy server might echo the credential back in its error message.
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``function`` of every item, results in the items' order, on the worker threads.

        This thread iterates ``items`` (for the listing: fetching its pages) into a queue that
        every worker drains. So the listing is never paced by the billing reads it feeds:
        page-number pagination shifts when organizations come and go while it is read, and
        one that moves across a page boundary meanwhile is missed for the cycle; at its own
        pace the listing takes seconds, paced by billing reads under a rate cap it would take
        the whole cycle. And each worker takes its next item itself: no Future per item and no
        hand-off through this thread, which cost about a third of the client's CPU per
        organization. The queue holds at most the items not yet taken, which the results hold
        anyway at the end. If ``items`` raises, the workers stop at their next item.
        """
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._concurrency, thread_name_prefix="cekura"
                )
            executor = self._executor
        work: queue.SimpleQueue[tuple[int, T] | None] = queue.SimpleQueue()
        results: list[tuple[int, R]] = []
        stopped = threading.Event()

        def drain() -> None:
            while (entry := work.get()) is not None and not stopped.is_set():
                index, item = entry
                results.append((index, function(item)))

        workers = [executor.submit(drain) for _ in range(self._concurrency)]
        try:
            for entry in enumerate(items):
                work.put(entry)
        except BaseException:
            stopped.set()
            raise
        finally:
            for _ in workers:
                work.put(None)
        for worker in workers:
            worker.result()  # a worker's own exception (a bug: reads report errors as values)
        results.sort(key=itemgetter(0))
        return [result for _, result in results]

    def _owns(self, org_id: int, only_org: int | None) -> bool:
        """Whether this shard handles the org; ``--org`` asks for one org whatever its shard."""
        return only_org is not None or self._shard is None or self._shard.owns(org_id)

    def _url(self, path: str) -> str:
        return self._base_url + path

    def _same_origin(self, url: str) -> bool:
        """Whether ``url`` leads to the API's own origin, as the transport that would send it
        reads it (a URL other parsers could read differently is refused)."""
        try:
            return origin(url) == self._origin
        except ValueError:
            return False

    def _credentials(self) -> tuple[_Credential, ...]:
        return ((self._token,) if self._token is not None else ()) + self._keys


def _checked_origin(api_url: str, allow_insecure_http: bool) -> tuple[str, str, int]:
    try:
        scheme, host, port = origin(api_url)
    except ValueError as exc:
        raise ConfigError(f"api_url: {exc}") from None
    if scheme == "http" and not allow_insecure_http and not is_loopback(host):
        raise ConfigError(
            f"api_url: refusing to send the API credential over plain http to {host}; "
            "use https, or set allow_insecure_http"
        )
    return scheme, host, port


def _describe_origin(url: str) -> str:
    try:
        scheme, host, port = origin(url)
    except ValueError:
        return "an invalid URL"
    return f"{scheme}://{host}:{port}"


def _retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _error_detail(content: bytes) -> str:
    """DRF's error body as one line: 'detail', or 'field: message' pairs."""
    try:
        data = json.loads(content)
        text = _joined_messages(data)
    except (ValueError, RecursionError):
        return ""
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."


def _joined_messages(data: object) -> str:
    if not isinstance(data, dict):
        return _messages(data)
    detail = data.get("detail")
    if isinstance(detail, str):
        return detail
    return "; ".join(
        _messages(value) if name == "non_field_errors" else f"{name}: {_messages(value)}"
        for name, value in data.items()
    )


def _messages(value: object) -> str:
    if isinstance(value, list):
        return " ".join(_messages(item) for item in value)
    if isinstance(value, dict):
        return "; ".join(f"{name}: {_messages(item)}" for name, item in value.items())
    return str(value)


def _listed(
    raw_orgs: Iterable[object],
    owns: Callable[[int], bool],
    counter: _RequestCounter,
    failed: Callable[[OrgError], None],
) -> Iterator[Organization]:
    """Each organization of a listing that ``owns`` takes, parsed as it arrives, once (pages
    can shift while they are read: the same org may be listed twice), each counted as known.
    An entry that cannot be parsed goes to ``failed``, under its id when it has one."""
    listed: set[int] = set()
    for index, raw in enumerate(raw_orgs):
        try:
            org = parse_organization(raw)
        except ParseError as exc:
            org_id = _raw_id(raw)
            where = f"organization {org_id}" if org_id is not None else f"organization #{index}"
            failed(OrgError(org_id, f"{where} in the list: {exc}"))
            continue
        if owns(org.id) and org.id not in listed:
            listed.add(org.id)
            counter.expect(1)
            yield org.for_alerts()


def _everyone(org_id: int) -> bool:
    """The listing for the adaptive schedule takes every org: its work queue replaces shards."""
    return True


def _snapshot(org: Organization, read: Callable[[], Billing]) -> OrgSnapshot | OrgError:
    """``org`` with the balance ``read`` gets; an error if the read fails or answers for
    another org."""
    where = f"organization {org.id}: billing info"
    try:
        billing = read()
    except (ApiError, ParseError) as exc:
        return OrgError(org.id, f"{where}: {exc}")
    if billing.organization_id != org.id:
        return OrgError(org.id, f"{where}: answered for organization {billing.organization_id}")
    return OrgSnapshot(org=org, balance=billing.credits_remaining)


def _log_errors(errors: Iterable[OrgError]) -> None:
    for error in errors:
        log.warning("api.error", org_id=error.org_id, error=error.message)


def _organization_from_response(data: object, endpoint: str) -> Organization:
    try:
        return parse_organization(data)
    except ParseError as exc:
        raise ApiError(f"{endpoint}: unexpected organization in the response: {exc}") from exc


def _raw_id(raw: object) -> int | None:
    if isinstance(raw, OrganizationBody):
        return raw.id
    value = raw.get("id") if isinstance(raw, dict) else None
    # Errors are recorded against their org id: an id that cannot be stored is not named.
    return value if is_id(value) else None


def _json_value(value: object) -> object:
    # The API accepts decimal strings; sending a float would lose money precision.
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
