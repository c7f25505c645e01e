"""Coverage-guided fuzz target for the sans-IO POP3 engine (atheris / libFuzzer).

Run outside CI::

    pip install atheris
    python fuzz/engine_fuzz.py -max_total_time=60            # or -runs=N, -jobs=N
    python fuzz/engine_fuzz.py fuzz/corpus -max_total_time=600  # keep a corpus

The input drives a :class:`~pop3proxy.pop3.Pop3Conversation` from both sides: each round picks a
side and feeds it a slice of the input, sometimes a canned POP3 line so that the fuzzer gets
past the greeting and into the SASL and body states quickly. Only ``RemoteProtocolError`` is
expected; after it the engine must refuse input with ``LocalProtocolError``. Anything else,
a relayed octet that was never received, a line forwarded upstream with a control octet in
it (NUL, TAB, a bare CR...: refused lines are answered by the proxy, never forwarded), or a
credential in an event's ``repr`` is a crash.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from pop3proxy.pop3 import (
        REFUSALS,
        STLS_REFUSAL,
        Event,
        LocalProtocolError,
        Pop3Conversation,
        RemoteProtocolError,
    )

#: The credentials the canned lines carry; none may show in an event.
_CREDENTIALS = ("s3cr3t", "AGFsaWNlAHMzY3IzdA==")
_CLIENT_LINES = (
    b"USER alice\r\n",
    b"USER alice\x00\r\n",
    b"USER alice\rPASS s3cr3t\r\n",
    b"PASS s3cr3t\r\n",
    b"APOP alice s3cr3t\r\n",
    b"AUTH PLAIN AGFsaWNlAHMzY3IzdA==\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH FOO\r\n",
    b"AGFsaWNlAHMzY3IzdA==\r\n",
    b"AUTH\r\n",
    b"*\r\n",
    b"CAPA\r\n",
    b"STLS\r\n",
    b"LIST\r\n",
    b"UIDL 1\r\n",
    b"RETR 1\r\n",
    b"TOP 1 0\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
)
_SERVER_LINES = (
    b"+OK ready <1.2@x>\r\n",
    b"+OK\r\n",
    b"-ERR [AUTH] no\r\n",
    b"+ \r\n",
    b".\r\n",
    b"..x\r\n",
    b"STLS\r\n",
    b"\r\n.\r\n",
    b"SASL PLAIN\r\n",
)
_MAX_ROUNDS = 64


def _lines(data: bytes) -> list[bytes]:
    """Lines as POP3 cuts them: at LF only."""
    parts = [line + b"\n" for line in data.split(b"\n")]
    parts[-1] = parts[-1][:-1]
    return parts if parts[-1] else parts[:-1]


def _is_subsequence(small: bytes, big: bytes) -> bool:
    it = iter(big)
    return all(byte in it for byte in small)


class _Harness:
    """One conversation fed from one fuzz input, with what went in and came out."""

    def __init__(self) -> None:
        self.conversation = Pop3Conversation()
        self.client_in = bytearray()
        self.server_in = bytearray()
        self.upstream = bytearray()
        self.downstream = bytearray()
        self.events: list[Event] = []

    def feed(self, client_side: bool, chunk: bytes) -> bool:
        """Feed one chunk; return False once the engine reported a protocol error."""
        if client_side:
            self.client_in += chunk
            receive = self.conversation.receive_client
        else:
            self.server_in += chunk
            receive = self.conversation.receive_server
        conversation = self.conversation
        try:
            self.events += receive(chunk)
            # As a relay does: lines held back are fed once replies have made room.
            while conversation.client_backlog and not conversation.client_paused:
                self.events += conversation.receive_client(b"")
        except RemoteProtocolError as exc:
            if exc.side not in ("client", "server") or not exc.reply_hint.startswith(b"-ERR"):
                raise AssertionError("malformed RemoteProtocolError") from exc
            return False
        finally:
            self.upstream += self.conversation.take_upstream_bytes()
            self.downstream += self.conversation.take_client_bytes()
        return True

    def check_refuses_input(self) -> None:
        for receive in (self.conversation.receive_client, self.conversation.receive_server):
            try:
                receive(b"NOOP\r\n")
            except LocalProtocolError:
                continue
            raise AssertionError("engine accepted input after a protocol error")

    def check_relay(self) -> None:
        if not _is_subsequence(bytes(self.upstream), bytes(self.client_in)):
            raise AssertionError("upstream octets are not a copy of client octets")
        received = iter(_lines(bytes(self.client_in)))
        for line in _lines(bytes(self.upstream)):
            if line not in received:
                raise AssertionError("a forwarded line is not a whole client line")
            body = line.removesuffix(b"\n").removesuffix(b"\r")
            if any(octet < 0x20 or octet == 0x7F for octet in body):
                raise AssertionError("a line with a control octet was forwarded")
        downstream = bytes(self.downstream)
        for reply in (STLS_REFUSAL, *REFUSALS.values()):
            downstream = downstream.replace(reply, b"")
        if not _is_subsequence(downstream, bytes(self.server_in)):
            raise AssertionError("client-bound octets are not a copy of server octets")
        shown = "".join(repr(e) for e in self.events)
        if any(credential in shown for credential in _CREDENTIALS):
            raise AssertionError("a credential reached an event")


def _next_chunk(fdp: atheris.FuzzedDataProvider, client_side: bool, after: bytes) -> bytes:
    if fdp.ConsumeIntInRange(0, 3) != 0:
        return bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)))
    pool = _CLIENT_LINES if client_side else _SERVER_LINES
    line = pool[fdp.ConsumeIntInRange(0, len(pool) - 1)]
    # A canned line starts a line of its own: fuzz bytes glued in front of "AUTH PLAIN <ir>"
    # make an unknown verb whose arguments are rightly not secret.
    return line if not after or after.endswith(b"\n") else b"\r\n" + line


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    harness = _Harness()
    ok = True
    for _ in range(_MAX_ROUNDS):
        if fdp.remaining_bytes() == 0:
            break
        client_side = fdp.ConsumeBool()
        seen = harness.client_in if client_side else harness.server_in
        ok = harness.feed(client_side, _next_chunk(fdp, client_side, bytes(seen[-1:])))
        if not ok:
            harness.check_refuses_input()
            break
    harness.check_relay()
    harness.conversation.client_closed()
    harness.conversation.server_closed()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
