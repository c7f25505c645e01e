"""Issue 3 against the real proxy and Dovecot: access control, limits, timers, drain, reload.

Every check asserts the client's reply, the log event, and that a following session still
works. Addresses 127.0.0.2-127.0.0.9 stand for different clients (all loopback).

A timer made short for a test must not race the test's own steps: a Dovecot login (PASS
starts a mail process) can take longer than a second on a busy machine, and silence in
either direction is idleness. So a test of a short idle or lifetime limit never needs a
login, or any reply, to beat it; it checks the close and its reason, whatever step the
session had reached, and then that the proxy still serves (:func:`proxy_still_serves`).
The exact timing of every deadline is tested on trio's mock clock
(``tests/test_timers_mock_clock.py``).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.peers.dovecot import Dovecot, Mailbox, MailboxFactory
from tests.peers.proxy import ProxyProcess

TIMEOUT = 10.0


class LimitedProxy(ProxyProcess):
    """The proxy under ``prlimit --nofile=SOFT:HARD`` (which execs it: same process id)."""

    def __init__(self, *args: object, nofile: tuple[int, int], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.nofile = nofile

    def command(self) -> list[str]:
        soft, hard = self.nofile
        return ["prlimit", f"--nofile={soft}:{hard}", "--", *super().command()]


@contextlib.contextmanager
def started_proxy(
    tmp_path: Path,
    dovecot: Dovecot,
    *args: str,
    config: Path | None = None,
    nofile: tuple[int, int] | None = None,
) -> Iterator[ProxyProcess]:
    extra = [*args, *(["--config", str(config)] if config else [])]
    kind: Callable[..., ProxyProcess] = (
        ProxyProcess if nofile is None else lambda *a, **k: LimitedProxy(*a, nofile=nofile, **k)
    )
    proxy = kind(
        tmp_path / f"proxy-{time.monotonic_ns()}.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=extra,
    )
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


_OPEN: list[Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every client a test opened, also when an assertion ended it early."""
    yield
    while _OPEN:
        _OPEN.pop().close()


class Client:
    """A raw POP3 client bound to a chosen loopback source address."""

    def __init__(self, proxy: ProxyProcess, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", proxy.port), timeout=TIMEOUT, source_address=(source, 0)
        )
        self.file = self.sock.makefile("rb")
        self.local_port: int = self.sock.getsockname()[1]
        _OPEN.append(self)

    def line(self) -> bytes:
        return self.file.readline()

    def command(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.line()

    def login(self, box: Mailbox) -> None:
        assert self.line().startswith(b"+OK")
        assert self.command(f"USER {box.user}").startswith(b"+OK")
        assert self.command(f"PASS {box.password}").startswith(b"+OK")

    def closed(self) -> bool:
        """The proxy closed the connection (EOF or reset) without sending anything more.

        A proxy that keeps the connection open makes this raise a timeout.
        """
        try:
            return self.file.read() == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def fresh_session_works(proxy: ProxyProcess, box: Mailbox, source: str = "127.0.0.1") -> None:
    client = Client(proxy, source)
    try:
        client.login(box)
        assert client.command("STAT").startswith(b"+OK")
        assert client.command("QUIT").startswith(b"+OK")
    finally:
        client.close()


def session_closed(proxy: ProxyProcess, client: Client) -> dict[str, object]:
    return proxy.wait_session_closed(proxy.session_id_for(client.local_port))


def proxy_still_serves(proxy: ProxyProcess) -> None:
    """A new client is accepted and gets its own verified upstream connection.

    Needs no reply in time, so it cannot race a short timer of the proxy under test.
    """
    client = Client(proxy)
    try:
        wait_upstream(proxy, proxy.session_id_for(client.local_port))
    finally:
        client.close()


def wait_upstream(proxy: ProxyProcess, session_id: str) -> None:
    """Wait until the session has its verified upstream connection."""
    proxy.wait_for_event("upstream.tls_established", lambda e: e["session_id"] == session_id)


def open_sockets(proxy: ProxyProcess) -> int:
    """How many sockets the proxy process holds (of its file descriptors, the ones sessions
    use: the listener's spare descriptor, /dev/null, comes and goes under a shortage)."""
    fd_dir = Path(f"/proc/{proxy.pid}/fd")
    count = 0
    for entry in fd_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            count += os.readlink(entry).startswith("socket:")
    return count


def wait_until(condition: Callable[[], bool], what: Callable[[], object]) -> None:
    """Wait (at most TIMEOUT s) for ``condition``; ``what()`` explains a failure."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {TIMEOUT} s: {what()}")
        time.sleep(0.02)


def verdicts(proxy: ProxyProcess, session_id: str) -> list[tuple[object, object]]:
    return [
        (e.get("action"), e.get("reason"))
        for e in proxy.session_events(session_id)
        if e.get("event") == "policy.verdict"
    ]


# ---------------------------------------------------------------------------- access control


def test_network_outside_allow_list_refused_before_upstream(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    with started_proxy(tmp_path, dovecot, "--allow", "127.0.0.1/32,::1/128") as proxy:
        client = Client(proxy, "127.0.0.2")
        reply = client.line()
        assert reply.startswith(b"-ERR [SYS/PERM] ")
        assert b"995" in reply
        assert client.closed()
        client.close()
        closed = session_closed(proxy, client)
        assert closed["reason"] == "refused_acl"
        session_id = str(closed["session_id"])
        assert verdicts(proxy, session_id) == [("deny", "acl")]
        assert not [e for e in proxy.session_events(session_id)
                    if str(e.get("event", "")).startswith("upstream.")]  # fmt: skip
        fresh_session_works(proxy, box)


def test_user_bound_to_a_network_is_refused_elsewhere_without_reaching_upstream(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    binding = f"{box.user}=127.0.0.3/32"
    with started_proxy(tmp_path, dovecot, "--user-networks", binding) as proxy:
        client = Client(proxy, "127.0.0.2")
        assert client.line().startswith(b"+OK")
        reply = client.command(f"USER {box.user}")
        assert reply.startswith(b"-ERR [AUTH] ")
        assert client.closed()
        client.close()
        closed = session_closed(proxy, client)
        assert closed["reason"] == "login_refused_user_network"
        session_id = str(closed["session_id"])
        assert verdicts(proxy, session_id) == [("deny", "user_network")]
        commands = [e for e in proxy.session_events(session_id) if e.get("event") == "pop3.command"]
        assert [(e["verb"], e["status"]) for e in commands] == [("USER", "-ERR")]
        assert closed["bytes_to_upstream"] == 0  # USER never left the proxy
        fresh_session_works(proxy, box, "127.0.0.3")


# ---------------------------------------------------------------------------- limits


def test_session_caps_answer_sys_temp_without_upstream(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    args = ("--max-sessions", "3", "--max-sessions-per-client", "2")
    with started_proxy(tmp_path, dovecot, *args) as proxy:
        held = [Client(proxy, "127.0.0.4"), Client(proxy, "127.0.0.4")]
        for client in held:
            assert client.line().startswith(b"+OK")
        third = Client(proxy, "127.0.0.4")
        assert third.line().startswith(b"-ERR [SYS/TEMP] ")
        third.close()
        assert session_closed(proxy, third)["reason"] == "refused_client_capacity"
        other = Client(proxy, "127.0.0.5")
        assert other.line().startswith(b"+OK")
        full = Client(proxy, "127.0.0.6")
        assert full.line().startswith(b"-ERR [SYS/TEMP] ")
        full.close()
        assert session_closed(proxy, full)["reason"] == "refused_capacity"
        for client in [*held, other]:
            client.close()
            session_closed(proxy, client)
        fresh_session_works(proxy, box, "127.0.0.4")


def test_overlong_command_line_gets_err_and_close(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    with started_proxy(tmp_path, dovecot, "--max-auth-line", "4096") as proxy:
        client = Client(proxy)
        assert client.line().startswith(b"+OK")
        # An AUTH line may be long (XOAUTH2): Dovecot answers it, the proxy lets it through.
        reply = client.command("AUTH XOAUTH2 " + "A" * 3000)
        assert reply.startswith(b"-ERR")
        assert b"too long" not in reply
        reply = client.command("USER " + "x" * 300)
        assert reply == b"-ERR command line too long (limit 255 octets)\r\n"
        assert client.closed()
        client.close()
        closed = session_closed(proxy, client)
        assert closed["reason"] == "client_protocol_error"
        errors = proxy.find_events(
            "pop3.protocol_error", lambda e: e.get("session_id") == closed["session_id"]
        )
        assert [e["side"] for e in errors] == ["client"]
        fresh_session_works(proxy, box)


def test_pipelined_flood_is_answered_in_order_within_the_bound(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([b"Subject: x\r\n\r\nhello\r\n"])
    count = 500
    with started_proxy(tmp_path, dovecot, "--max-pipelined", "8") as proxy:
        client = Client(proxy)
        client.login(box)
        client.sock.sendall(b"NOOP\r\n" * count + b"STAT\r\n")
        replies = [client.line() for _ in range(count + 1)]
        assert replies[:count] == [b"+OK\r\n"] * count
        assert replies[count].startswith(b"+OK 1 ")
        assert client.command("QUIT").startswith(b"+OK")
        client.close()
        assert session_closed(proxy, client)["commands"] == count + 4


def test_failed_login_budget_per_session_then_per_client(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    args = ("--max-login-failures", "2", "--client-login-failures", "3",
            "--login-failure-delay", "0")  # fmt: skip
    with started_proxy(tmp_path, dovecot, *args) as proxy:
        client = Client(proxy, "127.0.0.7")
        assert client.line().startswith(b"+OK")
        for _ in range(2):
            assert client.command(f"USER {box.user}").startswith(b"+OK")
            assert client.command("PASS wrong").startswith(b"-ERR")
        assert client.command(f"USER {box.user}").startswith(b"-ERR [AUTH] ")
        assert client.closed()
        client.close()
        assert session_closed(proxy, client)["reason"] == "login_refused_session_login_failures"

        second = Client(proxy, "127.0.0.7")
        assert second.line().startswith(b"+OK")
        assert second.command(f"USER {box.user}").startswith(b"+OK")
        assert second.command("PASS wrong").startswith(b"-ERR")  # the address's third
        assert second.command(f"USER {box.user}").startswith(b"-ERR [SYS/TEMP] ")
        second.close()
        assert session_closed(proxy, second)["reason"] == "login_refused_client_login_failures"
        fresh_session_works(proxy, box, "127.0.0.8")  # other addresses are not affected


def test_repeated_failures_are_slowed_down(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    args = ("--login-failure-delay", "1", "--max-login-failures", "10")
    with started_proxy(tmp_path, dovecot, *args) as proxy:
        client = Client(proxy, "127.0.0.9")
        assert client.line().startswith(b"+OK")
        waited = []
        for _ in range(3):
            client.command(f"USER {box.user}")
            started = time.monotonic()
            assert client.command("PASS wrong").startswith(b"-ERR")
            waited.append(time.monotonic() - started)
        # The first two failures are free; the third reply is held back (about 1 s).
        assert waited[2] >= 0.9
        assert client.command("QUIT").startswith(b"+OK")
        client.close()


# ---------------------------------------------------------------------------- timers


def read_until_closed(client: Client, commands: Sequence[str] = ()) -> list[bytes]:
    """Send ``commands`` one by one (then nothing) and read until the proxy closes.

    The close may come at any step: nothing here needs a reply before a timer fires.
    """
    lines = []
    with contextlib.suppress(ConnectionError):
        line = client.line()
        for command in commands:
            if not line:
                break
            lines.append(line)
            line = client.command(command)
        while line:
            lines.append(line)
            line = client.line()
    return lines


def test_idle_session_is_closed_and_logged(tmp_path: Path, dovecot: Dovecot) -> None:
    """The client says nothing: the proxy ends the session, silently (RFC 1939 section 3).

    (This test used to log in first and flaked: Dovecot's reply to PASS took longer than
    the 0.5 s idle timer on a busy machine, and waiting for a reply is silence too.)
    """
    with started_proxy(tmp_path, dovecot, "--idle-timeout", "0.5") as proxy:
        client = Client(proxy)
        lines = read_until_closed(client)
        assert all(line.startswith(b"+OK") for line in lines), lines  # the greeting at most
        client.close()
        closed = session_closed(proxy, client)
        assert closed["reason"] == "idle_timeout"
        assert proxy.find_events(
            "session.idle_timeout", lambda e: e.get("session_id") == closed["session_id"]
        )
        proxy_still_serves(proxy)


def test_session_lifetime_limit_ends_a_busy_session(tmp_path: Path, dovecot: Dovecot) -> None:
    """A client that never stops sending (CAPA, every reply) is ended by the lifetime
    limit; the idle timer (600 s) cannot be what ends it."""
    with started_proxy(tmp_path, dovecot, "--session-timeout", "1") as proxy:
        client = Client(proxy)
        started = time.monotonic()
        lines = read_until_closed(client, ["CAPA"] * 100_000)
        assert time.monotonic() - started < TIMEOUT
        assert not [line for line in lines if line.startswith(b"-ERR")], lines[-3:]
        client.close()
        assert session_closed(proxy, client)["reason"] == "session_timeout"
        proxy_still_serves(proxy)


# ---------------------------------------------------------------------------- slow clients


def trickle(clients: Sequence[Client], payloads: Sequence[bytes], pause: float) -> list[bytes]:
    """Send ``payloads[i]`` to ``clients[i]`` every ``pause`` s until the proxy closes each.

    Bounded: at most 15 s in all. Returns what each client received.
    """
    received = {client.sock: b"" for client in clients}
    payload_of = {client.sock: payload for client, payload in zip(clients, payloads, strict=True)}
    open_ = set(received)
    deadline = time.monotonic() + 15.0
    next_send = time.monotonic()
    while open_ and time.monotonic() < deadline:
        if time.monotonic() >= next_send:
            next_send += pause
            for sock in open_:
                if b"-ERR" in received[sock]:
                    continue  # told already: the end follows
                with contextlib.suppress(OSError):  # closed just now: read what it sent first
                    sock.sendall(payload_of[sock])
        wait = max(0.0, next_send - time.monotonic())
        readable, _, _ = select.select(list(open_), [], [], wait)
        for sock in readable:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            received[sock] += data
            if not data:
                open_.discard(sock)
    assert not open_, f"{len(open_)} of {len(clients)} connections still open after 15 s"
    return [received[client.sock] for client in clients]


@dataclass(frozen=True)
class SlowClient:
    """How a slow client misbehaves, and the deadline (made 1 s) that must end it."""

    flag: str
    payload: bytes
    reason: str
    goodbye: bytes


SLOW_CLIENTS = {
    "octets": SlowClient(
        "--command-timeout",
        b"x",
        "command_timeout",
        b"-ERR [SYS/TEMP] command line not completed within 1 s, closing\r\n",
    ),
    "commands": SlowClient(
        "--login-timeout",
        b"CAPA\r\n",
        "login_timeout",
        b"-ERR [SYS/TEMP] no login within 1 s, closing\r\n",
    ),
}


@pytest.mark.parametrize("slow", list(SLOW_CLIENTS.values()), ids=list(SLOW_CLIENTS))
def test_slow_clients_are_closed_and_free_their_descriptors(
    tmp_path: Path, dovecot: Dovecot, slow: SlowClient
) -> None:
    """20 connections, each holding an upstream TLS session, send one octet every 0.2 s and
    never end the line, or a whole CAPA every 0.2 s and never log in: the idle timer alone
    would never fire. The line (or login) deadline closes them all with its own reason and
    goodbye, and the proxy's sockets go back to what they were. Only the deadline under test
    is short (the other is 60 s), so which one fires cannot depend on the machine's speed."""
    count = 20
    with started_proxy(tmp_path, dovecot, slow.flag, "1") as proxy:
        baseline = open_sockets(proxy)
        clients = [Client(proxy) for _ in range(count)]
        sessions = [proxy.session_id_for(client.local_port) for client in clients]
        for session_id in sessions:
            wait_upstream(proxy, session_id)
        assert open_sockets(proxy) >= baseline + 2 * count  # each holds its client and upstream
        received = trickle(clients, [slow.payload] * count, 0.2)
        for session_id, data in zip(sessions, received, strict=True):
            closed = proxy.wait_session_closed(session_id)
            assert closed["reason"] == slow.reason, closed
            assert data.endswith(slow.goodbye), data[-200:]
            before = data.removesuffix(slow.goodbye).split(b"\r\n")[:-1]
            # The greeting, and CAPA replies (+OK, capability lines, "."), if they came first.
            assert all(not line.startswith(b"-") for line in before), before
        if slow.reason == "command_timeout":  # no line was ever finished: nothing went upstream
            closes = [proxy.wait_session_closed(session_id) for session_id in sessions]
            assert {closed["bytes_to_upstream"] for closed in closes} == {0}
        for client in clients:
            client.close()
        wait_until(lambda: open_sockets(proxy) == baseline, lambda: (open_sockets(proxy), baseline))
        proxy_still_serves(proxy)


# ---------------------------------------------------------------------------- file descriptors


def soft_nofile(proxy: ProxyProcess) -> int:
    """The proxy's soft RLIMIT_NOFILE, from /proc (``Max open files``)."""
    for line in Path(f"/proc/{proxy.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


def test_the_soft_descriptor_limit_is_raised_to_fit_max_sessions(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    """2 descriptors a session and 64 to spare: 1000 sessions need 2064."""
    with started_proxy(tmp_path, dovecot, nofile=(128, 4096)) as proxy:
        raised = proxy.wait_for_event("fd_limit.raised")
        assert (raised["previous"], raised["soft_limit"], raised["hard_limit"]) == (128, 2064, 4096)
        assert soft_nofile(proxy) == 2064
        assert proxy.find_events("fd_limit.too_low") == []


@pytest.mark.parametrize("limit", [64, 65], ids=["even", "odd"])
def test_out_of_descriptors_is_the_proxy_s_own_shortage_and_it_recovers(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory, limit: int
) -> None:
    """With 64 (or 65) descriptors, about 25 sessions fit. Clients beyond that are told the
    proxy is out of resources, never that the mail server is unreachable: once the upstream
    connect finds no descriptor left, and once accept(2) itself finds none (the listener's
    spare descriptor answers them); which one comes first depends on the limit's parity.
    When the sessions close, the proxy serves again."""
    box = mailbox([])
    with started_proxy(tmp_path, dovecot, nofile=(limit, limit)) as proxy:
        too_low = proxy.wait_for_event("fd_limit.too_low")
        assert (too_low["needed"], too_low["soft_limit"], too_low["hard_limit"]) == (
            2064,
            limit,
            limit,
        )
        assert too_low["level"] == "warning"
        baseline = open_sockets(proxy)
        held: list[Client] = []
        refused: list[Client] = []
        for _ in range(60):  # bounded; about 25 fit
            client = Client(proxy)
            first = client.line()
            assert first, "closed without a word"
            if first.startswith(b"+OK"):
                held.append(client)
                continue
            assert first == b"-ERR [SYS/TEMP] the proxy is out of resources, try again later\r\n"
            refused.append(client)
            if len(refused) == 5:
                break
        assert len(refused) == 5, (len(held), proxy.log_text()[-3000:])
        assert 10 < len(held) < 32, len(held)
        reasons = {session_closed(proxy, client)["reason"] for client in refused}
        assert reasons <= {"local_resources", "refused_local_resources"}, reasons
        failures = proxy.find_events("upstream.failed")
        assert {(f["phase"], f["reason"], f["level"]) for f in failures} <= {
            ("connect", "local_resources", "error")
        }, failures
        assert b"unreachable" not in proxy.log_bytes()
        if "refused_local_resources" in reasons:
            assert proxy.wait_for_event("listener.accept_failed")["reason"] == "local_resources"
        for client in [*held, *refused]:
            client.close()
        for client in held:
            session_closed(proxy, client)
        wait_until(lambda: open_sockets(proxy) == baseline, lambda: (open_sockets(proxy), baseline))
        fresh_session_works(proxy, box)
        assert "Traceback" not in proxy.log_text()


def test_silent_upstream_handshake_times_out_with_sys_temp(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never speaks TLS
        proxy = ProxyProcess(
            tmp_path / "proxy.log",
            upstream_port=silent.getsockname()[1],
            ca_file=None,
            server_name="pop.test",
            extra_args=["--handshake-timeout", "0.5"],
        )
        with proxy:
            client = Client(proxy)
            assert client.line().startswith(b"-ERR [SYS/TEMP] ")
            client.close()
            failed = proxy.wait_for_event("upstream.failed")
            assert (failed["phase"], failed["reason"]) == ("handshake", "timeout")


# ---------------------------------------------------------------------------- drain and reload


def test_sigterm_drains_open_sessions_then_exits_0(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([b"Subject: x\r\n\r\nhello\r\n"])
    with started_proxy(tmp_path, dovecot, "--drain-timeout", "20") as proxy:
        client = Client(proxy)
        client.login(box)
        proxy.send_signal(signal.SIGTERM)
        proxy.wait_for_event("drain.started")
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            Client(proxy).close()
        assert client.command("STAT").startswith(b"+OK 1 ")  # the open session goes on
        assert client.command("QUIT").startswith(b"+OK")
        client.close()
        assert proxy.wait_exit(timeout=TIMEOUT) == 0
        assert session_closed(proxy, client)["reason"] == "quit"


def test_drain_timeout_closes_lingering_sessions(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    with started_proxy(tmp_path, dovecot, "--drain-timeout", "0.5") as proxy:
        client = Client(proxy)
        client.login(box)
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait_exit(timeout=TIMEOUT) == 0
        assert client.closed()
        client.close()
        assert session_closed(proxy, client)["reason"] == "shutdown"


def test_second_signal_exits_at_once(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    with started_proxy(tmp_path, dovecot, "--drain-timeout", "60") as proxy:
        client = Client(proxy)
        client.login(box)
        proxy.send_signal(signal.SIGTERM)
        proxy.wait_for_event("drain.started")
        proxy.send_signal(signal.SIGINT)
        assert proxy.wait_exit(timeout=TIMEOUT) == 0
        proxy.wait_for_event("drain.aborted")
        client.close()


def write_config(path: Path, allow: Sequence[str]) -> Path:
    networks = ", ".join(f'"{n}"' for n in allow)
    path.write_text(f"allow = [{networks}]\n")
    return path


def test_sighup_reloads_the_allow_list_for_new_sessions_only(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    config = write_config(tmp_path / "pop3proxy.toml", ["127.0.0.1/32", "127.0.0.2/32"])
    with started_proxy(tmp_path, dovecot, config=config) as proxy:
        kept = Client(proxy, "127.0.0.2")
        kept.login(box)
        write_config(config, ["127.0.0.1/32"])
        proxy.send_signal(signal.SIGHUP)
        proxy.wait_for_event("reload.done")
        refused = Client(proxy, "127.0.0.2")
        assert refused.line().startswith(b"-ERR [SYS/PERM] ")
        refused.close()
        assert kept.command("STAT").startswith(b"+OK")  # admitted before: not dropped
        assert kept.command("QUIT").startswith(b"+OK")
        kept.close()
        # A broken file on reload keeps the settings in force.
        config.write_text("allow = [\n")
        proxy.send_signal(signal.SIGHUP)
        proxy.wait_for_event("reload.failed")
        fresh_session_works(proxy, box)


def test_sighup_keeps_and_names_the_settings_only_a_restart_changes(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    """A reload must not seem to apply what it cannot: the log level is set up once at start
    (so are the inventory, the admin endpoint and the pseudonym key)."""
    box = mailbox([])
    config = write_config(tmp_path / "pop3proxy.toml", ["127.0.0.1/32"])
    with started_proxy(tmp_path, dovecot, config=config) as proxy:
        config.write_text(config.read_text() + 'log_level = "debug"\n')
        proxy.send_signal(signal.SIGHUP)
        warning = proxy.wait_for_event("reload.restart_needed")
        assert warning["settings"] == ["log_level"]
        proxy.wait_for_event("reload.done")
        client = Client(proxy)
        client.login(box)
        assert client.command("QUIT").startswith(b"+OK")
        client.close()
        closed = session_closed(proxy, client)
        events = {e["event"] for e in proxy.session_events(str(closed["session_id"]))}
        assert "pop3.greeting" not in events  # a debug line: the level in force is still info
        assert "pop3.login" in events
