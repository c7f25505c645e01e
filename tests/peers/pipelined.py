"""Many parallel sessions that pipeline ``RETR`` and ``QUIT`` in one write, byte-compared.

The stress once reported to lose the last 21 octets of a pipelined batch ending in
``RETR <1 MiB>`` + ``QUIT`` under heavy parallel load (21 = the ``.`` line that ends the
RETR reply plus Dovecot's ``+OK Logging out.``). Each session here logs in, sends
``RETR 1\\r\\nQUIT\\r\\n`` in one write and reads to the end of the stream; a share of them
read slowly through a small receive buffer, so the proxy and the server behind it see
back-pressure while QUIT is already waiting. What a session read after its login must equal,
octet for octet, what the same commands get directly from Dovecot over POP3S one at a time
(:func:`reference_transcript`).

Used by ``tests/test_load.py`` (bounded, seconds) and ``bench/pipelined_stress.py`` (minutes).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field

import trio

__all__ = [
    "PIPELINED_BATCH",
    "Login",
    "Mismatch",
    "StressTally",
    "compare",
    "pipelined_session",
    "reference_transcript",
    "run_round",
]

PIPELINED_BATCH = b"RETR 1\r\nQUIT\r\n"
#: A slow reader: a small receive buffer, small reads, a pause after each.
SLOW_RCVBUF = 8 * 1024
SLOW_READ = 4 * 1024
SLOW_PAUSE = 0.002
FAST_READ = 64 * 1024
_MAX_TRANSCRIPT = 64 * 1024 * 1024
_MAX_LINE = 4096


@dataclass(frozen=True)
class Login:
    """A mailbox's credentials."""

    user: str
    password: str


class _Reader:
    """Lines from a trio stream, and then everything up to its end."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > _MAX_LINE:
                raise EOFError(f"no line end: {bytes(self.buffer[:80])!r}")
            chunk = await self.stream.receive_some(FAST_READ)
            if not chunk:
                raise EOFError(f"closed before a line end: {bytes(self.buffer)!r}")
            self.buffer += chunk
        line = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 2]
        return line

    async def until_terminator(self) -> bytes:
        """A multi-line reply's rest, through its ``CRLF.CRLF``, as on the wire."""
        while (end := self.buffer.find(b"\r\n.\r\n")) < 0:
            chunk = await self.stream.receive_some(FAST_READ)
            if not chunk:
                raise EOFError(f"closed in a multi-line reply after {len(self.buffer)} octets")
            self.buffer += chunk
        data = bytes(self.buffer[: end + 5])
        del self.buffer[: end + 5]
        return data

    async def to_the_end(self, *, slow: bool) -> bytes:
        data, self.buffer = self.buffer, bytearray()
        while len(data) <= _MAX_TRANSCRIPT:
            try:
                chunk = await self.stream.receive_some(SLOW_READ if slow else FAST_READ)
            except trio.BrokenResourceError as exc:  # a reset, or TLS without close_notify
                raise EOFError(f"broken after {len(data)} octets: {exc}") from None
            if not chunk:
                return bytes(data)
            data += chunk
            if slow:
                await trio.sleep(SLOW_PAUSE)
        raise EOFError(f"more than {_MAX_TRANSCRIPT} octets")


async def _connect(
    port: int, *, slow: bool, tls: ssl.SSLContext | None, server_name: str | None
) -> trio.abc.Stream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if slow:  # before connect: the window the peer may fill stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if tls is not None:
        stream = trio.SSLStream(stream, tls, server_hostname=server_name)
    return stream


async def _log_in(reader: _Reader, stream: trio.abc.Stream, login: Login) -> None:
    greeting = await reader.line()
    if not greeting.startswith(b"+OK"):
        raise EOFError(f"greeting {greeting!r}")
    for command in (f"USER {login.user}\r\n", f"PASS {login.password}\r\n"):
        await stream.send_all(command.encode())
        reply = await reader.line()
        if not reply.startswith(b"+OK"):
            raise EOFError(f"{command.split()[0]} answered {reply!r}")


async def pipelined_session(
    port: int,
    login: Login,
    *,
    slow: bool,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> bytes:
    """Log in, send :data:`PIPELINED_BATCH` in one write, return all octets read after PASS."""
    stream = await _connect(port, slow=slow, tls=tls, server_name=server_name)
    async with stream:
        reader = _Reader(stream)
        await _log_in(reader, stream, login)
        await stream.send_all(PIPELINED_BATCH)
        return await reader.to_the_end(slow=slow)


async def reference_transcript(
    port: int, login: Login, *, tls: ssl.SSLContext, server_name: str
) -> bytes:
    """The same commands straight to Dovecot over POP3S, one at a time: the expected octets."""
    stream = await _connect(port, slow=False, tls=tls, server_name=server_name)
    async with stream:
        reader = _Reader(stream)
        await _log_in(reader, stream, login)
        await stream.send_all(b"RETR 1\r\n")
        status = await reader.line()
        if not status.startswith(b"+OK"):
            raise EOFError(f"RETR answered {status!r}")
        body = await reader.until_terminator()
        await stream.send_all(b"QUIT\r\n")
        return status + body + await reader.to_the_end(slow=False)


@dataclass(frozen=True)
class Mismatch:
    """How one transcript differs from the expected one."""

    session: int
    slow: bool
    expected: int
    received: int
    common_prefix: int
    error: str | None = None

    def describe(self) -> str:
        what = self.error or (
            f"{self.received} octets instead of {self.expected}; the first "
            f"{self.common_prefix} agree"
            + (
                f", {self.expected - self.received} missing at the end"
                if self.is_truncation
                else ""
            )
        )
        return f"session {self.session} ({'slow' if self.slow else 'fast'} reader): {what}"

    @property
    def is_truncation(self) -> bool:
        return self.error is None and self.common_prefix == self.received < self.expected


def compare(session: int, slow: bool, expected: bytes, received: bytes) -> Mismatch | None:
    if received == expected:
        return None
    common = 0
    limit = min(len(expected), len(received))
    step = 1 << 16
    while common < limit and expected[common : common + step] == received[common : common + step]:
        common += step
    common = min(common, limit)
    while common < limit and expected[common] == received[common]:
        common += 1
    return Mismatch(session, slow, len(expected), len(received), common)


@dataclass
class StressTally:
    """What a run did: sessions, octets compared, and every mismatch."""

    sessions: int = 0
    slow_sessions: int = 0
    octets_compared: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)


async def run_round(
    tally: StressTally,
    port: int,
    logins: list[tuple[Login, bytes]],
    *,
    parallel: int,
    slow_every: int,
    session_timeout: float,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> None:
    """``parallel`` pipelined sessions at once (every ``slow_every``-th a slow reader), each
    compared with its login's expected transcript; tallies into ``tally``. Each session must
    end within ``session_timeout`` seconds (a stuck one counts as a mismatch)."""

    async def one(index: int) -> None:
        login, expected = logins[index % len(logins)]
        slow = slow_every > 0 and index % slow_every == 0
        number = tally.sessions + index
        try:
            with trio.fail_after(session_timeout):
                received = await pipelined_session(
                    port, login, slow=slow, tls=tls, server_name=server_name
                )
        except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            tally.mismatches.append(Mismatch(number, slow, len(expected), 0, 0, error))
            return
        tally.octets_compared += len(received)
        mismatch = compare(number, slow, expected, received)
        if mismatch is not None:
            tally.mismatches.append(mismatch)

    async with trio.open_nursery() as nursery:
        for index in range(parallel):
            nursery.start_soon(one, index)
    tally.sessions += parallel
    tally.slow_sessions += sum(1 for i in range(parallel) if slow_every and i % slow_every == 0)
