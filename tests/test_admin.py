"""The admin endpoint of a real proxy in front of the real Dovecot: every route, its status and
content type, a Prometheus scrape whose counters move as a ``poplib`` session runs, ``/readyz``
following Dovecot down and up, the HTTP front door's limits (head size, head timeout,
methods, malformed requests, connection budgets that no outsider can exhaust for the probes),
the admin token (what it protects, how clients present it, how bad token settings are
refused) and the ``Host`` check against DNS rebinding.

The helpers here (:class:`AdminProxy`, :func:`start_admin_proxy`) are shared by the other
admin test modules (feed, watch, dashboard).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import json
import os
import poplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import structlog
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from pop3proxy import cli
from pop3proxy.admin import http as admin_http
from pop3proxy.admin.auth import AdminToken
from pop3proxy.admin.readiness import Readiness
from pop3proxy.app import AppContext
from pop3proxy.config import Endpoint, Settings
from pop3proxy.telemetry import Telemetry
from tests.conftest import KIB, SHARED_PROXY_ARGS
from tests.peers.dovecot import Dovecot, MailboxFactory, make_message
from tests.peers.proxy import ProxyProcess

TIMEOUT = 10.0
REPO_ROOT = Path(__file__).resolve().parents[1]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers shared by the admin tests ----------------------------------------------------------


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


class AdminProxy:
    """A running proxy with its admin endpoint on an ephemeral port.

    With a ``token`` (the proxy's ``--admin-token-file``), :meth:`request` sends it as a bearer
    token unless told ``authorized=False``.
    """

    def __init__(self, proxy: ProxyProcess, token: str | None = None) -> None:
        self.proxy = proxy
        self.token = token
        event = proxy.wait_for_event("admin.started")
        self.address = str(event["address"])
        host, _, port = self.address.rpartition(":")
        self.host = host
        self.port = int(port)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def request(
        self,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        *,
        authorized: bool = True,
    ) -> Reply:
        fields = dict(headers or {})
        if authorized and self.token is not None:
            fields.setdefault("Authorization", f"Bearer {self.token}")
        connection = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            connection.request(method, path, headers=fields)
            response = connection.getresponse()
            body = response.read()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
        finally:
            connection.close()

    def raw(self, data: bytes, *, wait_for_close: bool = True) -> bytes:
        """Send raw bytes; return everything the server answers until it closes."""
        with socket.create_connection((self.host, self.port), timeout=TIMEOUT) as sock:
            sock.sendall(data)
            chunks = []
            while wait_for_close:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    def scrape(self) -> Samples:
        reply = self.request("/metrics")
        assert reply.status == 200
        return parse_metrics(reply.body.decode())


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def start_admin_proxy(
    dovecot: Dovecot,
    log_path: Path,
    *extra: str,
    admin: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
) -> ProxyProcess:
    """A proxy in front of ``dovecot`` with its admin endpoint on ``admin`` (not started).

    Its per-address login budget is lifted as for the shared proxy (``SHARED_PROXY_ARGS``):
    tests here fail logins on purpose from 127.0.0.1, and repeated runs must not exhaust it.
    """
    return ProxyProcess(
        log_path,
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=[*SHARED_PROXY_ARGS, "--admin", admin, "--readiness-cache", "0.2", *extra],
        env=env,
    )


def wait_until(condition: object, what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``condition()`` (every 50 ms, at most ``timeout`` s) until it is true."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def admin(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminProxy]:
    with start_admin_proxy(dovecot, tmp_path_factory.mktemp("admin") / "proxy.log") as proxy:
        yield AdminProxy(proxy)


# -- routes ---------------------------------------------------------------------------------------


def test_routes_answer_with_their_status_and_content_type(admin: AdminProxy) -> None:
    health = admin.request("/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    assert health.headers["content-type"].startswith("text/plain")
    assert health.headers["connection"] == "close"

    page = admin.request("/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert b"dashboard.js" in page.body
    assert b"http://" not in page.body.replace(b"http://www.w3.org", b"")  # no CDN
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for path, kind in (("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
        asset = admin.request(path)
        assert asset.status == 200, path
        assert asset.headers["content-type"].startswith(kind)
        assert int(asset.headers["content-length"]) == len(asset.body) > 100

    metrics = admin.request("/metrics")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    assert b"pop3proxy_sessions_opened_total" in metrics.body
    openmetrics = admin.request("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.body.rstrip().endswith(b"# EOF")

    summary = admin.request("/api/summary")
    assert summary.status == 200
    assert summary.headers["content-type"] == "application/json"
    assert set(summary.json()) >= {"sessions", "logins", "commands", "networks", "history"}

    ready = admin.request("/readyz")
    assert ready.status == 200, ready.body
    assert ready.headers["content-type"] == "application/json"
    assert ready.json()["ready"] is True

    plain_events = admin.request("/events")
    assert plain_events.status == 426
    assert plain_events.headers["upgrade"] == "websocket"


def test_head_gets_headers_only(admin: AdminProxy) -> None:
    get = admin.request("/")
    head = admin.request("/", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["content-type"] == get.headers["content-type"]


def test_unknown_paths_404_and_other_methods_405(admin: AdminProxy) -> None:
    for path in ("/nope", "/metrics/", "/../etc/passwd", "/dashboard/index.html", "/favicon.ico"):
        reply = admin.request(path)
        assert reply.status == 404, path
    for method, path in (("POST", "/metrics"), ("PUT", "/"), ("DELETE", "/healthz")):
        reply = admin.request(method=method, path=path)
        assert reply.status == 405, (method, path)
        assert reply.headers["allow"] == "GET, HEAD"
    reply = admin.request("/healthz?verbose=1")
    assert reply.status == 200  # a query string does not change the route


def test_plain_and_malformed_requests_get_proper_answers(admin: AdminProxy) -> None:
    http10 = admin.raw(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert http10.startswith(b"HTTP/1.1 200 OK\r\n")
    assert http10.endswith(b"\r\n\r\nok\n")

    garbage = admin.raw(b"HELLO THERE\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 Bad Request\r\n")

    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (32 * KIB) + b"\r\n\r\n"
    too_large = admin.raw(huge)
    assert too_large.startswith(b"HTTP/1.1 431 "), too_large[:80]

    # The proxy answered all of that and still works.
    assert admin.request("/healthz").status == 200


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_move_as_a_poplib_session_runs(admin: AdminProxy, mailbox: MailboxFactory) -> None:
    message = make_message(48 * KIB, subject="metrics")
    box = mailbox([message])
    before = admin.scrape()

    pop = poplib.POP3("127.0.0.1", admin.proxy.port, timeout=TIMEOUT)
    client_port = pop.sock.getsockname()[1]
    session_id = admin.proxy.session_id_for(client_port)
    pop.user(box.user)
    with pytest.raises(poplib.error_proto):
        pop.pass_(box.password + "-wrong")
    pop.close()
    admin.proxy.wait_session_closed(session_id)

    pop = poplib.POP3("127.0.0.1", admin.proxy.port, timeout=TIMEOUT)
    session_id = admin.proxy.session_id_for(pop.sock.getsockname()[1])
    pop.user(box.user)
    pop.pass_(box.password)
    pop.stat()
    _, lines, _ = pop.retr(1)
    pop.top(1, 0)
    with pytest.raises(poplib.error_proto):
        pop.retr(99)
    during = admin.scrape()
    pop.quit()
    admin.proxy.wait_session_closed(session_id)
    after = admin.scrape()
    assert b"\r\n".join(lines) + b"\r\n" == message

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(during, "pop3proxy_sessions_active") == 1
    assert value(after, "pop3proxy_sessions_active") == 0
    assert delta("pop3proxy_sessions_opened_total") == 2
    assert delta("pop3proxy_sessions_closed_total", reason="quit") == 1
    assert delta("pop3proxy_plaintext_sessions_total", network="127.0.0.0/8") == 2
    assert delta("pop3proxy_logins_total", mechanism="USER", result="failure") == 1
    assert delta("pop3proxy_logins_total", mechanism="USER", result="success") == 1
    assert delta("pop3proxy_commands_total", verb="RETR", status="+OK") == 1
    assert delta("pop3proxy_commands_total", verb="RETR", status="-ERR") == 1
    assert delta("pop3proxy_commands_total", verb="TOP", status="+OK") == 1
    assert delta("pop3proxy_commands_total", verb="PASS", status="-ERR") == 1
    assert delta("pop3proxy_message_size_bytes_count", verb="RETR") == 1
    assert delta("pop3proxy_message_size_bytes_sum", verb="RETR") >= len(message)
    assert delta("pop3proxy_message_size_bytes_bucket", verb="RETR", le="65536.0") == 1
    assert delta("pop3proxy_message_size_bytes_bucket", verb="RETR", le="16384.0") == 0
    assert delta("pop3proxy_bytes_total", direction="to_client") >= len(message)
    assert delta("pop3proxy_bytes_total", direction="from_client") > 0
    assert delta("pop3proxy_session_duration_seconds_count") == 2
    # trustme certificates are valid until the year 3000.
    assert value(after, "pop3proxy_upstream_certificate_expiry_days") > 300 * 365

    text = admin.request("/metrics").body.decode()
    assert box.user not in text
    assert box.password not in text
    summary = admin.request("/api/summary").body.decode()
    assert box.password not in summary


def test_readyz_follows_the_upstream_down_and_back(
    admin: AdminProxy, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    assert admin.request("/readyz").status == 200
    before = admin.scrape()
    problems: list[str] = []
    try:
        problems = dovecot.stop(check_log=False)
        wait_until(lambda: admin.request("/readyz").status == 503, "/readyz to answer 503")
        down = admin.request("/readyz").json()
        assert down["ready"] is False
        assert (down["reason"], down["phase"]) == ("refused", "connect")
        assert value(admin.scrape(), "pop3proxy_upstream_ready") == 0
        unhealthy = healthcheck(admin.endpoint)
        assert unhealthy.returncode == 1, unhealthy
        assert unhealthy.stdout.startswith("not ready: HTTP 503 refused"), unhealthy.stdout
        # A session now fails upstream, and is counted as such.
        with socket.create_connection(("127.0.0.1", admin.proxy.port), timeout=TIMEOUT) as sock:
            failed = admin.proxy.session_id_for(sock.getsockname()[1])
            assert sock.recv(512).startswith(b"-ERR [SYS/TEMP]")
        admin.proxy.wait_session_closed(failed)
    finally:
        dovecot.start()
    wait_until(lambda: admin.request("/readyz").status == 200, "/readyz to answer 200 again")
    after = admin.scrape()
    assert value(after, "pop3proxy_upstream_ready") == 1
    failures = value(
        after, "pop3proxy_upstream_failures_total", phase="connect", reason="refused"
    ) - value(before, "pop3proxy_upstream_failures_total", phase="connect", reason="refused")
    assert failures == 1
    assert problems == []
    changes = admin.proxy.find_events("readiness.changed")
    assert [e["ready"] for e in changes][-2:] == [False, True]
    box = mailbox([])
    pop = poplib.POP3("127.0.0.1", admin.proxy.port, timeout=TIMEOUT)
    session_id = admin.proxy.session_id_for(pop.sock.getsockname()[1])
    pop.user(box.user)
    pop.pass_(box.password)
    pop.quit()
    # Gone before the next test scrapes: the module's proxy counts every session.
    admin.proxy.wait_session_closed(session_id)


def test_client_networks_are_the_configured_ones(dovecot: Dovecot, tmp_path: Path) -> None:
    """With ``--allow 10.0.0.0/8,fd00::/8`` loopback clients are refused: counted under
    ``other`` and as refused by the access control; no label carries an address."""
    proxy = start_admin_proxy(dovecot, tmp_path / "acl.log", "--allow", "10.0.0.0/8,fd00::/8")
    with proxy:
        admin = AdminProxy(proxy)
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
                assert sock.recv(512).startswith(b"-ERR")
        wait_until(lambda: len(proxy.find_events("session.closed")) == 2, "both sessions to close")
        samples = admin.scrape()
        text = admin.request("/metrics").body.decode()
    networks = {
        dict(labels)["network"]: count
        for (name, labels), count in samples.items()
        if name == "pop3proxy_plaintext_sessions_total"
    }
    assert networks == {"10.0.0.0/8": 0, "fd00::/8": 0, "other": 2}
    assert value(samples, "pop3proxy_sessions_refused_total", reason="acl") == 2
    assert value(samples, "pop3proxy_sessions_closed_total", reason="refused_acl") == 2
    assert "127.0.0.1" not in text


# -- switching it off, and a taken port ----------------------------------------------------------


def test_admin_off_and_taken_ports(dovecot: Dovecot, tmp_path: Path) -> None:
    with start_admin_proxy(dovecot, tmp_path / "off.log", admin="off") as proxy:
        assert proxy.find_events("admin.started") == []

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = start_admin_proxy(dovecot, tmp_path / "x.log", admin=f"127.0.0.1:{port}")
        result = subprocess.run(
            command.command(),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO_ROOT,
            check=False,
        )
    assert result.returncode == 1, result
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1, result.stderr
    assert f"admin endpoint 127.0.0.1:{port}" in errors[0]
    assert errors[0].startswith("pop3proxy: cannot listen: ")  # not the POP3 address


def test_the_default_port_taken_is_only_a_warning(dovecot: Dovecot, tmp_path: Path) -> None:
    """A second proxy on a host keeps serving POP3 when 127.0.0.1:9110 is not free."""
    blocker = socket.socket()
    with contextlib.ExitStack() as stack:
        stack.enter_context(blocker)
        try:
            blocker.bind(("127.0.0.1", 9110))
            blocker.listen()
        except OSError:
            pass  # taken already (another proxy of this test run): just as good
        # The default address (ProxyProcess itself passes --admin off; later flags win).
        proxy = start_admin_proxy(dovecot, tmp_path / "default.log", admin="127.0.0.1:9110")
        with proxy:
            warning = proxy.wait_for_event("admin.unavailable")
            assert warning["level"] == "warning"
            assert warning["address"] == "127.0.0.1:9110"
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
                assert sock.recv(512).startswith(b"+OK")


# -- limits of the front door, in process (short timeouts) -----------------------------------------


async def start_in_process(nursery: trio.Nursery, **settings: Any) -> tuple[str, int]:
    """The admin service alone on 127.0.0.1 (no POP3 listener: ``/readyz`` says starting)."""
    values = {"admin": Endpoint("127.0.0.1", 0), **settings}
    ctx = AppContext(settings=dataclasses.replace(Settings(), **values), telemetry=Telemetry([]))
    with structlog.testing.capture_logs() as logs:
        await nursery.start(admin_http.admin_service, ctx)
    address = next(str(e["address"]) for e in logs if e["event"] == "admin.started")
    host, _, port = address.rpartition(":")
    return host, int(port)


async def receive_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks)


async def ask(host: str, port: int, head: bytes, *, pieces: int = 0) -> bytes:
    """Send ``head`` (in one write, or in ``pieces`` octets at a time); the whole answer."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        with trio.fail_after(TIMEOUT):
            if pieces:
                for start in range(0, len(head), pieces):
                    await stream.send_all(head[start : start + pieces])
            else:
                await stream.send_all(head)
            return await receive_all(stream)


async def test_a_slow_request_head_gets_408(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_http, "HEAD_TIMEOUT", 0.3)
    host, port = await start_in_process(nursery)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        started = trio.current_time()
        with trio.fail_after(5):
            answer = await receive_all(stream)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert 0.25 < trio.current_time() - started < 3


def head_of(size: int, path: str = "/healthz") -> bytes:
    """A request head of exactly ``size`` octets (the empty line included)."""
    start = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ".encode()
    end = b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("pieces", [0, 1000], ids=["one-write", "in-pieces"])
async def test_the_head_limit_counts_the_octets_received(
    nursery: trio.Nursery, pieces: int
) -> None:
    """16 KiB of head pass; one octet more, or 20 KiB, get 431 however they arrive (h11's own
    limit alone let a head through that arrived faster than it parsed)."""
    host, port = await start_in_process(nursery)
    limit = admin_http.MAX_HEAD
    assert limit == 16 * KIB
    answer = await ask(host, port, head_of(limit), pieces=pieces)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
    for size in (limit + 1, 20 * KIB):
        answer = await ask(host, port, head_of(size), pieces=pieces)
        assert answer.startswith(b"HTTP/1.1 431 "), (size, answer[:80])


async def unfinished_head(host: str, port: int, client: str) -> trio.SocketStream:
    """A connection from ``client`` (a 127.x.y.z address) whose request head never ends."""
    stream = await trio.open_tcp_stream(host, port, local_address=client)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return stream


async def wait_dropped(streams: list[trio.SocketStream], count: int) -> None:
    """Wait until ``count`` of ``streams`` have been closed by the server unanswered."""
    dropped = 0
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as readers:

            async def read(stream: trio.SocketStream) -> None:
                nonlocal dropped
                assert await stream.receive_some() == b""
                dropped += 1
                if dropped == count:
                    readers.cancel_scope.cancel()

            for stream in streams:
                readers.start_soon(read, stream)
    assert dropped == count


async def test_unfinished_heads_cannot_starve_the_probes(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 heads that never finish, from 10 addresses (more than the pool holds): the oldest
    are dropped, and ``/healthz`` is answered 200 at once. (Before, 64 of them made every
    probe a 503.)"""
    monkeypatch.setattr(admin_http, "HEAD_TIMEOUT", 60.0)  # none of them times out here
    host, port = await start_in_process(nursery)
    pool = admin_http.MAX_PENDING_HEADS
    assert admin_http.MAX_PENDING_HEADS_PER_CLIENT > 10  # only the pool's size drops here
    count = 100
    unfinished = []
    try:
        for number in range(count):
            unfinished.append(await unfinished_head(host, port, f"127.0.1.{number % 10 + 1}"))
        answer = await ask(host, port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:80]
        assert answer.endswith(b"\r\n\r\nok\n")
        # Dropped, unanswered: every head beyond the pool's size (the probe's own included).
        await wait_dropped(unfinished, count + 1 - pool)
    finally:
        for stream in unfinished:
            await stream.aclose()


async def test_a_flood_drops_the_flooders_heads_not_another_clients(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe whose head is slow to come (127.0.0.2) outlives floods of unfinished heads from
    one address (127.0.0.1: only its own are dropped) and from ten (the biggest holders'
    go first), then gets its answer."""
    monkeypatch.setattr(admin_http, "HEAD_TIMEOUT", 60.0)
    host, port = await start_in_process(nursery)
    kubelet = await trio.open_tcp_stream(host, port, local_address="127.0.0.2")
    flood = []
    try:
        await kubelet.send_all(b"GET /healthz HTTP/1.1\r\n")
        for number in range(100):
            flood.append(await unfinished_head(host, port, f"127.0.1.{number % 10 + 1}"))
        for _ in range(100):
            flood.append(await unfinished_head(host, port, "127.0.0.1"))
        # Each head beyond the pool's size dropped one, and none of them was the probe's ...
        await wait_dropped(flood, 1 + len(flood) - admin_http.MAX_PENDING_HEADS)
        # ... which gets its answer once its head is complete.
        with trio.fail_after(TIMEOUT):
            await kubelet.send_all(b"Host: 127.0.0.1\r\n\r\n")
            answer = await receive_all(kubelet)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:80]
    finally:
        await kubelet.aclose()
        for stream in flood:
            await stream.aclose()


class Hang:
    """A stand-in for a route that never answers; counts its callers."""

    def __init__(self) -> None:
        self.callers = 0
        self.cancelled = 0
        self._counted: dict[int, trio.Event] = {}

    async def __call__(self, *args: object) -> NoReturn:
        self.callers += 1
        for count, event in self._counted.items():
            if self.callers >= count:
                event.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled += 1
            raise

    async def until(self, callers: int) -> None:
        if self.callers < callers:
            await self._counted.setdefault(callers, trio.Event()).wait()


async def test_probes_have_a_pool_of_their_own(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests that hang fill their pool (503 for the next); probes still answer; and hung
    probes beyond theirs are dropped oldest first, never the newcomer."""
    monkeypatch.setattr(admin_http, "MAX_REQUESTS", 2)
    monkeypatch.setattr(admin_http, "MAX_PROBES", 2)
    metrics, readiness = Hang(), Hang()
    monkeypatch.setattr(admin_http.AdminServer, "_metrics", metrics)
    monkeypatch.setattr(Readiness, "check", readiness)
    host, port = await start_in_process(nursery)

    async def hung(request: bytes) -> trio.SocketStream:
        stream = await trio.open_tcp_stream(host, port)
        opened.append(stream)
        await stream.send_all(request)
        return stream

    opened: list[trio.SocketStream] = []
    try:
        with trio.fail_after(TIMEOUT):
            for _ in range(2):
                await hung(b"GET /metrics HTTP/1.0\r\n\r\n")
            await metrics.until(2)
            full = await ask(host, port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert full.startswith(b"HTTP/1.1 503 "), full[:80]
            probe = await ask(host, port, b"GET /healthz HTTP/1.0\r\n\r\n")
            assert probe.startswith(b"HTTP/1.1 200 "), probe[:80]

            # /readyz that hangs (the upstream probe never ends): the first in its pool ...
            first = await hung(b"GET /readyz HTTP/1.0\r\n\r\n")
            await readiness.until(1)
            for _ in range(2):  # ... is dropped once two more come
                await hung(b"GET /readyz HTTP/1.0\r\n\r\n")
            assert await first.receive_some() == b""
            probe = await ask(host, port, b"GET /healthz HTTP/1.0\r\n\r\n")
            assert probe.startswith(b"HTTP/1.1 200 "), probe[:80]
            # One upstream probe for all of them, and dropping a requester did not cancel it.
            assert (readiness.callers, readiness.cancelled) == (1, 0)
    finally:
        for stream in opened:
            await stream.aclose()


async def test_a_pool_drops_its_oldest_or_refuses() -> None:
    scopes = [trio.CancelScope() for _ in range(4)]
    dropping = admin_http._Pool("head", 2)
    for scope in scopes[:3]:
        assert dropping.join(scope, evict=True)
    assert [s.cancel_called for s in scopes[:3]] == [True, False, False]
    assert (len(dropping), dropping.dropped) == (2, 1)
    dropping.leave(scopes[1])
    assert dropping.join(scopes[3], evict=True)
    assert not scopes[2].cancel_called
    assert dropping.dropped == 1
    fair = admin_http._Pool("head", 3, per_client=2)
    a1, a2, a3, b1, c1 = (trio.CancelScope() for _ in range(5))
    for scope, client in ((a1, "a"), (a2, "a"), (b1, "b")):
        assert fair.join(scope, evict=True, client=client)
    assert fair.join(a3, evict=True, client="a")  # a's own oldest goes, not b's
    assert [s.cancel_called for s in (a1, a2, b1)] == [True, False, False]
    assert fair.join(c1, evict=True, client="c")  # full: the biggest holder's oldest goes
    assert [s.cancel_called for s in (a2, a3, b1)] == [True, False, False]
    fair.leave(a3)
    fair.leave(b1)
    fair.leave(c1)
    assert len(fair) == 0
    member, newcomer = trio.CancelScope(), trio.CancelScope()
    refusing = admin_http._Pool("request", 1)
    assert refusing.join(member, evict=False)
    assert not refusing.join(newcomer, evict=False)
    assert (len(refusing), refusing.dropped) == (1, 0)
    assert not member.cancel_called
    assert not newcomer.cancel_called


async def test_floods_are_logged_a_line_per_interval(mock_clock: trio.testing.MockClock) -> None:
    throttled = admin_http._Throttled(10.0)
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            throttled.warning("admin.unauthorized", path="/metrics")
        mock_clock.jump(10.0)
        throttled.warning("admin.unauthorized", path="/")
    assert [(e["event"], e["held_back"], e["path"]) for e in logs] == [
        ("admin.unauthorized", 0, "/metrics"),
        ("admin.unauthorized", 4, "/"),
    ]


def healthcheck(
    endpoint: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``pop3proxy healthcheck --admin ENDPOINT``, as a Docker HEALTHCHECK runs it."""
    return subprocess.run(
        [sys.executable, "-m", "pop3proxy", "healthcheck", "--admin", endpoint],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
        env=env if env is not None else healthcheck_env(),
    )


def test_healthcheck_command_exits_by_readyz(admin: AdminProxy) -> None:
    ready = healthcheck(admin.endpoint)
    assert ready.returncode == 0, ready
    assert ready.stdout.startswith("ready:")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    down = healthcheck(f"http://127.0.0.1:{port}")
    assert down.returncode == 1, down
    assert down.stdout.startswith("not ready:")


# -- budgets of a real proxy under a flood ---------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("addresses", [1, 8])
def test_half_open_connections_hold_bounded_fds_and_never_the_probe(
    dovecot: Dovecot, tmp_path: Path, addresses: int
) -> None:
    """An outsider's 400 half-open connections, from one address or from eight: the proxy
    holds at most the pending-heads budget of them, and ``/healthz`` answers 200 throughout."""
    budget = min(admin_http.MAX_PENDING_HEADS, addresses * admin_http.MAX_PENDING_HEADS_PER_CLIENT)
    with start_admin_proxy(dovecot, tmp_path / "flood.log") as proxy:
        admin = AdminProxy(proxy)
        assert admin.request("/healthz").status == 200
        baseline = open_fds(proxy.pid)
        bound = baseline + budget + 8  # + the probe and connections not yet dropped
        sockets: list[socket.socket] = []
        highest = baseline
        try:
            for number in range(400):
                sock = socket.create_connection(
                    (admin.host, admin.port),
                    timeout=TIMEOUT,
                    source_address=(f"127.0.2.{number % addresses + 1}", 0),
                )
                sockets.append(sock)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                if number % 50 == 49:
                    highest = max(highest, open_fds(proxy.pid))
                    health = admin.request("/healthz")
                    assert (health.status, health.body) == (200, b"ok\n"), number
            highest = max(highest, open_fds(proxy.pid))
        finally:
            for sock in sockets:
                sock.close()
    assert highest <= bound, (baseline, highest, bound)


# -- the admin token ------------------------------------------------------------------------------

TOKEN = "t0ken-" + "x7" * 16  # 38 octets
PROTECTED = ("/", "/index.html", "/dashboard.js", "/dashboard.css", "/metrics", "/api/summary")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def secured(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminProxy]:
    """A proxy whose admin endpoint asks for :data:`TOKEN` (from a file, with a newline)."""
    folder = tmp_path_factory.mktemp("secured")
    token_file = folder / "admin-token"
    token_file.write_text(TOKEN + "\n")
    with start_admin_proxy(
        dovecot, folder / "proxy.log", "--admin-token-file", str(token_file)
    ) as proxy:
        yield AdminProxy(proxy, token=TOKEN)


def test_the_token_guards_everything_but_the_probes(secured: AdminProxy) -> None:
    for path in (*PROTECTED, "/events", "/nope"):
        for authorization in (None, "Bearer wrong-token-wrong-token", basic("admin", "wrong")):
            headers = {} if authorization is None else {"Authorization": authorization}
            reply = secured.request(path, headers=headers, authorized=False)
            assert reply.status == 401, (path, authorization)
        for method in ("GET", "HEAD"):
            reply = secured.request(path, method=method, authorized=False)
            assert reply.status == 401, (method, path)
    reply = secured.request("/metrics", authorized=False)
    challenges = [v for k, v in secured_headers(secured, "/metrics") if k == "www-authenticate"]
    assert challenges == ['Bearer realm="pop3proxy"', 'Basic realm="pop3proxy", charset="UTF-8"']
    assert b"token" in reply.body
    # The probes answer anyone.
    assert secured.request("/healthz", authorized=False).status == 200
    assert secured.request("/readyz", authorized=False).status == 200


def secured_headers(admin: AdminProxy, path: str) -> list[tuple[str, str]]:
    """Every response header, repeated ones included (``Reply.headers`` keeps one of each)."""
    connection = http.client.HTTPConnection(admin.host, admin.port, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return [(k.lower(), v) for k, v in response.getheaders()]
    finally:
        connection.close()


def test_the_token_is_taken_as_bearer_or_as_a_basic_password(secured: AdminProxy) -> None:
    for authorization in (
        f"Bearer {TOKEN}",
        f"bearer   {TOKEN}",
        basic("admin", TOKEN),
        basic("", TOKEN),
        basic("Über Admin", TOKEN),
    ):
        for path in PROTECTED:
            reply = secured.request(path, headers={"Authorization": authorization})
            assert reply.status == 200, (path, authorization)
    for authorization in (
        basic(TOKEN, ""),
        basic(TOKEN, "x"),
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Token {TOKEN}",
        "Basic !!!",
        f"Bearer {TOKEN}, Bearer {TOKEN}",
    ):
        reply = secured.request("/metrics", headers={"Authorization": authorization})
        assert reply.status == 401, authorization
    events = secured.request("/events")  # the token, but no upgrade
    assert events.status == 426


def test_readyz_tells_outsiders_only_ready_and_a_reason(secured: AdminProxy) -> None:
    public = secured.request("/readyz", authorized=False).json()
    assert public == {"ready": True, "reason": "ok"}
    detail = secured.request("/readyz").json()
    assert detail["ready"] is True
    assert detail["upstream"] == f"127.0.0.1:{secured.proxy.upstream_port}"
    assert str(detail["tls_version"]).startswith("TLSv1.")


def test_refusals_are_logged_without_the_token(secured: AdminProxy) -> None:
    wrong = "Wrong-token-" + "q" * 20
    assert (
        secured.request("/api/summary", headers={"Authorization": f"Bearer {wrong}"}).status == 401
    )
    refusal = secured.proxy.wait_for_event("admin.unauthorized")
    assert refusal["level"] == "warning"
    assert refusal["client"] == "127.0.0.1"
    assert set(refusal) >= {"path", "reason", "held_back"}
    started = secured.proxy.wait_for_event("admin.started")
    assert started["token"] is True
    log = secured.proxy.log_text()
    assert TOKEN not in log
    assert wrong not in log
    assert secured.proxy.find_events("admin.unprotected") == []


def websocket_upgrade(admin: AdminProxy, **headers: str) -> bytes:
    fields = {
        "Host": admin.endpoint,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(b"fedcba9876543210").decode(),
        "Sec-WebSocket-Version": "13",
        **{k.replace("_", "-"): v for k, v in headers.items()},
    }
    head = "GET /events HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    with socket.create_connection((admin.host, admin.port), timeout=TIMEOUT) as sock:
        sock.sendall((head + "\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    return answer


def test_the_feed_asks_for_the_token_too(secured: AdminProxy) -> None:
    assert websocket_upgrade(secured).startswith(b"HTTP/1.1 401 ")
    assert websocket_upgrade(secured, Authorization="Bearer nope-nope-nope-nope").startswith(
        b"HTTP/1.1 401 "
    )
    assert websocket_upgrade(secured, Authorization=f"Bearer {TOKEN}").startswith(b"HTTP/1.1 101 ")
    origin = f"http://{secured.endpoint}"
    assert websocket_upgrade(secured, Authorization=basic("me", TOKEN), Origin=origin).startswith(
        b"HTTP/1.1 101 "
    )
    # A browser sends its saved credentials along with another site's WebSocket too.
    assert websocket_upgrade(
        secured, Authorization=basic("me", TOKEN), Origin="http://evil.example"
    ).startswith(b"HTTP/1.1 403 ")


def healthcheck_env(token: str | None = None, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")}
    if token is not None:
        env["POP3PROXY_ADMIN_TOKEN"] = token
    env.update(more)
    return env


def test_healthcheck_sends_the_token(secured: AdminProxy, tmp_path: Path) -> None:
    bare = healthcheck(secured.endpoint, env=healthcheck_env())
    assert (bare.returncode, bare.stdout.strip()) == (0, "ready"), bare
    for env in (
        healthcheck_env(TOKEN),
        healthcheck_env(POP3PROXY_ADMIN_TOKEN_FILE=str(write(tmp_path / "t", TOKEN + "\n"))),
    ):
        told = healthcheck(secured.endpoint, env=env)
        assert told.returncode == 0, told
        assert told.stdout.startswith(f"ready: upstream 127.0.0.1:{secured.proxy.upstream_port}")
        assert TOKEN not in told.stdout + told.stderr


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- bad token settings ---------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("POP3PROXY_"):
            monkeypatch.delenv(name)
    return monkeypatch


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """``pop3proxy ARGV`` up to its settings (``--help``-like: nothing is started on error)."""
    status = cli.main(argv)
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("command", ["serve", "watch", "healthcheck"])
def test_a_bad_token_file_exits_2_naming_the_setting(
    command: str,
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = "s3cret-" + "z" * 9  # 16 octets, but with white space inside below
    cases = {
        "missing": (tmp_path / "nope", "no such file"),
        "directory": (tmp_path, "is a directory"),
        "empty": (write(tmp_path / "empty", "\n"), "holds no token"),
        "short": (write(tmp_path / "short", "0123456789abcde\n"), "fewer than 16"),
        "long": (write(tmp_path / "long", "a" * 1025), "more than 1024"),
        "spaces": (write(tmp_path / "spaces", f"{secret} {secret}"), "printable ASCII"),
        "control": (write(tmp_path / "control", f"{secret}\x1b{secret}"), "printable ASCII"),
    }
    extra = ["--upstream", "127.0.0.1:995"] if command == "serve" else []
    for name, (path, problem) in cases.items():
        status, errors = run_cli([command, *extra, "--admin-token-file", str(path)], capsys)
        assert status == 2, name
        assert len(errors) == 1, (name, errors)
        # Like every secret setting's, the message quotes neither the value nor the file name.
        assert errors[0].startswith("pop3proxy: --admin-token-file: "), errors
        assert problem in errors[0], (name, errors)
        assert secret not in errors[0]
        assert str(path) not in errors[0]
    clean_env.setenv("POP3PROXY_ADMIN_TOKEN_FILE", str(tmp_path))
    status, errors = run_cli([command, *extra], capsys)
    assert status == 2
    assert errors == [
        "pop3proxy: --admin-token-file (POP3PROXY_ADMIN_TOKEN_FILE): is a "
        "directory, expected a file holding the token"
    ]


def test_an_unreadable_token_file_exits_2(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """(As root every file is readable: the denial is simulated.)"""
    path = write(tmp_path / "token", TOKEN)

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    clean_env.setattr(Path, "read_bytes", denied)
    status, errors = run_cli(["healthcheck", "--admin-token-file", str(path)], capsys)
    assert (status, errors) == (
        2,
        ["pop3proxy: --admin-token-file: cannot read: Permission denied"],
    )


def test_the_token_itself_comes_from_the_environment_only(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    status, errors = run_cli(["watch", "--admin-token", TOKEN], capsys)
    assert status == 2
    assert errors[0].startswith("pop3proxy: --admin-token: the token itself is read only from")
    assert TOKEN not in errors[0]
    clean_env.setenv("POP3PROXY_ADMIN_TOKEN", "short-secret")
    status, errors = run_cli(["healthcheck"], capsys)
    assert (status, errors) == (
        2,
        ["pop3proxy: POP3PROXY_ADMIN_TOKEN: holds 12 octets, fewer than 16 "
         "(e.g. openssl rand -hex 32)"],
    )  # fmt: skip
    clean_env.setenv("POP3PROXY_ADMIN_TOKEN", TOKEN)
    _, settings, _ = cli.parse_command_line(["watch"])
    assert settings.admin_credential is not None
    assert settings.admin_credential.value == TOKEN.encode()
    assert TOKEN not in repr(settings)
    status, errors = run_cli(
        ["watch", "--admin-token-file", str(write(tmp_path / "t", TOKEN))], capsys
    )
    assert (status, errors) == (
        2,
        ["pop3proxy: POP3PROXY_ADMIN_TOKEN: give it one way only, not also as "
         "--admin-token-file"],
    )  # fmt: skip


# -- the Host check (DNS rebinding) -----------------------------------------------------------


def test_browser_facing_routes_refuse_a_foreign_host(admin: AdminProxy) -> None:
    rebound = f"rebind.example:{admin.port}"
    for path in (*PROTECTED, "/events", "/nope"):
        reply = admin.request(path, headers={"Host": rebound})
        assert reply.status == 421, path
        assert b"DNS rebinding" in reply.body
    assert websocket_upgrade(admin, Host=rebound, Origin=f"http://{rebound}").startswith(
        b"HTTP/1.1 421 "
    )
    for host in (
        f"localhost:{admin.port}",
        f"dash.localhost:{admin.port}",
        f"LOCALHOST.:{admin.port}",
        f"127.0.0.1:{admin.port}",
        f"127.9.8.7:{admin.port}",
        f"[::1]:{admin.port}",
        "127.0.0.1",
    ):
        reply = admin.request("/api/summary", headers={"Host": host})
        assert reply.status == 200, host
    # The probes answer by any name; /readyz then tells no more than ready and a reason.
    assert admin.request("/healthz", headers={"Host": rebound}).status == 200
    ready = admin.request("/readyz", headers={"Host": rebound})
    assert (ready.status, ready.json()) == (200, {"ready": True, "reason": "ok"})
    full = admin.request("/readyz").json()
    assert set(full) > {"ready", "reason", "upstream"}


def test_configured_host_names_and_the_token_pass_the_host_check(
    dovecot: Dovecot, secured: AdminProxy, tmp_path: Path
) -> None:
    with start_admin_proxy(
        dovecot, tmp_path / "names.log", "--admin-host-names", "pop3proxy.monitoring.svc,Other."
    ) as proxy:
        named = AdminProxy(proxy)
        for host in ("pop3proxy.monitoring.svc:9110", "other", "OTHER.:1"):
            assert named.request("/metrics", headers={"Host": host}).status == 200, host
        assert named.request("/metrics", headers={"Host": "pop3proxy.evil"}).status == 421
    # With the token, any Host: a rebound page cannot have it (a browser sends saved
    # credentials only to the name they were given for, and a foreign name gets 421 before
    # any login prompt).
    rebound = {"Host": "pop3proxy.pop3proxy.svc.cluster.local:9110"}
    assert secured.request("/metrics", headers=rebound).status == 200
    assert secured.request("/metrics", headers=rebound, authorized=False).status == 421


# -- a warning when the endpoint is open beyond loopback ----------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.200.1.2", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("::ffff:10.1.2.3", False),
        ("fe80::1%eth0", False),
    ],
)
def test_what_counts_as_loopback(address: str, loopback: bool) -> None:
    assert admin_http._is_loopback(address) is loopback


@pytest.mark.parametrize("token", [None, TOKEN])
async def test_an_admin_endpoint_beyond_loopback_without_token_is_warned_of(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, token: str | None
) -> None:
    """Tests listen on loopback only: the listener is made to look like 0.0.0.0."""
    monkeypatch.setattr(admin_http, "_is_loopback", lambda host: False)
    settings = dataclasses.replace(
        Settings(),
        admin=Endpoint("127.0.0.1", 0),
        admin_token_file=None if token is None else AdminToken(token.encode()),
    )
    ctx = AppContext(settings=settings, telemetry=Telemetry([]))
    with structlog.testing.capture_logs() as logs:
        await nursery.start(admin_http.admin_service, ctx)
    warnings = [e for e in logs if e["event"] == "admin.unprotected"]
    if token is not None:
        assert warnings == []
        return
    (warning,) = warnings
    assert warning["log_level"] == "warning"
    assert "--admin-token-file" in warning["hint"]
    assert warning["addresses"] == [
        next(e["address"] for e in logs if e["event"] == "admin.started")
    ]
