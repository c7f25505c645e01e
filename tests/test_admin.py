"""The admin endpoint of a real proxy in front of the real Dovecot: every route, its status and
content type, a Prometheus scrape whose counters move as a ``poplib`` session runs, ``/readyz``
following Dovecot down and up, and the HTTP front door's limits (head size, head timeout,
methods, malformed requests).

The helpers here (:class:`AdminProxy`, :func:`start_admin_proxy`) are shared by the other
admin test modules (feed, watch, dashboard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import poplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import trio
from prometheus_client.parser import text_string_to_metric_families

from pop3proxy.admin import http as admin_http
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
    """A running proxy with its admin endpoint on an ephemeral port."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        event = proxy.wait_for_event("admin.started")
        self.address = str(event["address"])
        host, _, port = self.address.rpartition(":")
        self.host = host
        self.port = int(port)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def request(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> Reply:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            connection.request(method, path, headers=headers or {})
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
    dovecot: Dovecot, log_path: Path, *extra: str, admin: str = "127.0.0.1:0"
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


async def start_in_process(nursery: trio.Nursery) -> tuple[str, int]:
    settings = dataclasses.replace(Settings(), admin=Endpoint("127.0.0.1", 0))
    ctx = AppContext(settings=settings, telemetry=Telemetry(sinks=[]))
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


async def test_connections_beyond_the_limit_get_503(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_http, "MAX_CONNECTIONS", 2)
    host, port = await start_in_process(nursery)
    idle = [await trio.open_tcp_stream(host, port) for _ in range(2)]
    try:
        await trio.sleep(0.1)  # let the server accept them
        extra = await trio.open_tcp_stream(host, port)
        async with extra:
            with trio.fail_after(5):
                answer = await receive_all(extra)
        assert answer.startswith(b"HTTP/1.1 503 ")
    finally:
        for stream in idle:
            await stream.aclose()
    with trio.fail_after(5):
        while True:  # the slots free up once the idle ones leave
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"GET /healthz HTTP/1.0\r\n\r\n")
                answer = await receive_all(stream)
            if answer.startswith(b"HTTP/1.1 200"):
                break
            await trio.sleep(0.05)


def healthcheck(endpoint: str) -> subprocess.CompletedProcess[str]:
    """``pop3proxy healthcheck --admin ENDPOINT``, as a Docker HEALTHCHECK runs it."""
    return subprocess.run(
        [sys.executable, "-m", "pop3proxy", "healthcheck", "--admin", endpoint],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
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
