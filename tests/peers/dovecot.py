"""A throwaway Dovecot POP3S server for tests and benchmarks, and test messages for it.

``Dovecot`` is plain synchronous code (subprocess, files, ``ssl``/``poplib``) so that pytest
fixtures and standalone benchmark scripts can both use it::

    ca = trustme.CA()
    with Dovecot(root, ca) as dovecot:              # root must be traversable by ``nobody``
        dovecot.add_user("alice", "secret", [make_message(1024, subject="hi")])
        pop = dovecot.direct_pop3s("alice", "secret")

Each instance has its own config, ``instance_name``, ``base_dir``, ``state_dir`` and log under
``root``, listens for implicit TLS only (POP3S) on a free port of 127.0.0.1, and keeps that port
across ``stop()``/``start()`` so that a proxy pointed at it sees the "same" upstream come back.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import poplib
import pwd
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:
    import trustme

__all__ = ["Dovecot", "DovecotError", "Mailbox", "MailboxFactory", "find_dovecot", "make_message"]

_DH_PEM = Path("/usr/share/dovecot/dh.pem")
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_MAIL_USER = "nobody"
_INTERNAL_USER = "dovecot"  # default_internal_user
# Dovecot's UNIX sockets live under base_dir; sun_path holds 108 bytes, the longest socket
# name Dovecot uses there is about 30.
_MAX_BASE_DIR = 70
_LOG_PROBLEM = re.compile(r"\b(Error|Fatal|Panic):")
_USER_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}\Z")
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Mailbox:
    """A Dovecot user made for one test: its name, password and messages (1-based in POP3)."""

    user: str
    password: str
    messages: tuple[bytes, ...]


class MailboxFactory(Protocol):
    """The ``mailbox`` fixture: makes a fresh user holding ``messages``."""

    def __call__(
        self, messages: Sequence[bytes] = (), *, password: str | None = None
    ) -> Mailbox: ...


class DovecotError(RuntimeError):
    """Dovecot could not be started, or it logged errors."""


def find_dovecot() -> str:
    """Return the path of the ``dovecot`` binary, or raise `DovecotError` saying how to get it."""
    found = shutil.which("dovecot")
    if found:
        return found
    for folder in _SBIN_DIRS:
        candidate = Path(folder) / "dovecot"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise DovecotError(
        "dovecot is not installed: the real-peer tests need it "
        "(apt-get install -y dovecot-core dovecot-pop3d)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _check_traversable(path: Path, uid: int, gid: int) -> None:
    """Fail early (with a readable message) if the mail user cannot reach ``path``."""
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid == uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise DovecotError(
                f"{folder} (mode {stat.filemode(st.st_mode)}) is not traversable by "
                f"{_MAIL_USER!r}: Dovecot could not read the mailboxes; chmod 755 it"
            )


class Dovecot:
    """One Dovecot instance serving POP3 over implicit TLS on 127.0.0.1.

    Args:
        root: an existing folder owned by this process; everything goes under it. It and all
            its parents must be traversable by ``nobody`` (``chmod 755``).
        ca: the test CA that issues the server certificate (for ``server_name`` and 127.0.0.1).
        server_name: the DNS name in the server certificate.
        process_limit: ``default_process_limit`` (each POP3 session is a process).
        client_limit: ``default_client_limit``.
        userip_connections: ``mail_max_userip_connections`` for POP3 (all proxied sessions
            come from 127.0.0.1, so load tests need this high).
        port: the POP3S port; a free one is picked if not given.
        auth_failure_delay: seconds Dovecot waits before answering a failed login (its own
            default is 2; 0 keeps tests that fail logins fast).
    """

    def __init__(
        self,
        root: Path,
        ca: trustme.CA,
        *,
        server_name: str = "pop.test",
        process_limit: int = 1000,
        client_limit: int = 1000,
        userip_connections: int = 1000,
        port: int | None = None,
        auth_failure_delay: int = 0,
    ) -> None:
        self.root = Path(root).resolve()
        self.server_name = server_name
        self.process_limit = process_limit
        self.client_limit = client_limit
        self.userip_connections = userip_connections
        self.auth_failure_delay = auth_failure_delay
        self._ca = ca
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None
        self._log_offset = 0
        self._users: dict[str, str] = {}
        self._lock = threading.Lock()
        self._message_seq = 0

        pw = pwd.getpwnam(_MAIL_USER)
        self._uid, self._gid = pw.pw_uid, pw.pw_gid

        self.conf_path = self.root / "dovecot.conf"
        self.passwd_dir = self.root / "passwd"
        self.log_path = self.root / "dovecot.log"
        self.console_path = self.root / "dovecot.console"
        self.base_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.mail_dir = self.root / "mail"
        self.ca_pem_path = self.root / "ca.pem"
        self.cert_path = self.root / "server.pem"
        self.key_path = self.root / "server.key"
        self._prepared = False

    # -- properties ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The implicit-TLS POP3S port on 127.0.0.1 (fixed for the life of the object)."""
        if self._port is None:
            self._port = _free_port()
        return self._port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def users(self) -> dict[str, str]:
        """The users added so far, name → password."""
        return dict(self._users)

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Do not mask the body's exception with a log complaint.
        self.stop(check_log=exc is None)

    def start(self) -> None:
        """Start Dovecot (again) and wait until it greets ``+OK`` over TLS on `port`."""
        if self.running:
            return
        binary = find_dovecot()
        if os.geteuid() != 0:
            raise DovecotError("the Dovecot test server must be started as root")
        self._prepare()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._console = self.console_path.open("ab")
        self._proc = subprocess.Popen(
            [binary, "-F", "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is for pytest, not for Dovecot
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(check_log=False)
            raise

    def stop(self, *, check_log: bool = True) -> list[str]:
        """Stop Dovecot and wait for it; callable again, and `start()` works afterwards.

        Returns the ``Error:``/``Fatal:``/``Panic:`` lines Dovecot logged since `start()`;
        with ``check_log`` (the default) raises `DovecotError` quoting them instead.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=_STOP_TIMEOUT)
            self._wait_children_gone(proc.pid)
        if self._console is not None:
            self._console.close()
            self._console = None
        problems = self.log_problems()
        if problems and check_log:
            raise DovecotError(
                f"Dovecot logged errors (full log: {self.log_path}):\n" + "\n".join(problems)
            )
        return problems

    def log_text(self) -> str:
        """Dovecot's log since the last `start()`."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    def log_problems(self) -> list[str]:
        """``Error:``/``Fatal:``/``Panic:`` lines in the log since the last `start()`."""
        return [line for line in self.log_text().splitlines() if _LOG_PROBLEM.search(line)]

    # -- users and mail ----------------------------------------------------------------------

    def add_user(self, name: str, password: str, messages: Sequence[bytes]) -> None:
        """Add a user (Dovecot re-reads the passwd-file) with a maildir holding ``messages``.

        The messages are served in the given order (message 1 is ``messages[0]``) and byte for
        byte as given: pass CRLF line endings.
        """
        if not _USER_NAME.match(name):
            raise ValueError(f"unsupported user name {name!r}")
        if not password or any(c in password for c in ":\r\n\0"):
            raise ValueError("password must be non-empty without ':', CR, LF or NUL")
        with self._lock:
            if name in self._users:
                raise ValueError(f"user {name!r} exists already")
            self._prepare()
            self._write_maildir(name, messages)
            self._write_passwd(name, password)
            self._users[name] = password

    def _write_maildir(self, name: str, messages: Sequence[bytes]) -> None:
        home = self.mail_dir / name
        maildir = home / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        # Dovecot gives new maildir files UIDs in the order of the time stamp that starts their
        # names, so increasing stamps fix the POP3 message numbers.
        base = 1_600_000_000
        for index, message in enumerate(messages):
            self._message_seq += 1
            filename = (
                f"{base + index}.M{self._message_seq}P{os.getpid()}.pop3test,S={len(message)}:2,"
            )
            target = maildir / "cur" / filename
            target.write_bytes(message)
            os.utime(target, (base + index, base + index))
        for path in [home, *home.rglob("*")]:
            os.chown(path, self._uid, self._gid)
        home.chmod(0o700)

    def _write_passwd(self, name: str, password: str) -> None:
        # One passwd-file per user: Dovecot opens a user's file on the first lookup, so a new
        # user is visible at once. (A shared file is re-read at most once a second, so a user
        # added just after a login could be "unknown" for up to a second.)
        line = f"{name}:{{PLAIN}}{password}:{self._uid}:{self._gid}::{self.mail_dir / name}::\n"
        tmp = self.passwd_dir / f".{name}.tmp"
        tmp.write_text(line, encoding="utf-8")
        # Dovecot's auth process runs as its internal user and must read the file.
        try:
            tmp.chmod(0o640)
            os.chown(tmp, 0, grp.getgrnam(_INTERNAL_USER).gr_gid)
        except KeyError:
            tmp.chmod(0o644)
        tmp.replace(self.passwd_dir / name)

    # -- clients -----------------------------------------------------------------------------

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the test CA (and nothing else)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_pem_path))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.keylog_filename = None  # type: ignore[assignment]
        return ctx

    def direct_pop3s(
        self, user: str | None = None, password: str | None = None, *, timeout: float = 30.0
    ) -> poplib.POP3_SSL:
        """A `poplib.POP3_SSL` session straight to Dovecot, logged in with USER/PASS if given."""
        pop = poplib.POP3_SSL(
            "127.0.0.1", self.port, timeout=timeout, context=self.client_ssl_context()
        )
        if user is not None:
            pop.user(user)
            pop.pass_(password if password is not None else self._users[user])
        return pop

    # -- internals -----------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self._prepared:
            return
        if not self.root.is_dir():
            raise DovecotError(f"{self.root} does not exist")
        if len(str(self.base_dir)) > _MAX_BASE_DIR:
            raise DovecotError(
                f"{self.root} is too long a path for Dovecot's UNIX sockets; use a short "
                "temporary folder (tempfile.mkdtemp())"
            )
        _check_traversable(self.root, self._uid, self._gid)
        if not _DH_PEM.is_file():
            raise DovecotError(f"{_DH_PEM} is missing: install dovecot-core")
        for folder in (self.base_dir, self.state_dir, self.mail_dir, self.passwd_dir):
            folder.mkdir(exist_ok=True)
        self.mail_dir.chmod(0o755)
        self.passwd_dir.chmod(0o755)
        leaf = self._ca.issue_cert(self.server_name, "127.0.0.1")
        self._ca.cert_pem.write_to_path(str(self.ca_pem_path))
        leaf.private_key_pem.write_to_path(str(self.key_path))
        self.key_path.chmod(0o600)
        # The leaf first, then its chain up to (not including) the CA.
        with self.cert_path.open("wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        self.conf_path.write_text(self._config(), encoding="utf-8")
        self._prepared = True

    def _config(self) -> str:
        auth_clients = 2 * self.process_limit + 100
        return f"""\
# Generated for one test instance; see tests/peers/dovecot.py.
instance_name = pop3test-{self.port}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
protocols = pop3
listen = 127.0.0.1
shutdown_clients = yes

ssl = required
ssl_cert = <{self.cert_path}
ssl_key = <{self.key_path}
ssl_dh = <{_DH_PEM}
ssl_min_protocol = TLSv1.2

disable_plaintext_auth = no
auth_mechanisms = plain login apop cram-md5
auth_cache_size = 0
auth_failure_delay = {self.auth_failure_delay} secs
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {self.passwd_dir}/%n
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {self.passwd_dir}/%n
}}
first_valid_uid = 1
mail_location = maildir:~/Maildir

default_process_limit = {self.process_limit}
default_client_limit = {self.client_limit}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {self.port}
    ssl = yes
  }}
}}
service auth {{
  client_limit = {auth_clients}
}}
service anvil {{
  client_limit = {auth_clients}
  # No auth penalty: all test logins come from 127.0.0.1, and after a failed one Dovecot
  # would delay every later login from there by 2-15 s. Mode 0 drops the socket; auth
  # then runs without penalties (silently: a missing socket is not an error).
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
protocol pop3 {{
  mail_max_userip_connections = {self.userip_connections}
  pop3_uidl_format = %g
}}
"""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        last: BaseException | None = None
        ctx = self.client_ssl_context()
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise DovecotError(
                    f"dovecot exited with status {proc.returncode if proc else None}:\n"
                    + self._diagnostics()
                )
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as raw,
                    ctx.wrap_socket(raw, server_hostname=self.server_name) as tls,
                ):
                    greeting = tls.recv(512)
                    if greeting.startswith(b"+OK"):
                        with contextlib.suppress(OSError):
                            tls.sendall(b"QUIT\r\n")
                            tls.recv(512)
                        return
                    last = DovecotError(f"unexpected greeting {greeting!r}")
            except (OSError, ssl.SSLError) as exc:
                last = exc
            time.sleep(0.05)
        raise DovecotError(
            f"dovecot did not greet on 127.0.0.1:{self.port} within {_START_TIMEOUT} s "
            f"(last error: {last!r}):\n" + self._diagnostics()
        )

    def _diagnostics(self) -> str:
        console = (
            self.console_path.read_text("utf-8", "replace") if self.console_path.exists() else ""
        )
        return f"--- console ---\n{console[-4000:]}\n--- log ---\n{self.log_text()[-4000:]}"

    def _wait_children_gone(self, master_pid: int) -> None:
        # The master kills its children on SIGTERM (shutdown_clients = yes), but they may take a
        # moment; a killed master leaves them behind, so clean up the process group.
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline:
            if not _live_group_members(master_pid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(master_pid, signal.SIGKILL)


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (``kill(-pgid, 0)`` counts zombies)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ')'.
        fields = stat_line.rpartition(")")[2].split()
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry.name))
    return members


# -- test messages -----------------------------------------------------------------------------

_WORDS = (
    b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    b"incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud"
).split()
_EIGHT_BIT_LINES = (
    "Grüße aus Köln, naïve café, smørrebrød, Ελληνικά, 日本語".encode(),
    b"Latin-1 bytes: caf\xe9 na\xefve \xa3100 \xbfqu\xe9?",
)
_DOT_LINES = (b".", b"..", b".leading dot", b"..two leading dots", b"...", b". space")
_LINE_LENGTH = 76


def make_message(
    size: int,
    *,
    subject: str = "test message",
    dot_lines: bool = True,
    eight_bit: bool = True,
) -> bytes:
    """An RFC 5322 message with CRLF line endings, exactly ``size`` bytes when that is possible.

    The body is deterministic for a given ``subject`` and ``size``. With ``dot_lines`` it has
    lines that are ``.``, ``..``, or start with dots (so POP3 dot-stuffing is exercised); with
    ``eight_bit`` lines holding UTF-8 and raw Latin-1 bytes above 0x7F. No line is longer than
    78 bytes plus CRLF (poplib refuses lines over 2048 bytes).
    """
    header = (
        "From: Test Sender <sender@example.test>\r\n"
        "To: Test Recipient <recipient@example.test>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
        f"Message-ID: <{hashlib.sha256(subject.encode()).hexdigest()[:16]}.{size}@example.test>\r\n"
        "MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset={'utf-8' if eight_bit else 'us-ascii'}\r\n"
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}\r\n"
        "\r\n"
    ).encode()
    specials: list[bytes] = []
    if dot_lines:
        specials.extend(_DOT_LINES)
    if eight_bit:
        specials.extend(_EIGHT_BIT_LINES)

    body = bytearray()
    budget = size - len(header)
    seed = sum(subject.encode("utf-8")) + size
    line_no = 0
    while len(body) + _LINE_LENGTH + 2 < budget:
        if specials and line_no % 7 == 3:
            line = specials[(line_no // 7) % len(specials)]
        else:
            words: list[bytes] = []
            length = 0
            i = seed + line_no
            while length < 60:
                word = _WORDS[(i * 7 + length) % len(_WORDS)]
                words.append(word)
                length += len(word) + 1
                i += 3
            line = b" ".join(words)
        body += line + b"\r\n"
        line_no += 1
    remaining = budget - len(body)
    if remaining >= 3:
        body += b"x" * (remaining - 2) + b"\r\n"
    elif remaining > 0 or not body:
        body += b"end\r\n"
    return header + bytes(body)
