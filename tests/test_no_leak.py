"""No credential, in any encoding, ever reaches the proxy's output.

Modelled on aiosmtpd's ``assert_nopassleak``: drive real sessions through a ``pop3proxy serve``
subprocess in front of Dovecot with distinctive random passwords, for every login flow, both
succeeding and failing, and with cancelled SASL exchanges; then search *everything* the process
wrote (stdout and stderr, at ``info`` and at ``debug`` level) for the password, its base64 and
hex forms, the base64 SASL payloads and the APOP/CRAM-MD5 digests.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import poplib
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import SHARED_PROXY_ARGS
from tests.peers.dovecot import Dovecot, MailboxFactory
from tests.peers.proxy import ProxyProcess

TIMEOUT = 30.0
FLOWS = ["USER", "APOP", "PLAIN-initial", "PLAIN-continuation", "LOGIN", "CRAM-MD5"]
APOP_TIMESTAMP = re.compile(rb"<[^<>\s]+@[^<>\s]+>")


@dataclass
class LeakWatch:
    """A proxy subprocess and every secret form sent through it so far."""

    proxy: ProxyProcess
    level: str
    secrets: dict[str, bytes] = field(default_factory=dict)

    def add(self, label: str, value: str | bytes) -> None:
        raw = value.encode("utf-8") if isinstance(value, str) else value
        assert len(raw) >= 12, f"{label} is too short to search for"
        self.secrets[f"{label} {raw[:6]!r}…"] = raw

    def add_password(self, password: str) -> None:
        raw = password.encode()
        self.add("password", raw)
        self.add("password core", raw.removeprefix(b"Pw-"))
        self.add("password base64", base64.b64encode(raw))
        self.add("password hex", raw.hex())
        self.add("password hex upper", raw.hex().upper())

    def assert_no_leak(self) -> None:
        output = self.proxy.log_bytes()
        found = []
        for label, secret in self.secrets.items():
            for line in output.splitlines():
                if secret in line or secret.lower() in line.lower():
                    found.append(f"{label}: {line.decode('utf-8', 'replace')}")
        assert not found, "credentials in the proxy output:\n" + "\n".join(found)


@pytest.fixture(scope="module", params=["info", "debug"])
def watch(
    request: pytest.FixtureRequest, dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LeakWatch]:
    level: str = request.param
    log_path: Path = tmp_path_factory.mktemp(f"leak-{level}") / "proxy.log"
    proxy = ProxyProcess(
        log_path,
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=["--log-level", level, *SHARED_PROXY_ARGS],
    )
    proxy.start()
    watching = LeakWatch(proxy, level)
    try:
        yield watching
    finally:
        proxy.stop()
    # Whatever the process wrote while shutting down counts too.
    watching.assert_no_leak()


# -- a client that remembers what it sent --------------------------------------------------------


@contextlib.contextmanager
def session(watch: LeakWatch) -> Iterator[tuple[poplib.POP3, str]]:
    pop = poplib.POP3("127.0.0.1", watch.proxy.port, timeout=TIMEOUT)
    try:
        session_id = watch.proxy.session_id_for(pop.sock.getsockname()[1])
        yield pop, session_id
    finally:
        pop.close()
    watch.proxy.wait_session_closed(session_id)


def shortcmd(pop: poplib.POP3, line: str) -> bytes:
    pop.sock.sendall(line.encode("utf-8") + b"\r\n")
    reply = pop.file.readline(4096).rstrip(b"\r\n")
    if not reply.startswith(b"+"):
        raise poplib.error_proto(reply)
    return reply


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def login(watch: LeakWatch, pop: poplib.POP3, flow: str, user: str, password: str) -> bytes:
    """Log in with ``flow``, registering every secret form that goes over the wire."""
    watch.add_password(password)
    pw = password.encode()
    if flow == "USER":
        watch.add("PASS line", f"PASS {password}")
        pop.user(user)
        return pop.pass_(password)
    if flow == "APOP":
        stamp = APOP_TIMESTAMP.search(pop.getwelcome())
        assert stamp is not None, pop.getwelcome()
        digest = hashlib.md5(stamp.group() + pw).hexdigest()
        watch.add("APOP digest", digest)
        return shortcmd(pop, f"APOP {user} {digest}")
    if flow in {"PLAIN-initial", "PLAIN-continuation"}:
        payload = b"\0" + user.encode() + b"\0" + pw
        encoded = b64(payload)
        watch.add("PLAIN payload base64", encoded)
        watch.add("PLAIN payload tail", encoded[-16:])
        watch.add("PLAIN payload hex", payload.hex())
        if flow == "PLAIN-initial":
            return shortcmd(pop, f"AUTH PLAIN {encoded}")
        assert shortcmd(pop, "AUTH PLAIN").startswith(b"+")
        return shortcmd(pop, encoded)
    if flow == "LOGIN":
        assert shortcmd(pop, "AUTH LOGIN").startswith(b"+ ")
        assert shortcmd(pop, b64(user.encode())).startswith(b"+ ")
        return shortcmd(pop, b64(pw))
    if flow == "CRAM-MD5":
        challenge = base64.b64decode(shortcmd(pop, "AUTH CRAM-MD5")[2:])
        digest = hmac.new(pw, challenge, hashlib.md5).hexdigest()
        response = b64(f"{user} {digest}".encode())
        watch.add("CRAM-MD5 digest", digest)
        watch.add("CRAM-MD5 response", response)
        watch.add("CRAM-MD5 response tail", response[-16:])
        return shortcmd(pop, response)
    raise AssertionError(f"unknown login flow {flow}")


def login_events(watch: LeakWatch, session_id: str) -> list[tuple[object, object, object]]:
    return [
        (e.get("user"), e.get("mechanism"), e.get("result"))
        for e in watch.proxy.session_events(session_id)
        if e.get("event") == "pop3.login"
    ]


# -- the flows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flow", FLOWS)
def test_successful_login_leaks_nothing(
    flow: str, watch: LeakWatch, mailbox: MailboxFactory
) -> None:
    box = mailbox([b"Subject: hello\r\n\r\nbody\r\n"])
    with session(watch) as (pop, session_id):
        assert login(watch, pop, flow, box.user, box.password).startswith(b"+OK")
        assert pop.stat() == (1, len(box.messages[0]))
        pop.quit()

    # The output is the right one: it recorded this login.
    assert login_events(watch, session_id)[-1][2] == "success"
    watch.assert_no_leak()


@pytest.mark.parametrize("flow", FLOWS)
def test_failed_login_leaks_nothing(flow: str, watch: LeakWatch, mailbox: MailboxFactory) -> None:
    box = mailbox([])
    wrong = f"Pw-{secrets.token_hex(12)}"
    with session(watch) as (pop, session_id):
        with pytest.raises(poplib.error_proto, match="-ERR"):
            login(watch, pop, flow, box.user, wrong)
        # The session goes on; a second failure with the real password's neighbour too.
        with pytest.raises(poplib.error_proto, match="-ERR"):
            login(watch, pop, "USER", box.user, f"{box.password}-nope")
        pop.quit()

    assert [result for _, _, result in login_events(watch, session_id)] == ["failure", "failure"]
    watch.assert_no_leak()


def test_cancelled_auth_then_login_leaks_nothing(watch: LeakWatch, mailbox: MailboxFactory) -> None:
    """After ``*`` cancels an exchange, the next lines are commands again, not SASL data.

    A proxy that lost track of the exchange would take the ``AUTH PLAIN`` below for SASL data
    and the payload after it for a command, and log it as one.
    """
    box = mailbox([])
    with session(watch) as (pop, session_id):
        assert shortcmd(pop, "AUTH LOGIN").startswith(b"+ ")
        assert shortcmd(pop, b64(box.user.encode())).startswith(b"+ ")
        with pytest.raises(poplib.error_proto, match="-ERR"):
            shortcmd(pop, "*")
        assert shortcmd(pop, "AUTH PLAIN").startswith(b"+")
        with pytest.raises(poplib.error_proto, match="-ERR"):
            shortcmd(pop, "*")
        assert login(watch, pop, "PLAIN-continuation", box.user, box.password).startswith(b"+OK")
        assert pop.stat() == (0, 0)
        pop.quit()

    verbs = [
        e.get("verb")
        for e in watch.proxy.session_events(session_id)
        if e.get("event") == "pop3.command"
    ]
    assert verbs[-2:] == ["STAT", "QUIT"], verbs
    assert login_events(watch, session_id)[-1] == (box.user, "PLAIN", "success")
    watch.assert_no_leak()


def test_debug_level_logs_more_than_info(watch: LeakWatch, mailbox: MailboxFactory) -> None:
    """The ``debug`` run really is more verbose, so its clean bill means something."""
    box = mailbox([])
    with session(watch) as (pop, _session_id):
        login(watch, pop, "USER", box.user, box.password)
        pop.quit()
    levels = {e.get("level") for e in watch.proxy.events()}
    if watch.level == "debug":
        assert "debug" in levels
    else:
        assert "debug" not in levels
    watch.assert_no_leak()
