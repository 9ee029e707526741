"""The simulator on the wire: SimulatorServer serves a SimulatedApi over HTTP or HTTPS with
aiohttp's low-level server, on an event loop in a thread of its own; ``run_simulator`` is
``poller simulate``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Mapping
from types import FrameType

from aiohttp import web

from poller.devtools.simulator.generate import SimulatorError
from poller.devtools.simulator.handlers import DROP, ApiHandler, Delayed, Request
from poller.devtools.simulator.model import DEFAULT_TOKEN, SimulatedApi

# stop() lets an answer in progress this long before it cancels it (a latency fault's wait).
_STOP_GRACE_SECONDS = 0.05
_JSON = {"Content-Type": "application/json"}


class SimulatorServer:
    """Serves a SimulatedApi over HTTP in a background thread; ``ssl_context`` (server side)
    makes it HTTPS."""

    def __init__(
        self,
        api: SimulatedApi,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.api = api
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self._host_port: str | None = None
        self._handler: ApiHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.ServerRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._host_port is None:
            raise RuntimeError("the simulator is not started")
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._host_port}"

    def start(self) -> SimulatorServer:
        if self._loop is not None:
            return self
        try:
            listener = socket.create_server((self._host, self._port), backlog=1024)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise SimulatorError(f"cannot listen on {self._host}:{self._port}: {reason}") from None
        host, port = listener.getsockname()[:2]
        self._host_port = f"{host}:{port}"
        self._handler = ApiHandler(self.api, self._host_port, tls=self._ssl_context is not None)
        loop = asyncio.new_event_loop()
        try:
            self._runner = loop.run_until_complete(self._open(listener))
        except BaseException:
            listener.close()
            loop.close()
            raise
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="cekura-simulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; open connections, idle keep-alive ones included, are closed now."""
        loop, runner, thread = self._loop, self._runner, self._thread
        if loop is None or runner is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._loop = self._runner = self._thread = None
        self._host_port = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _open(self, listener: socket.socket) -> web.ServerRunner:
        # No access log: a line per request would cost more than the answer.
        server = web.Server(self._serve, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=_STOP_GRACE_SECONDS)
        await runner.setup()
        await web.SockSite(runner, listener, ssl_context=self._ssl_context).start()
        return runner

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._handler is not None
        body = await request.read() if request.body_exists else b""
        answer = self._handler.respond(
            Request(request.method, request.raw_path, request.headers, body)
        )
        if isinstance(answer, Delayed):
            # Only this request waits: the loop goes on serving every other connection.
            await asyncio.sleep(answer.seconds)
            answer = answer.then()
        if answer is DROP:
            if request.transport is not None:
                request.transport.close()
            # Never written: aiohttp sees the connection closed and ends it without an error.
            return web.Response()
        headers = {**_JSON, **dict(answer.headers)} if answer.headers else _JSON
        return web.Response(status=answer.status, body=answer.body, headers=headers)


def write_keys_file(path: str | os.PathLike[str], keys: Mapping[int, str]) -> None:
    """``<org id> <key>`` per line, readable by the owner only (mode 0600)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # O_CREAT's mode does not apply to a file that already existed.
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as keys_file:
        keys_file.writelines(f"{org_id} {key}\n" for org_id, key in sorted(keys.items()))


def run_simulator(
    *,
    orgs: int,
    port: int,
    token: str | None,
    seed: int,
    keys_file: str | None,
    seed_file: str | None,
    host: str = "127.0.0.1",
    usage_scale: float | None = None,
) -> None:
    """Serve a simulated Cekura API until SIGINT/SIGTERM (``poller simulate``).

    ``token`` None means the seed file's token, or DEFAULT_TOKEN. ``usage_scale`` turns the
    usage model on with ``seed`` (docs/simulator.md).
    Raises SimulatorError (one-line message) for a bad seed file, keys file or port.
    """
    if token is not None and not token:
        raise SimulatorError("the simulator token must not be empty")
    if seed_file:
        api = SimulatedApi.from_seed_file(seed_file, token=token)
    elif orgs < 0:
        raise SimulatorError("--orgs must be 0 or more")
    else:
        api = SimulatedApi.generate(orgs, seed=seed, token=token or DEFAULT_TOKEN)
    if usage_scale is not None:
        try:
            api.enable_usage(seed=seed, scale=usage_scale)
        except ValueError as exc:
            raise SimulatorError(str(exc)) from None
    if keys_file:
        try:
            write_keys_file(keys_file, api.keys())
        except OSError as exc:
            raise SimulatorError(f"cannot write keys file {keys_file}: {exc.strerror}") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: the /_sim/ control endpoints need no credentials and {host} "
            "is reachable from other machines",
            file=sys.stderr,
        )

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with SimulatorServer(api, host=host, port=port) as server:
            where = f"; API keys in {keys_file}" if keys_file else ""
            if usage_scale is not None:
                where += f"; usage model on (seed {seed}, scale {usage_scale:g})"
            count = len(api.org_ids())
            print(
                f"Cekura API simulator at {server.url} with {count} organizations{where}",
                flush=True,
            )
            # A timed wait so signals are handled promptly on every platform.
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("Cekura API simulator stopped", flush=True)
