"""The proxy as a real subprocess (``python -m pop3proxy serve``), with its JSON log at hand.

All of the child's output (stdout and stderr) goes to one file, so tests can both read the
structured events and grep everything it ever wrote (the no-credential-leak tests do).

Finding a test's own session in the log of a proxy that many tests share: client ports come
back (the kernel hands them out again), so a port alone does not name a session.
:meth:`ProxyProcess.session_id_for` matches the client's whole address, looks only at the
sessions opened since a mark (:meth:`ProxyProcess.mark`; by default the start of the current
test, see :func:`mark_every_log`) and fails when two sessions match instead of picking one. A
client from an address of its own (``tests.peers.clients.device_address``) is unique by
construction. ``pop3.command`` lines are delivered in batches: read them after
:meth:`ProxyProcess.wait_session_closed` (``session.closed`` delivers the batch) or wait for
the line itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

__all__ = ["ClientRef", "ProxyError", "ProxyProcess", "mark_every_log"]

Event = dict[str, Any]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_POLL = 0.02


class ProxyError(RuntimeError):
    """The proxy subprocess did not start, an awaited event did not come, or a lookup was
    ambiguous."""


class _HasSockName(Protocol):
    def getsockname(self) -> Any: ...


class _HasSock(Protocol):
    @property
    def sock(self) -> Any: ...


#: A client, as :meth:`ProxyProcess.session_id_for` takes it: its connected socket, an object
#: with a ``sock`` (``poplib.POP3``, the tests' client classes), its ``(host, port)``, or its
#: local port alone (any host).
ClientRef = _HasSockName | _HasSock | tuple[str, int] | int

#: Every started, not yet stopped proxy (for :func:`mark_every_log`).
_RUNNING: weakref.WeakSet[ProxyProcess] = weakref.WeakSet()


def mark_every_log() -> None:
    """A test begins: from now on each running proxy's ``session_id_for`` looks only at
    sessions opened by this test (an autouse fixture in ``tests/conftest.py`` calls it)."""
    for proxy in list(_RUNNING):
        proxy.test_mark = proxy.mark()


def _client_address(client: ClientRef) -> tuple[str | None, int]:
    """(host or None for any, port) of a client reference."""
    if isinstance(client, int):
        return None, client
    if isinstance(client, tuple):
        return str(client[0]), int(client[1])
    sock = client if hasattr(client, "getsockname") else client.sock
    if not isinstance(sock, socket.socket):
        raise TypeError(f"not a client socket: {client!r}")
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


class ProxyProcess:
    """``pop3proxy serve`` in front of an upstream, listening on an ephemeral loopback port.

    Args:
        log_path: where the child's stdout and stderr go (appended to).
        upstream_port: the POP3S port on ``upstream_host``.
        ca_file: the CA the upstream certificate must chain to.
        server_name: the name the upstream certificate must match.
        extra_args: appended to the command line (e.g. ``["--log-level", "debug"]``).
        env: extra environment variables. ``POP3PROXY_*`` and ``SSLKEYLOGFILE`` variables of
            the test process are not passed on, so only what the test says applies.
    """

    def __init__(
        self,
        log_path: Path,
        *,
        upstream_port: int,
        ca_file: Path | None,
        upstream_host: str = "127.0.0.1",
        server_name: str | None = "pop.test",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.log_path = Path(log_path)
        self.upstream_port = upstream_port
        self.ca_file = ca_file
        self.upstream_host = upstream_host
        self.server_name = server_name
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.listen = listen
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None
        self._log_offset = 0
        #: Where :meth:`session_id_for` starts looking by default (see :func:`mark_every_log`).
        self.test_mark = 0
        # The log parsed so far: (offset of the line, event) and where the next line starts.
        self._parsed: list[tuple[int, Event]] = []
        self._parsed_to = 0
        self._parse_lock = threading.Lock()  # tests read the log from worker threads too

    # -- lifecycle -------------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "pop3proxy",
            "serve",
            "--listen",
            self.listen,
            "--upstream",
            f"{self.upstream_host}:{self.upstream_port}",
            "--log-format",
            "json",
            # Many proxies run at once in the suite: no fixed admin port, no shared inventory
            # file under the user's data directory. Tests that need them pass their own
            # (later flags win).
            "--admin",
            "off",
            "--state-dir",
            ":memory:",
        ]
        if self.ca_file is not None:
            cmd += ["--upstream-ca-file", str(self.ca_file)]
        if self.server_name is not None:
            cmd += ["--upstream-server-name", self.server_name]
        return cmd + self.extra_args

    def _environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("POP3PROXY_") and key != "SSLKEYLOGFILE"
        }
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 15.0) -> None:
        """Start the proxy and wait (at most ``timeout`` s) for its ``listener.started`` line."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self._parse_lock:
            self._parsed, self._parsed_to = [], self._log_offset
        self.test_mark = self._log_offset
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            cwd=_REPO_ROOT,  # ``-m pop3proxy`` finds this checkout first
        )
        _RUNNING.add(self)
        try:
            event = self.wait_for_event("listener.started", timeout=timeout)
            address = str(event["address"])
            self._port = int(address.rpartition(":")[2])
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT, then SIGKILL after ``timeout`` s; returns the exit status (None if not run)."""
        proc, self._proc = self._proc, None
        _RUNNING.discard(self)
        status: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            status = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return status

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` (SIGTERM to drain, SIGHUP to reload) to the running proxy."""
        if self._proc is None:
            raise ProxyError("the proxy has not started")
        self._proc.send_signal(signum)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the proxy to exit by itself; its exit status."""
        if self._proc is None:
            raise ProxyError("the proxy has not started")
        return self._proc.wait(timeout=timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int:
        """The proxy process id (for /proc sampling)."""
        if self._proc is None:
            raise ProxyError("the proxy has not started")
        return self._proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise ProxyError("the proxy has not started")
        return self._port

    # -- output ------------------------------------------------------------------------------

    def log_bytes(self) -> bytes:
        """Everything the child wrote (stdout and stderr) since `start()`, as raw bytes."""
        if not self.log_path.exists():
            return b""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read()

    def log_text(self) -> str:
        return self.log_bytes().decode("utf-8", "replace")

    def mark(self) -> int:
        """A place in the log: now. Pass it as ``since`` to look only at what comes after."""
        return self.log_path.stat().st_size if self.log_path.exists() else self._log_offset

    def _read_events(self) -> list[tuple[int, Event]]:
        """Parse the complete lines written since the last call; all parsed so far."""
        with self._parse_lock:
            if not self.log_path.exists():
                return list(self._parsed)
            with self.log_path.open("rb") as f:
                f.seek(self._parsed_to)
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
            offset = self._parsed_to
            for raw in data[:end].splitlines(keepends=True):
                line = raw.strip()
                if line.startswith(b"{"):
                    try:
                        value = json.loads(line.decode("utf-8", "replace"))
                    except ValueError:
                        value = None
                    if isinstance(value, dict):
                        self._parsed.append((offset, value))
                offset += len(raw)
            self._parsed_to += end
            return list(self._parsed)

    def events(self, since: int | None = None) -> list[Event]:
        """The JSON objects among the output lines, in order (other lines are skipped).

        Only complete lines; with ``since`` (a :meth:`mark`), only the lines begun after it.
        """
        start = self._log_offset if since is None else since
        return [event for offset, event in self._read_events() if offset >= start]

    def find_events(
        self,
        name: str,
        predicate: Callable[[Event], bool] | None = None,
        *,
        since: int | None = None,
    ) -> list[Event]:
        return [
            e
            for e in self.events(since)
            if e.get("event") == name and (predicate is None or predicate(e))
        ]

    def wait_for_event(
        self,
        name: str,
        predicate: Callable[[Event], bool] | None = None,
        timeout: float = 10.0,
        *,
        since: int | None = None,
    ) -> Event:
        """The first event called ``name`` (matching ``predicate``, logged after ``since``);
        waits up to ``timeout`` s."""
        matches = self._wait_for(
            name, lambda: self.find_events(name, predicate, since=since), timeout
        )
        return matches[0]

    def _wait_for(self, what: str, find: Callable[[], list[Event]], timeout: float) -> list[Event]:
        """Poll ``find`` until it finds something, the proxy exits or ``timeout`` s pass."""
        deadline = time.monotonic() + timeout
        while True:
            found = find()
            if found:
                return found
            proc = self._proc
            if proc is None or proc.poll() is not None:
                # One last look: the line may have landed just before the exit.
                found = find()
                if found:
                    return found
                status = None if proc is None else proc.returncode
                raise ProxyError(
                    f"the proxy is not running (exit status {status}) and logged no {what!r} "
                    f"event; command {self.command()}; output:\n{self.log_text()[-4000:]}"
                )
            if time.monotonic() >= deadline:
                raise ProxyError(
                    f"no {what!r} event within {timeout} s; output:\n{self.log_text()[-4000:]}"
                )
            time.sleep(_POLL)

    # -- sessions ------------------------------------------------------------------------------

    def session_id_for(
        self, client: ClientRef, timeout: float = 10.0, *, since: int | None = None
    ) -> str:
        """The ``session_id`` of the session ``client`` opened (waits for its ``session.opened``).

        Only sessions opened after ``since`` count (default: since the current test began,
        :attr:`test_mark`). Two matching sessions are an error, not a guess: give the client
        an address of its own (``tests.peers.clients.device_address``) or a later mark.
        """
        host, port = _client_address(client)
        start = self.test_mark if since is None else since

        # As the proxy writes it in session.opened (IPv6 in brackets).
        address = None if host is None else f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

        def same_client(event: Event) -> bool:
            client = str(event.get("client", ""))
            if address is not None:
                return client == address
            return client.rpartition(":")[2] == str(port)

        opened = self._wait_for(
            "session.opened",
            lambda: self.find_events("session.opened", same_client, since=start),
            timeout,
        )
        if len(opened) > 1:
            raise ProxyError(
                f"{len(opened)} sessions of client {host or '*'}:{port} since offset {start}: "
                f"{[e.get('session_id') for e in opened]}; which one is the test's is unknowable"
            )
        session_id = str(opened[0]["session_id"])
        twins = self.find_events("session.opened", lambda e: e.get("session_id") == session_id)
        if len(twins) > 1:  # 32 random bits: rare, but session_events would mix them
            raise ProxyError(f"session id {session_id} was opened {len(twins)} times")
        return session_id

    def sessions_opened(self, since: int) -> list[str]:
        """The ids of the sessions opened after mark ``since``, in order."""
        return [str(e["session_id"]) for e in self.find_events("session.opened", since=since)]

    def session_events(self, session_id: str) -> list[Event]:
        return [e for e in self.events() if e.get("session_id") == session_id]

    def wait_session_closed(self, session_id: str, timeout: float = 10.0) -> Event:
        return self.wait_for_event(
            "session.closed", lambda e: e.get("session_id") == session_id, timeout=timeout
        )
