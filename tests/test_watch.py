"""``pop3proxy watch`` as a user runs it: a subprocess following a real proxy's feed, printing a
session a test runs through the proxy, reconnecting when the proxy restarts, and exiting with
status 0 on Ctrl-C (SIGINT).
"""

from __future__ import annotations

import json
import os
import poplib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from pop3proxy.watch import format_event, json_line
from tests.peers.dovecot import Dovecot, Mailbox, MailboxFactory
from tests.peers.proxy import ProxyProcess
from tests.test_admin import REPO_ROOT, AdminProxy, start_admin_proxy

TIMEOUT = 15.0


class WatchProcess:
    """``python -m pop3proxy watch --admin ENDPOINT`` with its output collected line by line."""

    def __init__(self, endpoint: str, env: dict[str, str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")} | (env or {})
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pop3proxy", "watch", "--admin", endpoint],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._lock = threading.Lock()
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._pipes = (self.proc.stdout, self.proc.stderr)
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            with self._lock:
                lines.append(line.rstrip("\n"))

    def wait_for(
        self, lines: list[str], predicate: Callable[[str], bool], what: str, start: int = 0
    ) -> int:
        """Index of the first line (from ``start``) matching ``predicate``; fails after a while."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with self._lock:
                for index in range(start, len(lines)):
                    if predicate(lines[index]):
                        return index
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(
            f"watch printed no {what} (exit status {self.proc.poll()});\n"
            f"stdout: {self.out}\nstderr: {self.err}"
        )

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT, and the exit status."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            self.stop()

    def stop(self) -> None:
        """Kill it if still running; collect the rest of its output; close the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        for reader in self._readers:
            reader.join(timeout=5)
        for pipe in self._pipes:
            pipe.close()


@pytest.fixture
def watch_process() -> Iterator[Callable[..., WatchProcess]]:
    started: list[WatchProcess] = []

    def start(endpoint: str, env: dict[str, str] | None = None) -> WatchProcess:
        process = WatchProcess(endpoint, env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def run_session(proxy: ProxyProcess, box: Mailbox) -> str:
    """A short poplib session through ``proxy``; returns its session id."""
    pop = poplib.POP3("127.0.0.1", proxy.port, timeout=TIMEOUT)
    session_id = proxy.session_id_for(pop.sock.getsockname()[1])
    pop.user(box.user)
    pop.pass_(box.password)
    pop.stat()
    pop.quit()
    return session_id


def session_lines(watch: WatchProcess, session_id: str, box: Mailbox, start: int = 0) -> int:
    """Waits for the lines of one session (opened, login, commands, closed); returns the end."""
    opened = watch.wait_for(
        watch.out, lambda s: session_id in s and "opened" in s, "session opened", start
    )
    watch.wait_for(
        watch.out,
        lambda s: session_id in s and f"login    {box.user} USER success" in s,
        "login line",
        opened,
    )
    watch.wait_for(
        watch.out, lambda s: session_id in s and "command  STAT" in s, "STAT line", opened
    )
    return watch.wait_for(
        watch.out,
        lambda s: session_id in s and "closed   quit: 4 commands" in s,
        "session closed",
        opened,
    )


def test_watch_prints_a_session_and_exits_cleanly_on_ctrl_c(
    dovecot: Dovecot,
    mailbox: MailboxFactory,
    tmp_path: Path,
    watch_process: Callable[..., WatchProcess],
) -> None:
    box = mailbox([])
    with start_admin_proxy(dovecot, tmp_path / "proxy.log") as proxy:
        admin = AdminProxy(proxy)
        watch = watch_process(admin.endpoint)
        watch.wait_for(watch.err, lambda s: s.startswith("watch: connected to ws://"), "connect")
        session_id = run_session(proxy, box)
        session_lines(watch, session_id, box)
        status = watch.interrupt()
    assert status == 0, (watch.out, watch.err)
    assert not [line for line in watch.err if "Traceback" in line], watch.err
    assert box.password not in "\n".join(watch.out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_watch_reconnects_when_the_proxy_restarts(
    dovecot: Dovecot,
    mailbox: MailboxFactory,
    tmp_path: Path,
    watch_process: Callable[..., WatchProcess],
) -> None:
    box = mailbox([])
    endpoint = f"127.0.0.1:{free_port()}"
    watch = watch_process(endpoint)  # before the proxy: it keeps trying
    watch.wait_for(watch.err, lambda s: "retrying in" in s, "retry notice")
    proxy = start_admin_proxy(dovecot, tmp_path / "proxy.log", admin=endpoint)
    end = 0
    for _round in range(2):
        with proxy:
            connected = watch.wait_for(
                watch.err, lambda s: s.startswith("watch: connected"), "connect", end
            )
            session_lines(watch, run_session(proxy, box), box)
        # The proxy stopped: watch notices and retries, then connects again.
        end = watch.wait_for(watch.err, lambda s: "retrying in" in s, "retry notice", connected)
    assert watch.interrupt() == 0


def test_watch_sends_the_admin_token(
    dovecot: Dovecot,
    mailbox: MailboxFactory,
    tmp_path: Path,
    watch_process: Callable[..., WatchProcess],
) -> None:
    """With the proxy's token (here from POP3PROXY_ADMIN_TOKEN) watch follows; without it,
    or with a wrong one, it stops at once with exit status 1 and says what to set."""
    token = "watch-token-" + "w" * 20
    box = mailbox([])
    (tmp_path / "token").write_text(token + "\n")
    with start_admin_proxy(
        dovecot, tmp_path / "proxy.log", "--admin-token-file", str(tmp_path / "token")
    ) as proxy:
        admin = AdminProxy(proxy, token=token)
        watch = watch_process(admin.endpoint, {"POP3PROXY_ADMIN_TOKEN": token})
        watch.wait_for(watch.err, lambda s: s.startswith("watch: connected to ws://"), "connect")
        session_lines(watch, run_session(proxy, box), box)
        assert watch.interrupt() == 0
        for env in ({}, {"POP3PROXY_ADMIN_TOKEN": "not-the-token-at-all"}):
            refused = watch_process(admin.endpoint, env)
            assert refused.proc.wait(timeout=TIMEOUT) == 1
            refused.stop()
            assert len(refused.err) == 1, refused.err
            assert "HTTP 401 (the proxy asks for its admin token" in refused.err[0]
            assert token not in refused.err[0]


def test_watch_escapes_what_clients_sent() -> None:
    lines = format_event(
        {
            "event": "pop3.login",
            "session_id": "abcd1234",
            "timestamp": "2026-01-01T00:00:00Z",
            "user": "eve\x1b[2J\x07",
            "mechanism": "USER",
            "result": "failure",
        }
    )
    assert len(lines) == 1
    assert "\x1b" not in lines[0]
    assert "\x07" not in lines[0]
    assert "eve\\x1b[2J\\x07 USER failure" in lines[0]


def test_watch_escapes_event_names_keys_and_values_it_does_not_know() -> None:
    lines = format_event(
        {
            "event": "odd\x1b[2J",
            "session_id": "s\x9b1",
            "timestamp": "2026-01-01T00:00:00Z",
            "key\x1b]0;t\x07": "value\u202e\x7f",
            "nested": {"user": "eve\x1b[31m"},
        }
    )
    assert len(lines) == 1
    assert lines[0].isprintable()
    assert "odd\\x1b[2J" in lines[0]
    assert "s\\x9b1" in lines[0]
    assert "key\\x1b]0;t\\x07=value\\u202e\\x7f" in lines[0]
    assert "eve\\u001b[31m" in lines[0]  # a nested value is shown as JSON


def test_watch_json_lines_reach_the_terminal_escaped_and_still_equal() -> None:
    event = {"event": "pop3.login", "user": "eve\x9b2J\x7f\u202e\u2028\U000e0001", "n": 1}
    raw = json.dumps(event, ensure_ascii=False)  # what a less careful sender would send
    assert not raw.isprintable()
    line = json_line(raw)
    assert line.isprintable()
    assert json.loads(line) == event
    proper = json.dumps(event)  # what the proxy sends: already escaped, passed as it is
    assert json_line(proper) is proper
    assert json_line('{"broken": "\x1b[2J"').isprintable()  # not JSON: escaped all the same
