"""SIGHUP after the upstream CA file is replaced in place: every consumer trusts the new CA.

Sessions, ``/readyz``, the ``healthcheck`` command (which asks ``/readyz``) and the ready
gauge must all follow the same, current trust material. The proxy first trusts Dovecot's CA
(A) from a file; the file is then overwritten with an unrelated CA (B) and the proxy gets
SIGHUP: ``/readyz`` must answer 503 ``unknown_ca`` at the first request after ``reload.done``
(even with a readiness cache far longer than the test), and a new session must fail its
handshake the same way. With A written back and another SIGHUP, all is ready again.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
import trustme

from tests.peers.dovecot import Dovecot, MailboxFactory
from tests.test_admin import TIMEOUT, AdminProxy, healthcheck, start_admin_proxy, value, wait_until


def reload_and_wait(admin: AdminProxy, done_before: int) -> None:
    """SIGHUP, then wait for the next ``reload.done`` (a failed reload fails the test)."""
    admin.proxy.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (
            len(admin.proxy.find_events("reload.done")) > done_before
            or admin.proxy.find_events("reload.failed") != []
        ),
        "reload.done",
    )
    assert admin.proxy.find_events("reload.failed") == []


def first_line_of_a_session(admin: AdminProxy) -> bytes:
    with socket.create_connection(("127.0.0.1", admin.proxy.port), timeout=TIMEOUT) as sock:
        return sock.recv(512)


@pytest.mark.parametrize("cache", ["0.001", "3600"], ids=["no-cache", "long-cache"])
def test_a_ca_file_replaced_in_place_is_trusted_by_readiness_and_sessions_alike(
    dovecot: Dovecot, mailbox: MailboxFactory, tmp_path: Path, cache: str
) -> None:
    ca_file = tmp_path / "upstream-ca.pem"
    trusted_pem = dovecot.ca_pem_path.read_bytes()
    ca_file.write_bytes(trusted_pem)
    proxy = start_admin_proxy(dovecot, tmp_path / "proxy.log", "--readiness-cache", cache)
    proxy.ca_file = ca_file
    with proxy:
        admin = AdminProxy(proxy)
        assert admin.request("/readyz").status == 200
        assert value(admin.scrape(), "pop3proxy_upstream_ready") == 1

        # In place: the same path (and inode), another CA's certificate.
        ca_file.write_bytes(trustme.CA().cert_pem.bytes())
        reload_and_wait(admin, 0)
        ready = admin.request("/readyz")
        assert ready.status == 503, ready
        assert (ready.json()["reason"], ready.json()["phase"]) == ("unknown_ca", "handshake")
        assert value(admin.scrape(), "pop3proxy_upstream_ready") == 0
        unhealthy = healthcheck(admin.endpoint)
        assert unhealthy.returncode == 1, unhealthy
        assert unhealthy.stdout.startswith("not ready: HTTP 503 unknown_ca"), unhealthy.stdout
        refused = first_line_of_a_session(admin)
        assert refused.startswith(b"-ERR [SYS/TEMP] mail server unavailable (unknown_ca)"), refused
        failed = proxy.wait_for_event("upstream.failed")
        assert failed["reason"] == "unknown_ca", failed

        ca_file.write_bytes(trusted_pem)
        reload_and_wait(admin, 1)
        assert admin.request("/readyz").status == 200
        assert value(admin.scrape(), "pop3proxy_upstream_ready") == 1
        healthy = healthcheck(admin.endpoint)
        assert healthy.returncode == 0, healthy
        box = mailbox([])
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
            assert sock.recv(512).startswith(b"+OK")
            sock.sendall(f"USER {box.user}\r\n".encode())
            assert sock.recv(512).startswith(b"+OK")
            sock.sendall(f"PASS {box.password}\r\nQUIT\r\n".encode())
            replies = b""
            while chunk := sock.recv(512):
                replies += chunk
        assert replies.startswith(b"+OK"), replies
        assert replies.count(b"+OK") == 2, replies

        def changes() -> list[tuple[object, object]]:
            return [(e["ready"], e["reason"]) for e in proxy.find_events("readiness.changed")]

        # Telemetry events are delivered in batches: wait for the last one.
        expected = [(True, "ok"), (False, "unknown_ca"), (True, "ok")]
        wait_until(lambda: changes() == expected, f"readiness.changed {expected}")
