"""``pop3proxy check`` against the real Dovecot (and a test server for a short-lived cert)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pop3proxy.migration.check import missing_issuer, name_matches, spki_pin
from tests.peers.dovecot import Dovecot, MailboxFactory
from tests.peers.tls_servers import POP3STestServer, server_context

_REPO_ROOT = Path(__file__).resolve().parents[1]


def run_check(
    args: Sequence[str], *, stdin: str | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")}
    env.pop("SSLKEYLOGFILE", None)
    return subprocess.run(
        [sys.executable, "-m", "pop3proxy", "check", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        cwd=_REPO_ROOT,
        timeout=timeout,
        check=False,
    )


def dovecot_args(
    dovecot: Dovecot, *, ca_file: Path | None = None, name: str | None = None
) -> list[str]:
    return [
        "--upstream",
        f"127.0.0.1:{dovecot.port}",
        "--upstream-ca-file",
        str(ca_file or dovecot.ca_pem_path),
        "--upstream-server-name",
        name or dovecot.server_name,
    ]


def findings(report: dict[str, Any]) -> dict[str, list[str]]:
    """check name -> the statuses reported for it."""
    found: dict[str, list[str]] = {}
    for item in report["findings"]:
        found.setdefault(item["check"], []).append(item["status"])
    return found


def leaf_of(dovecot: Dovecot) -> x509.Certificate:
    return x509.load_pem_x509_certificates(dovecot.cert_path.read_bytes())[0]


def test_good_chain_json(dovecot: Dovecot) -> None:
    done = run_check([*dovecot_args(dovecot), "--json"])
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    statuses = findings(report)
    for check in ("tcp", "tls", "chain", "hostname", "expiry", "greeting", "capa"):
        assert statuses[check] == ["ok"], (check, report["findings"])
    assert statuses["login"] == ["skip"]
    assert report["tls_version"] in {"TLSv1.2", "TLSv1.3"}
    assert report["cipher"]
    leaf = leaf_of(dovecot)
    assert report["chain"][0]["subject"] == leaf.subject.rfc4514_string()
    assert report["chain"][0]["sha256"] == leaf.fingerprint(hashes.SHA256()).hex()
    assert "pop.test" in report["chain"][0]["names"]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(spki).digest()
    assert report["spki_sha256"] == digest.hex()
    assert report["spki_pin"] == f'pin-sha256="{base64.b64encode(digest).decode()}"'
    # The greeting and CAPA are Dovecot's own, as a direct client sees them.
    pop = dovecot.direct_pop3s()
    try:
        welcome = pop.getwelcome().decode()
        capa = pop.capa()
    finally:
        pop.quit()
    # The APOP timestamp differs per connection; the rest is the same.
    stamp = re.compile(r"<[^<>]*@[^<>]*>")
    assert stamp.sub("<>", report["greeting"]) == stamp.sub("<>", welcome)
    assert report["apop_timestamp"] == (stamp.search(welcome) is not None)
    assert set(capa) <= {line.split(" ")[0] for line in report["capabilities"]}
    assert "USER" in [line.split(" ")[0] for line in report["capabilities"]]


def test_good_chain_text(dovecot: Dovecot) -> None:
    done = run_check(dovecot_args(dovecot))
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert text.rstrip().endswith("Result: OK")
    assert "Certificate chain as sent by the server:" in text
    assert 'SPKI pin of the leaf: pin-sha256="' in text
    assert f"connected to 127.0.0.1:{dovecot.port} in" in text


def test_unknown_ca_names_the_missing_issuer(dovecot: Dovecot, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    done = run_check([*dovecot_args(dovecot, ca_file=other), "--json"])
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    chain = [f for f in report["findings"] if f["check"] == "chain"]
    assert [f["status"] for f in chain] == ["fail"]
    issuer = leaf_of(dovecot).issuer.rfc4514_string()
    assert f"missing issuer {issuer}" in chain[0]["message"]
    assert str(other) in chain[0]["message"]
    # The chain is still shown, and POP3 is not spoken over an unverified connection.
    assert report["chain"][0]["issuer"] == issuer
    assert report["greeting"] is None
    assert findings(report)["pop3"] == ["skip"]
    text = run_check(dovecot_args(dovecot, ca_file=other))
    assert text.returncode == 1
    assert f"missing issuer {issuer}" in text.stdout
    assert "FAILED" in text.stdout


def test_wrong_host_name(dovecot: Dovecot) -> None:
    done = run_check([*dovecot_args(dovecot, name="wrong.test"), "--json"])
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    statuses = findings(report)
    assert statuses["hostname"] == ["fail"]
    assert statuses["chain"] == ["ok"]
    message = next(f["message"] for f in report["findings"] if f["check"] == "hostname")
    assert "wrong.test does not match" in message
    assert "pop.test" in message


def test_certificate_expiring_in_ten_days_warns(ca: trustme.CA, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    leaf = ca.issue_cert(
        "soon.test",
        not_before=now - dt.timedelta(days=80),
        not_after=now + dt.timedelta(days=10, hours=1),
    )
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with POP3STestServer(server_context(leaf)) as server:
        done = run_check(
            [
                "--upstream",
                f"127.0.0.1:{server.port}",
                "--upstream-ca-file",
                str(ca_file),
                "--upstream-server-name",
                "soon.test",
                "--json",
            ]
        )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    expiry = [f for f in report["findings"] if f["check"] == "expiry"]
    assert [f["status"] for f in expiry] == ["warn"]
    assert "expires in 10 days" in expiry[0]["message"]
    assert report["chain"][0]["days_left"] == 10
    assert report["warnings"] >= 1


def test_login_right_and_wrong_password_never_printed(
    dovecot: Dovecot, mailbox: MailboxFactory, tmp_path: Path
) -> None:
    box = mailbox()
    password_file = tmp_path / "password"
    password_file.write_text(box.password + "\n", encoding="utf-8")
    good = run_check(
        [*dovecot_args(dovecot), "--user", box.user, "--password-file", str(password_file)]
    )
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"ok    login     {box.user} logged in" in good.stdout
    wrong_password = "Wrong-" + box.password[::-1]
    bad = run_check(
        [*dovecot_args(dovecot), "--user", box.user, "--password-file", "-", "--json"],
        stdin=wrong_password + "\n",
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    report = json.loads(bad.stdout)
    assert findings(report)["login"] == ["fail"]
    assert report["login"]["ok"] is False
    for done, secret in ((good, box.password), (bad, wrong_password)):
        assert secret not in done.stdout
        assert secret not in done.stderr
        assert secret not in " ".join(done.args)
    # Nor in the server's log (Dovecot logs failed logins, never passwords).
    assert wrong_password not in dovecot.log_text()


def test_usage_errors_exit_2_with_one_line() -> None:
    done = run_check(["--upstream", "127.0.0.1:1", "--user", "alice"])
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "--password-file" in done.stderr
    missing = run_check([])
    assert missing.returncode == 2
    assert "--upstream" in missing.stderr


def test_refused_port_fails_tcp() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        done = run_check(["--upstream", f"127.0.0.1:{port}", "--json"])
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert findings(report) == {"tcp": ["fail"]}


# -- pure helpers -----------------------------------------------------------------------------


def test_missing_issuer_follows_the_sent_chain() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("mail.example.com")
    chain = [x509.load_pem_x509_certificate(b.bytes()) for b in leaf.cert_chain_pems]
    root_cert = x509.load_pem_x509_certificate(root.cert_pem.bytes())
    # The server sent leaf + intermediate: the root is the missing issuer.
    name, is_root = missing_issuer(chain[:2])
    assert (name, is_root) == (root_cert.subject.rfc4514_string(), False)
    # Only the leaf: the intermediate is missing.
    assert missing_issuer(chain[:1])[0] == chain[1].subject.rfc4514_string()
    # The root was sent too: the root itself is untrusted.
    assert missing_issuer([*chain[:2], root_cert]) == (root_cert.subject.rfc4514_string(), True)
    assert spki_pin(chain[0]) != spki_pin(chain[1])


def test_name_matches() -> None:
    assert name_matches("pop.example.com", ["pop.example.com"])
    assert name_matches("POP.example.com.", ["pop.example.com"])
    assert name_matches("pop.example.com", ["*.example.com"])
    assert not name_matches("a.pop.example.com", ["*.example.com"])
    assert not name_matches("example.com", ["*.example.com"])
    assert name_matches("127.0.0.1", ["pop.test", "127.0.0.1"])
    assert not name_matches("127.0.0.2", ["127.0.0.1"])
    assert not name_matches("other.test", ["pop.test"])
