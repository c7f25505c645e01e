"""Issue 11 part 2 end to end: lines Dovecot would read differently never reach it.

Dovecot 2.3 logs ``alice`` in for ``USER alice\\0`` (it ends the name at the NUL), reads
``US\\rER alice`` as USER before login, decodes an AUTH initial response with a space inside,
cuts a SASL line at a NUL, and reads the lines pipelined behind a failing AUTH as commands.
Through the proxy, each such line gets ``-ERR [SYS/PERM]`` (or, inside a SASL exchange, ends
the session), is logged with its reason, and logs nobody in; and none of them gets a user
past a network binding (``--user-networks``) or a user ``deny`` rule. Addresses 127.0.0.2
and 127.0.0.3 stand for two client networks.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pop3proxy.pop3 import REFUSALS, SASL_REFUSAL
from tests.conftest import SHARED_PROXY_ARGS
from tests.peers.dovecot import Dovecot
from tests.peers.proxy import ProxyProcess
from tests.test_no_leak import opened_sessions, session_of

TIMEOUT = 10.0


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@dataclass(frozen=True)
class Shape:
    """A way to send a login that some server reads differently from the words it seems to be.

    ``lines(user, password)`` are sent one at a time, each answered before the next, or all in
    one write when ``pipelined``. ``refusal`` is the reason the proxy gives for the first line
    (a key of REFUSALS), ``"sasl"`` for a SASL line that ends the session, or None when the
    lines themselves pass and only a policy may refuse them.
    """

    name: str
    lines: Callable[[bytes, bytes], list[bytes]]
    refusal: str | None
    pipelined: bool = False


def _plain(user: bytes, password: bytes) -> bytes:
    return b64(b"\0" + user + b"\0" + password)


SHAPES = [
    Shape("nul-after-name", lambda u, p: [b"USER " + u + b"\0\r\n", b"PASS " + p + b"\r\n"],
          "control_character"),
    Shape("nul-inside-name", lambda u, p: [b"USER " + u + b"\0x\r\n", b"PASS " + p + b"\r\n"],
          "control_character"),
    Shape("lower-case-nul", lambda u, p: [b"user " + u + b"\0\r\n", b"pass " + p + b"\r\n"],
          "control_character"),
    Shape("cr-inside-verb", lambda u, p: [b"US\rER " + u + b"\r\n", b"PASS " + p + b"\r\n"],
          "control_character"),
    Shape("bare-cr-then-pass", lambda u, p: [b"USER " + u + b"\rPASS " + p + b"\r\n"],
          "control_character"),
    Shape("tab-after-verb", lambda u, p: [b"USER\t" + u + b"\r\n", b"PASS " + p + b"\r\n"],
          "control_character"),
    Shape("long-s-verb", lambda u, p: ["u\u017fer ".encode() + u + b"\r\n", b"PASS " + p + b"\r\n"],
          "malformed_verb"),
    Shape("leading-space", lambda u, p: [b" USER " + u + b"\r\n", b"PASS " + p + b"\r\n"],
          "malformed_verb"),
    Shape("name-and-password", lambda u, p: [b"USER " + u + b" " + p + b"\r\n"], "malformed_user"),
    Shape("no-break-space", lambda u, p: [b"USER " + u + b"\xc2\xa0\r\n", b"PASS " + p + b"\r\n"],
          "malformed_user"),
    Shape("initial-response-nul", lambda u, p: [b"AUTH PLAIN " + _plain(u, p) + b"\0x\r\n"],
          "control_character"),
    Shape("initial-response-space",
          lambda u, p: [b"AUTH PLAIN " + _plain(u, p)[:4] + b" " + _plain(u, p)[4:] + b"\r\n"],
          "malformed_auth"),
    Shape("plain-continuation-nul",
          lambda u, p: [b"AUTH PLAIN\r\n", _plain(u, p) + b"\0\r\n"], "sasl"),
    Shape("login-name-nul",
          lambda u, p: [b"AUTH LOGIN\r\n", b64(u) + b"\0\r\n", b64(p) + b"\r\n"], "sasl"),
    Shape("user-behind-failing-auth",
          lambda u, p: [b"AUTH FOO\r\n", b"USER " + u + b"\r\n", b"PASS " + p + b"\r\n"],
          None, pipelined=True),
    Shape("user-behind-empty-initial-response",
          lambda u, p: [b"AUTH PLAIN =\r\n", b"USER " + u + b"\r\n", b"PASS " + p + b"\r\n"],
          None, pipelined=True),
    Shape("user-and-pass-in-one-write",
          lambda u, p: [b"USER " + u + b"\r\n", b"PASS " + p + b"\r\n"], None, pipelined=True),
]  # fmt: skip
REFUSED = [shape for shape in SHAPES if shape.refusal is not None]


class Client:
    """A raw POP3 client from a chosen loopback address, that records every reply line."""

    def __init__(self, proxy: ProxyProcess, source: str = "127.0.0.1") -> None:
        before = opened_sessions(proxy)
        self.sock = socket.create_connection(
            ("127.0.0.1", proxy.port), timeout=TIMEOUT, source_address=(source, 0)
        )
        self.file = self.sock.makefile("rb")
        self.session_id = session_of(proxy, self.sock, before)
        self.replies: list[bytes] = []

    def line(self) -> bytes:
        """The next reply line; b"" once the proxy has closed the connection."""
        try:
            line = self.file.readline(4096)
        except ConnectionResetError:
            line = b""
        if line:
            self.replies.append(line)
        return line

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def attempt(self, shape: Shape, user: bytes, password: bytes) -> bool:
        """Greeting, the shape's lines, then STAT; whether STAT was answered ``+OK``."""
        assert self.line().startswith(b"+OK")
        lines = shape.lines(user, password)
        if shape.pipelined:
            sent = self.send(b"".join(lines))
            for _ in lines:
                if not sent or not self.line():
                    return False
        else:
            for line in lines:
                if not self.send(line) or not self.line():
                    return False
        return self.send(b"STAT\r\n") and self.line().startswith(b"+OK")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def new_user(dovecot: Dovecot, prefix: str) -> tuple[bytes, bytes]:
    """A fresh user ``<prefix><hex>-u``: the globs below end in ``-u``, so that a name with
    anything after it (``bound-1a2b-u\0``) does not match them, as on the old code."""
    user, password = f"{prefix}{secrets.token_hex(4)}-u", f"Pw-{secrets.token_hex(8)}"
    dovecot.add_user(user, password, [b"Subject: x\r\n\r\nx\r\n"])
    return user.encode(), password.encode()


def run_attempt(
    proxy: ProxyProcess, shape: Shape, user: bytes, password: bytes, source: str = "127.0.0.1"
) -> tuple[bool, Client, list[dict[str, Any]]]:
    """One session with ``shape``: (logged in?, the client, the session's events once closed)."""
    client = Client(proxy, source)
    try:
        logged_in = client.attempt(shape, user, password)
        client.send(b"QUIT\r\n")
        client.line()
    finally:
        client.close()
    proxy.wait_session_closed(client.session_id)
    return logged_in, client, proxy.session_events(client.session_id)


def of(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def assert_nobody_logged_in(logged_in: bool, events: list[dict[str, Any]]) -> None:
    assert not logged_in
    assert [e for e in of(events, "pop3.login") if e.get("result") == "success"] == []


def assert_refused_by_the_proxy(shape: Shape, client: Client, events: list[dict[str, Any]]) -> None:
    """The shape's first odd line got the proxy's own answer, logged with its reason."""
    if shape.refusal == "sasl":
        assert SASL_REFUSAL in client.replies
        [error] = of(events, "pop3.protocol_error")
        assert (error["side"], error["error"]) == ("client", "SASL response line is not base64")
        assert of(events, "session.closed")[0]["reason"] == "client_protocol_error"
        return
    assert shape.refusal is not None
    assert REFUSALS[shape.refusal] in client.replies
    local = of(events, "pop3.local_reply")
    assert [(e["reason"], e["status"]) for e in local][:1] == [(shape.refusal, "-ERR")]
    refused = [e for e in of(events, "pop3.command") if e["code"] == "SYS/PERM"]
    assert [e["args"] for e in refused][:1] == [[]]  # nothing of the line is logged


# ---------------------------------------------------------------------------- no policy


@pytest.mark.parametrize("shape", REFUSED, ids=lambda s: s.name)
def test_an_odd_line_is_refused_and_logs_nobody_in(
    shape: Shape, proxy: ProxyProcess, dovecot: Dovecot
) -> None:
    user, password = new_user(dovecot, "odd")
    logged_in, client, events = run_attempt(proxy, shape, user, password)
    assert_nobody_logged_in(logged_in, events)
    assert_refused_by_the_proxy(shape, client, events)
    # What reached Dovecot: every line but the refused one (a SASL refusal ends the session).
    [closed] = of(events, "session.closed")
    lines = shape.lines(user, password)
    after = b"".join(lines[1:]) + b"STAT\r\nQUIT\r\n"
    forwarded = lines[0] if shape.refusal == "sasl" else after
    assert closed["bytes_to_upstream"] == len(forwarded)


def test_the_same_user_logs_in_with_a_plain_line(proxy: ProxyProcess, dovecot: Dovecot) -> None:
    """The control: the user and password of these tests work when sent as RFC 1939 says."""
    user, password = new_user(dovecot, "odd")
    plain = Shape("plain", lambda u, p: [b"USER " + u + b"\r\n", b"PASS " + p + b"\r\n"], None)
    logged_in, _client, events = run_attempt(proxy, plain, user, password)
    assert logged_in
    assert [e["result"] for e in of(events, "pop3.login")] == ["success"]


# ---------------------------------------------------------------------------- policies


@contextlib.contextmanager
def policy_proxy(dovecot: Dovecot, folder: Path, *args: str) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(
        folder / f"proxy-{time.monotonic_ns()}.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=[*SHARED_PROXY_ARGS, *args],
    )
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def bound(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Users ``bound-*-u`` may log in from 127.0.0.3 only."""
    folder = tmp_path_factory.mktemp("bound")
    with policy_proxy(dovecot, folder, "--user-networks", "bound-*-u=127.0.0.3/32") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def ruled(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Users ``ruled-*-u`` are denied by a rule."""
    folder = tmp_path_factory.mktemp("ruled")
    config = folder / "rules.toml"
    config.write_text('[[rules]]\nname = "no-ruled"\nusers = ["ruled-*-u"]\nphase = "deny"\n')
    with policy_proxy(dovecot, folder, "--config", str(config)) as proxy:
        yield proxy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_a_network_binding_cannot_be_bypassed(
    shape: Shape, bound: ProxyProcess, dovecot: Dovecot
) -> None:
    user, password = new_user(dovecot, "bound-")
    logged_in, client, events = run_attempt(bound, shape, user, password, source="127.0.0.2")
    assert_nobody_logged_in(logged_in, events)
    if shape.refusal is not None:
        assert_refused_by_the_proxy(shape, client, events)
    else:  # the lines pass, as the upstream reads them: the binding decides on USER
        verdicts = [(e["action"], e["reason"]) for e in of(events, "policy.verdict")]
        assert verdicts == [("deny", "user_network")]
        assert any(r.startswith(b"-ERR [AUTH] ") for r in client.replies)
        assert_nothing_forwarded_from_the_refused_user_on(shape, user, password, events)
    # From its own network the same user logs in, with every shape that passes the proxy.
    if shape.refusal is None:
        logged_in, _client, _events = run_attempt(bound, shape, user, password, "127.0.0.3")
        assert logged_in


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_a_user_deny_rule_cannot_be_bypassed(
    shape: Shape, ruled: ProxyProcess, dovecot: Dovecot
) -> None:
    user, password = new_user(dovecot, "ruled-")
    logged_in, client, events = run_attempt(ruled, shape, user, password)
    assert_nobody_logged_in(logged_in, events)
    if shape.refusal is not None:
        assert_refused_by_the_proxy(shape, client, events)
    else:
        verdicts = [(e["action"], e["rule"]) for e in of(events, "policy.verdict")]
        assert verdicts == [("deny", "no-ruled")]
        assert any(r.startswith(b"-ERR [SYS/PERM] ") for r in client.replies)
        assert_nothing_forwarded_from_the_refused_user_on(shape, user, password, events)


def assert_nothing_forwarded_from_the_refused_user_on(
    shape: Shape, user: bytes, password: bytes, events: list[dict[str, Any]]
) -> None:
    """Only the lines before the refused USER reached Dovecot: not the USER, and not the PASS
    pipelined behind it (it did, in the same read, before)."""
    lines = shape.lines(user, password)
    refused = next(i for i, line in enumerate(lines) if line.startswith(b"USER "))
    [closed] = of(events, "session.closed")
    assert closed["bytes_to_upstream"] == len(b"".join(lines[:refused]))


# ------------------------------------------------------ logins whose user cannot be read


def _gs2(user: bytes) -> bytes:
    return b64(b"n,a=admin,n=" + user + b",r=0123456789abcdef")


#: First SASL messages that carry a credential for a user the proxy cannot tell for sure:
#: a mechanism it cannot read (GSSAPI, NTLM), a login acting for another identity (PLAIN or
#: SCRAM with an authzid). A binding of user names, or a user deny rule, must refuse them.
UNREADABLE = [
    pytest.param(lambda u, p: b"AUTH GSSAPI " + b64(b"\x60\x82\x01\x00" + u) + b"\r\n",
                 id="gssapi"),
    pytest.param(lambda u, p: b"AUTH NTLM " + b64(b"NTLMSSP\0\x03" + u) + b"\r\n", id="ntlm"),
    pytest.param(lambda u, p: b"AUTH PLAIN " + b64(b"admin\0" + u + b"\0" + p) + b"\r\n",
                 id="plain-authzid"),
    pytest.param(lambda u, p: b"AUTH SCRAM-SHA-256 " + _gs2(u) + b"\r\n", id="scram-authzid"),
]  # fmt: skip


@pytest.mark.parametrize("first", UNREADABLE)
@pytest.mark.parametrize("policy", ["bound", "ruled"])
def test_a_login_whose_user_cannot_be_read_is_refused_where_user_policies_apply(
    first: Callable[[bytes, bytes], bytes],
    policy: str,
    request: pytest.FixtureRequest,
    dovecot: Dovecot,
) -> None:
    proxy: ProxyProcess = request.getfixturevalue(policy)
    user, password = new_user(dovecot, f"{policy}-")
    shape = Shape("unreadable", lambda u, p: [first(u, p)], None)
    logged_in, client, events = run_attempt(proxy, shape, user, password, source="127.0.0.2")
    assert_nobody_logged_in(logged_in, events)
    verdicts = [(e["action"], e["reason"]) for e in of(events, "policy.verdict")]
    assert verdicts == [("deny", "user_unknown")]
    assert any(b"does not show the user name" in reply for reply in client.replies)
    [closed] = of(events, "session.closed")
    assert closed["bytes_to_upstream"] == 0  # the credential never left
