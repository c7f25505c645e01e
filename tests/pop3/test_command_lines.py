"""Command lines the upstream could read differently: refused here, whole, in their place.

Issue 11 part 2 (RFC 1939 section 3, RFC 2449, RFC 5034, RFC 6856). Every shape below makes
some server read a line other than the engine used to: Dovecot 2.3 ends a user name at a NUL
and skips a CR inside the verb, Python servers split at U+00A0 and upper-case U+017F to ``S``,
C servers split at TAB (see "Command lines" in :mod:`pop3proxy.pop3.conversation`). Each is
now answered with ``-ERR [SYS/PERM]``, reaches no upstream and names no user, while what the
RFCs allow (8-bit and UTF-8 arguments, a password with spaces, a bare LF line end) passes
unchanged. The properties at the end hold every line against models of how servers read it:
wherever one of them would see a known verb, a user name or an initial response, the engine
sees the same one, or refuses the line.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3proxy.pop3 import (
    KNOWN_VERBS,
    REFUSALS,
    SASL_REFUSAL,
    UNKNOWN_VERB,
    Command,
    Event,
    LocalReply,
    LoginSucceeded,
    Pop3Conversation,
    RemoteProtocolError,
    SaslResponse,
    SaslStarted,
    Secret,
    State,
    Status,
    UserNamed,
)
from pop3proxy.pop3.errors import LocalProtocolError
from tests.pop3.helpers import Split, Transcript, client_input, run, run_split, server_input
from tests.pop3.test_fuzz import FUZZ

GREETING = b"+OK POP3 ready <1896.697170952@dbc.mailcom.com>\r\n"
SECRET = "s3cr3t"
PLAIN = base64.b64encode(b"\0alice\0" + SECRET.encode())
LOGIN_NAME = base64.b64encode(b"alice")
DIGEST = b"c4c9334bac560ecc979e58001b3e22fb"


def revealed(args: tuple[str | Secret, ...]) -> list[str]:
    return [a.reveal() if isinstance(a, Secret) else a for a in args]


def shown(events: list[Event]) -> str:
    return " ".join(repr(e) + str(e) for e in events)


# ---------------------------------------------------------------------------- refused lines

REFUSED = [
    # C0 controls and DEL: servers cut at them, skip them or keep them inside a word.
    ("nul-after-name", b"USER alice\x00\r\n", "control_character"),  # Dovecot: alice
    ("nul-inside-name", b"USER alice\x00junk\r\n", "control_character"),
    ("nul-lower-case", b"user alice\x00\r\n", "control_character"),
    ("bare-cr-splits-words", b"USER alice\rPASS " + SECRET.encode() + b"\r\n", "control_character"),
    ("cr-inside-verb", b"US\rER alice\r\n", "control_character"),  # Dovecot: USER alice
    ("cr-before-crlf", b"USER alice\r\r\n", "control_character"),
    ("cr-before-lf", b"QUIT\r\r\n", "control_character"),
    ("tab-after-verb", b"USER\talice\r\n", "control_character"),
    ("tab-after-name", b"USER alice\t\r\n", "control_character"),
    ("tab-before-password", b"PASS\t" + SECRET.encode() + b"\r\n", "control_character"),
    ("tab-inside-password", b"pass s3c\tr3t\r\n", "control_character"),
    ("tab-between-numbers", b"LIST\t2\r\n", "control_character"),
    ("tab-before-mechanism", b"AUTH\tPLAIN " + PLAIN + b"\r\n", "control_character"),
    ("vertical-tab", b"USER alice\x0b\r\n", "control_character"),
    ("form-feed", b"USER alice\x0c\r\n", "control_character"),
    ("escape", b"USER alice\x1b[0m\r\n", "control_character"),
    ("file-separator", b"NOOP\x1cx\r\n", "control_character"),
    ("delete", b"USER alice\x7f\r\n", "control_character"),
    ("nul-in-password", b"PASS " + SECRET.encode() + b"\x00zzz\r\n", "control_character"),
    ("nul-in-apop", b"APOP alice\x00 " + DIGEST + b"\r\n", "control_character"),
    ("nul-after-initial-response", b"AUTH PLAIN " + PLAIN + b"\x00zz\r\n", "control_character"),
    ("nul-alone", b"\x00\r\n", "control_character"),
    ("nul-after-quit", b"QUIT\x00\r\n", "control_character"),
    ("nul-in-message-number", b"RETR\x001\r\n", "control_character"),
    # The verb: ASCII, first on the line (Unicode upper-casing and trimming make another).
    ("leading-space", b" USER alice\r\n", "malformed_verb"),
    ("long-s", "u\u017fer alice\r\n".encode(), "malformed_verb"),  # .upper() == "USER ALICE"
    ("dotless-i", "L\u0131st\r\n".encode(), "malformed_verb"),
    ("no-break-space-after-verb", b"USER\xc2\xa0alice\r\n", "malformed_verb"),
    ("em-space-after-verb", b"PASS\xe2\x80\x83" + SECRET.encode() + b"\r\n", "malformed_verb"),
    ("8-bit-verb", b"\xffUSER alice\r\n", "malformed_verb"),
    # USER: one word of printable UTF-8.
    ("two-words", b"USER alice " + SECRET.encode() + b"\r\n", "malformed_user"),
    ("two-spaces", b"USER  alice\r\n", "malformed_user"),
    ("trailing-space", b"USER alice \r\n", "malformed_user"),
    ("latin-1", b"USER alic\xe9\r\n", "malformed_user"),
    ("no-break-space", b"USER alice\xc2\xa0\r\n", "malformed_user"),  # Python strips it
    ("next-line", b"USER alice\xc2\x85\r\n", "malformed_user"),
    ("line-separator", b"USER alice\xe2\x80\xa8\r\n", "malformed_user"),
    ("ideographic-space", b"USER alice\xe3\x80\x80" + SECRET.encode() + b"\r\n", "malformed_user"),
    ("zero-width-space", b"USER ali\xe2\x80\x8bce\r\n", "malformed_user"),
    ("byte-order-mark", b"USER \xef\xbb\xbfalice\r\n", "malformed_user"),
    ("right-to-left-override", b"USER \xe2\x80\xaealice\r\n", "malformed_user"),
    # APOP: a name and a digest.
    ("apop-no-digest", b"APOP alice\r\n", "malformed_apop"),
    ("apop-three-words", b"APOP alice " + DIGEST + b" extra\r\n", "malformed_apop"),
    ("apop-two-spaces", b"APOP  alice " + DIGEST + b"\r\n", "malformed_apop"),
    ("apop-trailing-space", b"APOP alice " + DIGEST + b" \r\n", "malformed_apop"),
    ("apop-latin-1", b"APOP alic\xe9 " + DIGEST + b"\r\n", "malformed_apop"),
    # AUTH: a mechanism name and one base64 initial response.
    ("ir-with-space", b"AUTH PLAIN " + PLAIN[:4] + b" " + PLAIN[4:] + b"\r\n", "malformed_auth"),
    ("ir-trailing-space", b"AUTH PLAIN " + PLAIN + b" \r\n", "malformed_auth"),
    ("ir-after-two-spaces", b"AUTH PLAIN  " + PLAIN + b"\r\n", "malformed_auth"),
    ("ir-not-base64", b"AUTH PLAIN not-base64!\r\n", "malformed_auth"),
    ("ir-unpadded", b"AUTH PLAIN " + PLAIN.rstrip(b"=") + b"\r\n", "malformed_auth"),
    ("ir-star", b"AUTH PLAIN *\r\n", "malformed_auth"),
    ("auth-trailing-space", b"AUTH PLAIN \r\n", "malformed_auth"),
    ("mechanism-too-long", b"AUTH " + b"X" * 21 + b"\r\n", "malformed_auth"),
    ("mechanism-8-bit", b"AUTH PL\xc3\x84IN\r\n", "malformed_auth"),
]


@pytest.mark.parametrize(
    ("line", "reason"), [pytest.param(line, reason, id=name) for name, line, reason in REFUSED]
)
def test_refused_line_is_answered_here_in_its_place(split: Split, line: bytes, reason: str) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"NOOP\r\n" + line + b"STAT\r\n"),
        ("S", b"+OK\r\n"),
        ("S", b"+OK 0 0\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.error is None
    # Nothing of the line reaches the server; its refusal goes out between the two replies.
    assert result.upstream == b"NOOP\r\nSTAT\r\n"
    assert result.downstream == GREETING + b"+OK\r\n" + REFUSALS[reason] + b"+OK 0 0\r\n"
    [local] = result.of_type(LocalReply)
    assert local.reason == reason
    assert local.command.seq == 2
    assert local.command.args == ()
    assert local.status.code == "SYS/PERM"
    assert not local.status.ok
    # No user name for a policy to check, none remembered, no credential shown anywhere.
    assert result.of_type(UserNamed) == []
    assert result.conversation.user is None
    assert SECRET not in shown(result.all_events)
    assert result.state is State.AUTHORIZATION
    assert result.conversation.pending == 0


def test_refused_verb_is_named_only_when_it_is_one() -> None:
    result = run([("S", GREETING), ("C", b"USER alice\x00\r\nUSER\x00alice\r\n")])
    assert [e.command.verb for e in result.of_type(LocalReply)] == ["USER", UNKNOWN_VERB]


def test_refused_user_keeps_the_name_before_it() -> None:
    # The upstream never saw the refused USER: it still has bob, and so does the engine.
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"USER bob\r\n"),
        ("S", b"+OK\r\n"),
        ("C", b"USER alice\x00\r\nPASS " + SECRET.encode() + b"\r\n"),
        ("S", b"+OK logged in\r\n"),
    ]
    result = run_split(transcript, "boundaries")
    assert result.upstream == b"USER bob\r\nPASS " + SECRET.encode() + b"\r\n"
    assert [e.user for e in result.of_type(UserNamed)] == ["bob"]
    assert result.of_type(LoginSucceeded) == [LoginSucceeded(user="bob", mechanism="USER")]


def test_refused_line_before_the_greeting_is_answered_after_it(split: Split) -> None:
    transcript: Transcript = [("C", b"USER alice\x00\r\n"), ("S", GREETING)]
    result = run_split(transcript, split)
    assert result.upstream == b""
    assert result.downstream == GREETING + REFUSALS["control_character"]


def test_refusals_are_status_lines_with_a_response_code() -> None:
    for reply in (*REFUSALS.values(), SASL_REFUSAL):
        assert reply.startswith(b"-ERR [SYS/PERM] ")
        assert reply.endswith(b"\r\n")
        assert reply.count(b"\n") == 1
        assert len(reply) <= 512  # RFC 2449 section 4
        assert reply.isascii()


# ---------------------------------------------------------------------------- what still passes

PASSED = [
    ("user", b"USER alice\r\n", Command(1, "USER", ("alice",)), "alice"),
    ("bare-lf", b"USER alice\n", Command(1, "USER", ("alice",)), "alice"),
    ("lower-case", b"user ALICE\r\n", Command(1, "USER", ("ALICE",)), "ALICE"),
    ("utf-8-name", "USER müller\r\n".encode(), Command(1, "USER", ("müller",)), "müller"),
    ("cjk-name", "USER 用户\r\n".encode(), Command(1, "USER", ("用户",)), "用户"),
    ("user-alone", b"USER\r\n", Command(1, "USER"), None),
    ("user-space-only", b"USER \r\n", Command(1, "USER"), None),
    (
        "password-with-spaces",
        b"PASS  two  spaces \r\n",
        Command(1, "PASS", (Secret(" two  spaces "),)),
        None,
    ),
    (
        "latin-1-password",
        b"PASS p\xe4ss w\xf6rd\r\n",
        Command(1, "PASS", (Secret("p\ufffdss w\ufffdrd"),)),
        None,
    ),
    (
        "utf-8-password",
        "pass pässwörd\n".encode(),
        Command(1, "PASS", (Secret("pässwörd"),)),
        None,
    ),
    (
        "apop",
        b"APOP mrose " + DIGEST + b"\r\n",
        Command(1, "APOP", ("mrose", Secret(DIGEST.decode()))),
        "mrose",
    ),
    ("auth-empty-ir", b"AUTH PLAIN =\r\n", Command(1, "AUTH", ("PLAIN", Secret("="))), None),
    (
        "auth-lower-case",
        b"auth plain " + PLAIN + b"\r\n",
        Command(1, "AUTH", ("plain", Secret(PLAIN.decode()))),
        "alice",
    ),
    ("auth-listing-space", b"AUTH \r\n", Command(1, "AUTH"), None),
    ("empty-line", b"\r\n", Command(1, UNKNOWN_VERB), None),
    (
        "unknown-8-bit-argument",
        b"XYZZY caf\xc3\xa9\r\n",
        Command(1, UNKNOWN_VERB, (Secret("XYZZY café"),)),
        None,
    ),
    ("noop-argument-hidden", b"NOOP s3cr3t\r\n", Command(1, "NOOP", (Secret(SECRET),)), None),
    ("retr-word-hidden", b"RETR s3cr3t\r\n", Command(1, "RETR", (Secret(SECRET),)), None),
    ("lang", b"LANG de-CH\r\n", Command(1, "LANG", ("de-CH",)), None),
]


@pytest.mark.parametrize(
    ("line", "command", "user"),
    [pytest.param(line, command, user, id=name) for name, line, command, user in PASSED],
)
def test_what_the_rfcs_allow_passes_unchanged(
    split: Split, line: bytes, command: Command, user: str | None
) -> None:
    transcript: Transcript = [("S", GREETING), ("C", line), ("S", b"-ERR no\r\n")]
    result = run_split(transcript, split)
    assert result.upstream == client_input(transcript)
    assert result.downstream == server_input(transcript)
    reported = result.events[1]
    assert reported == command
    assert isinstance(reported, Command)
    assert revealed(reported.args) == revealed(command.args)
    assert [e.user for e in result.of_type(UserNamed)] == ([user] if user else [])
    assert result.of_type(LocalReply) == []
    assert SECRET not in shown(result.events)


def test_a_user_name_is_logged_alone() -> None:
    """USER's one argument is all the log ever gets of its line (no second word to leak)."""
    for line in (b"USER alice\r\n", b"USER alice " + SECRET.encode() + b"\r\n"):
        result = run([("S", GREETING), ("C", line), ("S", b"+OK\r\n")])
        commands = result.of_type(Command)
        assert [c.loggable_args() for c in commands] in ([["alice"]], [[]])
        assert SECRET not in shown(result.all_events)


# ---------------------------------------------------------------------------- SASL lines


SASL_NOT_BASE64 = [
    ("nul-after-data", PLAIN + b"\x00\r\n"),  # Dovecot cuts at the NUL and logs in
    ("cr-inside", PLAIN + b"\rzz\r\n"),
    ("space-inside", PLAIN[:8] + b" " + PLAIN[8:] + b"\r\n"),
    ("tab-before", b"\t" + PLAIN + b"\r\n"),
    ("unpadded", PLAIN.rstrip(b"=") + b"\r\n"),
    ("8-bit", PLAIN + b"\xc3\xa9\r\n"),
    ("two-stars", b"**\r\n"),
    ("a-command", b"USER alice\r\n"),
]


@pytest.mark.parametrize("line", [pytest.param(line, id=name) for name, line in SASL_NOT_BASE64])
@pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
def test_sasl_line_that_is_not_base64_ends_the_session(
    split: Split, mechanism: bytes, line: bytes
) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH " + mechanism + b"\r\n"),
        ("S", b"+ \r\n"),
        ("C", line),
    ]
    result = run_split(transcript, split)
    error = result.error
    assert error is not None
    assert error.side == "client"
    assert error.reply_hint == SASL_REFUSAL
    assert SECRET not in error.reason
    assert result.upstream == b"AUTH " + mechanism + b"\r\n"
    assert result.of_type(UserNamed) == []
    with pytest.raises(LocalProtocolError):
        result.conversation.receive_client(b"NOOP\r\n")


@pytest.mark.parametrize(
    "line",
    [b"*\r\n", b"=\r\n", b"\r\n", PLAIN + b"\n", LOGIN_NAME + b"\r\n"],
    ids=["cancel", "equals", "empty", "bare-lf", "login-name"],
)
def test_sasl_line_that_is_base64_passes_unchanged(split: Split, line: bytes) -> None:
    transcript: Transcript = [
        ("S", GREETING),
        ("C", b"AUTH PLAIN\r\n"),
        ("S", b"+ \r\n"),
        ("C", line),
        ("S", b"-ERR [AUTH] no\r\n"),
    ]
    result = run_split(transcript, split)
    assert result.error is None
    assert result.upstream == client_input(transcript)
    assert len(result.of_type(SaslResponse)) == 1


@pytest.mark.parametrize("split_mode", ["boundaries", "bytes"])
@pytest.mark.parametrize(
    "auth", [b"AUTH FOO\r\n", b"AUTH PLAIN =\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n"]
)
def test_user_pipelined_behind_a_failing_auth_is_read_as_the_server_reads_it(
    split_mode: Split, auth: bytes
) -> None:
    """The server reads the lines after a failed AUTH as commands: so must the engine.

    The old engine took them for SASL data (no user name, no policy check) and forwarded them
    at once; Dovecot then logged ``bob`` in. The engine now holds them until the AUTH's
    reply, then reads ``USER bob`` as a command, before it leaves (the policy hook).
    (Not split as ``pipelined``: that would have the server answer USER before receiving it.)
    """
    transcript: Transcript = [
        ("S", GREETING),
        ("C", auth + b"USER bob\r\nPASS " + SECRET.encode() + b"\r\n"),
        ("S", b"-ERR [AUTH] Authentication failed\r\n"),
        ("S", b"+OK\r\n"),
        ("S", b"+OK logged in\r\n"),
    ]
    result = run_split(transcript, split_mode)
    assert result.steps[1].to_server == auth
    assert result.steps[2].to_server == b"USER bob\r\nPASS " + SECRET.encode() + b"\r\n"
    assert [(e.user, e.mechanism) for e in result.of_type(UserNamed)][-1] == ("bob", "USER")
    assert result.of_type(LoginSucceeded) == [LoginSucceeded(user="bob", mechanism="USER")]
    assert result.state is State.TRANSACTION
    assert SECRET not in shown(result.all_events)


def test_a_policy_can_refuse_the_user_held_behind_auth() -> None:
    conversation = Pop3Conversation()
    conversation.receive_server(GREETING)
    conversation.receive_client(b"AUTH FOO\r\nUSER bob\r\n")
    assert conversation.take_upstream_bytes() == b"AUTH FOO\r\n"
    conversation.receive_server(b"-ERR unsupported\r\n")
    events = conversation.receive_client(b"")
    [named] = [e for e in events if isinstance(e, UserNamed)]
    assert named.user == "bob"
    refusal = b"-ERR [AUTH] this user may not log in from your network\r\n"
    local = conversation.answer_locally(named.command, refusal, reason="user_network")
    assert [e.reason for e in local if isinstance(e, LocalReply)] == ["user_network"]
    assert conversation.take_upstream_bytes() == b""
    assert conversation.take_client_bytes().endswith(refusal)


# ---------------------------------------------------------------------------- properties

#: How servers read a line (its LF included), as (verb, arguments) in bytes, verb upper-cased
#: their way. Each is what real code does:
Reading = tuple[bytes, list[bytes]]


def _text(line: bytes) -> bytes:
    """The line without its LF and a CR before it (i_stream_next_line, fgets + chomp)."""
    text = line.split(b"\n", 1)[0]
    return text[:-1] if text.endswith(b"\r") else text


def dovecot_login(line: bytes) -> Reading:
    """Dovecot 2.3 pop3-login: the verb ends at SP, LF or NUL and skips CR; the rest of the
    line is one C string (ends at a NUL)."""
    text, verb, i = _text(line), b"", 0
    while i < len(text) and text[i] not in b" \0":
        if text[i] != ord("\r"):
            verb += text[i : i + 1]
        i += 1
    rest = text[i + 1 :] if text[i : i + 1] == b" " else b""
    return verb.upper(), [rest.split(b"\0")[0]]


def dovecot_mail(line: bytes) -> Reading:
    """Dovecot 2.3 pop3 (logged in): the line is a C string; ``strchr(line, ' ')`` cuts it."""
    verb, _space, rest = _text(line).split(b"\0")[0].partition(b" ")
    return verb.upper(), [rest]


def strtok(line: bytes) -> Reading:
    """A C server that splits a C string with ``strtok(line, " \\t\\r\\n")``."""
    words = [w for w in re.split(rb"[ \t\r\n]+", line.split(b"\0")[0]) if w]
    return (words[0].upper(), words[1:]) if words else (b"", [])


def python_split(line: bytes) -> Reading:
    """A Python server: ``text.split()`` (Unicode white space), ``str.upper`` (Unicode)."""
    words = _text(line).decode("utf-8", "replace").split()
    return (words[0].upper().encode(), [w.encode() for w in words[1:]]) if words else (b"", [])


def python_partition(line: bytes) -> Reading:
    """As ``pop3proxy/demo_upstream.py``: ``partition(" ")``, then ``rest.split()``."""
    word, _space, rest = _text(line).decode("utf-8", "replace").partition(" ")
    return word.upper().encode(), [w.encode() for w in rest.split()]


SERVERS: list[Callable[[bytes], Reading]] = [
    dovecot_login,
    dovecot_mail,
    strtok,
    python_split,
    python_partition,
]
_KNOWN = {verb.encode() for verb in KNOWN_VERBS}

_VERBS = [
    *sorted(_KNOWN),
    b"user",
    b"uSeR",
    b"pass",
    b"auth",
    "u\u017fer".encode(),
    b"US\rER",
    b"XYZZY",
    b"",
    b" ",
]
_SEPARATORS = [b" ", b" ", b" ", b"  ", b"\t", b"\x00", b"\r", b"\x0b", b"\x0c", b"\x1c"]
_SEPARATORS += [b"\xc2\xa0", b"\xc2\x85", b"\xe2\x80\xa8", b"\xe3\x80\x80", b"\xe2\x80\x8b"]
_WORDS = [b"alice", b"ALICE", b"bob", b"1", b"10", SECRET.encode(), b"PLAIN", b"LOGIN"]
_WORDS += [PLAIN, PLAIN[:8], PLAIN[8:], b"=", b"*", "müller".encode(), b"caf\xe9", DIGEST, b""]
_ENDINGS = [b"\r\n", b"\r\n", b"\n", b"\r\r\n"]


@st.composite
def command_lines(draw: st.DrawFn) -> bytes:
    """One line (one LF, at its end): mostly verb, separators and words; sometimes raw bytes."""
    if draw(st.integers(0, 4)) == 0:
        body = draw(st.binary(max_size=40))
    else:
        parts = [draw(st.sampled_from(_VERBS))]
        for _ in range(draw(st.integers(0, 3))):
            parts += [draw(st.sampled_from(_SEPARATORS)), draw(st.sampled_from(_WORDS))]
        body = b"".join(parts)
        if draw(st.integers(0, 3)) == 0:  # one octet of any value, anywhere
            at = draw(st.integers(0, len(body)))
            body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at:]
    return body.replace(b"\n", b"") + draw(st.sampled_from(_ENDINGS))


def read_one(line: bytes) -> tuple[list[Event], bytes, bytes]:
    """Feed ``line`` after a greeting: the events, what went upstream, what the client got."""
    conversation = Pop3Conversation(local_replies={})
    conversation.receive_server(GREETING)
    conversation.take_client_bytes()
    events = conversation.receive_client(line)
    return events, conversation.take_upstream_bytes(), conversation.take_client_bytes()


@FUZZ
@given(command_lines())
def test_a_line_is_forwarded_exactly_or_refused_whole(line: bytes) -> None:
    events, upstream, to_client = read_one(line)
    refused = [e for e in events if isinstance(e, LocalReply)]
    if refused:
        [local] = refused
        assert local.reason in REFUSALS
        assert upstream == b""
        assert to_client == REFUSALS[local.reason]
        assert not any(isinstance(e, UserNamed | SaslStarted) for e in events)
    else:
        assert upstream == line
        assert to_client == b""
        body = _text(line)
        assert not any(octet < 0x20 or octet == 0x7F for octet in body)


@FUZZ
@given(command_lines())
def test_every_server_reads_a_forwarded_line_as_the_engine_does(line: bytes) -> None:
    events, upstream, _to_client = read_one(line)
    if not upstream:
        return  # refused: no server reads it
    [command] = [e for e in events if isinstance(e, Command)]
    named = [e.user for e in events if isinstance(e, UserNamed) and e.user is not None]
    for server in SERVERS:
        verb, args = server(line)
        # Wherever a server sees a verb the engine knows, the engine sees the same one.
        if verb in _KNOWN:
            assert command.verb == verb.decode(), (server.__name__, verb)
        # The user a policy checks is the one every server takes from USER or APOP.
        if command.verb == "USER" and named:
            assert args == [named[0].encode()], server.__name__
        if command.verb == "APOP" and named:
            assert args[0].split(b" ")[0] == named[0].encode(), server.__name__
    if command.verb == "AUTH" and command.args:
        # Dovecot skips white space in an initial response: none is left to skip.
        _verb, [rest] = dovecot_login(line)
        mechanism, _space, initial = rest.partition(b" ")
        assert mechanism.upper().decode() == str(command.args[0]).upper()
        shown_initial = revealed(command.args[1:])
        assert shown_initial == ([re.sub(rb"\s", b"", initial).decode()] if initial else [])


@FUZZ
@given(command_lines())
def test_the_shown_arguments_are_the_servers_words(line: bytes) -> None:
    events, upstream, _to_client = read_one(line)
    if not upstream:
        return
    [command] = [e for e in events if isinstance(e, Command)]
    _verb, [rest] = dovecot_mail(line)
    if command.verb in {"LIST", "UIDL", "RETR", "DELE", "TOP", "LANG", "XTND"} and rest:
        # An SP-splitting server's words; what the log may not show is hidden, not dropped.
        assert revealed(command.args) == [w.decode("utf-8", "replace") for w in rest.split(b" ")]
    if command.verb in {"LIST", "UIDL", "RETR", "DELE", "TOP"}:
        assert all(isinstance(a, Secret) or a.isdigit() or not a for a in command.args)
    assert all(isinstance(a, Secret) or a.isprintable() for a in command.args)


def test_status_of_a_refusal() -> None:
    events, _upstream, _to_client = read_one(b"USER alice\x00\r\n")
    [local] = [e for e in events if isinstance(e, LocalReply)]
    assert local.status == Status(
        ok=False,
        code="SYS/PERM",
        text="a command line may not contain control characters (NUL, TAB, a CR before its "
        "end...; RFC 1939 section 3)",
    )


def test_remote_protocol_error_for_a_sasl_line_is_log_safe() -> None:
    conversation = Pop3Conversation()
    conversation.receive_server(GREETING)
    conversation.receive_client(b"AUTH LOGIN\r\n")
    conversation.receive_server(b"+ VXNlcm5hbWU6\r\n")
    with pytest.raises(RemoteProtocolError) as raised:
        conversation.receive_client(LOGIN_NAME + b"\x00" + SECRET.encode() + b"\r\n")
    assert SECRET not in str(raised.value)
    assert SECRET not in raised.value.reason
