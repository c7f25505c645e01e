"""Property tests of the POP3 engine with hypothesis: hostile bytes, hostile chunking.

Whatever arrives, the engine may only raise :class:`RemoteProtocolError` (and refuse further
input with :class:`LocalProtocolError` afterwards); what it forwards is always a faithful copy
of what it received, whole lines only, none with a control octet; and no credential ever
shows in an event. ``POP3PROXY_FUZZ_EXAMPLES`` raises the example count for a longer local
run. No example database is used (the ``ci`` profile in ``tests/conftest.py``): each run
explores afresh, and a failure prints its reproduction blob.
"""

from __future__ import annotations

import base64
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pop3proxy.pop3 import (
    REFUSALS,
    STLS_REFUSAL,
    Command,
    Event,
    LocalProtocolError,
    LocalReply,
    Pop3Conversation,
    RemoteProtocolError,
    SaslResponse,
)
from tests.pop3.helpers import Side, Step, merge_body_chunks

EXAMPLES = int(os.environ.get("POP3PROXY_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


# Every credential the client strategy can send, raw and as the client sends it. Their user
# parts are "alice"/"mrose"; the secret parts all contain "s3cr3t", which nothing else does.
_PLAIN = b64(b"\0alice\0s3cr3t-plain")
_PLAIN_AUTHZ = b64(b"admin\0alice\0s3cr3t-authz")
_CRAM = b64(b"alice 0123s3cr3t-cram456789abcdef")
_XOAUTH2 = b64(b"user=alice\x01auth=Bearer s3cr3t-token\x01\x01")
CREDENTIALS = [
    b"s3cr3t",
    b"s3cr3t-pass with spaces",
    b"s3cr3t-apop",
    _PLAIN,
    _PLAIN_AUTHZ,
    _CRAM,
    _XOAUTH2,
]

# AUTH LOGIN is left out on purpose: its user name is "whatever the first line is", so a
# client that sends a password first would name itself with it, by design.
CLIENT_LINES = [
    b"USER alice\r\n",
    b"PASS s3cr3t-pass with spaces\r\n",
    b"pass s3cr3t\r\n",
    b"APOP mrose s3cr3t-apop\r\n",
    b"AUTH PLAIN " + _PLAIN + b"\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH CRAM-MD5\r\n",
    b"AUTH XOAUTH2 " + _XOAUTH2 + b"\r\n",
    b"AUTH\r\n",
    _PLAIN_AUTHZ + b"\r\n",
    _CRAM + b"\r\n",
    b"*\r\n",
    b"=\r\n",
    b"CAPA\r\n",
    b"STLS\r\n",
    b"STAT\r\n",
    b"LIST\r\n",
    b"LIST 1\r\n",
    b"UIDL\r\n",
    b"UIDL 1\r\n",
    b"RETR 1\r\n",
    b"TOP 1 0\r\n",
    b"DELE 1\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"XYZZY\r\n",
    b"\r\n",
    b"NOOP\n",
]
SERVER_LINES = [
    b"+OK POP3 ready <1896.697170952@dbc.mailcom.com>\r\n",
    b"+OK\r\n",
    b"+OK 2 320\r\n",
    b"-ERR [AUTH] invalid\r\n",
    b"-ERR\r\n",
    b"+ \r\n",
    b"+ VXNlcm5hbWU6\r\n",
    b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n",
    b".\r\n",
    b"..stuffed\r\n",
    b"\r\n",
    b"STLS\r\n",
    b"SASL PLAIN LOGIN\r\n",
    b"PIPELINING\r\n",
    b"1 120\r\n",
    b"Subject: hi\r\n",
    b"\r\n.\r\n",
    b"caf\xc3\xa9\xff\r\n",
]


def _garbage_line() -> st.SearchStrategy[bytes]:
    # A whole line of junk: it must not glue itself to the front of a credential line.
    return st.binary(max_size=24).map(lambda b: b.replace(b"\n", b"") + b"\r\n")


def _step(side: Side, lines: Sequence[bytes]) -> st.SearchStrategy[Step]:
    line = st.one_of(st.sampled_from(lines), _garbage_line())
    return st.tuples(st.just(side), st.lists(line, min_size=1, max_size=4).map(b"".join))


#: Plausible conversations: client and server steps in any order, partly garbage.
conversations = st.lists(st.one_of(_step("C", CLIENT_LINES), _step("S", SERVER_LINES)), max_size=30)


#: Command and reply pairs that make sense together, so that sessions reach every state.
EXCHANGES: list[tuple[bytes, bytes]] = [
    (b"CAPA\r\n", b"+OK Capability list follows\r\nTOP\r\nSTLS\r\nUIDL\r\n.\r\n"),
    (b"STLS\r\n", b""),
    (b"USER alice\r\n", b"+OK\r\n"),
    (b"PASS s3cr3t\r\n", b"+OK logged in\r\n"),
    (b"PASS s3cr3t-pass with spaces\r\n", b"-ERR [AUTH] invalid\r\n"),
    (b"APOP mrose s3cr3t-apop\r\n", b"+OK\r\n"),
    (b"AUTH PLAIN " + _PLAIN + b"\r\n", b"+OK\r\n"),
    (b"AUTH PLAIN\r\n", b"+ \r\n"),
    (_PLAIN_AUTHZ + b"\r\n", b"+OK\r\n"),
    (b"AUTH CRAM-MD5\r\n", b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2U+\r\n"),
    (_CRAM + b"\r\n", b"-ERR [AUTH] no\r\n"),
    (b"*\r\n", b"-ERR cancelled\r\n"),
    (b"AUTH\r\n", b"+OK\r\nPLAIN\r\n.\r\n"),
    (b"STAT\r\n", b"+OK 2 320\r\n"),
    (b"LIST\r\n", b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"),
    (b"LIST 1\r\n", b"+OK 1 120\r\n"),
    (b"UIDL\r\n", b"+OK\r\n.\r\n"),
    (b"RETR 1\r\n", b"+OK 120 octets\r\nSubject: x\r\n\r\n..dot\r\n.\r\n"),
    (b"RETR 1\r\n", b"+OK\r\n.\r\n"),
    (b"RETR 2\r\n", b"+OK\r\n\r\n\r\n.\r\n"),
    (b"RETR 9\r\n", b"-ERR no such message\r\n"),
    (b"TOP 1 0\r\n", b"+OK\r\nFrom: a\r\n\r\n.\r\n"),
    (b"DELE 1\r\n", b"+OK\r\n"),
    (b"RSET\r\n", b"+OK\r\n"),
    (b"NOOP\r\n", b"+OK\r\n"),
    (b"XYZZY\r\n", b"-ERR unknown command\r\n"),
    (b"QUIT\r\n", b"+OK bye\r\n"),
]


#: What the scripted server answers to each line it receives (one of them, drawn).
REPLIES: dict[bytes, list[bytes]] = {}
for _command, _reply in EXCHANGES:
    if _reply:  # STLS: answered by the proxy, never received by the server
        REPLIES.setdefault(_command, []).append(_reply)
#: Its answers to any other line (a garbage line, or a line the server reads as SASL data).
OTHER_REPLIES = [b"-ERR unknown command\r\n", b"+OK\r\n", b"-ERR\r\n"]
COMMANDS = [*sorted(REPLIES), b"STLS\r\n"]
#: A command, or one time in ten a garbage line.
_session_line = st.integers(0, 9).flatmap(
    lambda n: _garbage_line() if n == 0 else st.sampled_from(COMMANDS)
)


@st.composite
def sessions(draw: st.DrawFn) -> list[Step]:
    """A greeting, then pipelined commands (now and then a garbage line) and a causal server.

    The server answers only lines it has received, in the order they arrived: the lines the
    engine forwarded, found by feeding it the script as it is written. So it never answers a
    QUIT or a SASL line that the engine still holds, nor a line the engine answered itself
    (STLS, a refused line). It answers some of the lines it has now and the rest later; once
    its answers release held lines, it answers those in later steps.
    """
    greeting = draw(st.sampled_from([SERVER_LINES[0], b"+OK ready\r\n"]))
    feeder = Feeder(Pop3Conversation())
    steps: list[Step] = []
    received: list[bytes] = []  # by the server, not answered yet

    def send(side: Side, data: bytes) -> bool:
        steps.append((side, data))
        forwarded = feeder.step(side, data)
        received.extend(lines_of(forwarded))
        return feeder.error is None

    if not send("S", greeting):
        return steps
    for _ in range(draw(st.integers(0, 12))):
        if not send("C", b"".join(draw(st.lists(_session_line, min_size=1, max_size=3)))):
            return steps
        for _ in range(16):  # bounded: each step answers at least one line
            if not received:
                break
            count = draw(st.integers(1, len(received)))
            answer = b"".join(
                draw(st.sampled_from(REPLIES.get(line, OTHER_REPLIES))) for line in received[:count]
            )
            del received[:count]
            if not send("S", answer):
                return steps
    return steps


@dataclass
class Feeder:
    """Feeds a conversation step by step, as a relay does, and records what it showed."""

    conversation: Pop3Conversation
    events: list[Event] = field(default_factory=list)
    client_in: bytes = b""
    server_in: bytes = b""
    upstream: bytes = b""
    downstream: bytes = b""
    error: RemoteProtocolError | None = None

    def step(self, side: Side, data: bytes) -> bytes:
        """Feed one read; return the octets it made the engine forward upstream."""
        conversation = self.conversation
        if side == "C":
            self.client_in += data
        else:
            self.server_in += data
        receive = conversation.receive_client if side == "C" else conversation.receive_server
        try:
            self.events += receive(data)
            # As a relay does: client lines held back are fed once replies have made room.
            while conversation.client_backlog and not conversation.client_paused:
                self.events += conversation.receive_client(b"")
        except RemoteProtocolError as exc:
            self.error = exc
        forwarded = conversation.take_upstream_bytes()
        self.upstream += forwarded
        self.downstream += conversation.take_client_bytes()
        return forwarded


def feed(steps: Sequence[Step], conversation: Pop3Conversation | None = None) -> Feeder:
    """Feed the steps; only a RemoteProtocolError may stop it (anything else fails the test)."""
    fed = Feeder(conversation or Pop3Conversation())
    for side, data in steps:
        fed.step(side, data)
        if fed.error is not None:
            break
    return fed


def assert_broken_after_error(fed: Feeder) -> None:
    """After a RemoteProtocolError the engine refuses input from both sides."""
    error = fed.error
    if error is None:
        return
    assert error.side in {"client", "server"}
    assert error.reply_hint.startswith(b"-ERR")
    assert error.reply_hint.endswith(b"\r\n")
    with pytest.raises(LocalProtocolError):
        fed.conversation.receive_client(b"NOOP\r\n")
    with pytest.raises(LocalProtocolError):
        fed.conversation.receive_server(b"+OK\r\n")


def lines_of(data: bytes) -> list[bytes]:
    """The lines of ``data`` as POP3 cuts them: at LF only (``bytes.splitlines`` cuts at CR too)."""
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def is_subsequence(small: bytes, big: bytes) -> bool:
    it = iter(big)
    return all(byte in it for byte in small)


def assert_no_credential(events: Sequence[Event], conversation: Pop3Conversation) -> None:
    shown = "".join(repr(e) + str(e) for e in events) + repr(conversation.user)
    for credential in CREDENTIALS:
        assert credential.decode() not in shown


def assert_whole_clean_lines(fed: Feeder) -> None:
    """Upstream gets whole client lines, in order, none with a control octet before its end.

    A line is forwarded exactly as received or not at all (RFC 1939 section 3: nothing the
    upstream could read differently, see ``REFUSALS``).
    """
    client_lines = lines_of(fed.client_in)
    forwarded = lines_of(fed.upstream)
    it = iter(client_lines)
    assert all(line in it for line in forwarded), "a forwarded line is not a client line"
    for line in forwarded:
        assert line.endswith(b"\n")
        body = line.removesuffix(b"\n").removesuffix(b"\r")
        assert not any(octet < 0x20 or octet == 0x7F for octet in body), line


def without_local_replies(downstream: bytes) -> bytes:
    """What the client got, without the lines the proxy itself answered."""
    for reply in (STLS_REFUSAL, *REFUSALS.values()):
        downstream = downstream.replace(reply, b"")
    return downstream


# ---------------------------------------------------------------------------- raw bytes


@FUZZ
@given(st.binary(max_size=2048))
def test_any_client_bytes(data: bytes) -> None:
    greeting: list[Step] = [("S", b"+OK hi\r\n")]
    for before in ([], greeting):
        fed = feed([*before, ("C", data)])
        assert_broken_after_error(fed)
        assert is_subsequence(fed.upstream, data)
        assert_whole_clean_lines(fed)


@FUZZ
@given(st.binary(max_size=2048))
def test_any_server_bytes(data: bytes) -> None:
    fed = feed([("S", data)])
    assert_broken_after_error(fed)
    assert data.startswith(fed.downstream)


@FUZZ
@given(st.binary(max_size=1024), st.binary(max_size=1024), st.booleans())
def test_any_bytes_both_sides(client: bytes, server: bytes, client_first: bool) -> None:
    steps: list[Step] = [("C", client), ("S", server)]
    fed = feed(steps if client_first else steps[::-1])
    assert_broken_after_error(fed)
    assert is_subsequence(fed.upstream, fed.client_in)
    assert_whole_clean_lines(fed)
    assert is_subsequence(without_local_replies(fed.downstream), fed.server_in)


# ---------------------------------------------------------------------------- plausible POP3


@FUZZ
@given(st.one_of(conversations, sessions()))
def test_plausible_conversations_default_rewrites(steps: list[Step]) -> None:
    fed = feed(steps)
    assert_broken_after_error(fed)
    # Only whole lines answered here go missing upstream (STLS, refused lines); their replies
    # are the only octets added.
    assert is_subsequence(fed.upstream, fed.client_in)
    assert_whole_clean_lines(fed)
    assert is_subsequence(without_local_replies(fed.downstream), fed.server_in)
    assert_no_credential(fed.events, fed.conversation)


@FUZZ
@given(st.one_of(conversations, sessions()))
def test_plausible_conversations_verbatim(steps: list[Step]) -> None:
    # Without rewrites the engine relays complete lines (and body octets) unchanged, except the
    # lines it refuses, which it answers itself with one of REFUSALS.
    fed = feed(steps, Pop3Conversation(hidden_capabilities=frozenset(), local_replies={}))
    assert_broken_after_error(fed)
    assert_whole_clean_lines(fed)
    assert fed.server_in.startswith(without_local_replies(fed.downstream))
    refused = [e for e in fed.events if isinstance(e, LocalReply)]
    assert all(e.reason in REFUSALS and not e.command.args for e in refused)
    if fed.error is None:
        # Every complete client line was read (as a command or SASL data), except a tail that
        # waits for replies (a pipelined QUIT, an AUTH exchange, the pipelining bound); each
        # line read went upstream unless it was refused.
        complete = lines_of(fed.client_in[: fed.client_in.rfind(b"\n") + 1])
        read = sum(isinstance(e, Command | SaslResponse) for e in fed.events)
        assert read <= len(complete)
        if read < len(complete):
            assert fed.conversation.client_paused
        assert len(lines_of(fed.upstream)) + len(refused) <= read
        # What the server sent and was not forwarded can only be an unfinished line.
        assert b"\n" not in fed.server_in[len(without_local_replies(fed.downstream)) :]
    assert_no_credential(fed.events, fed.conversation)


@FUZZ
@given(sessions(), st.data())
def test_chunking_does_not_matter(steps: list[Step], data: st.DataObject) -> None:
    # Only with a causal server: one that answers a line it has not received yet (as
    # ``conversations`` may script) makes the engine's reading depend on when the answer
    # arrives relative to the release of a held line, as it would with a real such server.
    whole = feed(steps)
    if whole.error is not None:
        return
    # Cut every step at random places (the reads of a real socket).
    cut: list[Step] = []
    for side, chunk in steps:
        points = sorted(data.draw(st.sets(st.integers(1, max(1, len(chunk) - 1)), max_size=4)))
        edges = [0, *(p for p in points if p < len(chunk)), len(chunk)]
        cut += [(side, chunk[a:b]) for a, b in itertools.pairwise(edges) if b > a]
    pieces = feed(cut)
    assert pieces.error is None
    assert merge_body_chunks(pieces.events) == merge_body_chunks(whole.events)
    assert pieces.upstream == whole.upstream
    assert pieces.downstream == whole.downstream
    assert pieces.conversation.state is whole.conversation.state
