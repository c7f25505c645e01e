"""``user_pseudonym_key``: user names in the log become keyed pseudonyms (GDPR/DSGVO)."""

from __future__ import annotations

import poplib
from pathlib import Path

from tests.peers.dovecot import Dovecot, MailboxFactory
from tests.peers.proxy import ProxyProcess


def test_user_names_are_pseudonymised_everywhere_in_the_log(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    key = tmp_path / "pseudonym.key"
    key.write_text("a-test-key-of-sufficient-length\n")
    with ProxyProcess(
        tmp_path / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=["--user-pseudonym-key", str(key)],
    ) as proxy:
        pop = poplib.POP3("127.0.0.1", proxy.port, timeout=10)
        pop.user(box.user)
        pop.pass_(box.password)
        pop.quit()
        closed = proxy.wait_for_event("session.closed")
        login = proxy.wait_for_event("pop3.login")
        user_command = proxy.wait_for_event("pop3.command", lambda e: e.get("verb") == "USER")
        log = proxy.log_text()

    assert box.user not in log
    pseudonym = login["user"]
    assert isinstance(pseudonym, str)
    assert pseudonym.startswith("u-")
    assert closed["user"] == pseudonym
    assert user_command["args"] == [pseudonym]
