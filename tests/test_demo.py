"""``pop3proxy demo``: its PKI, its POP3S server, and the command end to end.

The demo server is checked with a real client (stdlib ``poplib`` in a worker thread, verifying
the demo CA) and, where ``poplib`` cannot go (pipelining, AUTH PLAIN, raw dot-stuffing), with a
small line client over ``trio.SSLStream``. The last tests run the demo the way a newcomer does:
in-process with ``run_demo``, and as ``python -m pop3proxy demo`` stopped by SIGINT.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import io
import json
import os
import poplib
import re
import selectors
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
import trio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pop3proxy.config import Endpoint, Settings
from pop3proxy.demo import connect_hint, instructions, run_demo
from pop3proxy.demo_pki import DemoPKI
from pop3proxy.demo_upstream import (
    DEMO_MAILBOX,
    DEMO_PASSWORD,
    DEMO_USER,
    DemoSession,
    serve_demo_upstream,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
T = TypeVar("T")
DEMO_ARGS = ("demo", "--listen", "127.0.0.1:0", "--log-format", "json")

EXPECTED_CAPA = {"TOP", "UIDL", "USER", "SASL", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> DemoPKI:
    return DemoPKI.create(tmp_path)


@pytest.fixture
async def upstream_port(pki: DemoPKI, nursery: trio.Nursery) -> int:
    port: int = await nursery.start(serve_demo_upstream, pki.server_context())
    return port


async def in_thread(fn: Callable[[], T]) -> T:
    """Run blocking client code (poplib) in a worker thread, with a deadline."""
    with trio.fail_after(TIMEOUT):
        return await trio.to_thread.run_sync(fn)


def pop3s(port: int, pki: DemoPKI, host: str = "127.0.0.1") -> poplib.POP3_SSL:
    return poplib.POP3_SSL(host, port, context=pki.client_context(), timeout=TIMEOUT)


class LineClient:
    """A raw POP3 client over TLS: send bytes, read single and multi-line replies."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self) -> bytes:
        """One line, CRLF included."""
        with trio.fail_after(TIMEOUT):
            while b"\r\n" not in self.buffer:
                data = await self.stream.receive_some(4096)
                if not data:
                    raise EOFError(bytes(self.buffer))
                self.buffer += data
        end = self.buffer.index(b"\r\n") + 2
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line

    async def multiline(self) -> bytes:
        """A whole multi-line reply, raw (still dot-stuffed), terminator included."""
        lines = [await self.line()]
        if lines[0].startswith(b"+OK"):
            for _ in range(10_000):
                lines.append(await self.line())
                if lines[-1] == b".\r\n":
                    break
        return b"".join(lines)

    async def at_eof(self) -> bool:
        with trio.fail_after(TIMEOUT):
            return await self.stream.receive_some(4096) == b""


@pytest.fixture
async def client(upstream_port: int, pki: DemoPKI) -> AsyncIterator[LineClient]:
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", upstream_port, ssl_context=pki.client_context()
    )
    async with stream:
        c = LineClient(stream)
        assert (await c.line()).startswith(b"+OK pop3proxy demo server ready <")
        yield c


async def login(c: LineClient) -> None:
    await c.send(b"USER demo\r\nPASS demo\r\n")
    assert (await c.line()).startswith(b"+OK")
    assert (await c.line()).startswith(b"+OK")


# --------------------------------------------------------------------------------------------
# demo_pki
# --------------------------------------------------------------------------------------------


def test_pki_certificates_have_the_extensions_strict_verifiers_want(pki: DemoPKI) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca_cert_path.read_bytes())
    leaf = x509.load_pem_x509_certificate(pki.server_cert_path.read_bytes())

    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert basic.value.path_length == 0
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ca_usage.critical
    assert ca_usage.value.key_cert_sign
    assert ca_usage.value.crl_sign
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    leaf.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong

    now = datetime.datetime.now(datetime.UTC)
    for cert in (ca, leaf):
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        assert cert.not_valid_after_utc - now < datetime.timedelta(days=31)


def test_pki_key_file_is_private_and_ca_key_is_not_written(pki: DemoPKI, tmp_path: Path) -> None:
    assert stat.S_IMODE(pki.server_key_path.stat().st_mode) == 0o600
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["demo-ca.pem", "demo-server.key", "demo-server.pem"]
    assert b"PRIVATE KEY" not in pki.ca_cert_path.read_bytes()
    assert b"PRIVATE KEY" not in pki.server_cert_path.read_bytes()


@pytest.mark.parametrize("server_name", ["localhost", "127.0.0.1"])
async def test_pki_verifies_for_its_names(
    upstream_port: int, pki: DemoPKI, server_name: str
) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    async with trio.SSLStream(tcp, pki.client_context(), server_hostname=server_name) as tls:
        with trio.fail_after(TIMEOUT):
            await tls.do_handshake()
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


async def test_pki_refuses_another_host_name(upstream_port: int, pki: DemoPKI) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    tls = trio.SSLStream(tcp, pki.client_context(), server_hostname="mail.example.com")
    with pytest.raises(trio.BrokenResourceError) as excinfo:
        with trio.fail_after(TIMEOUT):
            await tls.do_handshake()
    await trio.aclose_forcefully(tls)
    assert isinstance(excinfo.value.__cause__, ssl.SSLCertVerificationError)
    assert "mismatch" in str(excinfo.value.__cause__).lower()


# --------------------------------------------------------------------------------------------
# demo_upstream with poplib (a real, independent client)
# --------------------------------------------------------------------------------------------


async def test_greeting_has_a_fresh_apop_timestamp(upstream_port: int, pki: DemoPKI) -> None:
    def greetings() -> list[bytes]:
        result = []
        for _ in range(2):
            p = pop3s(upstream_port, pki)
            result.append(p.getwelcome())
            p.quit()
        return result

    first, second = await in_thread(greetings)
    pattern = rb"\+OK pop3proxy demo server ready <\d+\.\d+@localhost>"
    assert re.fullmatch(pattern, first)
    assert re.fullmatch(pattern, second)
    assert first != second


async def test_capa_lists_the_promised_capabilities(upstream_port: int, pki: DemoPKI) -> None:
    def capa() -> dict[str, list[str]]:
        p = pop3s(upstream_port, pki)
        try:
            return p.capa()
        finally:
            p.quit()

    caps = await in_thread(capa)
    assert set(caps) == {*EXPECTED_CAPA, "STLS"}
    assert caps["SASL"] == ["PLAIN"]


async def test_user_pass_session_reads_the_mailbox(upstream_port: int, pki: DemoPKI) -> None:
    def session() -> dict[str, Any]:
        p = pop3s(upstream_port, pki)
        try:
            out: dict[str, Any] = {"pass": p.user(DEMO_USER) and p.pass_(DEMO_PASSWORD)}
            out["stat"] = p.stat()
            out["list"] = p.list()[1]
            out["list2"] = p.list(2)
            out["uidl"] = p.uidl()[1]
            out["retr"] = [p.retr(i)[1] for i in (1, 2, 3)]
            out["top"] = p.top(1, 1)[1]
            out["noop"] = p.noop()
            out["quit"] = p.quit()
            return out
        finally:
            p.close()

    out = await in_thread(session)
    sizes = [m.size for m in DEMO_MAILBOX]
    assert out["pass"].startswith(b"+OK")
    assert out["stat"] == (3, sum(sizes))
    assert out["list"] == [f"{i} {s}".encode() for i, s in enumerate(sizes, 1)]
    assert out["list2"] == f"+OK 2 {sizes[1]}".encode()
    assert out["uidl"] == [f"{i} {m.uid}".encode() for i, m in enumerate(DEMO_MAILBOX, 1)]
    # poplib undoes the dot-stuffing: what it returns is the message, line for line.
    for lines, message in zip(out["retr"], DEMO_MAILBOX, strict=True):
        assert b"\r\n".join(lines) + b"\r\n" == message.text
    assert b"." in out["retr"][1]
    assert any(line.startswith(b".hidden") for line in out["retr"][1])
    header = DEMO_MAILBOX[0].text.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert out["top"] == [*header, b"", b"Hello!"]
    assert out["noop"] == b"+OK"
    assert out["quit"].startswith(b"+OK")


async def test_dele_rset_and_update_are_per_session(upstream_port: int, pki: DemoPKI) -> None:
    def sessions() -> list[object]:
        seen: list[object] = []
        p = pop3s(upstream_port, pki)
        try:
            p.user(DEMO_USER)
            p.pass_(DEMO_PASSWORD)
            seen.append(p.dele(1))
            seen.append(p.stat())
            with pytest.raises(poplib.error_proto) as again:
                p.dele(1)
            seen.append(again.value.args[0])
            with pytest.raises(poplib.error_proto) as gone:
                p.retr(1)
            seen.append(gone.value.args[0])
            seen.append(p.rset())
            seen.append(p.stat())
            p.dele(2)
            seen.append(p.quit())
        finally:
            p.close()
        # A new session starts with the full demo mailbox again.
        p = pop3s(upstream_port, pki)
        try:
            p.user(DEMO_USER)
            p.pass_(DEMO_PASSWORD)
            seen.append(p.stat())
            p.quit()
        finally:
            p.close()
        return seen

    total = sum(m.size for m in DEMO_MAILBOX)
    dele, after_dele, again, gone, rset, after_rset, quit_, fresh = await in_thread(sessions)
    assert dele == b"+OK message 1 deleted"
    assert after_dele == (2, total - DEMO_MAILBOX[0].size)
    assert again == b"-ERR no such message"
    assert gone == b"-ERR no such message"
    assert rset == f"+OK maildrop has 3 messages ({total} octets)".encode()
    assert after_rset == (3, total)
    assert quit_ == b"+OK pop3proxy demo server signing off (1 deleted, 2 messages left)"
    assert fresh == (3, total)


async def test_apop_login(upstream_port: int, pki: DemoPKI) -> None:
    def apop() -> tuple[bytes, bytes]:
        p = pop3s(upstream_port, pki)
        try:
            with pytest.raises(poplib.error_proto) as wrong:
                p.apop(DEMO_USER, "not the password")
            return wrong.value.args[0], p.apop(DEMO_USER, DEMO_PASSWORD)
        finally:
            p.close()

    wrong, right = await in_thread(apop)
    assert wrong.startswith(b"-ERR [AUTH]")
    assert right.startswith(b"+OK")


async def test_bad_logins_are_refused(upstream_port: int, pki: DemoPKI) -> None:
    def attempts() -> list[bytes]:
        replies = []
        p = pop3s(upstream_port, pki)
        try:
            for action in (
                p.stat,
                lambda: p.pass_(DEMO_PASSWORD),
                lambda: p.user(DEMO_USER) and p.pass_("wrong"),
                lambda: p.user("someone") and p.pass_(DEMO_PASSWORD),
            ):
                with pytest.raises(poplib.error_proto) as exc:
                    action()
                replies.append(exc.value.args[0])
            replies.append(p.quit())
        finally:
            p.close()
        return replies

    before_login, pass_first, wrong_pass, wrong_user, quit_ = await in_thread(attempts)
    assert before_login.startswith(b"-ERR")
    assert pass_first.startswith(b"-ERR")
    assert wrong_pass.startswith(b"-ERR [AUTH]")
    assert wrong_user.startswith(b"-ERR [AUTH]")
    assert quit_.startswith(b"+OK")


# --------------------------------------------------------------------------------------------
# demo_upstream on the wire
# --------------------------------------------------------------------------------------------


async def test_retr_is_dot_stuffed_on_the_wire(client: LineClient) -> None:
    await login(client)
    await client.send(b"RETR 2\r\n")
    raw = await client.multiline()
    assert b"\r\n..\r\n" in raw
    assert b"\r\n..hidden-file and ... are safe too.\r\n.\r\n" in raw
    assert raw.endswith(b"\r\n.\r\n")
    assert raw.count(b"\r\n.\r\n") == 1  # only the terminator is a lone dot


async def test_pipelined_commands_are_answered_in_order(client: LineClient) -> None:
    await client.send(
        b"CAPA\r\nUSER demo\r\nPASS demo\r\nSTAT\r\nLIST\r\nUIDL 3\r\nXYZZY\r\nNOOP\r\nQUIT\r\n"
    )
    capa = await client.multiline()
    assert capa.startswith(b"+OK")
    assert b"\r\nPIPELINING\r\n" in capa
    assert (await client.line()).startswith(b"+OK")
    assert (await client.line()).startswith(b"+OK")
    total = sum(m.size for m in DEMO_MAILBOX)
    assert await client.line() == f"+OK 3 {total}\r\n".encode()
    listing = await client.multiline()
    assert listing.count(b"\r\n") == 5
    assert await client.line() == b"+OK 3 bye-3\r\n"
    assert (await client.line()).startswith(b"-ERR")
    assert await client.line() == b"+OK\r\n"
    assert (await client.line()).startswith(b"+OK pop3proxy demo server signing off")
    assert await client.at_eof()


def _plain(authzid: str, authcid: str, password: str) -> bytes:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode())


async def test_auth_plain_with_initial_response(client: LineClient) -> None:
    await client.send(b"AUTH PLAIN " + _plain("", "demo", "wrong") + b"\r\n")
    assert (await client.line()).startswith(b"-ERR [AUTH]")
    await client.send(b"AUTH PLAIN " + _plain("", "demo", "demo") + b"\r\n")
    assert (await client.line()).startswith(b"+OK PLAIN login accepted")
    await client.send(b"STAT\r\n")
    assert (await client.line()).startswith(b"+OK 3 ")


async def test_auth_plain_with_continuation_and_cancel(client: LineClient) -> None:
    await client.send(b"AUTH\r\n")
    assert await client.multiline() == b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"
    await client.send(b"AUTH CRAM-MD5\r\n")
    assert (await client.line()).startswith(b"-ERR")
    await client.send(b"AUTH PLAIN\r\n")
    assert await client.line() == b"+ \r\n"
    await client.send(b"*\r\n")
    assert await client.line() == b"-ERR AUTH cancelled\r\n"
    # Pipelined: the continuation line is taken from the same buffer as the command.
    await client.send(b"AUTH PLAIN\r\n" + _plain("demo", "demo", "demo") + b"\r\nSTAT\r\n")
    assert await client.line() == b"+ \r\n"
    assert (await client.line()).startswith(b"+OK PLAIN login accepted")
    assert (await client.line()).startswith(b"+OK 3 ")


async def test_apop_digest_uses_the_greeting_timestamp(upstream_port: int, pki: DemoPKI) -> None:
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", upstream_port, ssl_context=pki.client_context()
    )
    async with stream:
        c = LineClient(stream)
        greeting = await c.line()
        match = re.search(rb"<[^>]+>", greeting)
        assert match is not None
        digest = hashlib.md5(match.group() + DEMO_PASSWORD.encode()).hexdigest()
        await c.send(f"APOP demo {digest}\r\n".encode())
        assert (await c.line()).startswith(b"+OK APOP login accepted")


async def test_stls_and_state_errors(client: LineClient) -> None:
    await client.send(b"STLS\r\nRETR 1\r\n\r\nCAPA extra\r\n")
    assert (await client.line()).startswith(b"-ERR TLS is already active")
    assert await client.line() == b"-ERR RETR: log in first\r\n"
    assert await client.line() == b"-ERR empty command\r\n"
    assert await client.line() == b"-ERR usage: CAPA\r\n"
    await login(client)
    await client.send(b"USER demo\r\nRETR 9\r\nRETR 0\r\nTOP 1\r\nTOP 1 x\r\nLIST 1 2\r\n")
    assert await client.line() == b"-ERR USER: already logged in\r\n"
    assert await client.line() == b"-ERR no such message\r\n"
    assert await client.line() == b"-ERR no such message\r\n"
    assert await client.line() == b"-ERR usage: TOP msg n\r\n"
    assert await client.line() == b"-ERR usage: TOP msg n\r\n"
    assert await client.line() == b"-ERR usage: LIST [msg]\r\n"


async def test_overlong_line_ends_the_session(client: LineClient) -> None:
    await client.send(b"NOOP " + b"x" * 2000 + b"\r\n")
    assert await client.line() == b"-ERR line too long\r\n"
    assert await client.at_eof()


def test_update_applies_deletions_to_the_session_copy_only() -> None:
    session = DemoSession()
    for line in (b"USER demo", b"PASS demo", b"DELE 2"):
        assert session.handle_line(line).startswith(b"+OK")
    assert session.handle_line(b"QUIT").startswith(b"+OK")
    assert session.finished
    assert [m.uid for m in session.mailbox] == ["welcome-1", "bye-3"]
    assert len(DEMO_MAILBOX) == 3
    assert session.handle_line(b"STAT") == b""


def test_too_many_failures_end_the_session() -> None:
    session = DemoSession()
    replies = [session.handle_line(line) for line in (b"USER demo", b"PASS x") * 3]
    assert replies[-1].startswith(b"-ERR [AUTH]")
    assert session.finished


# --------------------------------------------------------------------------------------------
# run_demo, in-process
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8110", ("127.0.0.1", 8110)),
        ("[::1]:8110", ("::1", 8110)),
        ("0.0.0.0:110", ("127.0.0.1", 110)),
        ("[::]:110", ("::1", 110)),
    ],
)
def test_connect_hint(address: str, expected: tuple[str, int]) -> None:
    assert connect_hint(address) == expected


def test_instructions_name_the_real_address_and_credentials(tmp_path: Path) -> None:
    text = instructions("127.0.0.1:41234", "127.0.0.1:5", tmp_path / "ca.pem")
    assert "telnet 127.0.0.1 41234" in text
    assert "nc -C 127.0.0.1 41234" in text
    assert "port 41234" in text
    assert f'user name "{DEMO_USER}", password "{DEMO_PASSWORD}"' in text
    assert str(tmp_path / "ca.pem") in text


async def test_run_demo_in_process() -> None:
    out = io.StringIO()
    settings = Settings(listen=Endpoint("127.0.0.1", 0))
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            addresses: list[str] = await nursery.start(
                functools.partial(run_demo, settings, stream=out)
            )
            host, port = connect_hint(addresses[0])

            def session() -> tuple[dict[str, list[str]], tuple[int, int], list[bytes]]:
                p = poplib.POP3(host, port, timeout=TIMEOUT)
                try:
                    caps = p.capa()
                    p.user(DEMO_USER)
                    p.pass_(DEMO_PASSWORD)
                    result = caps, p.stat(), p.retr(2)[1]
                    p.quit()
                    return result
                finally:
                    p.close()

            caps, stat_, message = await in_thread(session)
            match = re.search(r"throwaway CA:\s+(\S+)", out.getvalue())
            assert match is not None
            ca_file = trio.Path(match.group(1))
            assert await ca_file.is_file()
            nursery.cancel_scope.cancel()

    assert not await ca_file.parent.exists(), "the demo must remove its PEM files"
    assert set(caps) == EXPECTED_CAPA  # the proxy hid STLS
    assert stat_ == (3, sum(m.size for m in DEMO_MAILBOX))
    assert b"\r\n".join(message) + b"\r\n" == DEMO_MAILBOX[1].text
    assert f"telnet {host} {port}" in out.getvalue()
    events = [e["event"] for e in logs]
    assert "demo.upstream_started" in events
    assert "listener.started" in events
    [login_event] = [e for e in logs if e["event"] == "pop3.login"]
    assert login_event["user"] == DEMO_USER
    assert login_event["result"] == "success"


# --------------------------------------------------------------------------------------------
# python -m pop3proxy demo, as a newcomer runs it
# --------------------------------------------------------------------------------------------


class JsonLines:
    """Reads JSON log lines from a child's stdout without ever blocking past a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)
        self.pending = b""
        self.events: list[dict[str, Any]] = []

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        seen = 0
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            if not self.selector.select(timeout=deadline - time.monotonic()):
                break
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            self.pending += chunk
            *lines, self.pending = self.pending.split(b"\n")
            self.events.extend(json.loads(line) for line in lines if line.strip())
        raise AssertionError(f"log event not seen; got {[e.get('event') for e in self.events]}")

    def close(self) -> None:
        if self.selector.get_map() is not None:
            self.selector.close()


def start_demo() -> tuple[subprocess.Popen[bytes], JsonLines]:
    """``python -m pop3proxy demo`` on an ephemeral port, JSON logs on a pipe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")}
    # A shell without job control starts background jobs with SIGINT ignored, and an ignored
    # signal stays ignored across exec: the demo would never see our Ctrl-C. A Python-level
    # handler in this process becomes SIG_DFL in the child, which then installs its own.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pop3proxy", *DEMO_ARGS],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    return proc, JsonLines(proc)


def kill(proc: subprocess.Popen[bytes], log: JsonLines) -> None:
    """Clean-up after a failed test: never leave the child running."""
    log.close()
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def stop_demo(proc: subprocess.Popen[bytes], log: JsonLines, signum: int) -> str:
    """Send ``signum``; the demo must exit 0 within a few seconds. Returns its stderr."""
    try:
        began = time.monotonic()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=TIMEOUT)
        elapsed = time.monotonic() - began
    finally:
        kill(proc, log)
    text = stderr.decode()
    assert proc.returncode == 0, text
    assert elapsed < 5
    assert "Traceback" not in text
    return text


def test_demo_command_end_to_end() -> None:
    proc, log = start_demo()
    try:
        started = log.wait_for(lambda e: e["event"] == "listener.started")
        host, port = connect_hint(started["address"])
        upstream = log.wait_for(lambda e: e["event"] == "demo.upstream_started")
        ca_file = Path(upstream["upstream_ca_file"])
        assert ca_file.is_file()

        p = poplib.POP3(host, port, timeout=TIMEOUT)
        try:
            assert p.getwelcome().startswith(b"+OK pop3proxy demo server ready <")
            p.user(DEMO_USER)
            assert p.pass_(DEMO_PASSWORD).startswith(b"+OK")
            assert p.stat() == (3, sum(m.size for m in DEMO_MAILBOX))
            lines = p.retr(1)[1]
            assert p.quit().startswith(b"+OK")
        finally:
            p.close()
        assert b"\r\n".join(lines) + b"\r\n" == DEMO_MAILBOX[0].text

        closed = log.wait_for(lambda e: e["event"] == "session.closed")
        commands = [e for e in log.events if e["event"] == "pop3.command"]
        assert [c["verb"] for c in commands] == ["USER", "PASS", "STAT", "RETR", "QUIT"]
        assert commands[1]["args"] == ["***"]
        assert all(c["session_id"] == closed["session_id"] for c in commands)
        assert closed["commands"] == 5

        # Ctrl-C while a client is still logged in: the session is torn down with the rest.
        idle = poplib.POP3(host, port, timeout=TIMEOUT)
        try:
            idle.user(DEMO_USER)
            idle.pass_(DEMO_PASSWORD)
            text = stop_demo(proc, log, signal.SIGINT)
        finally:
            idle.close()
    finally:
        kill(proc, log)
    assert f"telnet {host} {port}" in text
    assert f"nc -C {host} {port}" in text
    assert not ca_file.exists()
    assert not ca_file.parent.exists()


def test_demo_command_stops_cleanly_on_sigterm() -> None:
    proc, log = start_demo()
    try:
        upstream = log.wait_for(lambda e: e["event"] == "demo.upstream_started")
        log.wait_for(lambda e: e["event"] == "listener.started")
        ca_file = Path(upstream["upstream_ca_file"])
        assert ca_file.is_file()
    except BaseException:
        kill(proc, log)
        raise
    stop_demo(proc, log, signal.SIGTERM)
    assert not ca_file.parent.exists()
