"""Back-pressure: a slow reader of a 50 MiB RETR costs the proxy bounded memory.

Dovecot sends the message at 90-100 MiB/s; the client here reads it at about 6 MiB/s through
a small receive buffer, so a proxy that read the upstream faster than the client drains
would have to hold tens of MiB. The proxy's resident set (``VmRSS`` from
``/proc/PID/status``) is sampled every 100 ms during the transfer; its growth over the value
just before ``RETR`` must stay under `RSS_GROWTH_BOUND`, and the message must arrive byte
for byte. The relay states its per-session bound as one client read plus one upstream batch
(a few hundred KiB) plus the engine's line buffers; the bound here leaves room for allocator
noise and is still far below the 50 MiB a whole-message buffer would take.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.dovecot import Dovecot, MailboxFactory, make_message
from tests.peers.proxy import ProxyProcess

KIB = 1024
MIB = 1024 * KIB
RSS_GROWTH_BOUND = 16 * MIB
#: The client's pace: 50 MiB in about 8-9 s.
READ_RATE = 6 * MIB
CLIENT_RCVBUF = 16 * KIB
READ_SIZE = 64 * KIB
SAMPLE_EVERY = 0.1
#: Hard bound on the transfer, whatever happens.
TRANSFER_LIMIT = 60.0

pytestmark = pytest.mark.slow


def vm_rss(pid: int) -> int:
    """The resident set size of ``pid`` in bytes (``VmRSS`` in ``/proc/PID/status``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS every `SAMPLE_EVERY` seconds in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + TRANSFER_LIMIT + 10
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.samples.append((time.monotonic(), vm_rss(self.pid)))
            self._stop.wait(SAMPLE_EVERY)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak(self) -> int:
        return max(rss for _, rss in self.samples)


def undot(body: bytes) -> bytes:
    """A RETR body (up to and excluding the ``.`` line) with dot-stuffing undone."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class SlowClient:
    """A POP3 client with a small receive buffer that reads at `READ_RATE` at most."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect, so that the window the proxy sees is small from the start.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        self.sock.settimeout(20.0)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def line(self) -> bytes:
        for _ in range(1000):
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 2])
                del self.buffer[: end + 2]
                return line
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError(bytes(self.buffer[-200:]))
            self.buffer += chunk
        raise AssertionError("no line in 1000 reads")

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.line()

    def slow_body(self) -> tuple[bytes, float]:
        """The rest of a multi-line reply, read slowly; returns it and the time taken."""
        started = time.monotonic()
        data = self.buffer
        self.buffer = bytearray()
        while not data.endswith(b"\r\n.\r\n"):
            elapsed = time.monotonic() - started
            assert elapsed < TRANSFER_LIMIT, f"only {len(data)} octets in {elapsed:.1f} s"
            ahead = len(data) / READ_RATE - elapsed
            if ahead > 0:
                time.sleep(ahead)
            chunk = self.sock.recv(READ_SIZE)
            if not chunk:
                raise EOFError(f"closed after {len(data)} octets")
            data += chunk
        return bytes(data[: -len(b".\r\n")]), time.monotonic() - started


@pytest.fixture
def memory_proxy(dovecot: Dovecot, tmp_path: Path) -> Iterator[ProxyProcess]:
    """A proxy of its own, so that no other test's sessions change its memory."""
    process = ProxyProcess(
        tmp_path / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def proxy_pid(proxy: ProxyProcess) -> int:
    return proxy.pid


def test_slow_reader_of_50_mib_keeps_proxy_memory_bounded(
    memory_proxy: ProxyProcess, mailbox: MailboxFactory, big_message: bytes
) -> None:
    small = make_message(64 * KIB, subject="memory warm-up")
    box = mailbox([big_message, small])
    pid = proxy_pid(memory_proxy)
    client = SlowClient(memory_proxy.port)
    try:
        assert client.line().startswith(b"+OK")
        assert client.command(b"USER " + box.user.encode()).startswith(b"+OK")
        assert client.command(b"PASS " + box.password.encode()).startswith(b"+OK")
        # Warm the code paths (TLS, engine, logging) so the baseline is a steady state.
        assert client.command(b"RETR 2").startswith(b"+OK")
        warm, _ = client.slow_body()
        assert undot(warm) == small
        baseline = vm_rss(pid)
        with RssSampler(pid) as sampler:
            status = client.command(b"RETR 1")
            assert status.startswith(b"+OK"), status
            body, seconds = client.slow_body()
        assert client.command(b"QUIT").startswith(b"+OK")
    finally:
        client.close()

    assert undot(body) == big_message, "the message did not arrive byte for byte"
    # The pace really was slow: Dovecot alone would deliver 50 MiB in well under a second.
    assert seconds > len(big_message) / READ_RATE * 0.8, seconds
    assert len(sampler.samples) >= seconds / SAMPLE_EVERY / 2, len(sampler.samples)
    growth = sampler.peak - baseline
    assert growth < RSS_GROWTH_BOUND, (
        f"proxy RSS grew by {growth / MIB:.1f} MiB (from {baseline / MIB:.1f} MiB) while a "
        f"client read {len(big_message) / MIB:.0f} MiB in {seconds:.1f} s; bound "
        f"{RSS_GROWTH_BOUND / MIB:.0f} MiB"
    )
    print(
        f"proxy RSS: baseline {baseline / MIB:.1f} MiB, peak {sampler.peak / MIB:.1f} MiB, "
        f"growth {growth / KIB:.0f} KiB over {len(sampler.samples)} samples in {seconds:.1f} s"
    )
