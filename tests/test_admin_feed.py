"""``/events``: the live feed of a real proxy, with WebSocket watchers that keep up and one that
never reads. The relay and the good watcher must not notice the stuck one; no event may carry
a credential; browsers from other origins and broken upgrades are refused.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from pop3proxy.admin.feed import QUEUE_SIZE
from pop3proxy.telemetry import BATCH_LIMIT
from tests.peers.dovecot import Dovecot, Mailbox, MailboxFactory
from tests.test_admin import AdminProxy, start_admin_proxy, value, wait_until

TIMEOUT = 30.0
NOOPS = 2000
BATCH = 50  # commands sent ahead of their replies (under the proxy's pipelining limit)

Message = dict[str, Any]


@pytest.fixture(scope="module")
def feed_proxy(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminProxy]:
    with start_admin_proxy(dovecot, tmp_path_factory.mktemp("feed") / "proxy.log") as proxy:
        yield AdminProxy(proxy)


def events_url(admin: AdminProxy) -> str:
    return f"ws://{admin.host}:{admin.port}/events"


class Watcher:
    """A WebSocket client of ``/events`` that reads everything until :meth:`stop`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.messages: list[Message] = []
        self.raw: list[str] = []
        self._reading = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_websocket_url(self.url, connect_timeout=5, disconnect_timeout=2) as ws:
            self.messages.append(json.loads(await ws.get_message()))  # the snapshot
            task_status.started()
            with self._reading, trio.move_on_after(3 * TIMEOUT):
                while True:
                    text = await ws.get_message()
                    assert isinstance(text, str)
                    self.raw.append(text)
                    # One or more events per message, one JSON object per line.
                    self.messages.extend(json.loads(line) for line in text.split("\n"))
        # Leaving the block closes from the client side (trio-websocket leaks the socket
        # when the server closes first).

    def stop(self) -> None:
        self._reading.cancel()

    def closed(self, session_id: str) -> bool:
        return any(
            m.get("event") == "session.closed" and m.get("session_id") == session_id
            for m in self.messages
        )

    async def wait_closed(self, session_id: str) -> None:
        """Wait until the watcher has seen ``session.closed`` of ``session_id``, then stop it."""
        with trio.move_on_after(TIMEOUT):
            while not self.closed(session_id):  # noqa: ASYNC110 - polls another task's list
                await trio.sleep(0.05)
        self.stop()
        dropped = [m for m in self.messages if m["event"] == "feed.dropped"]
        assert self.closed(session_id), (
            f"the watcher got {len(self.messages)} messages but not the end of {session_id}; "
            f"dropped for it: {dropped}"
        )

    def of_session(self, session_id: str) -> list[Message]:
        return [m for m in self.messages if m.get("session_id") == session_id]


async def stuck_watcher(admin: AdminProxy) -> trio.SocketStream:
    """A WebSocket client that completes the handshake with a tiny receive buffer, then never
    reads again."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((admin.host, admin.port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(b"0123456789abcdef").decode()
    await stream.send_all(
        (
            f"GET /events HTTP/1.1\r\nHost: {admin.endpoint}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(1)  # byte by byte: read nothing past the head
    assert head.startswith(b"HTTP/1.1 101 "), head
    return stream


class Pop3Line:
    """A blocking POP3 client over a plain socket, with pipelining."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")
        assert self.line().startswith(b"+OK")

    @property
    def local_port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def line(self) -> bytes:
        return self.file.readline(65536)

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def multiline(self, text: str) -> bytes:
        status = self.command(text)
        assert status.startswith(b"+OK"), status
        body = bytearray()
        while (line := self.line()) != b".\r\n":
            assert line, "connection closed inside a multi-line reply"
            body += line[1:] if line.startswith(b"..") else line
        return bytes(body)

    def pipelined(self, text: str, count: int) -> list[bytes]:
        self.sock.sendall((text + "\r\n").encode() * count)
        return [self.line() for _ in range(count)]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def busy_session(admin: AdminProxy, box: Mailbox) -> tuple[str, bytes, float]:
    """USER/PASS, a large RETR and many NOOPs; returns the session id, the message, seconds."""
    started = time.monotonic()
    pop = Pop3Line(admin.proxy.port)
    try:
        session_id = admin.proxy.session_id_for(pop.local_port)
        assert pop.command(f"USER {box.user}").startswith(b"+OK")
        assert pop.command(f"PASS {box.password}").startswith(b"+OK")
        body = pop.multiline("RETR 1")
        for _ in range(NOOPS // BATCH):
            replies = pop.pipelined("NOOP", BATCH)
            assert all(r.startswith(b"+OK") for r in replies), replies
        assert pop.command("QUIT").startswith(b"+OK")
    finally:
        pop.close()
    return session_id, body, time.monotonic() - started


async def test_a_stuck_watcher_slows_neither_the_relay_nor_the_other_watcher(
    feed_proxy: AdminProxy, mailbox: MailboxFactory, corpus: tuple[bytes, ...]
) -> None:
    admin = feed_proxy
    big = corpus[2]  # 1 MiB
    box = mailbox([big])
    # Watchers of earlier tests on this proxy may still be on their way out.
    await trio.to_thread.run_sync(
        lambda: wait_until(
            lambda: value(admin.scrape(), "pop3proxy_feed_watchers") == 0, "no watchers"
        )
    )
    before = await trio.to_thread.run_sync(admin.scrape)
    good = Watcher(events_url(admin))
    async with trio.open_nursery() as nursery:
        await nursery.start(good.run)
        stuck = await stuck_watcher(admin)
        async with stuck:
            during = await trio.to_thread.run_sync(admin.scrape)
            assert value(during, "pop3proxy_feed_watchers") == 2
            session_id, body, seconds = await trio.to_thread.run_sync(busy_session, admin, box)
            # The good watcher sees the whole session while the stuck one is still connected
            # and still reads nothing.
            await good.wait_closed(session_id)
            after = await trio.to_thread.run_sync(admin.scrape)

    assert body.replace(b"\r\n", b"\n") == big.replace(b"\r\n", b"\n")
    assert seconds < TIMEOUT
    mine = good.of_session(session_id)
    verbs = [m["verb"] for m in mine if m["event"] == "pop3.command"]
    assert verbs == ["USER", "PASS", "RETR"] + ["NOOP"] * NOOPS + ["QUIT"]
    retr = next(m for m in mine if m.get("verb") == "RETR")
    assert retr["status"] == "+OK"
    assert retr["reply_octets"] >= len(big)
    names = [m["event"] for m in mine]
    assert names[0] == "session.opened"
    assert names[-1] == "session.closed"
    assert {"upstream.tls_established", "pop3.login"} <= set(names)
    assert not [m for m in good.messages if m["event"] == "feed.dropped"]
    # The stuck watcher really was stuck: events were dropped for it (and only for it).
    dropped = value(after, "pop3proxy_feed_dropped_events_total") - value(
        before, "pop3proxy_feed_dropped_events_total"
    )
    assert dropped > 0
    # No credential in any form.
    password_event = next(m for m in mine if m.get("verb") == "PASS")
    assert password_event["args"] == ["***"]
    assert not [text for text in good.raw if box.password in text]
    # Both watchers are gone once they left.
    wait_until(
        lambda: value(admin.scrape(), "pop3proxy_feed_watchers") == 0, "the watchers to leave"
    )


async def test_no_credential_of_a_sasl_login_reaches_the_feed(
    feed_proxy: AdminProxy, mailbox: MailboxFactory
) -> None:
    admin = feed_proxy
    box = mailbox([])
    token = base64.b64encode(f"\0{box.user}\0{box.password}".encode()).decode()
    good = Watcher(events_url(admin))

    def sasl_session() -> str:
        pop = Pop3Line(admin.proxy.port)
        try:
            session_id = admin.proxy.session_id_for(pop.local_port)
            assert pop.command(f"AUTH PLAIN {token}").startswith(b"+OK")
            assert pop.command("QUIT").startswith(b"+OK")
        finally:
            pop.close()
        return session_id

    async with trio.open_nursery() as nursery:
        await nursery.start(good.run)
        session_id = await trio.to_thread.run_sync(sasl_session)
        await good.wait_closed(session_id)

    logins = [m for m in good.of_session(session_id) if m["event"] == "pop3.login"]
    assert [(m["user"], m["mechanism"], m["result"]) for m in logins] == [
        (box.user, "PLAIN", "success")
    ]
    for text in good.raw:
        assert box.password not in text
        assert token not in text


async def test_a_new_watcher_starts_with_the_open_sessions(
    feed_proxy: AdminProxy, mailbox: MailboxFactory
) -> None:
    admin = feed_proxy
    box = mailbox([])
    pop = await trio.to_thread.run_sync(Pop3Line, admin.proxy.port)
    try:
        session_id = await trio.to_thread.run_sync(admin.proxy.session_id_for, pop.local_port)
        for line in (f"USER {box.user}", f"PASS {box.password}"):
            assert (await trio.to_thread.run_sync(pop.command, line)).startswith(b"+OK")
        # The PASS line is logged once its batch is delivered (telemetry.BATCH_INTERVAL).
        await trio.to_thread.run_sync(
            admin.proxy.wait_for_event,
            "pop3.command",
            lambda e: e.get("session_id") == session_id and e.get("verb") == "PASS",
        )
        async with open_websocket_url(events_url(admin), connect_timeout=5) as ws:
            snapshot = json.loads(await ws.get_message())
        assert snapshot["event"] == "feed.snapshot"
        sessions = {s["session_id"]: s for s in snapshot["sessions"]}
        assert sessions[session_id]["user"] == box.user
        assert sessions[session_id]["state"] == "authenticated"
        assert sessions[session_id]["commands"] == 2
    finally:
        await trio.to_thread.run_sync(pop.close)


def upgrade(admin: AdminProxy, path: str = "/events", **headers: str) -> bytes:
    fields = {
        "Host": admin.endpoint,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(b"fedcba9876543210").decode(),
        "Sec-WebSocket-Version": "13",
    }
    fields.update({k.replace("_", "-"): v for k, v in headers.items()})
    head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v)
    with socket.create_connection((admin.host, admin.port), timeout=TIMEOUT) as sock:
        sock.sendall((head + "\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer


def test_browsers_from_other_origins_and_broken_upgrades_are_refused(
    feed_proxy: AdminProxy,
) -> None:
    admin = feed_proxy
    same = upgrade(admin, Origin=f"http://{admin.endpoint}")
    assert same.startswith(b"HTTP/1.1 101 "), same
    assert upgrade(admin, Origin="http://evil.example").startswith(b"HTTP/1.1 403 ")
    assert upgrade(admin, Origin="null").startswith(b"HTTP/1.1 403 ")
    # DNS rebinding: another site's name made to resolve to 127.0.0.1 is "same-origin"
    # (refused for every browser-facing route: tests/test_admin.py).
    rebound = f"rebind.example:{admin.port}"
    assert upgrade(admin, Host=rebound, Origin=f"http://{rebound}").startswith(b"HTTP/1.1 421 ")
    local = f"localhost:{admin.port}"
    assert upgrade(admin, Host=local, Origin=f"http://{local}").startswith(b"HTTP/1.1 101 ")
    assert upgrade(admin, Sec_WebSocket_Key="").startswith(b"HTTP/1.1 400 ")
    assert upgrade(admin, Sec_WebSocket_Version="8").startswith(b"HTTP/1.1 426 ")
    assert upgrade(admin, "/nope").startswith(b"HTTP/1.1 404 ")


def test_a_command_batch_fits_twice_in_a_watchers_queue() -> None:
    """A watcher that keeps up takes each batch before the next: two must fit (no drops)."""
    assert 2 * BATCH_LIMIT <= QUEUE_SIZE
