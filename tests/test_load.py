"""Load: 1,000 concurrent sessions through one proxy process to Dovecot, all complete.

Each session connects (at most `RAMP_UP` of them connecting and logging in at a time),
logs in, then waits until every session is logged in (so all of them
are open at the same time, each with its own TLS connection and Dovecot process), and then
runs ``STAT``, ``RETR 1`` (compared byte for byte) and ``QUIT``. None may fail, the proxy must
log each as ended by ``quit`` without any ``session.error``, and afterwards the listener must
still serve a fresh session. Everything is bounded by `LOAD_TIMEOUT`.

A Dovecot of its own serves this test, with process limits above the session count (Dovecot
forks a process per POP3 session, about 5 MB RSS each). The proxy's own caps
(``--max-sessions``, ``--max-sessions-per-client``) are raised above the load, and the
clients come from several loopback addresses (127.0.0.1-127.0.0.8).
"""

from __future__ import annotations

import math
import resource
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trustme

from tests.conftest import MIB
from tests.peers.dovecot import Dovecot, Mailbox, MailboxFactory, make_message
from tests.peers.pipelined import Login, StressTally, compare, reference_transcript, run_round
from tests.peers.proxy import ProxyProcess

SESSIONS = 1000
USERS = 20
SOURCE_ADDRESSES = [f"127.0.0.{i}" for i in range(1, 9)]
LOAD_TIMEOUT = 120.0
IO_TIMEOUT = 60.0
#: Sessions connecting and logging in at the same time. Real clients do not all connect in
#: the same millisecond; without a ramp the last of 1,000 simultaneous TLS handshakes to
#: Dovecot (a fork each) waits longer than the proxy's handshake timer.
RAMP_UP = 64
#: File descriptors wanted in this process (one socket per session and then some).
WANTED_FDS = 4 * SESSIONS + 1024

pytestmark = pytest.mark.slow


def raise_fd_limit() -> None:
    """Raise RLIMIT_NOFILE (inherited by the proxy and Dovecot started afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WANTED_FDS if hard == resource.RLIM_INFINITY else min(WANTED_FDS, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2 * SESSIONS + 100:
        pytest.fail(f"RLIMIT_NOFILE is {soft}: the load test needs {2 * SESSIONS + 100}")


@pytest.fixture(scope="module")
def load_dovecot(ca: trustme.CA) -> Iterator[Dovecot]:
    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="pop3load-"))
    root.chmod(0o755)
    limit = SESSIONS + 200
    # default_client_limit is also the stats service's limit, and every pop3 and pop3-login
    # process keeps a stats-writer connection: at 1.2 x SESSIONS it overflows under load
    # ("client_limit reached, client connections are being dropped", then logins hang).
    server = Dovecot(
        root, ca, process_limit=limit, client_limit=3 * limit, userip_connections=limit
    )
    try:
        server.start()
        yield server
    finally:
        problems = server.stop(check_log=False)
    if problems:
        pytest.fail(
            f"Dovecot logged errors (log kept in {server.log_path}):\n" + "\n".join(problems[:20]),
            pytrace=False,
        )
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def load_proxy(
    load_dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    caps = str(2 * SESSIONS)
    process = ProxyProcess(
        tmp_path_factory.mktemp("load") / "proxy.log",
        upstream_port=load_dovecot.port,
        ca_file=load_dovecot.ca_pem_path,
        server_name=load_dovecot.server_name,
        extra_args=["--max-sessions", caps, "--max-sessions-per-client", caps],
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def load_boxes(load_dovecot: Dovecot) -> list[Mailbox]:
    boxes = []
    for n in range(USERS):
        message = make_message(2048 + 97 * n, subject=f"load {n}")
        user, password = f"load{n}", f"Load-pw-{n}"
        load_dovecot.add_user(user, password, [message])
        boxes.append(Mailbox(user=user, password=password, messages=(message,)))
    return boxes


def undot(body: bytes) -> bytes:
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class LineStream:
    """Lines and multi-line bodies from a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _until(self, marker: bytes) -> bytes:
        for _ in range(10_000):
            end = self.buffer.find(marker)
            if end >= 0:
                data = bytes(self.buffer[: end + len(marker)])
                del self.buffer[: end + len(marker)]
                return data
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"closed; have {bytes(self.buffer[-200:])!r}")
            self.buffer += chunk
        raise AssertionError("too many reads")

    async def line(self) -> bytes:
        return await self._until(b"\r\n")

    async def command(self, line: bytes) -> bytes:
        await self.stream.send_all(line + b"\r\n")
        return await self.line()

    async def multiline(self) -> bytes:
        return await self._until(b"\r\n.\r\n")


class Barrier:
    """Opens when ``parties`` tasks have arrived (arriving on failure counts too)."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.opened = trio.Event()

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.opened.set()


@dataclass
class Load:
    """What the sessions share: the barrier, the ramp-up limit and the tallies."""

    port: int
    barrier: Barrier
    logging_in: trio.Semaphore
    failures: list[str] = field(default_factory=list)
    open_now: int = 0
    peak: int = 0


async def one_session(load: Load, index: int, box: Mailbox) -> None:
    arrived = False
    barrier, failures = load.barrier, load.failures
    try:
        source = SOURCE_ADDRESSES[index % len(SOURCE_ADDRESSES)]
        async with load.logging_in:
            with trio.fail_after(IO_TIMEOUT):
                stream = await trio.open_tcp_stream("127.0.0.1", load.port, local_address=source)
            lines = LineStream(stream)
            try:
                with trio.fail_after(IO_TIMEOUT):
                    greeting = await lines.line()
                    assert greeting.startswith(b"+OK"), greeting
                    reply = await lines.command(b"USER " + box.user.encode())
                    assert reply.startswith(b"+OK"), reply
                    reply = await lines.command(b"PASS " + box.password.encode())
                    assert reply.startswith(b"+OK"), reply
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        async with stream:
            load.open_now += 1
            load.peak = max(load.peak, load.open_now)
            barrier.arrive()
            arrived = True
            await barrier.opened.wait()
            with trio.fail_after(IO_TIMEOUT):
                reply = await lines.command(b"STAT")
                assert reply == b"+OK 1 %d\r\n" % len(box.messages[0]), reply
                reply = await lines.command(b"RETR 1")
                assert reply.startswith(b"+OK"), reply
                body = await lines.multiline()
                assert undot(body[: -len(b".\r\n")]) == box.messages[0], "RETR differs"
                reply = await lines.command(b"QUIT")
                assert reply.startswith(b"+OK"), reply
                assert await stream.receive_some(1024) == b""
            load.open_now -= 1
    except (AssertionError, OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        failures.append(f"session {index}: {type(exc).__name__}: {exc}")
    finally:
        if not arrived:
            barrier.arrive()


async def test_thousand_concurrent_sessions(
    load_proxy: ProxyProcess, load_boxes: list[Mailbox]
) -> None:
    load = Load(load_proxy.port, Barrier(SESSIONS), trio.Semaphore(RAMP_UP))
    started = trio.current_time()
    with trio.fail_after(LOAD_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for index in range(SESSIONS):
                nursery.start_soon(one_session, load, index, load_boxes[index % len(load_boxes)])
    elapsed = trio.current_time() - started
    kinds = Counter(f.split(":", 2)[1].strip() for f in load.failures)
    assert load.failures == [], f"{len(load.failures)} of {SESSIONS} failed ({kinds}): " + (
        "\n".join(load.failures[:5])
    )
    assert load.peak == SESSIONS, f"only {load.peak} sessions were logged in at the same time"

    # Each client saw EOF; the proxy logs session.closed just after closing it.
    closed = load_proxy.find_events("session.closed")
    for _ in range(100):
        if len(closed) >= SESSIONS:
            break
        await trio.sleep(0.1)
        closed = load_proxy.find_events("session.closed")
    assert len(closed) == SESSIONS, len(closed)
    reasons = {str(e["reason"]) for e in closed}
    assert reasons == {"quit"}, reasons
    assert load_proxy.find_events("session.error") == []
    clients = {
        str(e["client"]).rpartition(":")[0] for e in load_proxy.find_events("session.opened")
    }
    assert clients == set(SOURCE_ADDRESSES), clients

    # The listener still answers, and a fresh session works end to end.
    fresh = Load(load_proxy.port, Barrier(1), trio.Semaphore(1))
    await one_session(fresh, 0, load_boxes[0])
    assert fresh.failures == [], fresh.failures
    print(
        f"{SESSIONS} concurrent sessions in {elapsed:.1f} s "
        f"({math.floor(SESSIONS / elapsed)} sessions/s)"
    )


# -- pipelined RETR + QUIT under parallel load, byte-compared with direct POP3S -----------------
#
# Reported once and never reproduced: a pipelined batch ending in RETR <1 MiB> + QUIT lost its
# last 21 octets under heavy parallel load. This is the bounded version of
# ``bench/pipelined_stress.py`` (see tests/peers/pipelined.py for what a session does).

STRESS_PARALLEL = 16
STRESS_ROUNDS = 4
STRESS_SLOW_EVERY = 3
STRESS_MAILBOXES = 4
STRESS_TIMEOUT = 60.0


async def test_parallel_pipelined_retr_quit_sessions_lose_no_octet(
    proxy: ProxyProcess, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    logins: list[tuple[Login, bytes]] = []
    for n in range(STRESS_MAILBOXES):
        message = make_message(MIB, subject=f"pipelined stress {n}", dot_lines=True)
        box = mailbox([message])
        login = Login(box.user, box.password)
        with trio.fail_after(STRESS_TIMEOUT):
            expected = await reference_transcript(
                dovecot.port,
                login,
                tls=dovecot.client_ssl_context(),
                server_name=dovecot.server_name,
            )
        status, _, rest = expected.partition(b"\r\n")
        assert status.startswith(b"+OK"), status
        body, terminator, quit_reply = rest.partition(b"\r\n.\r\n")
        assert undot(body + b"\r\n") == message, "the reference RETR differs from the message"
        assert terminator
        assert quit_reply.startswith(b"+OK"), quit_reply
        logins.append((login, expected))

    tally = StressTally()
    for _ in range(STRESS_ROUNDS):
        await run_round(
            tally,
            proxy.port,
            logins,
            parallel=STRESS_PARALLEL,
            slow_every=STRESS_SLOW_EVERY,
            session_timeout=STRESS_TIMEOUT,
        )
    assert tally.mismatches == [], "\n".join(m.describe() for m in tally.mismatches[:10])
    assert tally.sessions == STRESS_PARALLEL * STRESS_ROUNDS
    assert (
        tally.octets_compared
        == sum(len(logins[i % STRESS_MAILBOXES][1]) for i in range(STRESS_PARALLEL)) * STRESS_ROUNDS
    )
    print(
        f"{tally.sessions} pipelined RETR+QUIT sessions ({tally.slow_sessions} slow readers), "
        f"{tally.octets_compared} octets compared, {len(tally.mismatches)} mismatches"
    )


def test_the_comparison_reports_a_lost_tail() -> None:
    """The check itself can fail: 21 octets missing at the end are named as such."""
    expected = b"+OK 5 octets\r\nhello\r\n.\r\n+OK Logging out.\r\n"
    assert compare(0, False, expected, expected) is None
    truncated = compare(7, True, expected, expected[:-21])
    assert truncated is not None
    assert truncated.is_truncation
    assert truncated.describe() == (
        f"session 7 (slow reader): {len(expected) - 21} octets instead of {len(expected)}; "
        f"the first {len(expected) - 21} agree, 21 missing at the end"
    )
    changed = compare(1, False, expected, expected.replace(b"hello", b"hellO"))
    assert changed is not None
    assert not changed.is_truncation
    assert changed.common_prefix == expected.index(b"hello") + 4
