"""Timers at their real, long defaults, on trio's mock clock: ten minutes take no time.

Everything runs in one trio run: a POP3S upstream (real TLS on loopback: the demo server, or a
scripted one that stalls where a test says), the real proxy, and a raw client. Loopback I/O
between tasks of one process is ready as soon as it is sent, so with ``autojump_threshold=0``
virtual time moves only when every task waits on a timer: a deadline is hit to the virtual
microsecond, however busy the machine is.

The deadlines (see ``pop3proxy.relay.SessionDeadlines``) and what each must survive:

- idle (600 s, RFC 1939 section 3): silence in both directions; a command restarts it;
- command line (60 s): a line trickled octet by octet, never ended; not while the proxy itself
  stops reading (pipelining back-pressure);
- login (60 s from accept): commands or an AUTH exchange that never log in; a login stops it;
- greeting (30 s): an upstream that never greets, or trickles its greeting;
- half-close (10 s): counted from the last octet moved, so a reply that keeps moving is
  relayed to the end, and an upstream that never answers is given up on.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
import trio
import trio.testing

from pop3proxy import demo_upstream
from pop3proxy.config import Settings, load_settings
from pop3proxy.demo_pki import DemoPKI
from pop3proxy.pop3 import STLS_REFUSAL
from pop3proxy.server import serve
from pop3proxy.telemetry import Telemetry

if TYPE_CHECKING:
    from pop3proxy.relay import SessionDeadlines

UpstreamHandler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]

GREETING = b"+OK scripted upstream ready\r\n"


class Events:
    """The session events the proxy logged, and a way to wait for the session's end."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, dict[str, Any]]] = []
        self.closed = trio.Event()

    def __call__(self, event: str, level: str, fields: Mapping[str, Any]) -> None:
        self.logged.append((event, dict(fields)))
        if event == "session.closed":
            self.closed.set()

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return iter(self.logged)

    async def wait_closed(self) -> list[object]:
        """The close reasons, once the session has logged its close."""
        await self.closed.wait()
        return [fields.get("reason") for event, fields in self if event == "session.closed"]


class LineClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        #: When the client connected (the login deadline counts from the proxy's accept).
        self.connected_at = trio.current_time()

    async def line(self) -> bytes:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(4096)
            if not data:
                return b""
            self.buffer += data
        end = self.buffer.index(b"\n") + 1
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line

    async def command(self, text: str) -> bytes:
        await self.stream.send_all(text.encode() + b"\r\n")
        return await self.line()

    async def rest(self) -> bytes:
        """Everything until the proxy closes."""
        while data := await self.stream.receive_some(65536):
            self.buffer += data
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest


@dataclass
class ScriptedUpstream:
    """A few lines of a POP3S server, slow exactly where a test says.

    Args:
        greeting: sent after the TLS handshake, one octet every ``greeting_pause`` seconds
            (0: all at once); None: never greets.
        stall: verb -> seconds before its reply (``math.inf``: never answered).
        body_pieces: the reply to RETR streams this many lines, one every ``body_pause`` s.
        body: sent in one piece after those (a body that no socket buffer holds).
    """

    greeting: bytes | None = GREETING
    greeting_pause: float = 0.0
    stall: dict[bytes, float] = field(default_factory=dict)
    body_pieces: int = 0
    body_pause: float = 0.0
    body: bytes = b""
    #: Set when the proxy closed its upstream connection.
    hung_up: trio.Event = field(default_factory=trio.Event)

    async def handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
            await self._greet(stream)
            buffer = b""
            while True:
                while b"\n" not in buffer:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    buffer += data
                line, _, buffer = buffer.partition(b"\n")
                await self._answer(stream, line.rstrip(b"\r"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self.hung_up.set()
            await trio.aclose_forcefully(stream)

    async def _greet(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        if self.greeting is None:
            await _until_hung_up(stream)
        if not self.greeting_pause:
            await stream.send_all(self.greeting)
            return
        for octet in self.greeting:
            await stream.send_all(bytes([octet]))
            await trio.sleep(self.greeting_pause)

    async def _answer(self, stream: trio.SSLStream[trio.SocketStream], line: bytes) -> None:
        verb = line.partition(b" ")[0].upper()
        pause = self.stall.get(verb, 0.0)
        if math.isinf(pause):
            await _until_hung_up(stream)
        await trio.sleep(pause)
        if verb == b"RETR":
            await stream.send_all(b"+OK message follows\r\n")
            for number in range(self.body_pieces):
                await stream.send_all(b"line %d of a slowly streamed body\r\n" % number)
                await trio.sleep(self.body_pause)
            await stream.send_all(self.body + b".\r\n")
        elif verb == b"QUIT":
            await stream.send_all(b"+OK bye\r\n")
            raise trio.ClosedResourceError  # the session is over: hang up
        else:
            await stream.send_all(b"+OK\r\n")


async def _until_hung_up(stream: trio.SSLStream[trio.SocketStream]) -> NoReturn:
    """Say nothing, but notice the proxy hanging up (then end the connection)."""
    while await stream.receive_some(4096):
        pass
    raise trio.ClosedResourceError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DemoPKI:
    return DemoPKI.create(tmp_path_factory.mktemp("mock-clock-pki"))


@asynccontextmanager
async def proxy_and_client(
    pki: DemoPKI,
    monkeypatch: pytest.MonkeyPatch,
    upstream: UpstreamHandler | None = None,
    **flags: str,
) -> AsyncIterator[tuple[LineClient, Events]]:
    """The proxy in front of ``upstream`` (default: the demo server), and one client of it."""
    # The demo upstream's own limits must not be what the test sees.
    monkeypatch.setattr(demo_upstream, "IDLE_TIMEOUT", 24 * 3600.0)
    monkeypatch.setattr(demo_upstream, "MAX_AUTH_FAILURES", 100)
    events = Events()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_ssl_over_tcp_listeners(
            0, pki.server_context(), host="127.0.0.1"
        )
        transport = listeners[0].transport_listener
        assert isinstance(transport, trio.SocketListener)
        upstream_port = transport.socket.getsockname()[1]
        handler = upstream or demo_upstream.handle_connection
        await nursery.start(trio.serve_listeners, handler, listeners)
        settings: Settings = load_settings(
            {
                "listen": "127.0.0.1:0",
                "upstream": f"127.0.0.1:{upstream_port}",
                "upstream_ca_file": str(pki.ca_cert_path),
                "upstream_server_name": "localhost",
                **flags,
            },
            {},
        )
        addresses = await nursery.start(
            functools.partial(serve, settings, telemetry=Telemetry([events]))
        )
        port = int(addresses[0].rpartition(":")[2])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            yield LineClient(stream), events
        nursery.cancel_scope.cancel()


async def trickle(client: LineClient, octet: bytes, pause: float) -> None:
    """Send ``octet`` every ``pause`` seconds until the proxy hangs up."""
    with contextlib.suppress(trio.BrokenResourceError):
        while True:
            await client.stream.send_all(octet)
            await trio.sleep(pause)


async def login(client: LineClient) -> None:
    assert (await client.line()).startswith(b"+OK")
    assert (await client.command("USER demo")).startswith(b"+OK")
    assert (await client.command("PASS demo")).startswith(b"+OK")


# ---------------------------------------------------------------------------- idle, login delays


async def test_default_idle_timeout_is_ten_minutes_of_silence(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxy_and_client(pki, monkeypatch) as (client, events):
        await login(client)
        await trio.sleep(599)  # RFC 1939 section 3: at least 10 minutes
        assert (await client.command("NOOP")).startswith(b"+OK")  # traffic restarts the timer
        quiet_since = trio.current_time()
        assert await client.line() == b""  # the proxy hangs up, without a word (RFC 1939)...
        assert 600 <= trio.current_time() - quiet_since < 601  # ...after exactly 600 s
        assert await events.wait_closed() == ["idle_timeout"]
    assert any(event == "session.idle_timeout" for event, _ in events)


async def test_repeated_failed_logins_are_delayed_more_and_more(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxy_and_client(pki, monkeypatch, max_login_failures="10") as (client, _):
        assert (await client.line()).startswith(b"+OK")
        waited = []
        for _ in range(5):
            assert (await client.command("USER demo")).startswith(b"+OK")
            sent = trio.current_time()
            assert (await client.command("PASS wrong")).startswith(b"-ERR")
            waited.append(round(trio.current_time() - sent))
        assert waited == [0, 0, 1, 2, 4]  # two free failures, then doubling (default cap 8 s)
        assert (await client.command("QUIT")).startswith(b"+OK")


# ---------------------------------------------------------------------------- command line


async def test_a_trickled_command_line_is_closed_after_the_command_timeout(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slowloris after login: one octet every 5 s keeps the idle timer from ever firing; the
    line must still be finished within 60 s of its first octet."""
    async with proxy_and_client(pki, monkeypatch) as (client, events):
        await login(client)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle, client, b"N", 5.0)
            with trio.fail_after(300):  # old code: never closed
                goodbye = await client.line()
            nursery.cancel_scope.cancel()
        assert goodbye == b"-ERR [SYS/TEMP] command line not completed within 60 s, closing\r\n"
        assert 60 <= trio.current_time() - started < 61
        assert await client.line() == b""
        assert await events.wait_closed() == ["command_timeout"]
    assert [f["timeout_s"] for e, f in events if e == "session.command_timeout"] == [60.0]


async def test_whole_lines_however_slow_are_not_a_command_timeout(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line timer runs only while a line is unfinished: a client that sends a whole
    command every 59 s (and one split over 59 s) goes on for as long as it likes."""
    async with proxy_and_client(pki, monkeypatch) as (client, events):
        await login(client)
        for _ in range(5):
            await trio.sleep(59)
            assert await client.command("NOOP") == b"+OK\r\n"
        await client.stream.send_all(b"NO")
        await trio.sleep(59)
        assert await client.command("OP") == b"+OK\r\n"
        assert (await client.command("QUIT")).startswith(b"+OK")
        assert await events.wait_closed() == ["quit"]


async def test_the_line_timer_waits_while_back_pressure_stops_the_proxy_reading(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipelining within ``max_pipelined``: the proxy stops reading while replies are owed,
    so the start of a line already received is not the client's delay. The upstream takes
    100 s over STAT; the line begun behind it is finished 30 s after reading resumes."""
    script = ScriptedUpstream(stall={b"STAT": 100.0})
    async with proxy_and_client(pki, monkeypatch, script.handle, max_pipelined="1") as (
        client,
        events,
    ):
        assert await client.line() == GREETING
        assert await client.command("USER u") == b"+OK\r\n"
        assert await client.command("PASS p") == b"+OK\r\n"
        await client.stream.send_all(b"STAT\r\nNOOP\r\nNO")
        assert await client.line() == b"+OK\r\n"  # STAT, 100 s later
        assert await client.line() == b"+OK\r\n"  # NOOP
        await trio.sleep(30)  # 130 s since "NO" arrived, 30 s of them with the proxy reading
        assert await client.command("OP") == b"+OK\r\n"
        assert await client.command("QUIT") == b"+OK bye\r\n"
        assert await events.wait_closed() == ["quit"]


# ---------------------------------------------------------------------------- login


async def test_commands_that_never_log_in_are_closed_after_the_login_timeout(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NOOP every 5 s before any login keeps the idle timer quiet (each one is traffic);
    the login deadline counts from accept whatever the client sends."""
    async with proxy_and_client(pki, monkeypatch) as (client, events):
        assert (await client.line()).startswith(b"+OK")
        replies = []
        with trio.move_on_after(300):  # old code: never closed; bounded here
            while (reply := await client.command("CAPA")).startswith(b"+OK"):
                replies.append(reply)
                while (await client.line()) not in (b".\r\n", b""):
                    pass
                await trio.sleep(5)
            replies.append(reply)
        assert len(replies) > 10
        assert replies[-1] == b"-ERR [SYS/TEMP] no login within 60 s, closing\r\n"
        assert 60 <= trio.current_time() - client.connected_at < 61
        assert await events.wait_closed() == ["login_timeout"]
    assert [f["timeout_s"] for e, f in events if e == "session.login_timeout"] == [60.0]


async def test_an_auth_exchange_left_open_is_closed_after_the_login_timeout(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxy_and_client(pki, monkeypatch) as (client, events):
        assert (await client.line()).startswith(b"+OK")
        assert (await client.command("AUTH PLAIN")).startswith(b"+")  # the server waits...
        goodbye = await client.line()  # ...and so does the client, never answering
        assert goodbye == b"-ERR [SYS/TEMP] no login within 60 s, closing\r\n"
        assert 60 <= trio.current_time() - client.connected_at < 61
        assert await client.line() == b""
        assert await events.wait_closed() == ["login_timeout"]


@pytest.mark.parametrize("attempt", range(12))
async def test_nothing_follows_the_goodbye_not_even_a_reply_that_arrives_with_it(
    autojump_clock: trio.testing.MockClock,
    pki: DemoPKI,
    monkeypatch: pytest.MonkeyPatch,
    attempt: int,
) -> None:
    """STLS (answered by the proxy itself) arrives at the very moment the login deadline
    passes: the client gets the answer and then the goodbye, or the goodbye alone, never an
    answer after the goodbye (it would read as the reply to its next command).

    Which task trio runs first at that moment is random (trio reverses half its batches);
    without the relay's guard about half the attempts failed, so twelve of them miss it
    about once in 4,000 runs of this test."""
    async with proxy_and_client(pki, monkeypatch) as (client, events):
        assert (await client.line()).startswith(b"+OK")
        await trio.sleep_until(client.connected_at + 60)
        await client.stream.send_all(b"STLS\r\n")
        rest = await client.rest()
        goodbye = b"-ERR [SYS/TEMP] no login within 60 s, closing\r\n"
        assert rest in (goodbye, STLS_REFUSAL + goodbye), rest
        assert await events.wait_closed() == ["login_timeout"]


async def test_a_login_stops_the_login_timer(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxy_and_client(pki, monkeypatch) as (client, events):
        await trio.sleep(50)
        await login(client)  # 50 s after accept: in time
        for _ in range(4):
            await trio.sleep(50)
            assert await client.command("NOOP") == b"+OK\r\n"
        assert (await client.command("QUIT")).startswith(b"+OK")
        assert await events.wait_closed() == ["quit"]


# ---------------------------------------------------------------------------- greeting


@pytest.mark.parametrize("pause", [None, 5.0], ids=["silent", "trickled"])
async def test_an_upstream_that_does_not_greet_in_time_is_given_up(
    autojump_clock: trio.testing.MockClock,
    pki: DemoPKI,
    monkeypatch: pytest.MonkeyPatch,
    pause: float | None,
) -> None:
    """TLS is up; the greeting never comes, or comes one octet every 5 s (which the idle
    timer alone would never end). The client is told, and the upstream is hung up on."""
    script = ScriptedUpstream(greeting=None) if pause is None else ScriptedUpstream()
    script.greeting_pause = pause or 0.0
    async with proxy_and_client(pki, monkeypatch, script.handle) as (client, events):
        first = await client.line()
        assert first == (
            b"-ERR [SYS/TEMP] the mail server did not greet within 30 s, try again later\r\n"
        )
        assert 30 <= trio.current_time() - client.connected_at < 31
        assert await client.line() == b""
        assert await events.wait_closed() == ["greeting_timeout"]
        if pause is None:  # (a trickling one finds out at its next octet)
            with trio.fail_after(1):
                await script.hung_up.wait()
    failed = [f for e, f in events if e == "upstream.failed"]
    assert [(f["phase"], f["reason"]) for f in failed] == [("greeting", "timeout")]


# ---------------------------------------------------------------------------- half-close


async def test_a_half_closed_client_is_not_kept_waiting_on_a_silent_upstream(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client sends STAT and shuts its write side; the upstream never answers. After
    ``close_timeout`` (10 s) from the last octet, the client gets an answer and the end."""
    script = ScriptedUpstream(stall={b"STAT": math.inf})
    async with proxy_and_client(pki, monkeypatch, script.handle) as (client, events):
        assert await client.line() == GREETING
        assert await client.command("USER u") == b"+OK\r\n"
        assert await client.command("PASS p") == b"+OK\r\n"
        await client.stream.send_all(b"STAT\r\n")
        await client.stream.send_eof()
        half_closed = trio.current_time()
        goodbye = await client.line()
        assert goodbye == b"-ERR [SYS/TEMP] the mail server did not answer within 10 s, closing\r\n"
        assert 10 <= trio.current_time() - half_closed < 11
        assert await client.line() == b""
        assert await events.wait_closed() == ["close_timeout"]
        with trio.fail_after(1):
            await script.hung_up.wait()


async def test_after_a_half_close_a_reply_that_keeps_moving_is_relayed_to_the_end(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close timer counts from the last octet moved, not from the half-close: a body
    that takes 120 s, a line every 8 s (under the 10 s), arrives whole."""
    script = ScriptedUpstream(body_pieces=15, body_pause=8.0)
    async with proxy_and_client(pki, monkeypatch, script.handle) as (client, events):
        assert await client.line() == GREETING
        assert await client.command("USER u") == b"+OK\r\n"
        assert await client.command("PASS p") == b"+OK\r\n"
        await client.stream.send_all(b"RETR 1\r\n")
        await client.stream.send_eof()
        reply = await client.rest()
        assert reply.startswith(b"+OK message follows\r\n")
        assert reply.count(b"slowly streamed body") == 15
        assert reply.endswith(b"line 14 of a slowly streamed body\r\n.\r\n")
        assert await events.wait_closed() == ["client_closed"]


# ---------------------------------------------------------------------------- back-pressure


async def test_a_client_that_never_reads_its_replies_is_closed_by_the_idle_timer(
    autojump_clock: trio.testing.MockClock, pki: DemoPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RETR of a body no socket buffer holds, and the client reads none of it: back-pressure
    stops the relay, no octet moves, and 600 s later the idle timer ends it. No goodbye (the
    client reads nothing, and the line would land inside the body), and the upstream is
    hung up on, not left blocked on a full socket."""
    script = ScriptedUpstream(body=(b"y" * 78 + b"\r\n") * 25_000)  # 2 MB; a few 100 KB fit
    async with proxy_and_client(pki, monkeypatch, script.handle) as (client, events):
        assert await client.line() == GREETING
        assert await client.command("USER u") == b"+OK\r\n"
        assert await client.command("PASS p") == b"+OK\r\n"
        await client.stream.send_all(b"RETR 1\r\n")
        asked = trio.current_time()
        with trio.fail_after(700):
            await events.closed.wait()
        assert 600 <= trio.current_time() - asked < 601
        assert await events.wait_closed() == ["idle_timeout"]
        with trio.fail_after(1):
            await script.hung_up.wait()
        closed = next(f for e, f in events if e == "session.closed")
        assert closed["bytes_to_client"] < len(script.body)


# ---------------------------------------------------------------------------- the bookkeeping


def make_deadlines(**changes: Any) -> SessionDeadlines:
    # Imported here, so that the rest of the module runs against a relay without it too
    # (each test above must fail there).
    from pop3proxy.relay import SessionDeadlines

    values: dict[str, Any] = {
        "idle_timeout": 600.0,
        "close_timeout": 10.0,
        "command_timeout": 60.0,
        "last_moved": 0.0,
        "greeting_due": None,
        "login_due": None,
    }
    return SessionDeadlines(**(values | changes))


def test_the_first_deadline_wins_and_a_tie_goes_to_the_more_specific() -> None:
    deadlines = make_deadlines(greeting_due=30.0, login_due=60.0, session_due=60.0)
    assert deadlines.next_due() == (30.0, "greeting_timeout")
    deadlines.greeting_due = None
    assert deadlines.next_due() == (60.0, "login_timeout")  # not session_timeout
    deadlines.login_due = None
    assert deadlines.next_due() == (60.0, "session_timeout")
    deadlines.session_due = None
    assert deadlines.next_due() == (600.0, "idle_timeout")
    deadlines.last_moved = 5.0
    assert deadlines.next_due() == (605.0, "idle_timeout")


def test_the_line_clock_starts_at_a_line_and_stops_at_its_lf() -> None:
    deadlines = make_deadlines()
    assert deadlines.client_read(b"NOOP\r\n", 1.0) is None  # a whole line: nothing starts
    assert deadlines.client_read(b"NO", 2.0) == 62.0  # a line begins
    assert deadlines.reading_client(2.0) == 62.0
    assert deadlines.client_read(b"O", 10.0) is None  # the same line: its deadline stays
    assert deadlines.reading_client(10.0) == 62.0
    assert deadlines.next_due() == (62.0, "command_timeout")
    assert deadlines.client_read(b"P\r\nST", 20.0) == 80.0  # one ends, the next begins
    deadlines.reading_client(20.0)
    assert deadlines.client_read(b"AT\r\n", 30.0) is None
    assert deadlines.next_due() == (630.0, "idle_timeout")


def test_the_line_clock_is_held_while_the_proxy_is_not_reading() -> None:
    deadlines = make_deadlines()
    assert deadlines.client_read(b"STAT\r\nNO", 0.0) == 60.0
    assert deadlines.next_due() == (600.0, "idle_timeout")  # held: not reading yet
    assert deadlines.reading_client(100.0) == 160.0  # 100 s of back-pressure do not count
    assert deadlines.next_due() == (160.0, "command_timeout")


def test_a_half_close_ends_the_line_clock_and_starts_the_close_clock() -> None:
    deadlines = make_deadlines()
    deadlines.client_read(b"NO", 0.0)
    deadlines.reading_client(0.0)
    assert deadlines.client_closed(5.0) == 15.0
    assert deadlines.next_due() == (15.0, "close_timeout")
    deadlines.last_moved = 12.0  # a reply is still moving
    assert deadlines.next_due() == (22.0, "close_timeout")
