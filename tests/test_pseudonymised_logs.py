"""User-name pseudonyms (GDPR/DSGVO) end to end: the key from a file or the environment,
every name in the log replaced, and a pseudonym sent as a name treated like any name.
"""

from __future__ import annotations

import hashlib
import hmac
import poplib
from pathlib import Path

import pytest

from pop3proxy.migration.inventory import DATABASE_NAME
from pop3proxy.migration.pseudonym import Pseudonymizer
from tests.peers.dovecot import Dovecot, MailboxFactory
from tests.peers.proxy import ProxyProcess
from tests.test_inventory import query, wait_until

KEY = "a-test-key-of-sufficient-length"


def _proxy(
    dovecot: Dovecot, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> ProxyProcess:
    return ProxyProcess(
        tmp_path / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=list(args),
        env=env,
    )


def test_user_names_are_pseudonymised_everywhere_in_the_log(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    key = tmp_path / "pseudonym.key"
    key.write_text(KEY + "\n")
    with _proxy(dovecot, tmp_path, "--user-pseudonym-key-file", str(key)) as proxy:
        pop = poplib.POP3("127.0.0.1", proxy.port, timeout=10)
        pop.user(box.user)
        pop.pass_(box.password)
        pop.quit()
        closed = proxy.wait_for_event("session.closed")
        login = proxy.wait_for_event("pop3.login")
        user_command = proxy.wait_for_event("pop3.command", lambda e: e.get("verb") == "USER")
        log = proxy.log_text()

    assert box.user not in log
    pseudonym = Pseudonymizer(KEY.encode()).pseudonym(box.user)
    assert login["user"] == pseudonym
    assert closed["user"] == pseudonym
    assert user_command["args"] == [pseudonym]
    assert KEY not in log


def test_the_key_itself_from_the_environment(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    with _proxy(dovecot, tmp_path, env={"POP3PROXY_USER_PSEUDONYM_KEY": KEY}) as proxy:
        pop = poplib.POP3("127.0.0.1", proxy.port, timeout=10)
        pop.user(box.user)
        pop.pass_(box.password)
        pop.quit()
        login = proxy.wait_for_event("pop3.login")
        log = proxy.log_text()
    mac = hmac.new(KEY.encode(), box.user.encode(), hashlib.sha256).hexdigest()
    assert login["user"] == "u-" + mac[:24]
    assert box.user not in log
    assert KEY not in log


def test_a_pseudonym_sent_as_a_user_name_does_not_touch_that_users_row(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    """Someone who read alice's pseudonym in a report sends it as USER, with a wrong password."""
    alice = mailbox([])
    key = tmp_path / "pseudonym.key"
    key.write_text(KEY + "\n")
    state = tmp_path / "state"
    db = state / DATABASE_NAME
    pseudonyms = Pseudonymizer(KEY.encode())
    alias = pseudonyms.pseudonym(alice.user)
    args = ["--user-pseudonym-key-file", str(key), "--state-dir", str(state)]
    with _proxy(dovecot, tmp_path, *args, "--inventory-flush-interval", "0.1") as proxy:
        pop = poplib.POP3("127.0.0.1", proxy.port, timeout=10)
        pop.user(alice.user)
        pop.pass_(alice.password)
        pop.quit()
        row = "SELECT user, sessions, logins_ok, logins_failed, last_peer FROM users"
        wait_until("alice's row", lambda: query(db, row) == [(alias, 1, 1, 0, "127.0.0.1")])

        spoof = poplib.POP3("127.0.0.1", proxy.port, timeout=10)
        spoof.user(alias)
        with pytest.raises(poplib.error_proto):
            spoof.pass_("Wrong-password-1")
        spoof.quit()
        wait_until(
            "the failed login on the client's row",
            lambda: query(db, "SELECT logins_ok, logins_failed FROM clients") == [(1, 1)],
        )
        failed = proxy.wait_for_event("pop3.login", lambda e: e.get("result") == "failure")

    assert query(db, row) == [(alias, 1, 1, 0, "127.0.0.1")]  # alice's row: unchanged
    twice = pseudonyms.pseudonym(alias)
    assert failed["user"] == twice
    assert query(db, "SELECT user, attempts FROM failed_names") == [(twice, 1)]
