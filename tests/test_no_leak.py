"""No credential, in any encoding, ever reaches the proxy's output.

Modelled on aiosmtpd's ``assert_nopassleak``: drive real sessions through a ``pop3proxy serve``
subprocess in front of Dovecot with distinctive random passwords, for every login flow, both
succeeding and failing, with cancelled SASL exchanges, and with the command lines a server
might read differently (issue 11: a bare CR, a NUL, a TAB, USER with two words, lower case,
odd SASL lines, a password typed as a command); then search *everything* the process wrote
(stdout and stderr, at ``info`` and at ``debug`` level) for the password, its base64 and hex
forms, the base64 SASL payloads and the APOP/CRAM-MD5 digests. ``test_no_leak_sinks.py``
searches every other sink (feed, metrics, summary, inventory, reports) for the same shapes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import poplib
import re
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import SHARED_PROXY_ARGS
from tests.peers.dovecot import Dovecot, MailboxFactory
from tests.peers.proxy import ProxyProcess

TIMEOUT = 30.0
FLOWS = ["USER", "APOP", "PLAIN-initial", "PLAIN-continuation", "LOGIN", "CRAM-MD5"]
APOP_TIMESTAMP = re.compile(rb"<[^<>\s]+@[^<>\s]+>")


def leaks(secrets: Mapping[bytes, str], output: bytes) -> list[str]:
    """Each line of ``output`` that holds a secret (in any letter case), with its label."""
    found = []
    lines = [(line, line.lower()) for line in output.splitlines()]
    for secret, label in secrets.items():
        folded = secret.lower()
        found += [
            f"{label}: {line.decode('utf-8', 'replace')[:300]}"
            for line, lower in lines
            if folded in lower
        ]
    return found


@dataclass
class Secrets:
    """Every secret form sent so far, each with a label that says what it is.

    Keyed by the form itself: forms of different passwords share their first octets (the hex
    of ``Pw-`` is always ``50772d``), so a label and a prefix would not tell them apart.
    """

    forms: dict[bytes, str] = field(default_factory=dict)

    def add(self, label: str, value: str | bytes) -> None:
        raw = value.encode("utf-8") if isinstance(value, str) else value
        assert len(raw) >= 12, f"{label} is too short to search for"
        self.forms[raw] = f"{label} {raw[:6]!r}…"

    def add_password(self, password: str) -> None:
        """The password as typed, without its ``Pw-`` prefix, in base64 and in hex."""
        raw = password.encode()
        self.add("password", raw)
        self.add("password core", raw.removeprefix(b"Pw-"))
        self.add("password base64", base64.b64encode(raw))
        self.add("password hex", raw.hex())
        self.add("password hex upper", raw.hex().upper())


@dataclass(kw_only=True)
class LeakWatch(Secrets):
    """A proxy subprocess and every secret form sent through it so far."""

    proxy: ProxyProcess
    level: str

    def assert_no_leak(self) -> None:
        found = leaks(self.forms, self.proxy.log_bytes())
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
    watching = LeakWatch(proxy=proxy, level=level)
    try:
        yield watching
    finally:
        proxy.stop()
    # Whatever the process wrote while shutting down counts too.
    watching.assert_no_leak()


# -- a client that remembers what it sent --------------------------------------------------------


def opened_sessions(proxy: ProxyProcess) -> set[str]:
    return {str(e["session_id"]) for e in proxy.find_events("session.opened")}


def session_of(proxy: ProxyProcess, sock: socket.socket, before: set[str]) -> str:
    """The id of the session ``sock`` opened: by its whole client address, among the sessions
    not in ``before`` (opened before it connected).

    ``ProxyProcess.session_id_for`` matches the client port alone and takes the first match,
    but the kernel hands out a port again (to another source address at once, to the same
    one once the earlier connection is gone): it can name an older session.
    """
    host, port = sock.getsockname()[:2]
    event = proxy.wait_for_event(
        "session.opened",
        lambda e: e.get("client") == f"{host}:{port}" and e.get("session_id") not in before,
    )
    return str(event["session_id"])


@contextlib.contextmanager
def session(proxy: ProxyProcess) -> Iterator[tuple[poplib.POP3, str]]:
    before = opened_sessions(proxy)
    pop = poplib.POP3("127.0.0.1", proxy.port, timeout=TIMEOUT)
    try:
        session_id = session_of(proxy, pop.sock, before)
        yield pop, session_id
    finally:
        pop.close()
    proxy.wait_session_closed(session_id)


def shortcmd(pop: poplib.POP3, line: str) -> bytes:
    pop.sock.sendall(line.encode("utf-8") + b"\r\n")
    reply = pop.file.readline(4096).rstrip(b"\r\n")
    if not reply.startswith(b"+"):
        raise poplib.error_proto(reply)
    return reply


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def login(watch: Secrets, pop: poplib.POP3, flow: str, user: str, password: str) -> bytes:
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


# -- command lines a server might read differently (issue 11) ------------------------------------


@dataclass(frozen=True)
class OddShape:
    """Lines that carry the password where a server might not expect it.

    ``lines(user, password)`` are sent one at a time, each read to its reply line (a
    ``pipelined`` shape sends them in one write). ``logs_in``: the session is then in the
    TRANSACTION state (its STAT is answered ``+OK``).
    """

    name: str
    lines: Callable[[bytes, bytes], list[bytes]]
    logs_in: bool
    pipelined: bool = False


def plain_payload(user: bytes, password: bytes) -> bytes:
    return base64.b64encode(b"\0" + user + b"\0" + password)


def _user_pass(user: bytes, password: bytes) -> list[bytes]:
    return [b"USER " + user + b"\r\n", b"PASS " + password + b"\r\n"]


ODD_SHAPES = [
    OddShape("bare-cr-user-then-pass",
             lambda u, p: [b"USER " + u + b"\rPASS " + p + b"\r\n", b"PASS " + p + b"\r\n"],
             logs_in=False),
    OddShape("user-with-a-second-word",
             lambda u, p: [b"USER " + u + b" " + p + b"\r\n", b"PASS " + p + b"\r\n"],
             logs_in=False),
    OddShape("nul-between-user-and-password", lambda u, p: [b"USER " + u + b"\0" + p + b"\r\n"],
             logs_in=False),
    OddShape("nul-after-password",
             lambda u, p: [b"USER " + u + b"\r\n", b"PASS " + p + b"\0\r\n"], logs_in=False),
    OddShape("tab-separated-pass",
             lambda u, p: [b"USER " + u + b"\r\n", b"PASS\t" + p + b"\r\n"], logs_in=False),
    OddShape("tab-separated-user-and-password",
             lambda u, p: [b"USER " + u + b"\t" + p + b"\r\n"], logs_in=False),
    OddShape("lower-case-verbs",
             lambda u, p: [b"user " + u + b"\r\n", b"pass " + p + b"\r\n"], logs_in=True),
    OddShape("password-as-a-command", lambda u, p: [b"USER " + u + b"\r\n", p + b"\r\n"],
             logs_in=False),
    OddShape("password-after-verbs-with-no-such-argument",
             lambda u, p: [*_user_pass(u, p), b"NOOP " + p + b"\r\n", b"RETR " + p + b"\r\n",
                           b"XYZZY " + p + b"\r\n", p + b"\r\n"], logs_in=True),
    OddShape("password-as-apop-digest", lambda u, p: [b"APOP " + u + b" " + p + b"\r\n"],
             logs_in=False),
    OddShape("lower-case-auth-plain",
             lambda u, p: [b"auth plain " + plain_payload(u, p) + b"\r\n"], logs_in=True),
    OddShape("auth-plain-initial-response-with-a-space",
             lambda u, p: [b"AUTH PLAIN " + plain_payload(u, p)[:4] + b" "
                           + plain_payload(u, p)[4:] + b"\r\n"], logs_in=False),
    OddShape("auth-plain-continuation-with-a-nul",
             lambda u, p: [b"AUTH PLAIN\r\n", plain_payload(u, p) + b"\0\r\n"], logs_in=False),
    OddShape("auth-login-continuations",
             lambda u, p: [b"AUTH LOGIN\r\n", base64.b64encode(u) + b"\r\n",
                           base64.b64encode(p) + b"\r\n"], logs_in=True),
    OddShape("auth-login-password-first-then-cancel",
             lambda u, p: [b"AUTH LOGIN\r\n", base64.b64encode(p) + b"\r\n", b"*\r\n"],
             logs_in=False),
    OddShape("auth-login-name-with-a-nul",
             lambda u, p: [b"AUTH LOGIN\r\n", base64.b64encode(u) + b"\0\r\n",
                           base64.b64encode(p) + b"\r\n"], logs_in=False),
    OddShape("user-and-pass-behind-a-failing-auth",
             lambda u, p: [b"AUTH FOO\r\n", *_user_pass(u, p)], logs_in=True, pipelined=True),
]  # fmt: skip


def add_odd_secrets(secrets: Secrets, user: str, password: str) -> None:
    """The password's forms, and the SASL payloads the odd shapes build from it."""
    secrets.add_password(password)
    payload = plain_payload(user.encode(), password.encode())
    secrets.add("PLAIN payload base64", payload)
    secrets.add("PLAIN payload tail", payload[-16:])
    secrets.add("PLAIN payload after 4", payload[4:])


def odd_session(proxy: ProxyProcess, shape: OddShape, user: str, password: str) -> str:
    """One session with ``shape``, then STAT and QUIT; its id once it has closed."""
    before = opened_sessions(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
        reader = sock.makefile("rb")
        session_id = session_of(proxy, sock, before)
        replies = [reader.readline(4096)]
        lines = shape.lines(user.encode(), password.encode())
        with contextlib.suppress(OSError):
            if shape.pipelined:
                sock.sendall(b"".join(lines))
                replies += [reader.readline(4096) for _ in lines]
            else:
                for line in lines:
                    sock.sendall(line)
                    replies.append(reader.readline(4096))
            sock.sendall(b"STAT\r\n")
            replies.append(reader.readline(4096))
            sock.sendall(b"QUIT\r\n")
            replies.append(reader.readline(4096))
        reader.close()
    proxy.wait_session_closed(session_id)
    assert replies[0].startswith(b"+OK"), replies
    stat = replies[len(lines) + 1] if len(replies) > len(lines) + 1 else b""
    assert stat.startswith(b"+OK") is shape.logs_in, (shape.name, replies)
    return session_id


# -- the flows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flow", FLOWS)
def test_successful_login_leaks_nothing(
    flow: str, watch: LeakWatch, mailbox: MailboxFactory
) -> None:
    box = mailbox([b"Subject: hello\r\n\r\nbody\r\n"])
    with session(watch.proxy) as (pop, session_id):
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
    with session(watch.proxy) as (pop, session_id):
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
    with session(watch.proxy) as (pop, session_id):
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
    with session(watch.proxy) as (pop, _session_id):
        login(watch, pop, "USER", box.user, box.password)
        pop.quit()
    levels = {e.get("level") for e in watch.proxy.events()}
    if watch.level == "debug":
        assert "debug" in levels
    else:
        assert "debug" not in levels
    watch.assert_no_leak()


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda shape: shape.name)
def test_odd_command_lines_leak_nothing(
    shape: OddShape, watch: LeakWatch, mailbox: MailboxFactory
) -> None:
    box = mailbox([b"Subject: hello\r\n\r\nbody\r\n"])
    add_odd_secrets(watch, box.user, box.password)
    session_id = odd_session(watch.proxy, shape, box.user, box.password)
    # The output is the right one: it recorded this session's commands (or why it ended).
    names = {e.get("event") for e in watch.proxy.session_events(session_id)}
    assert names & {"pop3.command", "pop3.protocol_error"}, names
    watch.assert_no_leak()
