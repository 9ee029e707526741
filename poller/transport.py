"""HTTP for the Cekura client: one urllib3 connection pool shared by the fetch workers.

Why not a requests.Session: at 100,000 organizations per cycle the HTTP library's own CPU
cost decides the cycle time on a small machine. Measured single-threaded against the
simulator, `requests` spends about 1,180 µs of CPU per request, urllib3 (which requests wraps)
about 333 µs. This module keeps what poller relied on requests for, resolved once when the
client is built instead of on every request:

- proxies from HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY for the API URL, exactly as
  requests reads them (``requests.utils.get_environ_proxies``), with proxy credentials from the
  proxy URL sent as Proxy-Authorization;
- the CA bundle: REQUESTS_CA_BUNDLE, else CURL_CA_BUNDLE, else certifi's (what requests
  picks); a directory works too. Certificate verification is always on.

No redirects are followed and nothing is retried here: the client owns retries, back-off and
the decision never to send a credential anywhere but the API's own origin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlencode

import certifi
import urllib3
from requests.utils import get_auth_from_url, get_environ_proxies, select_proxy
from urllib3.exceptions import HTTPError, NewConnectionError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from poller.config import ConfigError


class TransportError(Exception):
    """One HTTP attempt failed before an answer arrived. Messages name no URL or credential."""


class TransportTimeout(TransportError):
    """Connecting or reading took longer than the configured timeout."""


class TransportTlsError(TransportError):
    """The server's certificate could not be verified (or TLS failed otherwise)."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    content: bytes
    retry_after: str | None


class HttpTransport:
    """Thread-safe; keeps up to ``pool_size`` keep-alive connections to the API."""

    def __init__(
        self,
        api_url: str,
        *,
        pool_size: int,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
    ) -> None:
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self._default_headers = {"User-Agent": user_agent, "Accept-Encoding": "gzip, deflate"}
        options: dict[str, object] = {
            "num_pools": 4,
            "maxsize": max(1, pool_size),
            "cert_reqs": "CERT_REQUIRED",
            "retries": False,
            "timeout": self._timeout,
        }
        ca_bundle = ca_bundle_path()
        options["ca_cert_dir" if os.path.isdir(ca_bundle) else "ca_certs"] = ca_bundle
        proxy = select_proxy(api_url, get_environ_proxies(api_url))
        self._pool: urllib3.PoolManager
        if proxy:
            if not proxy.lower().startswith(("http://", "https://")):
                raise ConfigError(
                    "the proxy for the API URL must be an http:// or https:// URL "
                    "(check HTTPS_PROXY / HTTP_PROXY / ALL_PROXY)"
                )
            username, password = get_auth_from_url(proxy)
            proxy_headers = (
                urllib3.make_headers(proxy_basic_auth=f"{username}:{password}")
                if username else None
            )
            self._pool = urllib3.ProxyManager(proxy, proxy_headers=proxy_headers, **options)
        else:
            self._pool = urllib3.PoolManager(**options)

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        params: dict[str, object] | None = None,
        body: str | None = None,
    ) -> HttpResponse:
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        try:
            response = self._pool.request(
                method,
                url,
                body=body.encode() if body is not None else None,
                headers={**self._default_headers, **headers},
                timeout=self._timeout,
                retries=False,
                redirect=False,
                preload_content=True,
            )
        # Order matters: urllib3's NewConnectionError is a subclass of its TimeoutError.
        except SSLError as exc:
            raise TransportTlsError("TLS failed") from exc
        except NewConnectionError as exc:
            raise TransportError("connection failed") from exc
        except Urllib3Timeout as exc:
            raise TransportTimeout("timed out") from exc
        except HTTPError as exc:
            raise TransportError(f"connection failed ({type(exc).__name__})") from exc
        return HttpResponse(
            status=response.status,
            content=response.data,
            retry_after=response.headers.get("Retry-After"),
        )

    def close(self) -> None:
        self._pool.clear()


def ca_bundle_path() -> str:
    """The CA bundle requests would use: REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, else certifi's.

    An empty variable counts as unset, as in requests: it never turns verification off.
    """
    return (
        os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("CURL_CA_BUNDLE")
        or certifi.where()
    )
