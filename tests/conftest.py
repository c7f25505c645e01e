"""Shared fixtures: a test CA, one real Dovecot for the session, the proxy in front of it.

Everything here is synchronous and (except ``mailbox``) session-scoped: pytest-trio only allows
function-scoped async fixtures, and starting Dovecot once keeps the suite fast. Tests never
share mailbox state: each asks ``mailbox`` for a fresh user.
"""

from __future__ import annotations

import itertools
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trustme
from hypothesis import settings

from tests.peers.dovecot import (
    Dovecot,
    DovecotError,
    Mailbox,
    MailboxFactory,
    find_dovecot,
    make_message,
)
from tests.peers.proxy import ProxyProcess, mark_every_log

KIB = 1024
MIB = 1024 * KIB

# Hypothesis: no example database by default, so that a run never depends on what earlier
# runs on this machine found (a failure once saved would be replayed first on every run until
# ``.hypothesis/`` is deleted, and CI has none). A failure prints its reproduction blob. Locally,
# ``pytest --hypothesis-profile=dev`` keeps and replays found examples in ``.hypothesis/``.
settings.register_profile("ci", database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _sessions_of_this_test() -> None:
    """Client ports come back on long-lived proxies: ``ProxyProcess.session_id_for`` looks
    only at the sessions opened since the current test began."""
    mark_every_log()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def dovecot(ca: trustme.CA) -> Iterator[Dovecot]:
    """A Dovecot POP3S server on 127.0.0.1 for the whole session (``dovecot.port``)."""
    try:
        find_dovecot()
    except DovecotError as exc:
        pytest.fail(str(exc), pytrace=False)
    # Not pytest's tmp_path: its parents are mode 0700, and the mail user (nobody) must be
    # able to traverse every parent of the maildirs. A short path also keeps Dovecot's UNIX
    # socket paths under their length limit.
    root = Path(tempfile.mkdtemp(prefix="pop3test-"))
    root.chmod(0o755)
    server = Dovecot(root, ca)
    try:
        server.start()
        yield server
    finally:
        problems = server.stop(check_log=False)
    if problems:
        pytest.fail(
            f"Dovecot logged errors (log kept in {server.log_path}):\n" + "\n".join(problems),
            pytrace=False,
        )
    shutil.rmtree(root, ignore_errors=True)


#: Settings of the shared proxy that differ from the defaults (see ``proxy``).
SHARED_PROXY_ARGS = (
    "--client-login-failures", "1000000",
    "--max-login-failures", "1000",
    "--login-failure-delay", "0",
)  # fmt: skip


@pytest.fixture(scope="session")
def proxy(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """``pop3proxy serve`` (JSON logs) on an ephemeral port in front of ``dovecot``.

    Shared by many tests that fail logins on purpose from 127.0.0.1: the per-address login
    budget and its delays are lifted here and tested with proxies of their own.
    """
    process = ProxyProcess(
        tmp_path_factory.mktemp("proxy") / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=SHARED_PROXY_ARGS,
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


_user_numbers = itertools.count(1)


@pytest.fixture
def mailbox(dovecot: Dovecot) -> MailboxFactory:
    """Make a fresh Dovecot user (unique name) holding the given messages."""

    def make(messages: Sequence[bytes] = (), *, password: str | None = None) -> Mailbox:
        user = f"user{next(_user_numbers)}x{secrets.token_hex(3)}"
        password = password if password is not None else f"Pw-{secrets.token_hex(8)}"
        dovecot.add_user(user, password, messages)
        return Mailbox(user=user, password=password, messages=tuple(messages))

    return make


@pytest.fixture(scope="session")
def corpus() -> tuple[bytes, ...]:
    """Messages of 1 KiB, 64 KiB and 1 MiB with dot-led lines and 8-bit bytes (and one plain)."""
    return (
        make_message(1 * KIB, subject="one KiB", dot_lines=True, eight_bit=True),
        make_message(64 * KIB, subject="sixty-four KiB", dot_lines=True, eight_bit=True),
        make_message(1 * MIB, subject="one MiB", dot_lines=True, eight_bit=True),
        make_message(2 * KIB, subject="plain seven-bit", dot_lines=False, eight_bit=False),
    )


@pytest.fixture(scope="session")
def big_message() -> bytes:
    """One 50 MiB message (only a test or two use it)."""
    return make_message(50 * MIB, subject="fifty MiB", dot_lines=True, eight_bit=True)
