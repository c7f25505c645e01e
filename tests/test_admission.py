"""The gatekeeper's decisions, with times passed in: no sockets, no clock."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress

import pytest

from pop3proxy.addresses import bracket_host, client_ip, format_address, host_of
from pop3proxy.admission import Gatekeeper
from pop3proxy.config import DEFAULT_ALLOW, Settings, load_settings
from pop3proxy.policy import IPAddress, Verdict

NOW = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def settings(**flags: object) -> Settings:
    return load_settings({"upstream": "pop.example:995", **flags}, {})


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.31.255.1", True),
        ("172.32.0.1", False),
        ("192.168.7.7", True),
        ("8.8.8.8", False),
        ("::1", True),
        ("fd12::1", True),
        ("2001:db8::1", False),
    ],
)
def test_default_allow_list_is_loopback_and_private_ranges(address: str, allowed: bool) -> None:
    verdict = Gatekeeper(settings()).admit(ip(address), NOW)
    assert (verdict.action == "allow") is allowed
    if not allowed:
        assert verdict.reason == "acl"
        assert verdict.reply is not None
        assert verdict.reply.startswith(b"-ERR [SYS/PERM] ")


def test_ipv4_mapped_clients_are_judged_as_ipv4() -> None:
    assert client_ip("::ffff:10.1.2.3") == ip("10.1.2.3")
    assert client_ip("fe80::1%eth0") == ip("fe80::1")


def test_allow_setting_replaces_the_default() -> None:
    gate = Gatekeeper(settings(allow=["192.0.2.0/24"]))
    assert gate.admit(ip("192.0.2.9"), NOW).action == "allow"
    assert gate.admit(ip("127.0.0.1"), NOW).reason == "acl"
    assert gate.settings.allow != DEFAULT_ALLOW


def test_session_caps_global_and_per_client() -> None:
    gate = Gatekeeper(settings(max_sessions="3", max_sessions_per_client="2"))
    a, b = ip("10.0.0.1"), ip("10.0.0.2")
    for address in (a, a):
        assert gate.admit(address, NOW).action == "allow"
        gate.session_started(address)
    refused = gate.admit(a, NOW)
    assert (refused.reason, refused.reply is not None) == ("client_capacity", True)
    assert refused.reply is not None
    assert refused.reply.startswith(b"-ERR [SYS/TEMP] ")
    gate.session_started(b)
    assert gate.admit(b, NOW).reason == "capacity"
    gate.session_ended(a)
    assert gate.admit(b, NOW).action == "allow"
    assert gate.active_by_client == {a: 1, b: 1}


def test_login_budget_per_session_is_auth_per_client_is_sys_temp() -> None:
    gate = Gatekeeper(
        settings(max_login_failures="2", client_login_failures="3", login_failure_window="60")
    )
    a = ip("10.0.0.1")
    ok = gate.check_login(a, "alice", session_failures=1, monotonic=0.0, now=NOW)
    assert ok.action == "allow"
    session = gate.check_login(a, "alice", session_failures=2, monotonic=0.0, now=NOW)
    assert session.reply is not None
    assert session.reply.startswith(b"-ERR [AUTH] ")
    for t in (0.0, 1.0, 2.0):
        gate.record_login_failure(a, t)
    locked = gate.check_login(a, "alice", session_failures=0, monotonic=3.0, now=NOW)
    assert locked.reason == "client_login_failures"
    assert locked.reply is not None
    assert locked.reply.startswith(b"-ERR [SYS/TEMP] ")
    # The window slides: a minute later the address may try again, and is forgotten.
    assert gate.check_login(a, "alice", session_failures=0, monotonic=63.0, now=NOW) == Verdict(
        "allow"
    )
    assert gate.recent_failures(a, 63.0) == 0


def test_failed_login_delay_grows_to_its_ceiling() -> None:
    gate = Gatekeeper(settings(login_failure_delay="5", client_login_failures="100"))
    a = ip("10.0.0.1")
    delays = [gate.record_login_failure(a, float(t)) for t in range(7)]
    assert delays == [0.0, 0.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    off = Gatekeeper(settings(login_failure_delay="0"))
    assert {off.record_login_failure(a, float(t)) for t in range(5)} == {0.0}


def test_user_networks_bind_matching_users_only() -> None:
    gate = Gatekeeper(settings(user_networks=["scanner*@example.com=10.9.0.0/16"]))
    inside, outside = ip("10.9.1.1"), ip("10.1.1.1")
    assert gate.check_login(inside, "Scanner-3@Example.com", session_failures=0,
                            monotonic=0.0, now=NOW).action == "allow"  # fmt: skip
    refused = gate.check_login(
        outside, "scanner-3@example.com", session_failures=0, monotonic=0.0, now=NOW
    )
    assert refused.reason == "user_network"
    assert refused.reply is not None
    assert refused.reply.startswith(b"-ERR [AUTH] ")
    other_user = gate.check_login(outside, "alice", session_failures=0, monotonic=0.0, now=NOW)
    assert other_user.action == "allow"


class _Phase:
    """A stand-in policy: denies one network on connect and warns one user on login."""

    def on_connect(self, client: IPAddress, now: dt.datetime) -> Verdict:
        if client == ip("10.0.0.66"):
            return Verdict("deny", reason="phase", reply=b"-ERR [SYS/PERM] use 995\r\n")
        return Verdict("allow")

    def on_login(self, client: IPAddress, user: str | None, now: dt.datetime) -> Verdict:
        return (
            Verdict("warn", reason="phase", notice="migrate") if user == "old" else Verdict("allow")
        )


def test_policies_run_after_the_built_in_checks() -> None:
    gate = Gatekeeper(settings(allow=["10.0.0.0/8"]), [_Phase()])
    assert gate.admit(ip("10.0.0.66"), NOW).reason == "phase"
    assert gate.admit(ip("127.0.0.1"), NOW).reason == "acl"  # ACL first
    warn = gate.check_login(ip("10.0.0.1"), "old", session_failures=0, monotonic=0.0, now=NOW)
    assert (warn.action, warn.notice) == ("warn", "migrate")
    gate.reconfigure(dataclasses.replace(gate.settings), [])
    assert gate.admit(ip("10.0.0.66"), NOW).action == "allow"


def test_a_login_whose_user_cannot_be_read_fails_closed_under_user_bindings() -> None:
    free = Gatekeeper(settings())
    bound = Gatekeeper(settings(user_networks=["scan*=10.9.0.0/16"]))

    def check(gate: Gatekeeper) -> Verdict:
        return gate.check_login(ip("10.9.1.1"), None, session_failures=0, monotonic=0.0, now=NOW)

    assert check(free).action == "allow"
    refused = check(bound)
    assert (refused.action, refused.reason) == ("deny", "user_unknown")
    assert refused.reply is not None
    assert refused.reply.startswith(b"-ERR [AUTH] ")
    # The budgets still apply to an unreadable name.
    exhausted = free.check_login(ip("10.9.1.1"), None, session_failures=3, monotonic=0.0, now=NOW)
    assert exhausted.reason == "session_login_failures"


def test_addresses_are_written_and_read_back_in_one_spelling() -> None:
    assert format_address(("::1", 110, 0, 0)) == "[::1]:110"
    assert format_address(("127.0.0.1", 110)) == "127.0.0.1:110"
    assert bracket_host("fe80::1") == "[fe80::1]"
    assert bracket_host("mail.example") == "mail.example"
    for written in ("[::1]:110", "127.0.0.1:110"):
        assert host_of(written) in ("::1", "127.0.0.1")
    assert host_of("unknown") is None
    assert host_of("") is None
    assert host_of(None) is None
