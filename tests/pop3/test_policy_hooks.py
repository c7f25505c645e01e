"""Engine hooks for the relay's policies: UserNamed, greeting notices, the pipelining bound."""

from __future__ import annotations

import base64

import pytest

from pop3proxy.pop3 import Command, Pop3Conversation, RemoteProtocolError, UserNamed

GREETING = b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def greeted(**kwargs: int) -> Pop3Conversation:
    conversation = Pop3Conversation(**kwargs)  # type: ignore[arg-type]
    conversation.receive_server(GREETING)
    conversation.take_client_bytes()
    return conversation


@pytest.mark.parametrize(
    ("lines", "user", "mechanism"),
    [
        ([b"USER alice\r\n"], "alice", "USER"),
        ([b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n"], "alice", "APOP"),
        ([b"AUTH PLAIN " + b64(b"\0alice\0pw") + b"\r\n"], "alice", "PLAIN"),
        ([b"AUTH PLAIN\r\n", b64(b"\0alice\0pw") + b"\r\n"], "alice", "PLAIN"),
        ([b"AUTH LOGIN\r\n", b64(b"alice") + b"\r\n"], "alice", "LOGIN"),
        ([b"AUTH CRAM-MD5\r\n", b64(b"alice 0123456789abcdef") + b"\r\n"], "alice", "CRAM-MD5"),
    ],
)
def test_user_named_before_the_credential_leaves(
    lines: list[bytes], user: str, mechanism: str
) -> None:
    conversation = greeted()
    events = []
    for line in lines:
        events += conversation.receive_client(line)
        if line is not lines[-1]:
            conversation.take_upstream_bytes()
            conversation.receive_server(b"+ \r\n")
    (named,) = [e for e in events if isinstance(e, UserNamed)]
    assert (named.user, named.mechanism) == (user, mechanism)
    # The line that named the user is still held: the relay may refuse it.
    assert conversation.take_upstream_bytes() == lines[-1]


def test_refusing_the_named_user_keeps_the_credential_here() -> None:
    conversation = greeted()
    events = conversation.receive_client(b"AUTH PLAIN\r\n")
    (auth,) = [e for e in events if isinstance(e, Command)]
    assert conversation.take_upstream_bytes() == b"AUTH PLAIN\r\n"
    conversation.receive_server(b"+ \r\n")
    conversation.take_client_bytes()
    events = conversation.receive_client(b64(b"\0mallory\0secret") + b"\r\n")
    assert any(isinstance(e, UserNamed) and e.user == "mallory" for e in events)
    conversation.answer_locally(auth, b"-ERR [AUTH] not from this network\r\n")
    assert conversation.take_upstream_bytes() == b""
    assert conversation.take_client_bytes() == b"-ERR [AUTH] not from this network\r\n"


def test_greeting_notice_goes_after_ok_and_keeps_apop_timestamp() -> None:
    conversation = Pop3Conversation()
    conversation.greeting_notice = "[migrate to port 995 with TLS]"
    conversation.receive_server(GREETING)
    assert conversation.take_client_bytes() == (
        b"+OK [migrate to port 995 with TLS] POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"
    )


def test_pipelining_bound_holds_lines_until_replies_arrive() -> None:
    conversation = greeted(max_pipelined=2)
    events = conversation.receive_client(b"NOOP\r\nNOOP\r\nNOOP\r\nSTAT\r\n")
    assert [e.seq for e in events if isinstance(e, Command)] == [1, 2]
    assert conversation.client_paused
    assert conversation.take_upstream_bytes() == b"NOOP\r\nNOOP\r\n"
    conversation.receive_server(b"+OK\r\n")
    assert conversation.pending == 1
    assert not conversation.client_paused  # room again: the relay resumes with b""
    events = conversation.receive_client(b"")
    assert [e.verb for e in events if isinstance(e, Command)] == ["NOOP"]
    assert conversation.take_upstream_bytes() == b"NOOP\r\n"
    conversation.receive_server(b"+OK\r\n+OK\r\n")
    events = conversation.receive_client(b"")
    assert [e.verb for e in events if isinstance(e, Command)] == ["STAT"]
    assert not conversation.client_paused


def test_pipelining_bound_holds_a_line_read_alone() -> None:
    conversation = greeted(max_pipelined=1)
    assert [e.verb for e in conversation.receive_client(b"NOOP\r\n") if isinstance(e, Command)] == [
        "NOOP"
    ]
    assert conversation.receive_client(b"STAT\r\n") == []
    assert conversation.client_paused
    assert conversation.take_upstream_bytes() == b"NOOP\r\n"
    conversation.receive_server(b"+OK\r\n")
    assert not conversation.client_paused
    events = conversation.receive_client(b"")
    assert [e.verb for e in events if isinstance(e, Command)] == ["STAT"]
    assert conversation.take_upstream_bytes() == b"STAT\r\n"


def test_pipelining_bound_lets_sasl_continuations_through() -> None:
    # The AUTH command fills the pipeline; the lines of its own exchange must still pass.
    conversation = greeted(max_pipelined=1)
    conversation.receive_client(b"AUTH PLAIN\r\n")
    conversation.receive_server(b"+ \r\n")
    events = conversation.receive_client(b64(b"\0alice\0pw") + b"\r\n")
    assert any(isinstance(e, UserNamed) and e.user == "alice" for e in events)
    assert conversation.take_upstream_bytes() == b"AUTH PLAIN\r\n" + b64(b"\0alice\0pw") + b"\r\n"


def test_in_body_while_a_multiline_reply_streams() -> None:
    conversation = greeted()
    conversation.receive_client(b"RETR 1\r\n")
    assert not conversation.in_body
    conversation.receive_server(b"+OK 12 octets\r\nSubject: x\r\n")
    assert conversation.in_body
    conversation.receive_server(b"\r\nhi\r\n.\r\n")
    assert not conversation.in_body
    conversation.receive_client(b"RETR 9\r\n")
    conversation.receive_server(b"-ERR no such message\r\n")
    assert not conversation.in_body


@pytest.mark.parametrize(
    "waiting",
    [
        pytest.param((b"NOOP\r\n", {"max_pipelined": 1}), id="full-pipeline"),
        pytest.param((b"AUTH PLAIN\r\n", {}), id="auth-not-answered"),
    ],
)
def test_a_waiting_client_is_still_held_to_the_line_limit(
    waiting: tuple[bytes, dict[str, int]],
) -> None:
    """While lines wait for replies the relay keeps reading a client that has sent no LF yet:
    the unfinished line must meet its limit then too, or it grows without bound."""
    first, options = waiting
    conversation = greeted(max_command_line=64, max_sasl_line=64, **options)
    conversation.receive_client(first)
    for _ in range(3):  # 48 octets: under the limit, and no line yet
        assert conversation.receive_client(b"x" * 16) == []
    assert not conversation.client_backlog  # the relay reads on
    with pytest.raises(RemoteProtocolError) as raised:
        conversation.receive_client(b"x" * 17)
    assert "64" in raised.value.reason


def test_nothing_behind_a_refused_login_is_forwarded() -> None:
    """``USER bob`` refused, ``PASS`` in the same read: the password stays here, while the
    lines of an earlier, allowed login still go (their replies come before the refusal)."""
    conversation = greeted()
    events = conversation.receive_client(
        b"USER alice\r\nPASS alice-pw\r\nUSER bob\r\nPASS bob-pw\r\nSTAT\r\n"
    )
    [bob] = [e.command for e in events if isinstance(e, UserNamed) and e.user == "bob"]
    conversation.answer_locally(bob, b"-ERR [AUTH] not from this network\r\n")
    conversation.forward_nothing_after(bob)
    assert conversation.take_upstream_bytes() == b"USER alice\r\nPASS alice-pw\r\n"
    assert conversation.receive_client(b"PASS again\r\n") != []  # read, and still not sent
    assert conversation.take_upstream_bytes() == b""
    conversation.receive_server(b"+OK\r\n+OK logged in\r\n")
    assert conversation.take_client_bytes() == (
        b"+OK\r\n+OK logged in\r\n-ERR [AUTH] not from this network\r\n"
    )


def _scram_first(authzid: bytes, user: bytes) -> bytes:
    return b64(b"n," + authzid + b",n=" + user + b",r=fyko+d2lbbFgONRv9qkxdawL")


@pytest.mark.parametrize(
    ("line", "user"),
    [
        pytest.param(b"AUTH GSSAPI " + b64(b"\x60\x82\x02\x00 kerberos") + b"\r\n", None,
                     id="gssapi"),
        pytest.param(b"AUTH NTLM " + b64(b"NTLMSSP\0\x01\0\0\0") + b"\r\n", None, id="ntlm"),
        pytest.param(b"AUTH EXTERNAL " + b64(b"alice") + b"\r\n", None, id="external"),
        pytest.param(b"AUTH PLAIN " + b64(b"admin\0alice\0pw") + b"\r\n", None,
                     id="plain-acting-for-another"),
        pytest.param(b"AUTH PLAIN " + b64(b"alice\0alice\0pw") + b"\r\n", "alice",
                     id="plain-acting-for-itself"),
        pytest.param(b"AUTH SCRAM-SHA-256 " + _scram_first(b"", b"alice") + b"\r\n", "alice",
                     id="scram"),
        pytest.param(b"AUTH SCRAM-SHA-1 " + _scram_first(b"", b"a=3Db=2Cc") + b"\r\n", "a=b,c",
                     id="scram-escaped"),
        pytest.param(b"AUTH SCRAM-SHA-256 " + _scram_first(b"a=admin", b"alice") + b"\r\n",
                     None, id="scram-acting-for-another"),
        pytest.param(b"AUTH OAUTHBEARER " + b64(b"n,a=alice@example.com,\x01host=x\x01auth="
                                                b"Bearer tok\x01\x01") + b"\r\n",
                     "alice@example.com", id="oauthbearer"),
    ],
)  # fmt: skip
def test_every_first_sasl_message_names_its_user_or_says_it_cannot(
    line: bytes, user: str | None
) -> None:
    """A user policy must never be skipped because a name could not be read: the credential
    about to leave is always reported, with None for "cannot tell"."""
    conversation = greeted()
    [named] = [e for e in conversation.receive_client(line) if isinstance(e, UserNamed)]
    assert named.user == user
    assert conversation.take_upstream_bytes() == line  # still held for the relay to refuse


def test_no_sasl_data_names_nobody_yet() -> None:
    """Neither ``AUTH X`` alone nor an empty initial response (``=``) carries a credential."""
    conversation = greeted()
    for line in (b"AUTH GSSAPI\r\n", b"AUTH PLAIN =\r\n"):
        assert not any(isinstance(e, UserNamed) for e in conversation.receive_client(line))
        conversation.receive_server(b"-ERR no\r\n")
