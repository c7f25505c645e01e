"""Transcript tests of :class:`Pop3Conversation`: every command, both directions, every cut.

Each transcript runs through :func:`run_split` (the ``split`` fixture), so every test also
checks that cutting the octets at any boundary, feeding them one octet at a time, or joining
consecutive reads (a pipelining client) changes neither the events nor the forwarded octets.
"""

from __future__ import annotations

import base64

import pytest

from pop3proxy.pop3 import (
    MAX_COMMAND_LINE,
    MAX_SASL_LINE,
    MAX_STATUS_LINE,
    STLS_REFUSAL,
    XCLIENT_REFUSAL,
    BodyChunk,
    BodyEnd,
    CapabilityLine,
    Command,
    CommandCompleted,
    ConnectionClosed,
    Event,
    Greeting,
    LocalProtocolError,
    LocalReply,
    LoginFailed,
    LoginSucceeded,
    Pop3Conversation,
    Response,
    SaslChallenge,
    SaslEnded,
    SaslResponse,
    SaslStarted,
    Secret,
    State,
    Status,
    UnsolicitedResponse,
    UserNamed,
)
from tests.pop3.helpers import (
    Run,
    Split,
    Step,
    Transcript,
    client_events,
    client_input,
    lock_step_to_pipelined,
    merge_body_chunks,
    reply_events,
    run,
    run_split,
    server_input,
)

GREETING = b"+OK POP3 server ready <1896.697170952@dbc.mailcom.com>\r\n"
PASSWORD = "hunter2-secret"


def ok(text: str = "", code: str | None = None) -> Status:
    return Status(ok=True, code=code, text=text)


def err(text: str = "", code: str | None = None) -> Status:
    return Status(ok=False, code=code, text=text)


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def assert_relayed_verbatim(result: Run, transcript: Transcript) -> None:
    """No rewrite applies: each direction is forwarded exactly as it was received."""
    assert result.upstream == client_input(transcript)
    assert result.downstream == server_input(transcript)


def assert_no_credential(result: Run, *secrets: bytes) -> None:
    """No event, printed any way, shows a credential or its base64 form."""
    shown = " ".join(repr(e) + str(e) for e in result.events)
    shown += repr(result.conversation.user)
    for secret in secrets:
        for form in (secret, b64(secret)):
            assert form.decode() not in shown


def login(user: bytes = b"alice") -> list[Step]:
    """Greeting plus a successful USER/PASS login."""
    return [
        ("S", GREETING),
        ("C", b"USER " + user + b"\r\n"),
        ("S", b"+OK\r\n"),
        ("C", b"PASS " + PASSWORD.encode() + b"\r\n"),
        ("S", b"+OK maildrop locked\r\n"),
    ]


def after_login(result: Run) -> list[Event]:
    """The events after the login of :func:`login` (greeting + 2 commands = 1 + 3 + 4 events)."""
    return merge_body_chunks(result.events[8:])


# ---------------------------------------------------------------------------- greeting


def test_greeting_with_apop_timestamp(split: Split) -> None:
    transcript: Transcript = [("S", GREETING)]
    result = run_split(transcript, split)
    assert result.events == [
        Greeting(
            ok("POP3 server ready <1896.697170952@dbc.mailcom.com>"),
            "<1896.697170952@dbc.mailcom.com>",
        )
    ]
    assert result.state is State.AUTHORIZATION
    assert_relayed_verbatim(result, transcript)


def test_greeting_without_apop_timestamp(split: Split) -> None:
    transcript: Transcript = [("S", b"+OK Dovecot ready.\r\n")]
    result = run_split(transcript, split)
    assert result.events == [Greeting(ok("Dovecot ready."), None)]
    assert result.state is State.AUTHORIZATION
    assert_relayed_verbatim(result, transcript)


def test_err_greeting_closes(split: Split) -> None:
    transcript: Transcript = [("S", b"-ERR [SYS/TEMP] too many connections\r\n")]
    result = run_split(transcript, split)
    assert result.events == [Greeting(err("too many connections", "SYS/TEMP"), None)]
    assert result.state is State.CLOSED
    assert_relayed_verbatim(result, transcript)
    assert result.conversation.server_closed() == [
        ConnectionClosed(side="server", clean=True, state=State.CLOSED)
    ]


def test_unsolicited_status_line(split: Split) -> None:
    transcript: Transcript = [("S", GREETING), ("S", b"-ERR [SYS/TEMP] autologout\r\n")]
    result = run_split(transcript, split)
    assert result.events[1:] == [UnsolicitedResponse(err("autologout", "SYS/TEMP"))]
    assert_relayed_verbatim(result, transcript)


# ---------------------------------------------------------------------------- USER/PASS, APOP


def test_user_pass_success(split: Split) -> None:
    transcript = login()
    result = run_split(transcript, split)
    user = Command(1, "USER", ("alice",))
    password = Command(2, "PASS", (Secret(PASSWORD),))
    assert result.events == [
        Greeting(
            ok("POP3 server ready <1896.697170952@dbc.mailcom.com>"),
            "<1896.697170952@dbc.mailcom.com>",
        ),
        user,
        Response(user, ok(), multiline=False),
        CommandCompleted(user, ok(), 5),
        password,
        Response(password, ok("maildrop locked"), multiline=False),
        LoginSucceeded(user="alice", mechanism="USER"),
        CommandCompleted(password, ok("maildrop locked"), 21),
    ]
    assert password.has_secret
    assert password.loggable_args() == ["***"]
    assert result.state is State.TRANSACTION
    assert result.conversation.user == "alice"
    assert_relayed_verbatim(result, transcript)
    assert_no_credential(result, PASSWORD.encode())


def test_password_with_spaces_is_one_secret(split: Split) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"USER bob\r\n"),
        ("S", b"+OK\r\n"),
        ("C", b"PASS correct horse battery\r\n"),
        ("S", b"+OK\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.of_type(Command)[1] == Command(2, "PASS", (Secret("correct horse battery"),))
    assert_no_credential(result, b"correct", b"horse", b"battery")


def test_user_pass_failure(split: Split) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"USER alice\r\n"),
        ("S", b"+OK\r\n"),
        ("C", b"PASS " + PASSWORD.encode() + b"\r\n"),
        ("S", b"-ERR [AUTH] invalid login\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.of_type(LoginFailed) == [
        LoginFailed(user="alice", mechanism="USER", status=err("invalid login", "AUTH"))
    ]
    assert result.of_type(LoginSucceeded) == []
    assert result.state is State.AUTHORIZATION
    assert_relayed_verbatim(result, transcript)
    assert_no_credential(result, PASSWORD.encode())


def test_refused_user_forgets_the_name(split: Split) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"USER mallory\r\n"),
        ("S", b"-ERR no such user\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.conversation.user is None
    assert result.state is State.AUTHORIZATION


def test_apop_digest_is_secret(split: Split) -> None:
    digest = b"c4c9334bac560ecc979e58001b3e22fb"
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"APOP mrose " + digest + b"\r\n"),
        ("S", b"+OK mrose's maildrop has 2 messages (320 octets)\r\n"),
    ]
    result = run_split(transcript, split)
    apop = Command(1, "APOP", ("mrose", Secret(digest.decode())))
    status = ok("mrose's maildrop has 2 messages (320 octets)")
    assert result.events[1:] == [
        apop,
        Response(apop, status, multiline=False),
        LoginSucceeded(user="mrose", mechanism="APOP"),
        CommandCompleted(apop, status, len(transcript[2][1])),
    ]
    assert apop.loggable_args() == ["mrose", "***"]
    assert result.state is State.TRANSACTION
    assert_relayed_verbatim(result, transcript)
    assert_no_credential(result, digest)


def test_apop_failure(split: Split) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"APOP mrose 00000000000000000000000000000000\r\n"),
        ("S", b"-ERR [AUTH] permission denied\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.of_type(LoginFailed) == [
        LoginFailed(user="mrose", mechanism="APOP", status=err("permission denied", "AUTH"))
    ]
    assert result.state is State.AUTHORIZATION


# ---------------------------------------------------------------------------- AUTH (RFC 5034)


def test_auth_without_argument_lists_mechanisms(split: Split) -> None:
    body = b"PLAIN\r\nLOGIN\r\n"
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH\r\n"),
        ("S", b"+OK\r\n" + body + b".\r\n"),
    ]
    result = run_split(transcript, split)
    auth = Command(1, "AUTH")
    assert merge_body_chunks(result.events[1:]) == [
        auth,
        Response(auth, ok(), multiline=True),
        BodyChunk(auth, body),
        BodyEnd(auth),
        CommandCompleted(auth, ok(), len(transcript[2][1])),
    ]
    assert result.of_type(SaslStarted) == []
    assert result.state is State.AUTHORIZATION
    assert_relayed_verbatim(result, transcript)


@pytest.mark.parametrize(
    ("initial", "user"),
    [
        pytest.param(b"\0alice\0" + PASSWORD.encode(), "alice", id="no-authzid"),
        # Acting for another identity (a master user): no one name says who logs in.
        pytest.param(b"admin\0alice\0" + PASSWORD.encode(), None, id="authzid"),
        pytest.param(b"alice\0alice\0" + PASSWORD.encode(), "alice", id="same-authzid"),
    ],
)
def test_auth_plain_initial_response(split: Split, initial: bytes, user: str | None) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH PLAIN " + b64(initial) + b"\r\n"),
        ("S", b"+OK Logged in.\r\n"),
    ]
    result = run_split(transcript, split)
    auth = Command(1, "AUTH", ("PLAIN", Secret(b64(initial).decode())))
    assert result.events[1:] == [
        auth,
        SaslStarted(auth, "PLAIN", initial_response=True),
        Response(auth, ok("Logged in."), multiline=False),
        SaslEnded(auth, "PLAIN", ok("Logged in."), cancelled=False),
        LoginSucceeded(user=user, mechanism="PLAIN"),
        CommandCompleted(auth, ok("Logged in."), len(transcript[2][1])),
    ]
    assert auth.loggable_args() == ["PLAIN", "***"]
    assert result.state is State.TRANSACTION
    assert result.conversation.user == user
    assert_relayed_verbatim(result, transcript)
    assert_no_credential(result, PASSWORD.encode(), initial)


def test_auth_plain_with_continuation(split: Split) -> None:
    response = b64(b"\0alice\0" + PASSWORD.encode())
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH PLAIN\r\n"),
        ("S", b"+ \r\n"),
        ("C", response + b"\r\n"),
        ("S", b"+OK\r\n"),
    ]
    result = run_split(transcript, split)
    auth = Command(1, "AUTH", ("PLAIN",))
    assert result.events[1:] == [
        auth,
        SaslStarted(auth, "PLAIN", initial_response=False),
        SaslChallenge(auth),
        SaslResponse(auth, Secret(response.decode()), cancelled=False),
        Response(auth, ok(), multiline=False),
        SaslEnded(auth, "PLAIN", ok(), cancelled=False),
        LoginSucceeded(user="alice", mechanism="PLAIN"),
        CommandCompleted(auth, ok(), len(b"+ \r\n+OK\r\n")),
    ]
    assert result.state is State.TRANSACTION
    assert_relayed_verbatim(result, transcript)
    assert_no_credential(result, PASSWORD.encode())


def test_auth_login_two_challenges(split: Split) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH LOGIN\r\n"),
        ("S", b"+ VXNlcm5hbWU6\r\n"),
        ("C", b64(b"alice") + b"\r\n"),
        ("S", b"+ UGFzc3dvcmQ6\r\n"),
        ("C", b64(PASSWORD.encode()) + b"\r\n"),
        ("S", b"+OK Logged in.\r\n"),
    ]
    result = run_split(transcript, split)
    auth = Command(1, "AUTH", ("LOGIN",))
    assert result.of_type(SaslChallenge) == [SaslChallenge(auth)] * 2
    assert result.of_type(SaslResponse) == [
        SaslResponse(auth, Secret(b64(b"alice").decode()), cancelled=False),
        SaslResponse(auth, Secret(b64(PASSWORD.encode()).decode()), cancelled=False),
    ]
    assert result.of_type(LoginSucceeded) == [LoginSucceeded(user="alice", mechanism="LOGIN")]
    assert result.of_type(CommandCompleted) == [
        CommandCompleted(auth, ok("Logged in."), len(server_input(transcript)) - len(GREETING))
    ]
    assert result.state is State.TRANSACTION
    assert_relayed_verbatim(result, transcript)
    assert_no_credential(result, PASSWORD.encode())


def test_auth_cram_md5(split: Split) -> None:
    digest = b"b913a602c7eda7a495b4e6e7334d3890"
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH CRAM-MD5\r\n"),
        ("S", b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n"),
        ("C", b64(b"tim " + digest) + b"\r\n"),
        ("S", b"+OK CRAM authentication successful\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.of_type(LoginSucceeded) == [LoginSucceeded(user="tim", mechanism="CRAM-MD5")]
    assert result.conversation.user == "tim"
    assert result.state is State.TRANSACTION
    assert_relayed_verbatim(result, transcript)
    assert_no_credential(result, digest)


def test_auth_xoauth2_user(split: Split) -> None:
    token = b"user=alice\x01auth=Bearer " + PASSWORD.encode() + b"\x01\x01"
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH XOAUTH2 " + b64(token) + b"\r\n"),
        ("S", b"+OK\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.of_type(LoginSucceeded) == [LoginSucceeded(user="alice", mechanism="XOAUTH2")]
    assert_no_credential(result, PASSWORD.encode())


def test_auth_cancelled_by_client(split: Split) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH LOGIN\r\n"),
        ("S", b"+ VXNlcm5hbWU6\r\n"),
        ("C", b"*\r\n"),
        ("S", b"-ERR [AUTH] Authentication cancelled\r\n"),
    ]
    result = run_split(transcript, split)
    auth = Command(1, "AUTH", ("LOGIN",))
    status = err("Authentication cancelled", "AUTH")
    assert result.events[1:] == [
        auth,
        SaslStarted(auth, "LOGIN", initial_response=False),
        SaslChallenge(auth),
        SaslResponse(auth, Secret("*"), cancelled=True),
        Response(auth, status, multiline=False),
        SaslEnded(auth, "LOGIN", status, cancelled=True),
        LoginFailed(user=None, mechanism="LOGIN", status=status, cancelled=True),
        CommandCompleted(auth, status, len(server_input(transcript)) - len(GREETING)),
    ]
    assert result.state is State.AUTHORIZATION
    assert_relayed_verbatim(result, transcript)


def test_auth_unknown_mechanism_refused(split: Split) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH GSSAPI\r\n"),
        ("S", b"-ERR Unsupported authentication mechanism.\r\n"),
        ("C", b"NOOP\r\n"),
        ("S", b"+OK\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.of_type(LoginFailed) == [
        LoginFailed(None, "GSSAPI", err("Unsupported authentication mechanism."))
    ]
    assert [c.command.verb for c in result.of_type(CommandCompleted)] == ["AUTH", "NOOP"]
    assert result.conversation.pending == 0
    assert_relayed_verbatim(result, transcript)


@pytest.mark.parametrize(
    ("mechanism", "data"),
    [
        pytest.param(b"PLAIN", b64(b"only-one-part"), id="plain-no-nul"),
        pytest.param(b"LOGIN", b64(b"\xff\xfe"), id="login-not-utf8"),
        pytest.param(b"DIGEST-MD5", b64(b'username="alice"'), id="unknown-mechanism"),
    ],
)
def test_sasl_user_unreadable_is_none(split: Split, mechanism: bytes, data: bytes) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH " + mechanism + b" " + data + b"\r\n"),
        ("S", b"-ERR [AUTH] Authentication failed\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.of_type(LoginFailed) == [
        LoginFailed(None, mechanism.decode(), err("Authentication failed", "AUTH"))
    ]


def test_a_line_pipelined_behind_auth_waits_for_the_servers_answer() -> None:
    # A client pipelines NOOP behind an AUTH with initial response. The server reads it as a
    # command once AUTH is over, or as SASL data if it asks for more: the engine holds it until
    # the server's answer tells which, then reads it the same way.
    initial = b64(b"\0alice\0" + PASSWORD.encode())
    conversation = Pop3Conversation()
    conversation.receive_server(GREETING)
    events = conversation.receive_client(b"AUTH PLAIN " + initial + b"\r\nNOOP\r\n")
    assert [type(e) for e in events] == [Command, SaslStarted, UserNamed]
    assert conversation.take_upstream_bytes() == b"AUTH PLAIN " + initial + b"\r\n"
    assert conversation.client_paused
    conversation.receive_server(b"+OK\r\n")
    assert not conversation.client_paused
    events = conversation.receive_client(b"")
    assert events == [Command(2, "NOOP")]
    assert conversation.take_upstream_bytes() == b"NOOP\r\n"
    events = conversation.receive_server(b"+OK noop\r\n")
    assert events[-1] == CommandCompleted(Command(2, "NOOP"), ok("noop"), 10)
    assert conversation.pending == 0


def test_a_line_pipelined_behind_a_challenge_is_sasl_data_once_asked_for() -> None:
    conversation = Pop3Conversation()
    conversation.receive_server(GREETING)
    data = b64(b"\0alice\0" + PASSWORD.encode())
    conversation.receive_client(b"AUTH PLAIN\r\n" + data + b"\r\nSTAT\r\n")
    assert conversation.take_upstream_bytes() == b"AUTH PLAIN\r\n"
    assert conversation.client_paused
    conversation.receive_server(b"+ \r\n")
    events = conversation.receive_client(b"")
    assert [type(e) for e in events] == [SaslResponse, UserNamed]
    assert conversation.take_upstream_bytes() == data + b"\r\n"
    assert conversation.client_paused  # STAT: the server has not answered the SASL line yet
    conversation.receive_server(b"+OK logged in\r\n")
    assert conversation.receive_client(b"") == [Command(2, "STAT")]
    assert conversation.take_upstream_bytes() == b"STAT\r\n"
    assert conversation.state is State.TRANSACTION


# ---------------------------------------------------------------------------- LIST, UIDL


@pytest.mark.parametrize("verb", [b"LIST", b"UIDL"])
def test_list_uidl_without_argument_is_multiline(split: Split, verb: bytes) -> None:
    body = b"1 120\r\n2 200\r\n"
    transcript: Transcript = [
        *login(),
        ("C", verb + b"\r\n"),
        ("S", b"+OK 2 messages\r\n" + body + b".\r\n"),
    ]
    result = run_split(transcript, split)
    command = Command(3, verb.decode())
    assert after_login(result) == [
        command,
        Response(command, ok("2 messages"), multiline=True),
        BodyChunk(command, body),
        BodyEnd(command),
        CommandCompleted(command, ok("2 messages"), len(transcript[-1][1])),
    ]
    assert_relayed_verbatim(result, transcript)


@pytest.mark.parametrize("verb", [b"LIST", b"UIDL"])
def test_list_uidl_with_argument_is_one_line(split: Split, verb: bytes) -> None:
    transcript: Transcript = [
        *login(),
        ("C", verb + b" 1\r\n"),
        ("S", b"+OK 1 120\r\n"),
        ("C", b"NOOP\r\n"),
        ("S", b"+OK\r\n"),
    ]
    result = run_split(transcript, split)
    command = Command(3, verb.decode(), ("1",))
    noop = Command(4, "NOOP")
    assert after_login(result) == [
        command,
        Response(command, ok("1 120"), multiline=False),
        CommandCompleted(command, ok("1 120"), 11),
        noop,
        Response(noop, ok(), multiline=False),
        CommandCompleted(noop, ok(), 5),
    ]
    assert_relayed_verbatim(result, transcript)


# ---------------------------------------------------------------------------- RETR, TOP


MESSAGE = (
    b"From: alice@example.org\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b"..foo\r\n"
    b"...\r\n"
    b"..\r\n"
    b"line with . and .\r\n"
    b".\tnot a terminator\r\n"
)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(MESSAGE, id="dot-stuffed"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\r\n", id="one-empty-line"),
        pytest.param(b"caf\xc3\xa9 \xff\xfe\x00\x80\r\n\xe9t\xe9\r\n", id="8-bit"),
        pytest.param(b"a\r\n" * 3000, id="large"),
    ],
)
def test_retr_body(split: Split, body: bytes) -> None:
    transcript: Transcript = [
        *login(),
        ("C", b"RETR 1\r\n"),
        ("S", b"+OK message follows\r\n" + body + b".\r\n"),
        ("C", b"NOOP\r\n"),
        ("S", b"+OK\r\n"),
    ]
    if split == "boundaries" and len(body) > 1000:
        pytest.skip("the large body is cut one octet at a time by the 'bytes' mode instead")
    result = run_split(transcript, split)
    retr = Command(3, "RETR", ("1",))
    noop = Command(4, "NOOP")
    status = ok("message follows")
    assert after_login(result) == [
        retr,
        Response(retr, status, multiline=True),
        *([BodyChunk(retr, body)] if body else []),
        BodyEnd(retr),
        CommandCompleted(retr, status, len(transcript[6][1])),
        noop,
        Response(noop, ok(), multiline=False),
        CommandCompleted(noop, ok(), 5),
    ]
    assert_relayed_verbatim(result, transcript)


#: Every cut of a body's last line and terminator ``x CRLF . CRLF``, as offsets into it.
_TERMINATOR_CUTS = [
    pytest.param(1, id="x|CRLF.CRLF"),
    pytest.param(2, id="xCR|LF.CRLF"),
    pytest.param(3, id="xCRLF|.CRLF"),
    pytest.param(4, id="xCRLF.|CRLF"),
    pytest.param(5, id="xCRLF.CR|LF"),
]


@pytest.mark.parametrize("cut", _TERMINATOR_CUTS)
def test_retr_terminator_split_across_reads(cut: int) -> None:
    # The server's reads cut the terminator themselves (no re-cutting by the helper), and the
    # next reply follows in the same read: it must not leak into the body.
    tail = b"x\r\n.\r\n"
    transcript: Transcript = [
        *login(),
        ("C", b"RETR 1\r\nNOOP\r\n"),
        ("S", b"+OK\r\nbody\r\n" + tail[:cut]),
        ("S", tail[cut:] + b"+OK noop\r\n"),
    ]
    result = run(transcript)
    retr = Command(3, "RETR", ("1",))
    assert b"".join(c.data for c in result.of_type(BodyChunk)) == b"body\r\nx\r\n"
    assert [type(e) for e in result.events[-4:]] == [
        BodyEnd,
        CommandCompleted,
        Response,
        CommandCompleted,
    ]
    assert result.of_type(CommandCompleted)[-2:] == [
        CommandCompleted(retr, ok(), len(b"+OK\r\nbody\r\n" + tail)),
        CommandCompleted(Command(4, "NOOP"), ok("noop"), 10),
    ]
    assert_relayed_verbatim(result, transcript)


def test_empty_body_dot_alone_in_a_read_is_not_body() -> None:
    transcript: Transcript = [*login(), ("C", b"RETR 1\r\n"), ("S", b"+OK\r\n"), ("S", b".\r\n")]
    result = run(transcript)
    assert result.of_type(BodyChunk) == []
    assert result.of_type(BodyEnd) == [BodyEnd(Command(3, "RETR", ("1",)))]


def test_top_headers_only(split: Split) -> None:
    headers = b"From: alice@example.org\r\nSubject: hi\r\n\r\n"
    transcript: Transcript = [
        *login(),
        ("C", b"TOP 1 0\r\n"),
        ("S", b"+OK\r\n" + headers + b".\r\n"),
    ]
    result = run_split(transcript, split)
    top = Command(3, "TOP", ("1", "0"))
    assert after_login(result) == [
        top,
        Response(top, ok(), multiline=True),
        BodyChunk(top, headers),
        BodyEnd(top),
        CommandCompleted(top, ok(), len(transcript[-1][1])),
    ]
    assert_relayed_verbatim(result, transcript)


@pytest.mark.parametrize(
    "command",
    [b"RETR 9", b"TOP 9 0", b"LIST", b"UIDL", b"CAPA", b"AUTH", b"LIST 9", b"UIDL 9"],
)
def test_err_reply_to_multiline_command_is_one_line(split: Split, command: bytes) -> None:
    transcript: Transcript = [
        *login(),
        ("C", command + b"\r\n"),
        ("S", b"-ERR no such message\r\n"),
        ("C", b"NOOP\r\n"),
        ("S", b"+OK\r\n"),
    ]
    result = run_split(transcript, split)
    events = after_login(result)
    first = events[0]
    assert isinstance(first, Command)
    assert events[1:3] == [
        Response(first, err("no such message"), multiline=False),
        CommandCompleted(first, err("no such message"), 22),
    ]
    assert [type(e) for e in events[3:]] == [Command, Response, CommandCompleted]
    assert result.conversation.pending == 0
    assert_relayed_verbatim(result, transcript)


# ---------------------------------------------------------------------------- CAPA and STLS

CAPA_REPLY = (
    b"+OK Capability list follows\r\n"
    b"TOP\r\n"
    b"USER\r\n"
    b"STLS\r\n"
    b"SASL PLAIN LOGIN\r\n"
    b"RESP-CODES\r\n"
    b"PIPELINING\r\n"
    b".\r\n"
)
CAPA_FORWARDED = CAPA_REPLY.replace(b"STLS\r\n", b"")


def test_capa_hides_stls(split: Split) -> None:
    transcript: Transcript = [("S", GREETING), ("C", b"CAPA\r\n"), ("S", CAPA_REPLY)]
    result = run_split(transcript, split)
    capa = Command(1, "CAPA")
    status = ok("Capability list follows")
    assert result.events[1:] == [
        capa,
        Response(capa, status, multiline=True),
        CapabilityLine(capa, "TOP", (), hidden=False),
        CapabilityLine(capa, "USER", (), hidden=False),
        CapabilityLine(capa, "STLS", (), hidden=True),
        CapabilityLine(capa, "SASL", ("PLAIN", "LOGIN"), hidden=False),
        CapabilityLine(capa, "RESP-CODES", (), hidden=False),
        CapabilityLine(capa, "PIPELINING", (), hidden=False),
        BodyEnd(capa),
        CommandCompleted(capa, status, len(CAPA_FORWARDED)),
    ]
    # The one documented rewrite: exactly the STLS line is gone.
    assert result.upstream == client_input(transcript)
    assert result.downstream == GREETING + CAPA_FORWARDED


def test_capa_hides_lower_case_stls(split: Split) -> None:
    reply = b"+OK\r\nstls\r\nUIDL\r\n.\r\n"
    transcript: Transcript = [("S", GREETING), ("C", b"capa\r\n"), ("S", reply)]
    result = run_split(transcript, split)
    assert [(c.name, c.hidden) for c in result.of_type(CapabilityLine)] == [
        ("STLS", True),
        ("UIDL", False),
    ]
    assert result.of_type(Command) == [Command(1, "CAPA")]
    assert result.downstream == GREETING + b"+OK\r\nUIDL\r\n.\r\n"


def test_capa_without_stls_hiding() -> None:
    transcript: Transcript = [("S", GREETING), ("C", b"CAPA\r\n"), ("S", CAPA_REPLY)]
    result = run_split(
        transcript, "bytes", factory=lambda: Pop3Conversation(hidden_capabilities=frozenset())
    )
    assert not any(c.hidden for c in result.of_type(CapabilityLine))
    assert_relayed_verbatim(result, transcript)


def test_stls_answered_locally_lock_step(split: Split) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"STLS\r\n"),
        ("C", b"NOOP\r\n"),
        ("S", b"+OK\r\n"),
    ]
    result = run_split(transcript, split)
    stls = Command(1, "STLS")
    refusal = err(
        "STLS is not available on this plaintext port: pop3proxy already relays the session "
        "to the server over TLS (fetchmail: set sslproto '')"
    )
    assert result.events[1:4] == [
        stls,
        LocalReply(stls, refusal, "local_verb"),
        CommandCompleted(stls, refusal, len(STLS_REFUSAL)),
    ]
    assert result.steps[1].to_client == STLS_REFUSAL
    assert result.steps[1].to_server == b""
    assert result.upstream == b"NOOP\r\n"
    assert result.downstream == GREETING + STLS_REFUSAL + b"+OK\r\n"
    assert result.state is State.AUTHORIZATION


def test_stls_in_place_among_pipelined_replies(split: Split) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"CAPA\r\nSTLS\r\nNOOP\r\n"),
        ("S", CAPA_REPLY),
        ("S", b"+OK\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.upstream == b"CAPA\r\nNOOP\r\n"
    assert result.downstream == GREETING + CAPA_FORWARDED + STLS_REFUSAL + b"+OK\r\n"
    # Nothing may answer STLS before CAPA's body is complete.
    assert result.steps[1].to_client == b""
    assert result.steps[2].to_client == CAPA_FORWARDED + STLS_REFUSAL
    kinds = [(type(e).__name__, getattr(e, "command", None)) for e in result.events]
    capa, stls, noop = Command(1, "CAPA"), Command(2, "STLS"), Command(3, "NOOP")
    assert [k for k in kinds if k[0] in {"BodyEnd", "LocalReply", "CommandCompleted"}] == [
        ("BodyEnd", capa),
        ("CommandCompleted", capa),
        ("LocalReply", stls),
        ("CommandCompleted", stls),
        ("CommandCompleted", noop),
    ]


def test_stls_before_greeting_is_answered_after_it(split: Split) -> None:
    transcript: Transcript = [("C", b"STLS\r\n"), ("S", GREETING)]
    result = run_split(transcript, split)
    assert result.steps[0].to_client == b""
    assert result.steps[1].to_client == GREETING + STLS_REFUSAL
    assert result.upstream == b""
    assert [type(e) for e in result.events] == [Command, Greeting, LocalReply, CommandCompleted]


def test_custom_local_reply() -> None:
    reply = b"-ERR [SYS/PERM] not here\r\n"
    transcript: Transcript = [("S", GREETING), ("C", b"XCLIENT a=b\r\n")]
    result = run_split(
        transcript, "bytes", factory=lambda: Pop3Conversation(local_replies={"xclient": reply})
    )
    assert result.upstream == b""
    assert result.downstream == GREETING + reply
    assert result.of_type(LocalReply) == [
        LocalReply(
            Command(1, "XCLIENT", (Secret("a=b"),)), err("not here", "SYS/PERM"), "local_verb"
        )
    ]


def test_a_clients_xclient_is_refused_here_by_default(split: Split) -> None:
    """A client must not tell the upstream its address is another one (Dovecot trusts the
    proxy's address with XCLIENT): the line is answered here and its arguments hidden."""
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"XCLIENT ADDR=10.9.9.9 PORT=110\r\nNOOP\r\n"),
        ("S", b"+OK\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.upstream == b"NOOP\r\n"
    assert result.downstream == GREETING + XCLIENT_REFUSAL + b"+OK\r\n"
    [refused] = result.of_type(LocalReply)
    assert (refused.command.verb, refused.reason) == ("XCLIENT", "local_verb")
    assert refused.command.loggable_args() == ["***"]


# ---------------------------------------------------------------------------- other commands


def test_bare_password_line_is_secret(split: Split) -> None:
    # A person at telnet typing the password without PASS, or a confused client.
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"USER alice\r\n"),
        ("S", b"+OK\r\n"),
        ("C", PASSWORD.encode() + b"\r\n"),
        ("S", b"-ERR unknown command\r\n"),
        ("C", b"\r\n"),
        ("S", b"-ERR empty command\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.of_type(Command)[1:] == [
        Command(2, "UNKNOWN", (Secret(PASSWORD),)),
        Command(3, "UNKNOWN"),
    ]
    assert_relayed_verbatim(result, transcript)
    assert_no_credential(result, PASSWORD.encode())


def test_unknown_verb_is_single_line(split: Split) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"XYZZY plugh\r\n"),
        ("S", b"+OK nothing happens\r\n"),
        ("C", b"NOOP\r\n"),
        ("S", b"+OK\r\n"),
    ]
    result = run_split(transcript, split)
    # Unknown verbs are reported as UNKNOWN with the whole line secret: it may be a password.
    xyzzy = Command(1, "UNKNOWN", (Secret("XYZZY plugh"),))
    assert result.events[1:4] == [
        xyzzy,
        Response(xyzzy, ok("nothing happens"), multiline=False),
        CommandCompleted(xyzzy, ok("nothing happens"), 21),
    ]
    assert result.conversation.pending == 0
    assert_relayed_verbatim(result, transcript)


@pytest.mark.parametrize(
    ("line", "command"),
    [
        pytest.param(
            b"DELE 1\xc2\xa0\r\n", Command(1, "DELE", (Secret("1\xa0"),)), id="no-break-space"
        ),
        pytest.param(
            b"PASS  two  spaces \r\n",
            Command(1, "PASS", (Secret(" two  spaces "),)),
            id="pass-rest",
        ),
        pytest.param(b"LIST  1\r\n", Command(1, "LIST", ("", "1")), id="two-spaces"),
        pytest.param(b"LIST 1 \r\n", Command(1, "LIST", ("1", "")), id="trailing-space"),
        pytest.param(b"TOP 1 10\r\n", Command(1, "TOP", ("1", "10")), id="top"),
        pytest.param(
            b"RETR \xd9\xa1\r\n", Command(1, "RETR", (Secret("\u0661"),)), id="arabic-digit"
        ),
        pytest.param(b"uSeR alice\r\n", Command(1, "USER", ("alice",)), id="mixed-case-verb"),
    ],
)
def test_words_are_split_at_each_space_and_nowhere_else(
    split: Split, line: bytes, command: Command
) -> None:
    # RFC 1939 section 3: a single SP separates words. Splitting at other white space (TAB,
    # U+00A0, U+2003: what str.split() does) would read a line other than the upstream does.
    transcript: Transcript = [("S", GREETING), ("C", line), ("S", b"-ERR no\r\n")]
    result = run_split(transcript, split)
    assert result.events[1] == command
    assert [a.reveal() if isinstance(a, Secret) else a for a in result.events[1].args] == [
        a.reveal() if isinstance(a, Secret) else a for a in command.args
    ]
    assert_relayed_verbatim(result, transcript)


@pytest.mark.parametrize(
    ("line", "reply", "command"),
    [
        (b"STAT\r\n", b"+OK 2 320\r\n", Command(3, "STAT")),
        (b"DELE 1\r\n", b"+OK message 1 deleted\r\n", Command(3, "DELE", ("1",))),
        (b"DELE 1\r\n", b"-ERR message 1 already deleted\r\n", Command(3, "DELE", ("1",))),
        (b"RSET\r\n", b"+OK maildrop has 2 messages\r\n", Command(3, "RSET")),
        (b"NOOP\r\n", b"+OK\r\n", Command(3, "NOOP")),
        (b"noop\r\n", b"+OK\r\n", Command(3, "NOOP")),
        (b"NOOP\n", b"+OK\n", Command(3, "NOOP")),
    ],
)
def test_transaction_commands(split: Split, line: bytes, reply: bytes, command: Command) -> None:
    transcript: Transcript = [*login(), ("C", line), ("S", reply)]
    result = run_split(transcript, split)
    events = after_login(result)
    assert events[0] == command
    assert isinstance(events[1], Response)
    assert events[1].multiline is False
    assert events[2] == CommandCompleted(command, events[1].status, len(reply))
    assert len(events) == 3
    assert result.state is State.TRANSACTION
    assert_relayed_verbatim(result, transcript)


def test_states_through_a_session(split: Split) -> None:
    transcript: Transcript = [
        *login(),
        ("C", b"STAT\r\n"),
        ("S", b"+OK 0 0\r\n"),
        ("C", b"QUIT\r\n"),
        ("S", b"+OK bye\r\n"),
    ]
    run_split(transcript, split)
    states = [run(transcript[:n]).state for n in range(len(transcript) + 1)]
    assert states == [
        State.GREETING,
        State.AUTHORIZATION,  # greeting
        State.AUTHORIZATION,  # USER sent
        State.AUTHORIZATION,  # USER accepted
        State.AUTHORIZATION,  # PASS sent: the reply decides
        State.TRANSACTION,
        State.TRANSACTION,
        State.TRANSACTION,
        State.TRANSACTION,  # QUIT sent
        State.UPDATE,
    ]
    result = run(transcript)
    assert result.conversation.quit_acknowledged
    assert not run(transcript[:-1]).conversation.quit_acknowledged
    assert result.conversation.server_closed() == [
        ConnectionClosed(side="server", clean=True, state=State.CLOSED)
    ]


def test_quit_before_login_closes(split: Split) -> None:
    transcript: Transcript = [("S", GREETING), ("C", b"QUIT\r\n"), ("S", b"+OK bye\r\n")]
    result = run_split(transcript, split)
    assert result.state is State.CLOSED
    assert result.conversation.quit_acknowledged
    assert result.conversation.server_closed() == [
        ConnectionClosed(side="server", clean=True, state=State.CLOSED)
    ]
    assert result.conversation.client_closed() == [
        ConnectionClosed(side="client", clean=True, state=State.CLOSED)
    ]


def test_refused_quit_keeps_state(split: Split) -> None:
    transcript: Transcript = [
        *login(),
        ("C", b"QUIT\r\n"),
        ("S", b"-ERR some deleted messages not removed\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.state is State.TRANSACTION
    assert not result.conversation.quit_acknowledged


# ---------------------------------------------------------------------------- whole sessions

SESSION: Transcript = [
    ("S", GREETING),
    ("C", b"CAPA\r\n"),
    ("S", CAPA_REPLY),
    ("C", b"STLS\r\n"),
    ("C", b"USER alice\r\n"),
    ("S", b"+OK\r\n"),
    ("C", b"PASS " + PASSWORD.encode() + b"\r\n"),
    ("S", b"+OK logged in\r\n"),
    ("C", b"STAT\r\n"),
    ("S", b"+OK 2 330\r\n"),
    ("C", b"LIST\r\n"),
    ("S", b"+OK\r\n1 120\r\n2 210\r\n.\r\n"),
    ("C", b"UIDL 2\r\n"),
    ("S", b"+OK 2 QhdPYR:00WBw1Ph7x7\r\n"),
    ("C", b"RETR 1\r\n"),
    ("S", b"+OK 120 octets\r\n" + MESSAGE + b".\r\n"),
    ("C", b"TOP 2 0\r\n"),
    ("S", b"+OK\r\nSubject: x\r\n\r\n.\r\n"),
    ("C", b"DELE 1\r\n"),
    ("S", b"+OK deleted\r\n"),
    ("C", b"RETR 7\r\n"),
    ("S", b"-ERR no such message\r\n"),
    ("C", b"RSET\r\n"),
    ("S", b"+OK\r\n"),
    ("C", b"NOOP\r\n"),
    ("S", b"+OK\r\n"),
    ("C", b"QUIT\r\n"),
    ("S", b"+OK bye\r\n"),
]
SESSION_VERBS = [
    "CAPA", "STLS", "USER", "PASS", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RETR",
    "RSET", "NOOP", "QUIT",
]  # fmt: skip


def test_session_every_command_completed_once(split: Split) -> None:
    result = run_split(SESSION, split)
    commands = result.of_type(Command)
    completed = result.of_type(CommandCompleted)
    assert [c.verb for c in commands] == SESSION_VERBS
    assert [c.command for c in completed] == commands
    assert [c.seq for c in commands] == list(range(1, len(SESSION_VERBS) + 1))
    # reply_octets is what the client got for that reply: the greeting plus all replies is
    # every octet sent to the client, and in lock-step each server step is one reply.
    assert len(GREETING) + sum(c.reply_octets for c in completed) == len(result.downstream)
    for step in result.steps[2:]:
        done = [e for e in step.events if isinstance(e, CommandCompleted)]
        assert sum(c.reply_octets for c in done) == len(step.to_client)
    assert result.upstream == client_input(SESSION).replace(b"STLS\r\n", b"")
    assert result.downstream == GREETING + CAPA_FORWARDED + STLS_REFUSAL + server_input(SESSION[5:])
    assert result.state is State.UPDATE


SESSIONS: dict[str, Transcript] = {
    "full": SESSION,
    # No SASL exchange here: a client cannot pipeline through one (it must read each
    # challenge), and lines sent before the server ends AUTH are taken as SASL data.
    "apop-uidl": [
        ("S", GREETING),
        ("C", b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"),
        ("S", b"+OK\r\n"),
        ("C", b"UIDL\r\n"),
        ("S", b"+OK\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n.\r\n"),
        ("C", b"CAPA\r\n"),
        ("S", CAPA_REPLY),
        ("C", b"QUIT\r\n"),
        ("S", b"+OK\r\n"),
    ],
    "stls-first": [("S", GREETING), ("C", b"STLS\r\n"), ("C", b"QUIT\r\n"), ("S", b"+OK\r\n")],
}


@pytest.mark.parametrize("client", ["lock-step", "pipelined"])
@pytest.mark.parametrize("name", list(SESSIONS))
def test_pipelined_and_lock_step_clients_agree(client: str, name: str) -> None:
    lock_step = SESSIONS[name]
    transcript = lock_step if client == "lock-step" else lock_step_to_pipelined(lock_step)
    result = run(transcript)
    reference = run(lock_step)
    # Only the interleaving of client and reply events may differ.
    assert client_events(result.events) == client_events(reference.events)
    assert reply_events(result.events) == reply_events(reference.events)
    assert result.upstream == reference.upstream
    assert result.downstream == reference.downstream
    assert result.state is reference.state
    assert result.conversation.pending == 0


def test_pipelined_client_events() -> None:
    transcript = lock_step_to_pipelined(
        [*login(), ("C", b"STLS\r\n"), ("C", b"QUIT\r\n"), ("S", b"+OK bye\r\n")]
    )
    result = run(transcript)
    # QUIT is held back until every earlier reply is complete.
    assert [type(e).__name__ for e in result.steps[0].events] == [
        "Command", "UserNamed", "Command", "Command"
    ]  # fmt: skip
    assert result.steps[0].to_server == b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n"
    assert [type(e).__name__ for e in result.steps[1].events] == [
        "Greeting",
        "Response", "CommandCompleted",
        "Response", "LoginSucceeded", "CommandCompleted",
        "LocalReply", "CommandCompleted",
        "Command",
    ]  # fmt: skip
    assert result.steps[1].to_server == b"QUIT\r\n"
    assert [type(e).__name__ for e in result.steps[2].events] == ["Response", "CommandCompleted"]
    assert result.state is State.UPDATE


# ---------------------------------------------------------------------------- answer_locally


def test_answer_locally_keeps_reply_order() -> None:
    conversation = Pop3Conversation()
    conversation.receive_server(GREETING)
    events = conversation.receive_client(b"NOOP\r\nUSER alice\r\nSTAT\r\n")
    noop, user, named, stat = events
    assert named == UserNamed(user, "alice", "USER")  # type: ignore[arg-type]
    assert isinstance(noop, Command)
    assert isinstance(user, Command)
    assert isinstance(stat, Command)
    reply = b"-ERR [AUTH] not from this network\r\n"
    assert conversation.answer_locally(user, reply) == []
    assert conversation.take_upstream_bytes() == b"NOOP\r\nSTAT\r\n"
    assert conversation.take_client_bytes() == GREETING
    events = conversation.receive_server(b"+OK\r\n")
    status = err("not from this network", "AUTH")
    assert events == [
        Response(noop, ok(), multiline=False),
        CommandCompleted(noop, ok(), 5),
        LocalReply(user, status, "caller"),
        CommandCompleted(user, status, len(reply)),
    ]
    assert conversation.take_client_bytes() == b"+OK\r\n" + reply
    events = conversation.receive_server(b"+OK 0 0\r\n")
    assert events[-1] == CommandCompleted(stat, ok("0 0"), 9)
    assert conversation.pending == 0


def test_answer_locally_at_head_answers_now() -> None:
    conversation = Pop3Conversation()
    conversation.receive_server(GREETING)
    conversation.take_client_bytes()
    command, _named = conversation.receive_client(b"USER alice\r\n")
    assert isinstance(command, Command)
    events = conversation.answer_locally(command, b"-ERR no\r\n", reason="user_network")
    assert events == [
        LocalReply(command, err("no"), "user_network"),
        CommandCompleted(command, err("no"), 9),
    ]
    assert conversation.take_client_bytes() == b"-ERR no\r\n"
    assert conversation.take_upstream_bytes() == b""


def test_answer_locally_too_late() -> None:
    conversation = Pop3Conversation()
    conversation.receive_server(GREETING)
    command, _named = conversation.receive_client(b"USER alice\r\n")
    assert isinstance(command, Command)
    assert conversation.take_upstream_bytes() == b"USER alice\r\n"
    with pytest.raises(LocalProtocolError):
        conversation.answer_locally(command, b"-ERR no\r\n")


# ---------------------------------------------------------------------------- closing


def test_server_closed_mid_retr_is_not_clean() -> None:
    result = run([*login(), ("C", b"RETR 1\r\n"), ("S", b"+OK\r\npart of a bo")])
    assert result.conversation.server_closed() == [
        ConnectionClosed(side="server", clean=False, state=State.CLOSED)
    ]


def test_server_closed_mid_status_line_is_not_clean() -> None:
    result = run([*login(), ("S", b"-ERR [SYS/TEMP] shutting d")])
    (closed,) = result.conversation.server_closed()
    assert isinstance(closed, ConnectionClosed)
    assert closed.clean is False


def test_server_closed_with_command_pending_is_not_clean() -> None:
    result = run([*login(), ("C", b"STAT\r\n")])
    assert result.conversation.server_closed() == [
        ConnectionClosed(side="server", clean=False, state=State.CLOSED)
    ]


def test_server_closed_after_quit_is_clean() -> None:
    result = run([*login(), ("C", b"QUIT\r\n"), ("S", b"+OK bye\r\n")])
    assert result.state is State.UPDATE
    assert result.conversation.server_closed() == [
        ConnectionClosed(side="server", clean=True, state=State.CLOSED)
    ]


@pytest.mark.parametrize(
    ("steps", "clean"),
    [
        pytest.param([], True, id="idle"),
        pytest.param([("C", b"STAT\r\n")], False, id="reply-outstanding"),
        pytest.param([("C", b"STA")], False, id="half-a-line"),
        pytest.param([("C", b"STAT\r\n"), ("S", b"+OK 0 0\r\n")], True, id="answered"),
    ],
)
def test_client_closed(steps: list[Step], clean: bool) -> None:
    transcript: Transcript = [*login(), *steps]
    result = run(transcript)
    assert result.conversation.client_closed() == [
        ConnectionClosed(side="client", clean=clean, state=State.TRANSACTION)
    ]


# ---------------------------------------------------------------------------- limits and errors


def test_command_line_at_limit_is_accepted(split: Split) -> None:
    line = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(line) == MAX_COMMAND_LINE
    transcript: Transcript = [("S", GREETING), ("C", line), ("S", b"+OK\r\n")]
    result = run_split(transcript, split)
    assert result.error is None
    assert_relayed_verbatim(result, transcript)


@pytest.mark.parametrize(
    ("line", "limit"),
    [
        pytest.param(
            b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6) + b"\r\n", MAX_COMMAND_LINE, id="command"
        ),
        pytest.param(b"x" * 1000, MAX_COMMAND_LINE, id="no-newline"),
        pytest.param(
            b"AUTH PLAIN " + b"A" * MAX_SASL_LINE + b"\r\n", MAX_SASL_LINE, id="auth-line"
        ),
    ],
)
def test_client_line_over_limit(line: bytes, limit: int) -> None:
    transcript: Transcript = [("S", GREETING), ("C", line)]
    result = run_split(transcript, "bytes")
    error = result.error
    assert error is not None
    assert error.side == "client"
    assert error.reply_hint.startswith(b"-ERR")
    assert error.reply_hint.endswith(b"\r\n")
    assert str(limit) in error.reason
    assert result.upstream == b""
    with pytest.raises(LocalProtocolError):
        result.conversation.receive_client(b"NOOP\r\n")
    with pytest.raises(LocalProtocolError):
        result.conversation.receive_server(b"+OK\r\n")


@pytest.mark.parametrize(
    ("limits", "line", "exceeded"),
    [
        pytest.param((64, 16), b"NOOP " + b"x" * 30 + b"\r\n", None, id="command-under-own-limit"),
        pytest.param((64, 16), b"AUTH PLAIN " + b"A" * 10 + b"\r\n", 16, id="auth-over-sasl"),
        pytest.param((8, 8192), b"AUTH PLAIN\r\n", None, id="auth-under-sasl"),
        pytest.param((8, 8192), b"NOOP xxxx\r\n", 8, id="command-over-own-limit"),
    ],
)
def test_each_line_limit_applies_to_its_lines(
    split: Split, limits: tuple[int, int], line: bytes, exceeded: int | None
) -> None:
    # Either limit may be the smaller one; a line read whole is held to the right one.
    command_limit, sasl_limit = limits
    result = run_split(
        [("S", GREETING), ("C", line)],
        split,
        factory=lambda: Pop3Conversation(max_command_line=command_limit, max_sasl_line=sasl_limit),
    )
    if exceeded is None:
        assert result.error is None
        assert result.upstream == line
    else:
        assert result.error is not None
        assert str(exceeded) in result.error.reason
        assert result.upstream == b""


def test_sasl_continuation_line_limit() -> None:
    ok_line = b"A" * (MAX_SASL_LINE - 4) + b"\r\n"  # base64 comes in groups of four
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH PLAIN\r\n"),
        ("S", b"+ \r\n"),
        ("C", ok_line),
        ("S", b"-ERR [AUTH] bad\r\n"),
        ("C", b"AUTH PLAIN\r\n"),
        ("S", b"+ \r\n"),
        ("C", b"AAAA" + ok_line),
    ]
    result = run(transcript)
    assert result.error is not None
    assert result.error.side == "client"
    assert len(result.of_type(SaslResponse)) == 1


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"+OK " + b"x" * MAX_STATUS_LINE + b"\r\n", id="long-status"),
        pytest.param(b"x" * (MAX_STATUS_LINE + 1), id="long-no-newline"),
        pytest.param(b"HELLO\r\n", id="not-a-status"),
        pytest.param(b"+ challenge\r\n", id="challenge-without-auth"),
    ],
)
def test_server_protocol_errors(data: bytes) -> None:
    transcript: Transcript = [*login(), ("C", b"STAT\r\n"), ("S", data)]
    result = run_split(transcript, "bytes")
    error = result.error
    assert error is not None
    assert error.side == "server"
    assert error.reply_hint.startswith(b"-ERR")
    with pytest.raises(LocalProtocolError):
        result.conversation.receive_server(b"+OK\r\n")


def test_bad_greeting_is_a_server_error() -> None:
    result = run([("S", b"SSH-2.0-OpenSSH_9.6\r\n")])
    assert result.error is not None
    assert result.error.side == "server"
    assert result.error.reply_hint.startswith(b"-ERR [SYS/TEMP]")


def test_capa_line_over_limit() -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"CAPA\r\n"),
        ("S", b"+OK\r\nX-" + b"A" * MAX_STATUS_LINE + b"\r\n.\r\n"),
    ]
    result = run(transcript)
    assert result.error is not None
    assert result.error.side == "server"


def test_body_lines_have_no_limit() -> None:
    body = b"x" * (MAX_STATUS_LINE * 4) + b"\r\n"
    transcript: Transcript = [*login(), ("C", b"RETR 1\r\n"), ("S", b"+OK\r\n" + body + b".\r\n")]
    result = run_split(transcript, "pipelined")
    assert result.error is None
    assert_relayed_verbatim(result, transcript)


# ---------------------------------------------------------------------------- pipelined QUIT


def test_pipelined_quit_waits_for_the_replies_before_it() -> None:
    conversation = Pop3Conversation()
    for step in login():
        (conversation.receive_client if step[0] == "C" else conversation.receive_server)(step[1])
    conversation.take_upstream_bytes()
    conversation.take_client_bytes()
    events = conversation.receive_client(b"RETR 1\r\nquit\r\n")
    assert [e.verb for e in events if isinstance(e, Command)] == ["RETR"]
    assert conversation.take_upstream_bytes() == b"RETR 1\r\n"
    assert conversation.client_paused
    conversation.receive_server(b"+OK 5 octets\r\nabc\r\n")  # the body is not complete yet
    assert conversation.client_paused
    conversation.receive_server(b".\r\n")
    assert not conversation.client_paused
    assert conversation.client_backlog
    assert [e.verb for e in conversation.receive_client(b"") if isinstance(e, Command)] == ["QUIT"]
    assert conversation.take_upstream_bytes() == b"quit\r\n"
    assert not conversation.client_backlog


@pytest.mark.parametrize(
    "line", [b"QUIT\r\n", b"QUIT\n", b"QUIT now\r\n", b"QUIT \r\n", b"Quit\r\n"]
)
def test_quit_with_nothing_pending_goes_at_once(line: bytes) -> None:
    conversation = Pop3Conversation()
    conversation.receive_server(GREETING)
    conversation.receive_client(line)
    assert conversation.take_upstream_bytes() == line
    assert not conversation.client_paused


@pytest.mark.parametrize("line", [b"QUITE\r\n", b"NOOP\r\n", b"QUI\r\n"])
def test_only_quit_is_held(line: bytes) -> None:
    conversation = Pop3Conversation()
    conversation.receive_server(GREETING)
    conversation.receive_client(b"NOOP\r\n" + line)
    assert conversation.take_upstream_bytes() == b"NOOP\r\n" + line


def test_a_quit_line_inside_a_sasl_exchange_is_sasl_data() -> None:
    conversation = Pop3Conversation()
    conversation.receive_server(GREETING)
    conversation.receive_client(b"AUTH LOGIN\r\n")
    conversation.receive_server(b"+ VXNlcm5hbWU6\r\n")
    events = conversation.receive_client(b"QUIT\r\n")  # a (strange) user name, not a command
    assert conversation.take_upstream_bytes() == b"AUTH LOGIN\r\nQUIT\r\n"
    assert not any(isinstance(e, Command) and e.verb == "QUIT" for e in events)
