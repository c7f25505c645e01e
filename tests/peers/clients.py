"""The legacy POP3 clients the proxy exists for, run for real: fetchmail and getmail6; and
plain sockets and ``poplib`` from a loopback address of their own.

- :func:`device_address` hands out a new 127.x.y.z each call: a client connecting from it is
  a device of its own, so its address and port name one session in the proxy's log for good
  (ports alone come back). :func:`connect_from_device` and :class:`DevicePOP3` use it.

Each ``run_*`` function writes a private configuration, runs the client once with a bounded
timeout, and returns what it printed and the messages it delivered.

- fetchmail delivers to a small MDA script that stores each message in its own numbered
  file, in delivery order. The rc file says ``set invisible`` (no ``Received:`` header of its
  own), ``no rewrite`` (no address rewriting), ``no stripcr`` (CRLF kept) and ``no
  mimedecode``, so what it delivers must be the message exactly as the server stored it.
- getmail6 refuses to deliver as root, so as root it runs as ``nobody`` (``runuser``) in a
  folder of its own; it delivers to a Maildir, with LF line endings, after three trace
  fields of its own (see `split_getmail_trace`).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import poplib
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEVICE_NETWORK",
    "ClientMissingError",
    "ClientRun",
    "DevicePOP3",
    "GetmailTrace",
    "connect_from_device",
    "device_address",
    "require_client",
    "run_fetchmail",
    "run_getmail",
    "split_getmail_trace",
]

_UNPRIVILEGED_USER = "nobody"
#: What may appear inside a quoted string of the rc files written here, unescaped.
_SAFE_VALUE = re.compile(r"[A-Za-z0-9._@+-]{1,128}\Z")
_MDA_SCRIPT = """\
#!/bin/sh
# fetchmail MDA for tests: store the message from stdin as the next numbered file in "$1".
set -eu
n=$(ls "$1" | wc -l)
cat > "$1/msg.$(printf %04d "$n")"
"""


#: Where :func:`device_address` takes addresses from; 127.0.0.x is left to the tests that
#: name addresses (allow lists, rules).
DEVICE_NETWORK = ipaddress.IPv4Network("127.128.0.0/9")
_device_numbers = itertools.count(1)


def device_address() -> str:
    """A loopback address no other client of this test run uses (the next of
    :data:`DEVICE_NETWORK`, skipping those ending in .0 or .255)."""
    while True:
        address = DEVICE_NETWORK[next(_device_numbers) % DEVICE_NETWORK.num_addresses]
        if address.packed[-1] not in (0, 255):
            return str(address)


def connect_from_device(port: int, *, timeout: float, host: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to ``host:port`` from a fresh :func:`device_address`."""
    return socket.create_connection((host, port), timeout, source_address=(device_address(), 0))


class DevicePOP3(poplib.POP3):
    """``poplib.POP3`` from a fresh :func:`device_address`."""

    def _create_socket(self, timeout: float) -> socket.socket:
        return connect_from_device(self.port, timeout=timeout, host=self.host)


class ClientMissingError(RuntimeError):
    """A legacy client is not installed."""


@dataclass(frozen=True)
class ClientRun:
    """One run of a client: its command, exit status, output and deliveries."""

    argv: list[str]
    returncode: int
    output: str
    messages: list[bytes] = field(repr=False)

    def summary(self, tail: int = 3000) -> str:
        """For assertion messages: the exit status and the end of the output."""
        return (
            f"{self.argv[0]} exited {self.returncode}, delivered {len(self.messages)}; "
            f"output tail:\n{self.output[-tail:]}"
        )


def require_client(name: str) -> str:
    """The path of client ``name``, or `ClientMissingError` saying how to install it."""
    found = shutil.which(name)
    if found is None:
        raise ClientMissingError(
            f"{name} is not installed: the legacy-client tests need it "
            f"(apt-get install -y {'getmail6' if name == 'getmail' else name})"
        )
    return found


def _check_value(what: str, value: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise ValueError(f"{what} {value!r} would need quoting in an rc file")
    return value


def _run(argv: Sequence[str], *, env: dict[str, str], timeout: float) -> tuple[int, str]:
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        partial = exc.output or b""
        text = partial.decode("utf-8", "replace") if isinstance(partial, bytes) else partial
        raise AssertionError(
            f"{argv[0]} did not finish within {timeout} s:\n{text[-3000:]}"
        ) from None
    return done.returncode, done.stdout.decode("utf-8", "replace")


# -- fetchmail ---------------------------------------------------------------------------------


def run_fetchmail(
    workdir: Path,
    *,
    port: int,
    user: str,
    password: str,
    host: str = "127.0.0.1",
    sslproto_off: bool = True,
    auth: str | None = None,
    fetchall: bool = True,
    timeout: float = 120.0,
) -> ClientRun:
    """Poll ``host:port`` once with fetchmail (plain POP3, keep mail) and collect deliveries.

    Args:
        workdir: a folder for the rc file, HOME, the MDA script and the deliveries; runs in
            the same ``workdir`` share fetchmail's memory of seen messages (``.fetchids``).
        sslproto_off: write ``sslproto ''``. fetchmail >= 6.4 otherwise sends ``STLS`` on a
            plaintext connection and gives up when the server says ``-ERR``, which is what
            pop3proxy answers (it already speaks TLS to the upstream).
        auth: fetchmail's ``auth`` keyword (``password`` forces USER/PASS); by default it
            picks what CAPA offers (CRAM-MD5 with Dovecot).
        fetchall: fetch every message; without it fetchmail fetches only those it has not
            seen (``LAST``, then ``UIDL``) like a user's daily poll.
    """
    binary = require_client("fetchmail")
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    outdir = Path(tempfile.mkdtemp(prefix="delivered-", dir=workdir))
    mda = workdir / "mda.sh"
    mda.write_text(_MDA_SCRIPT, encoding="utf-8")
    mda.chmod(0o700)

    options = ["keep", "no rewrite", "no stripcr", "no mimedecode"]
    if fetchall:
        options.insert(1, "fetchall")
    if sslproto_off:
        options.insert(0, "sslproto ''")
    auth_clause = f" auth {_check_value('auth', auth)}" if auth else ""
    rc_text = (
        "set invisible\n"
        f"poll {_check_value('host', host)} port {port} proto pop3{auth_clause} timeout 60\n"
        f"  user '{_check_value('user', user)}' password '{_check_value('password', password)}'\n"
        f"  {' '.join(options)}\n"
        f'  mda "{mda} {outdir}"\n'
    )
    rc_path = outdir.with_name(f"fetchmailrc-{outdir.name}")
    # fetchmail insists on mode 0600 and on the file belonging to the user running it.
    fd = os.open(rc_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as rc:
        rc.write(rc_text)

    argv = [binary, "--nodetach", "--nosyslog", "-v", "-f", str(rc_path)]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "FETCHMAILHOME": str(home),
        "LC_ALL": "C",
    }
    returncode, output = _run(argv, env=env, timeout=timeout)
    messages = [path.read_bytes() for path in sorted(outdir.iterdir())]
    return ClientRun(argv, returncode, output, messages)


# -- getmail6 ----------------------------------------------------------------------------------


def run_getmail(
    *,
    port: int,
    user: str,
    password: str,
    ssl_ca_file: Path | None = None,
    host: str = "127.0.0.1",
    timeout: float = 120.0,
) -> ClientRun:
    """Retrieve every message (``read_all``, ``delete = false``) with getmail6 into a Maildir.

    With ``ssl_ca_file`` it uses ``SimplePOP3SSLRetriever`` (implicit TLS, that CA only),
    otherwise ``SimplePOP3Retriever`` (plain POP3). As root it runs as ``nobody``: getmail
    refuses to deliver as root. The deliveries come back sorted (Maildir names are random).
    """
    binary = require_client("getmail")
    as_root = os.geteuid() == 0
    # Not pytest's tmp_path: its parents are mode 0700, closed to ``nobody``.
    workdir = Path(tempfile.mkdtemp(prefix="getmail-"))
    try:
        workdir.chmod(0o755)
        maildir = workdir / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        state = workdir / "state"
        state.mkdir()

        lines = ["[retriever]"]
        if ssl_ca_file is None:
            lines.append("type = SimplePOP3Retriever")
        else:
            ca_copy = workdir / "ca.pem"
            shutil.copyfile(ssl_ca_file, ca_copy)
            lines += ["type = SimplePOP3SSLRetriever", f"ca_certs = {ca_copy}"]
        lines += [
            f"server = {_check_value('host', host)}",
            f"port = {port}",
            f"username = {_check_value('user', user)}",
            f"password = {_check_value('password', password)}",
            "",
            "[destination]",
            "type = Maildir",
            f"path = {maildir}/",
            "",
            "[options]",
            "read_all = true",
            "delete = false",
            "verbose = 2",
            "",
        ]
        rc_path = workdir / "getmailrc"
        fd = os.open(rc_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as rc:
            rc.write("\n".join(lines))

        argv = [binary, "--getmaildir", str(state), "--rcfile", str(rc_path)]
        if as_root:
            pw = pwd.getpwnam(_UNPRIVILEGED_USER)
            for path in [workdir, *workdir.rglob("*")]:
                os.chown(path, pw.pw_uid, pw.pw_gid)
            argv = [require_client("runuser"), "-u", _UNPRIVILEGED_USER, "--", *argv]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "LC_ALL": "C",
        }
        returncode, output = _run(argv, env=env, timeout=timeout)
        delivered = [p for sub in ("new", "cur") for p in sorted((maildir / sub).iterdir())]
        messages = sorted(p.read_bytes() for p in delivered)
        return ClientRun(argv, returncode, output, messages)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass(frozen=True)
class GetmailTrace:
    """The trace fields getmail6 puts in front of each message it delivers, unfolded."""

    return_path: bytes
    delivered_to: bytes
    received: bytes


_TRACE_NAMES = {
    b"return-path": "return_path",
    b"delivered-to": "delivered_to",
    b"received": "received",
}


def split_getmail_trace(message: bytes) -> tuple[GetmailTrace, bytes]:
    """Split off the ``Return-Path``, ``Delivered-To`` and ``Received`` fields getmail6 adds.

    Exactly these three, each once, must open the message (getmail6 prepends them in this
    order); the rest is returned untouched. The ``Received`` field names the server address
    and the retriever (``POP3`` or ``POP3-SSL``) and carries a time stamp, so it differs
    between two retrievals of the same message; getmail folds it where it likes, hence the
    unfolding here.
    """
    fields: dict[str, bytes] = {}
    rest = message
    for expected in (b"return-path", b"delivered-to", b"received"):
        line, sep, rest = rest.partition(b"\n")
        name, colon, value = line.partition(b":")
        if not sep or not colon or name.lower() != expected:
            raise AssertionError(
                f"getmail6 delivery does not start with its {expected.decode()} field: "
                f"{message[:300]!r}"
            )
        while rest[:1] in (b" ", b"\t"):
            continuation, sep, rest = rest.partition(b"\n")
            value += b" " + continuation.strip()
        fields[_TRACE_NAMES[expected]] = b" ".join(value.split())
    return GetmailTrace(**fields), rest
