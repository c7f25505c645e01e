"""Transcript helpers for the sans-IO POP3 engine, in the spirit of h11's ``ConnectionPair``.

A transcript is a list of steps ``("C", b"...")`` (the client sends) and ``("S", b"...")``
(the server sends). :func:`run` feeds the steps to a :class:`Pop3Conversation` and records
every event and every octet the engine forwards, per direction and per step.

:func:`run_split` is the hostile-chunking check: it re-runs a transcript with its octets cut
differently and asserts that nothing observable changes. POP3 has no framing, so every
boundary matters: ``\\r`` | ``\\n`` inside a line, ``.`` | ``\\r\\n`` inside a body terminator,
a status line cut from its body. Splitting at every byte boundary covers them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from pop3proxy.pop3 import (
    BodyChunk,
    Command,
    Event,
    Pop3Conversation,
    RemoteProtocolError,
    SaslResponse,
    SaslStarted,
    State,
    UserNamed,
)

__all__ = [
    "SPLITS",
    "Run",
    "Side",
    "Split",
    "Step",
    "StepResult",
    "Transcript",
    "client_events",
    "client_input",
    "lock_step_to_pipelined",
    "merge_body_chunks",
    "reply_events",
    "run",
    "run_split",
    "server_input",
    "variants",
]

Side = Literal["C", "S"]
Step = tuple[Side, bytes]
Transcript = Sequence[Step]
#: How :func:`run_split` re-cuts a transcript:
#:
#: * ``"boundaries"``: one step at a time is cut in two, at every byte boundary;
#: * ``"bytes"``: every step is fed one octet at a time;
#: * ``"pipelined"``: consecutive steps of the same side are joined into one read.
Split = Literal["boundaries", "bytes", "pipelined"]
SPLITS: tuple[Split, ...] = ("boundaries", "bytes", "pipelined")

Factory = Callable[[], Pop3Conversation]
E = TypeVar("E", bound=Event)


@dataclass
class StepResult:
    """What one step produced: its events and the octets forwarded right after it."""

    side: Side
    events: list[Event] = field(default_factory=list)
    to_server: bytes = b""
    to_client: bytes = b""


@dataclass
class Run:
    """Everything observable from feeding one transcript."""

    conversation: Pop3Conversation
    steps: list[StepResult]
    #: Set when the engine raised; the run stops at that step.
    error: RemoteProtocolError | None = None

    @property
    def all_events(self) -> list[Event]:
        return [event for step in self.steps for event in step.events]

    @property
    def events(self) -> list[Event]:
        """The events, without :class:`UserNamed` (policy hooks; see ``of_type``)."""
        return [event for event in self.all_events if not isinstance(event, UserNamed)]

    @property
    def upstream(self) -> bytes:
        """Every octet forwarded to the server."""
        return b"".join(step.to_server for step in self.steps)

    @property
    def downstream(self) -> bytes:
        """Every octet forwarded to the client."""
        return b"".join(step.to_client for step in self.steps)

    def of_type(self, kind: type[E]) -> list[E]:
        return [event for event in self.all_events if isinstance(event, kind)]

    @property
    def state(self) -> State:
        return self.conversation.state


def client_input(transcript: Transcript) -> bytes:
    """All octets the client sent."""
    return b"".join(data for side, data in transcript if side == "C")


def server_input(transcript: Transcript) -> bytes:
    """All octets the server sent."""
    return b"".join(data for side, data in transcript if side == "S")


def run(
    transcript: Transcript,
    *,
    factory: Factory = Pop3Conversation,
    pieces: Callable[[int, bytes], Sequence[bytes]] | None = None,
) -> Run:
    """Feed ``transcript`` to a fresh conversation.

    Args:
        transcript: the steps.
        factory: makes the conversation (to pass non-default options).
        pieces: cuts step number ``i`` into the reads fed one by one; default: one read.
    """
    conversation = factory()
    results: list[StepResult] = []
    for index, (side, data) in enumerate(transcript):
        result = StepResult(side)
        results.append(result)
        receive = conversation.receive_client if side == "C" else conversation.receive_server
        reads = [data] if pieces is None else pieces(index, data)
        try:
            for read in reads:
                result.events += receive(read)
                # As a relay does: client lines held back (a full pipeline, a pipelined QUIT)
                # are fed once replies have made room.
                while conversation.client_backlog and not conversation.client_paused:
                    result.events += conversation.receive_client(b"")
                # Take after every read, as a relay would: the queues must not depend on it.
                result.to_server += conversation.take_upstream_bytes()
                result.to_client += conversation.take_client_bytes()
        except RemoteProtocolError as exc:
            result.to_server += conversation.take_upstream_bytes()
            result.to_client += conversation.take_client_bytes()
            return Run(conversation, results, exc)
    return Run(conversation, results)


def merge_body_chunks(events: Sequence[Event]) -> list[Event]:
    """Join adjacent :class:`BodyChunk` events of one command: their cut follows the reads."""
    merged: list[Event] = []
    for event in events:
        previous = merged[-1] if merged else None
        if (
            isinstance(event, BodyChunk)
            and isinstance(previous, BodyChunk)
            and previous.command == event.command
        ):
            merged[-1] = BodyChunk(event.command, previous.data + event.data)
        else:
            merged.append(event)
    return merged


def _pipelined(transcript: Transcript) -> list[Step]:
    joined: list[Step] = []
    for side, data in transcript:
        if joined and joined[-1][0] == side:
            joined[-1] = (side, joined[-1][1] + data)
        else:
            joined.append((side, data))
    return joined


def _cut_one(target: int, at: int) -> Callable[[int, bytes], Sequence[bytes]]:
    def pieces(index: int, data: bytes) -> Sequence[bytes]:
        return [data[:at], data[at:]] if index == target else [data]

    return pieces


def _bytewise(_index: int, data: bytes) -> Sequence[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def variants(
    transcript: Transcript, split: Split
) -> Iterator[tuple[str, Transcript, Callable[[int, bytes], Sequence[bytes]] | None]]:
    """The re-cut forms of ``transcript`` for one split mode, each with a label for failures."""
    if split == "boundaries":
        for index, (_side, data) in enumerate(transcript):
            for at in range(1, len(data)):
                label = f"step {index} cut at {at}: {data[:at]!r} | {data[at:]!r}"
                yield label, transcript, _cut_one(index, at)
    elif split == "bytes":
        yield "one octet per read", transcript, _bytewise
    else:
        yield "consecutive same-side steps joined", _pipelined(transcript), None


def _error_key(error: RemoteProtocolError | None) -> tuple[str, str, bytes] | None:
    if error is None:
        return None
    return (error.reason, error.side, error.reply_hint)


def run_split(transcript: Transcript, split: Split, *, factory: Factory = Pop3Conversation) -> Run:
    """Run ``transcript`` whole, then re-cut as ``split`` says, and assert nothing changed.

    Compared: the event sequence (adjacent body chunks merged), the octets forwarded in each
    direction, the final state and user, and the protocol error if one was raised. When the
    transcript ends in an error only the error is compared, since events already completed in
    the read that raised are lost with the exception.

    Returns:
        The unsplit run, for the test's own assertions.
    """
    reference = run(transcript, factory=factory)
    expected_events = merge_body_chunks(reference.all_events)
    for label, form, pieces in variants(transcript, split):
        other = run(form, factory=factory, pieces=pieces)
        assert _error_key(other.error) == _error_key(reference.error), label
        if reference.error is not None:
            continue
        assert merge_body_chunks(other.all_events) == expected_events, label
        assert other.upstream == reference.upstream, label
        assert other.downstream == reference.downstream, label
        assert other.state is reference.state, label
        assert other.conversation.user == reference.conversation.user, label
        assert other.conversation.pending == reference.conversation.pending, label
    return reference


#: Events caused by client octets; every other event is caused by a reply (or the local answer).
_CLIENT_EVENTS = (Command, SaslStarted, SaslResponse, UserNamed)


def client_events(events: Sequence[Event]) -> list[Event]:
    """The events the client's octets produced (commands and SASL lines)."""
    return [e for e in events if isinstance(e, _CLIENT_EVENTS)]


def reply_events(events: Sequence[Event]) -> list[Event]:
    """The events the replies produced, bodies merged."""
    return merge_body_chunks([e for e in events if not isinstance(e, _CLIENT_EVENTS)])


def lock_step_to_pipelined(transcript: Transcript) -> list[Step]:
    """What a pipelining client does: send every command at once, before any reply arrives.

    The server's replies then come in one read, except the reply to a QUIT and what follows:
    the engine holds a pipelined QUIT until every earlier reply is complete, so a server
    cannot answer it any sooner.
    """
    steps: list[Step] = [("C", client_input(transcript))]
    quits = [i for i, (side, data) in enumerate(transcript) if side == "C" and _is_quit(data)]
    cut = quits[-1] if quits else len(transcript)
    for part in (transcript[:cut], transcript[cut:]):
        if server_input(part):
            steps.append(("S", server_input(part)))
    return steps


def _is_quit(line: bytes) -> bool:
    return line[:4].upper() == b"QUIT" and line[4:5] in (b"\r", b"\n", b" ")
