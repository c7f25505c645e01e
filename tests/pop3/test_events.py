"""Tests of the engine's value types: :class:`Secret`, events, statuses and errors."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from pop3proxy.pop3 import (
    BodyChunk,
    Command,
    LocalProtocolError,
    LoginFailed,
    ProtocolError,
    RemoteProtocolError,
    SaslResponse,
    Secret,
    Status,
    parse_status,
)

PASSWORD = "hunter2-secret"


def test_secret_never_prints() -> None:
    secret = Secret(PASSWORD)
    for shown in (
        str(secret),
        repr(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret:>20}",
        "%s" % secret,  # noqa: UP031
        "{}".format(secret),  # noqa: UP032
        repr([secret]),
        repr({"k": secret}),
    ):
        assert PASSWORD not in shown
        assert "***" in shown
    assert secret.reveal() == PASSWORD


def test_secret_equality_and_hash() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"
    assert hash(Secret("a")) == hash(Secret("a"))
    assert len({Secret("a"), Secret("a"), Secret("b")}) == 2


def test_secret_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(PASSWORD))
    with pytest.raises(TypeError):
        pickle.dumps(Command(1, "PASS", (Secret(PASSWORD),)))


def test_secret_has_no_instance_dict() -> None:
    # __slots__: vars() cannot dump the value by accident.
    with pytest.raises(TypeError):
        vars(Secret(PASSWORD))


def test_command_with_secret_repr_and_args() -> None:
    command = Command(2, "PASS", (Secret(PASSWORD),))
    assert PASSWORD not in repr(command)
    assert PASSWORD not in str(command)
    assert command.has_secret
    assert command.loggable_args() == ["***"]
    apop = Command(1, "APOP", ("mrose", Secret("c4c9334bac560ecc979e58001b3e22fb")))
    assert apop.loggable_args() == ["mrose", "***"]
    plain = Command(3, "RETR", ("1",))
    assert not plain.has_secret
    assert plain.loggable_args() == ["1"]
    assert Command(4, "NOOP").args == ()


def test_sasl_response_repr_hides_data() -> None:
    event = SaslResponse(Command(1, "AUTH", ("LOGIN",)), Secret(PASSWORD), cancelled=False)
    assert PASSWORD not in repr(event)
    assert PASSWORD not in str(event)


def test_body_chunk_repr_leaves_out_data() -> None:
    event = BodyChunk(Command(1, "RETR", ("1",)), b"Subject: private\r\n")
    assert b"private".decode() not in repr(event)
    assert event.data == b"Subject: private\r\n"


def test_events_are_frozen() -> None:
    event = LoginFailed(user="alice", mechanism="USER", status=Status(False, "AUTH", "no"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.user = "mallory"  # type: ignore[misc]
    assert copy.copy(event) == event


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"+OK\r\n", Status(True, None, "")),
        (b"+OK 2 320\r\n", Status(True, None, "2 320")),
        (b"+ok lower case\n", Status(True, None, "lower case")),
        (b"-ERR\r\n", Status(False, None, "")),
        (b"-err no\r\n", Status(False, None, "no")),
        (b"-ERR [SYS/TEMP] busy\r\n", Status(False, "SYS/TEMP", "busy")),
        (b"-ERR [AUTH] bad\r\n", Status(False, "AUTH", "bad")),
        (b"-ERR [IN-USE]\r\n", Status(False, "IN-USE", "")),
        (b"+OK [LOGIN-DELAY 900] ok\r\n", Status(True, "LOGIN-DELAY 900", "ok")),
        (b"-ERR [] empty code\r\n", Status(False, None, "[] empty code")),
        (b"-ERR [unterminated\r\n", Status(False, None, "[unterminated")),
        (b"-ERR caf\xc3\xa9 \xff\r\n", Status(False, None, "caf\u00e9 \ufffd")),
    ],
)
def test_parse_status(line: bytes, expected: Status) -> None:
    assert parse_status(line) == expected


@pytest.mark.parametrize(
    "line", [b"", b"\r\n", b"+ challenge\r\n", b"OK\r\n", b"-ER\r\n", b"*\r\n"]
)
def test_parse_status_rejects(line: bytes) -> None:
    assert parse_status(line) is None


def test_status_indicator() -> None:
    assert Status(True, None, "").indicator == "+OK"
    assert Status(False, None, "").indicator == "-ERR"


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError):
        ProtocolError("nope")
    local = LocalProtocolError("misuse")
    assert isinstance(local, ProtocolError)
    assert local.reason == "misuse"


def test_remote_protocol_error_fields() -> None:
    error = RemoteProtocolError("too long", side="client", reply_hint=b"-ERR too long\r\n")
    assert isinstance(error, ProtocolError)
    assert (error.reason, error.side, error.reply_hint) == (
        "too long",
        "client",
        b"-ERR too long\r\n",
    )
    assert str(error) == "too long"
