"""The admin listener: an h11 front door for plain HTTP, with ``/events`` handed to trio-websocket.

trio-websocket alone answers every request that is not a WebSocket upgrade with a bare 400
(its handler never runs), so each connection starts here: h11 parses the request head under a
size limit (:data:`MAX_HEAD`) and a deadline (:data:`HEAD_TIMEOUT`). A WebSocket upgrade of
``/events`` is then replayed, bytes already read included, into
``trio_websocket.wrap_server_stream``; everything else gets one ``Connection: close`` response.

Routes (``GET`` and ``HEAD`` only, else 405; unknown paths 404):

- ``/healthz``: 200 while the process runs;
- ``/readyz``: 200 or 503 with a JSON reason (:mod:`.readiness`);
- ``/metrics``: Prometheus text (OpenMetrics when asked) (:mod:`.metrics`);
- ``/events``: the WebSocket feed (:mod:`.feed`); 426 without an upgrade;
- ``/api/summary``: JSON totals and history for the dashboard;
- ``/``, ``/dashboard.css``, ``/dashboard.js``: the dashboard, shipped in the package.

A WebSocket upgrade that carries an ``Origin`` (a browser) must come from a page of this very
endpoint, reached by IP address, ``localhost`` or the ``--admin`` host name: another web site
open in a browser on the same machine must not read the feed, not even by DNS rebinding.
"""

from __future__ import annotations

import contextlib
import errno
import http
import importlib.resources
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import h11
import structlog
import trio
import trio_websocket

from pop3proxy import __version__
from pop3proxy.admin.feed import Feed
from pop3proxy.admin.metrics import Metrics
from pop3proxy.admin.readiness import Readiness, ReadinessResult
from pop3proxy.config import DEFAULT_ADMIN_PORT, Endpoint

if TYPE_CHECKING:
    from pop3proxy.app import AppContext

__all__ = ["AdminServer", "PrefixedStream", "admin_service"]

log = structlog.get_logger("pop3proxy.admin")

#: Largest request head (request line and headers), in octets; larger gets 431.
MAX_HEAD: Final = 16 * 1024
#: Seconds a client has to send its whole request head; slower gets 408.
HEAD_TIMEOUT: Final = 5.0
#: Seconds a response (or the WebSocket handshake) may take to be sent.
SEND_TIMEOUT: Final = 10.0
#: Most admin connections at once (watchers included); more get 503 at once.
MAX_CONNECTIONS: Final = 64
#: Kernel send buffer of a watcher's socket: what a stuck watcher may hold, besides its queue.
WATCHER_SNDBUF: Final = 64 * 1024
RECEIVE_SIZE: Final = 4096
#: After a response: how long, and how much, to read and discard before closing, so that
#: the kernel does not answer unread input with a reset that destroys the response.
LINGER_TIMEOUT: Final = 2.0
LINGER_LIMIT: Final = 256 * 1024

DEFAULT_ADMIN: Final = Endpoint("127.0.0.1", DEFAULT_ADMIN_PORT)

_STATIC: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
}
_TEXT: Final = "text/plain; charset=utf-8"
_JSON: Final = "application/json"
#: The dashboard loads only its own files and talks only to this endpoint.
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

Response = tuple[int, str, bytes, list[tuple[str, str]]]
Handler = Callable[["Request"], Awaitable[Response]]


class Request:
    """The parts of a request head the routes use."""

    __slots__ = ("headers", "method", "path")

    def __init__(self, event: h11.Request) -> None:
        self.method = event.method.decode("ascii", "replace").upper()
        self.path = event.target.decode("ascii", "replace").partition("?")[0]
        self.headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("ascii", "replace").lower()
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}


class PrefixedStream(trio.abc.Stream):
    """A stream that first replays ``prefix`` (the bytes h11 already consumed), then reads on."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


def _response_bytes(
    status: int, content_type: str, body: bytes, headers: list[tuple[str, str]], head: bool
) -> bytes:
    phrase = http.HTTPStatus(status).phrase
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        f"Server: pop3proxy/{__version__}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return data if head else data + body


def _text(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return status, _TEXT, (message + "\n").encode(), headers or []


def _json(status: int, value: object) -> Response:
    body = json.dumps(value, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return status, _JSON, body, []


def _load_static() -> dict[str, bytes]:
    folder = importlib.resources.files("pop3proxy.admin").joinpath("dashboard")
    return {name: folder.joinpath(name).read_bytes() for name, _ in _STATIC.values()}


class AdminServer:
    """Routes and connection handling; one per admin listener."""

    def __init__(self, ctx: AppContext, metrics: Metrics, feed: Feed, readiness: Readiness) -> None:
        self.ctx = ctx
        self.metrics = metrics
        self.feed = feed
        self.readiness = readiness
        self.static = _load_static()
        self.connections = 0
        self.routes: Mapping[str, Handler] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/api/summary": self._summary,
            "/events": self._events_without_upgrade,
            **dict.fromkeys(_STATIC, self._static),
        }

    # -- connections ------------------------------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        """One admin connection; never raises (``serve_listeners`` would stop on an error)."""
        try:
            if self.connections >= MAX_CONNECTIONS:
                with trio.move_on_after(1):
                    await stream.send_all(
                        _response_bytes(503, _TEXT, b"too many connections\n", [], head=False)
                    )
                return
            self.connections += 1
            try:
                await self._handle(stream)
            finally:
                self.connections -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:
            log.warning("admin.error", error_type=type(exc).__name__, error=str(exc)[:200])
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        raw = bytearray()
        try:
            with trio.fail_after(HEAD_TIMEOUT):
                event = await self._read_head(stream, conn, raw)
        except trio.TooSlowError:
            await self._send(stream, _text(408, "request head not received in time"), head=False)
            return
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in {400, 431} else 400
            await self._send(stream, _text(status, f"bad request: {exc}"), head=False)
            return
        if event is None:
            return
        request = Request(event)
        head = request.method == "HEAD"
        if request.path == "/events" and "websocket" in request.tokens("upgrade"):
            await self._websocket(stream, request, bytes(raw))
            return
        handler = self.routes.get(request.path)
        if handler is None:
            response = _text(404, f"not found: {request.path}")
        elif request.method not in {"GET", "HEAD"}:
            response = _text(405, "only GET and HEAD", [("Allow", "GET, HEAD")])
        else:
            response = await handler(request)
        log.debug("admin.request", method=request.method, path=request.path, status=response[0])
        await self._send(stream, response, head=head)

    async def _read_head(
        self, stream: trio.SocketStream, conn: h11.Connection, raw: bytearray
    ) -> h11.Request | None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_SIZE)
                raw += data
                conn.receive_data(data)  # b"" is the end of the stream
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed before a request

    async def _send(self, stream: trio.SocketStream, response: Response, *, head: bool) -> None:
        """Send the response, then close gently: a client still sending (a head that was too
        large) must get to read the answer, not a reset."""
        status, content_type, body, headers = response
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(_response_bytes(status, content_type, body, headers, head))
        with (
            trio.move_on_after(LINGER_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await stream.send_eof()
            drained = 0
            while drained < LINGER_LIMIT and (data := await stream.receive_some(RECEIVE_SIZE)):
                drained += len(data)

    # -- routes -----------------------------------------------------------------------------------

    async def _healthz(self, request: Request) -> Response:
        return _text(200, "ok")

    async def _readyz(self, request: Request) -> Response:
        result = await self.readiness.check()
        return _json(200 if result.ready else 503, result.as_json(trio.current_time()))

    async def _metrics(self, request: Request) -> Response:
        body, content_type = self.metrics.render(request.headers.get("accept"))
        return 200, content_type, body, []

    async def _summary(self, request: Request) -> Response:
        summary: dict[str, Any] = self.metrics.summary()
        last = self.readiness.last
        summary["proxy"] = {
            "version": __version__,
            "uptime_s": round(trio.current_time() - self.ctx.started_at, 1),
            "upstream": str(self.ctx.settings.upstream),
            "tls_server_name": self.ctx.settings.upstream_server_name,
            "listeners": list(self.ctx.listeners),
        }
        summary["readiness"] = None if last is None else last.as_json(trio.current_time())
        return _json(200, summary)

    async def _static(self, request: Request) -> Response:
        name, content_type = _STATIC[request.path]
        headers = [("Content-Security-Policy", _CSP), ("Referrer-Policy", "no-referrer")]
        return 200, content_type, self.static[name], headers

    async def _events_without_upgrade(self, request: Request) -> Response:
        return _text(426, "/events is a WebSocket", [("Upgrade", "websocket")])

    # -- the WebSocket feed ---------------------------------------------------------------------

    def _upgrade_problem(self, request: Request) -> Response | None:
        if request.method != "GET":
            return _text(405, "a WebSocket upgrade is a GET", [("Allow", "GET")])
        if "upgrade" not in request.tokens("connection") or not request.headers.get(
            "sec-websocket-key"
        ):
            return _text(400, "incomplete WebSocket upgrade")
        if request.headers.get("sec-websocket-version", "").strip() != "13":
            return _text(426, "WebSocket version 13 only", [("Sec-WebSocket-Version", "13")])
        problem = self._origin_problem(request)
        if problem is not None:
            return _text(403, problem)
        if self.feed.full:
            return _text(503, "too many watchers")
        return None

    def _origin_problem(self, request: Request) -> str | None:
        origin = request.headers.get("origin")
        if origin is None:  # not a browser
            return None
        host = request.headers.get("host", "").lower()
        if origin.lower().partition("://")[2].rstrip("/") != host:
            return "cross-origin WebSocket refused"
        if not self._trusted_host_name(host):
            return "open the dashboard by IP address, localhost or the --admin host name"
        return None

    def _trusted_host_name(self, host: str) -> bool:
        """Whether a browser's ``Host`` may be trusted with the feed.

        A page of another site can make its own name resolve to 127.0.0.1 (DNS rebinding),
        and then it is "same-origin" with this endpoint. Its name is not an IP address, not
        ``localhost`` and not the configured admin host, though.
        """
        name = host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host
        name = name.removeprefix("[").removesuffix("]")
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            return True
        admin = getattr(self.ctx.settings, "admin", None)
        configured = admin.host.lower() if admin is not None else None
        return name in {"localhost", configured} or name.endswith(".localhost")

    async def _websocket(self, stream: trio.SocketStream, request: Request, raw: bytes) -> None:
        problem = self._upgrade_problem(request)
        if problem is not None:
            await self._send(stream, problem, head=False)
            return
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WATCHER_SNDBUF)
        prefixed = PrefixedStream(stream, raw)
        stalled = True
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    ws_request = await trio_websocket.wrap_server_stream(
                        nursery, prefixed, message_queue_size=4, max_message_size=64 * 1024
                    )
                    ws = await ws_request.accept()
                stalled = await self.feed.serve(ws)
                if not stalled:
                    with trio.move_on_after(2):
                        await ws.aclose()
            except (trio.TooSlowError, trio_websocket.ConnectionClosed):
                pass
            finally:
                await trio.aclose_forcefully(prefixed)
                nursery.cancel_scope.cancel()


def _format_address(sockaddr: Any) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def admin_service(
    ctx: AppContext, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The app service: serve the admin endpoint until cancelled (nothing if ``admin`` is off).

    If the *default* address is taken (say, by a second proxy on the same host), the proxy
    runs on without the admin endpoint and logs ``admin.unavailable``; an address given
    explicitly must be free, or start-up fails.
    """
    endpoint = getattr(ctx.settings, "admin", None)
    if endpoint is None:
        task_status.started()
        return
    try:
        listeners = await trio.open_tcp_listeners(endpoint.port, host=endpoint.host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and endpoint == DEFAULT_ADMIN:
            log.warning(
                "admin.unavailable",
                address=str(endpoint),
                error=exc.strerror or str(exc),
                hint="set --admin HOST:PORT (port 0 picks a free one) or --admin off",
            )
            task_status.started()
            return
        raise OSError(exc.errno, f"admin endpoint {endpoint}: {exc.strerror or exc}") from exc

    metrics = Metrics(lambda: ctx.settings)
    feed = Feed(
        lambda: ctx.settings,
        on_watchers=metrics.feed_watchers.set,
        on_dropped=metrics.feed_dropped.inc,
    )

    def on_result(result: ReadinessResult, peer: dict[str, str | None] | None) -> None:
        metrics.set_ready(result.ready)
        if peer is not None:
            metrics.observe_certificate(peer.get("peer_not_after"))

    readiness = Readiness(ctx, on_result)
    server = AdminServer(ctx, metrics, feed, readiness)
    ctx.telemetry.add_sink(metrics.sink)
    ctx.telemetry.add_sink(feed.sink)
    try:
        for listener in listeners:
            address = _format_address(listener.socket.getsockname())
            log.info("admin.started", address=address, url=f"http://{address}/")
        task_status.started()
        await trio.serve_listeners(server.handle, listeners)
    finally:
        ctx.telemetry.remove_sink(metrics.sink)
        ctx.telemetry.remove_sink(feed.sink)
