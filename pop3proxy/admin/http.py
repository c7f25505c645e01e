"""The admin listener: an h11 front door for plain HTTP, with ``/events`` handed to trio-websocket.

trio-websocket alone answers every request that is not a WebSocket upgrade with a bare 400
(its handler never runs), so each connection starts here: h11 parses the request head under a
size limit (:data:`MAX_HEAD`, counted on the octets received) and a deadline
(:data:`HEAD_TIMEOUT`). A WebSocket upgrade of ``/events`` is then replayed, bytes already read
included, into ``trio_websocket.wrap_server_stream``; everything else gets one
``Connection: close`` response.

Routes (``GET`` and ``HEAD`` only, else 405; unknown paths 404):

- ``/healthz``: 200 while the process runs;
- ``/readyz``: 200 or 503 with a JSON reason (:mod:`.readiness`);
- ``/metrics``: Prometheus text (OpenMetrics when asked) (:mod:`.metrics`);
- ``/events``: the WebSocket feed (:mod:`.feed`); 426 without an upgrade;
- ``/api/summary``: JSON totals and history for the dashboard;
- ``/``, ``/dashboard.css``, ``/dashboard.js``: the dashboard, shipped in the package.

Who may ask (:mod:`.auth`). The probes (``/healthz``, ``/readyz``) answer everyone: the
kubelet sends no token; ``/readyz`` then says only ready or not and a one-word reason, and its
details (upstream, error, TLS version) go to those who may see the rest. Everything else is
refused with 421 when the ``Host`` is not trusted (DNS rebinding) and with 401 when a token is
set and the request does not carry it; a request that carries the token is served whatever
its ``Host``. A WebSocket upgrade that carries an ``Origin`` (a browser) must also come from a
page of this very endpoint: a browser sends its saved credentials along with another site's
WebSocket too.

Budgets, so that no outsider can starve the probes or make the proxy hold unbounded file
descriptors: each connection is in one pool at a time. Reading its head (at most
:data:`MAX_PENDING_HEADS`, :data:`MAX_PENDING_HEADS_PER_CLIENT` of one address; when full,
an unfinished head is dropped to make room, the flooding address's own first, so half-open
connections can never keep a new one out); then, once routed, a probe
(:data:`MAX_PROBES`, the oldest dropped when full), another request (:data:`MAX_REQUESTS`,
503 when full) or a watcher (the feed's own cap, 503 when full); and after its response,
lingering (:data:`MAX_LINGERING`, the oldest closed when full).
"""

from __future__ import annotations

import contextlib
import errno
import http
import importlib.resources
import ipaddress
import json
import math
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import h11
import structlog
import trio
import trio_websocket

from pop3proxy import __version__
from pop3proxy.addresses import format_address
from pop3proxy.admin.auth import AdminToken, trusted_host
from pop3proxy.admin.feed import Feed
from pop3proxy.admin.metrics import Metrics
from pop3proxy.admin.readiness import Readiness, ReadinessResult
from pop3proxy.config import DEFAULT_ADMIN_PORT, Endpoint

if TYPE_CHECKING:
    from pop3proxy.app import AppContext

__all__ = ["AdminServer", "PrefixedStream", "admin_service"]

log = structlog.get_logger("pop3proxy.admin")

#: Largest request head (request line, headers and the empty line), in octets; larger gets 431.
MAX_HEAD: Final = 16 * 1024
#: Seconds a client has to send its whole request head; slower gets 408.
HEAD_TIMEOUT: Final = 5.0
#: Seconds a response (or the WebSocket handshake) may take to be sent.
SEND_TIMEOUT: Final = 10.0
#: Seconds a 503 for a full pool may take to be sent (then the connection is closed).
REFUSAL_TIMEOUT: Final = 1.0
#: Unfinished request heads at once; when full, the oldest is dropped for the newcomer.
MAX_PENDING_HEADS: Final = 64
#: Unfinished request heads of one client address; beyond, its own oldest is dropped.
MAX_PENDING_HEADS_PER_CLIENT: Final = 16
#: Probes (``/healthz``, ``/readyz``) being answered at once; when full, the oldest is dropped.
MAX_PROBES: Final = 64
#: Other requests (and WebSocket handshakes) being answered at once; more get 503.
MAX_REQUESTS: Final = 64
#: Connections lingering after their response; when full, the oldest is closed at once.
MAX_LINGERING: Final = 64
#: Seconds between two log lines of one kind that a flood could repeat (refusals, drops).
LOG_INTERVAL: Final = 10.0
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
#: Answer anyone; no token, no Host check (the kubelet's probes carry neither).
_PROBES: Final = frozenset({"/healthz", "/readyz"})
#: What ``/readyz`` tells a caller who may not see the rest.
_READYZ_PUBLIC: Final = ("ready", "reason")
_CHALLENGES: Final = [
    ("WWW-Authenticate", 'Bearer realm="pop3proxy"'),
    ("WWW-Authenticate", 'Basic realm="pop3proxy", charset="UTF-8"'),
]
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

    __slots__ = ("client", "headers", "method", "path")

    def __init__(self, event: h11.Request, client: str | None = None) -> None:
        self.client = client
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


class _Pool:
    """The connections in one phase of their life, at most ``size``, oldest first.

    Each member is the cancel scope of a connection's task: cancelling it drops the
    connection. With ``per_client``, one client address holds at most that many: a newcomer
    beyond it drops that client's own oldest, and when the pool is full the oldest member of
    the client holding the most goes; a flood from one address never drops another's.
    """

    __slots__ = ("_by_client", "_members", "dropped", "name", "per_client", "size")

    def __init__(self, name: str, size: int, per_client: int | None = None) -> None:
        self.name = name
        self.size = size
        self.per_client = per_client
        self.dropped = 0
        self._members: dict[trio.CancelScope, str | None] = {}  # insertion order: oldest first
        self._by_client: dict[str | None, dict[trio.CancelScope, None]] = {}

    def __len__(self) -> int:
        return len(self._members)

    def join(self, scope: trio.CancelScope, *, evict: bool, client: str | None = None) -> bool:
        """Add ``scope``; when full, drop the oldest member (``evict``) or refuse (False)."""
        mine = self._by_client.get(client, {}) if self.per_client is not None else {}
        if self.per_client is not None and len(mine) >= self.per_client:
            if not evict:
                return False
            self._drop(next(iter(mine)))
        if len(self._members) >= self.size:
            if not evict:
                return False
            if self.per_client is None:
                self._drop(next(iter(self._members)))
            else:
                biggest = max(self._by_client.values(), key=len)
                self._drop(next(iter(biggest)))
        self._members[scope] = client
        if self.per_client is not None:
            self._by_client.setdefault(client, {})[scope] = None
        return True

    def leave(self, scope: trio.CancelScope) -> None:
        if scope not in self._members:
            return
        client = self._members.pop(scope)
        theirs = self._by_client.get(client)
        if theirs is not None:
            theirs.pop(scope, None)
            if not theirs:
                del self._by_client[client]

    def _drop(self, scope: trio.CancelScope) -> None:
        self.leave(scope)
        scope.cancel()
        self.dropped += 1


class _Connection:
    """One admin connection: its cancel scope, its client address, and the pool it is in (one
    at most)."""

    __slots__ = ("client", "pool", "scope")

    def __init__(self, client: str | None = None) -> None:
        self.scope = trio.CancelScope()
        self.client = client
        self.pool: _Pool | None = None

    def move(self, pool: _Pool, *, evict: bool) -> bool:
        """Leave the current pool for ``pool``; False (in no pool) if ``pool`` refused."""
        self.leave()
        if not pool.join(self.scope, evict=evict, client=self.client):
            return False
        self.pool = pool
        return True

    def leave(self) -> None:
        if self.pool is not None:
            self.pool.leave(self.scope)
            self.pool = None


class _SharedResult:
    """One readiness check that several requests wait for."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: ReadinessResult | None = None


class _Throttled:
    """Warnings a flood could repeat without end: one line per ``interval`` seconds per event,
    which says how many were held back since the last."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._quiet_until: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, event: str, **fields: object) -> None:
        now = trio.current_time()
        if now < self._quiet_until.get(event, -math.inf):
            self._held[event] = self._held.get(event, 0) + 1
            return
        self._quiet_until[event] = now + self.interval
        log.warning(event, held_back=self._held.pop(event, 0), **fields)


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class AdminServer:
    """Routes and connection handling; one per admin listener."""

    def __init__(self, ctx: AppContext, metrics: Metrics, feed: Feed, readiness: Readiness) -> None:
        self.ctx = ctx
        self.metrics = metrics
        self.feed = feed
        self.readiness = readiness
        self.static = _load_static()
        self.heads = _Pool("head", MAX_PENDING_HEADS, per_client=MAX_PENDING_HEADS_PER_CLIENT)
        self.probes = _Pool("probe", MAX_PROBES)
        self.requests = _Pool("request", MAX_REQUESTS)
        self.lingering = _Pool("linger", MAX_LINGERING)
        self.throttled = _Throttled(LOG_INTERVAL)
        #: Whether the listener is bound beyond loopback (set by ``admin_service``).
        self.exposed = False
        #: Where shared work runs that no requester may cancel (set by ``admin_service``).
        self.nursery: trio.Nursery | None = None
        self._readiness_run: _SharedResult | None = None
        self._had_token = ctx.settings.admin_credential is not None
        self.routes: Mapping[str, Handler] = {
            "/metrics": self._metrics,
            "/api/summary": self._summary,
            "/events": self._events_without_upgrade,
            **dict.fromkeys(_STATIC, self._static),
        }

    # -- connections ------------------------------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        """One admin connection; never raises (``serve_listeners`` would stop on an error)."""
        connection = _Connection(_peer(stream))
        try:
            with connection.scope:
                await self._handle(stream, connection)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:
            log.warning("admin.error", error_type=type(exc).__name__, error=str(exc)[:200])
        finally:
            connection.leave()
            await trio.aclose_forcefully(stream)

    def _join(self, connection: _Connection, pool: _Pool, *, evict: bool) -> bool:
        dropped = pool.dropped
        admitted = connection.move(pool, evict=evict)
        if pool.dropped != dropped:
            self.throttled.warning(
                "admin.overloaded",
                pool=pool.name,
                size=pool.size,
                dropped_total=pool.dropped,
                action="dropped the oldest connection",
            )
        elif not admitted:
            self.throttled.warning(
                "admin.overloaded", pool=pool.name, size=pool.size, action="refused with 503"
            )
        return admitted

    async def _handle(self, stream: trio.SocketStream, connection: _Connection) -> None:
        self._join(connection, self.heads, evict=True)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        raw = bytearray()
        try:
            with trio.fail_after(HEAD_TIMEOUT):
                event = await self._read_head(stream, conn, raw)
        except trio.TooSlowError:
            response = _text(408, "request head not received in time")
            await self._send(stream, connection, response, head=False)
            return
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in {400, 431} else 400
            await self._send(stream, connection, _text(status, f"bad request: {exc}"), head=False)
            return
        if event is None:
            return
        request = Request(event, connection.client)
        head = request.method == "HEAD"
        if request.path in _PROBES:
            self._join(connection, self.probes, evict=True)
            response = await self._probe(request)
        else:
            if not self._join(connection, self.requests, evict=False):
                await self._refuse(stream, _text(503, "too many requests at once"))
                return
            if request.path == "/events" and "websocket" in request.tokens("upgrade"):
                await self._websocket(stream, connection, request, bytes(raw))
                return
            response = self._refusal(request) or await self._route(request)
        log.debug("admin.request", method=request.method, path=request.path, status=response[0])
        await self._send(stream, connection, response, head=head)

    async def _read_head(
        self, stream: trio.SocketStream, conn: h11.Connection, raw: bytearray
    ) -> h11.Request | None:
        """The request head, from at most :data:`MAX_HEAD` octets.

        h11's own limit applies to what it has not parsed yet: a larger head that arrives in
        one read would pass it. So h11 is fed no more than the limit, and a head that is not
        complete within it is too large.
        """
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if len(raw) >= MAX_HEAD:
                    raise h11.RemoteProtocolError(
                        f"request head larger than {MAX_HEAD} octets", error_status_hint=431
                    )
                room = MAX_HEAD - len(raw)
                data = await stream.receive_some(RECEIVE_SIZE)
                raw += data
                conn.receive_data(data[:room])  # b"" is the end of the stream
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed before a request

    async def _send(
        self,
        stream: trio.SocketStream,
        connection: _Connection,
        response: Response,
        *,
        head: bool,
    ) -> None:
        """Send the response, then close gently: a client still sending (a head that was too
        large) must get to read the answer, not a reset."""
        status, content_type, body, headers = response
        with trio.move_on_after(SEND_TIMEOUT):
            await stream.send_all(_response_bytes(status, content_type, body, headers, head))
        self._join(connection, self.lingering, evict=True)
        with (
            trio.move_on_after(LINGER_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await stream.send_eof()
            drained = 0
            while drained < LINGER_LIMIT and (data := await stream.receive_some(RECEIVE_SIZE)):
                drained += len(data)

    async def _refuse(self, stream: trio.SocketStream, response: Response) -> None:
        """A refusal for a full pool: sent briefly, then closed without lingering."""
        status, content_type, body, headers = response
        with trio.move_on_after(REFUSAL_TIMEOUT):
            await stream.send_all(_response_bytes(status, content_type, body, headers, False))

    # -- who may ask --------------------------------------------------------------------------

    def _token(self) -> AdminToken | None:
        """The token now in force (SIGHUP may change it); warns if a reload dropped it."""
        token = self.ctx.settings.admin_credential
        if token is None and self._had_token and self.exposed:
            log.warning(
                "admin.unprotected",
                problem="the reloaded settings have no admin token: the admin endpoint, "
                "reachable beyond loopback, now answers everyone",
                hint="set --admin-token-file FILE or POP3PROXY_ADMIN_TOKEN",
            )
        self._had_token = token is not None
        return token

    def _trusted_host_name(self, host: str | None) -> bool:
        """Whether a ``Host`` is one a browser can only use for this endpoint (not a name
        another site made resolve to it: DNS rebinding)."""
        settings = self.ctx.settings
        names = [*settings.admin_host_names]
        if settings.admin is not None:
            names.append(settings.admin.host)
        return trusted_host(host, names)

    def _refusal(self, request: Request, *, quiet: bool = False) -> Response | None:
        """Why ``request`` may not have anything but a probe (421, 401), or None."""
        token = self._token()
        authorization = request.headers.get("authorization")
        if token is not None and token.accepts(authorization):
            return None
        if not self._trusted_host_name(request.headers.get("host")):
            if not quiet:
                self.throttled.warning(
                    "admin.host_refused", client=request.client, path=request.path
                )
            return _text(
                421,
                "this admin endpoint answers only by IP address, localhost or a name in "
                "--admin-host-names (a defence against DNS rebinding)",
            )
        if token is None:
            return None
        if not quiet:
            self.throttled.warning(
                "admin.unauthorized",
                client=request.client,
                path=request.path,
                reason="no token" if authorization is None else "wrong token",
            )
        return _text(
            401,
            "this admin endpoint needs its token: send 'Authorization: Bearer TOKEN', or in a "
            "browser log in with any user name and the token as the password",
            _CHALLENGES,
        )

    # -- routes -----------------------------------------------------------------------------------

    async def _probe(self, request: Request) -> Response:
        if request.method not in {"GET", "HEAD"}:
            return _text(405, "only GET and HEAD", [("Allow", "GET, HEAD")])
        if request.path == "/healthz":
            return _text(200, "ok")
        result = await self._readiness()
        detail = result.as_json(trio.current_time())
        if self._refusal(request, quiet=True) is not None:
            detail = {key: detail[key] for key in _READYZ_PUBLIC}
        return _json(200 if result.ready else 503, detail)

    async def _readiness(self) -> ReadinessResult:
        """The readiness answer, from a check run in the server's own task.

        A requester may be dropped from the probes' pool (or give up) while the upstream is
        being probed; were the probe running in its task, a flood of ``/readyz`` could cancel
        every probe before it finished, and no answer would ever come.
        """
        if self.nursery is None:
            return await self.readiness.check()
        run = self._readiness_run
        if run is None:
            run = self._readiness_run = _SharedResult()
            self.nursery.start_soon(self._check_readiness, run)
        await run.done.wait()
        assert run.result is not None
        return run.result

    async def _check_readiness(self, run: _SharedResult) -> None:
        try:
            run.result = await self.readiness.check()
        except Exception as exc:
            log.warning("admin.error", error_type=type(exc).__name__, error=str(exc)[:200])
            run.result = ReadinessResult(
                False, "internal_error", trio.current_time(), error=type(exc).__name__
            )
        finally:
            self._readiness_run = None
            run.done.set()

    async def _route(self, request: Request) -> Response:
        handler = self.routes.get(request.path)
        if handler is None:
            return _text(404, f"not found: {request.path}")
        if request.method not in {"GET", "HEAD"}:
            return _text(405, "only GET and HEAD", [("Allow", "GET, HEAD")])
        return await handler(request)

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
        origin = request.headers.get("origin")
        host = request.headers.get("host", "").lower()
        # A browser (it sends Origin) also opens another site's WebSocket to this endpoint,
        # with the credentials it saved for it: only a page of this endpoint may.
        if origin is not None and origin.lower().partition("://")[2].rstrip("/") != host:
            return _text(403, "cross-origin WebSocket refused")
        if self.feed.full:
            return _text(503, "too many watchers")
        return None

    async def _websocket(
        self, stream: trio.SocketStream, connection: _Connection, request: Request, raw: bytes
    ) -> None:
        problem = self._refusal(request) or self._upgrade_problem(request)
        if problem is not None:
            await self._send(stream, connection, problem, head=False)
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
                connection.leave()  # a watcher now: the feed counts (and caps) those
                stalled = await self.feed.serve(ws)
                if not stalled:
                    with trio.move_on_after(2):
                        await ws.aclose()
            except (trio.TooSlowError, trio_websocket.ConnectionClosed):
                pass
            finally:
                await trio.aclose_forcefully(prefixed)
                nursery.cancel_scope.cancel()


def _peer(stream: trio.SocketStream) -> str | None:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError):
        return None


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
        token = ctx.settings.admin_credential
        exposed = []
        for listener in listeners:
            sockname = listener.socket.getsockname()
            address = format_address(sockname)
            if not _is_loopback(sockname[0]):
                exposed.append(address)
            log.info(
                "admin.started", address=address, url=f"http://{address}/", token=token is not None
            )
        server.exposed = bool(exposed)
        if exposed and token is None:
            log.warning(
                "admin.unprotected",
                addresses=exposed,
                problem="the admin endpoint is reachable beyond loopback and asks for no "
                "token: anyone who can connect reads the live feed (user names, client "
                "addresses), the metrics and the dashboard",
                hint="set --admin-token-file FILE (or POP3PROXY_ADMIN_TOKEN), or bind --admin "
                "to 127.0.0.1",
            )
        task_status.started()
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            await trio.serve_listeners(server.handle, listeners)
    finally:
        ctx.telemetry.remove_sink(metrics.sink)
        ctx.telemetry.remove_sink(feed.sink)
