"""Decisions that span sessions: who may connect, how many at once, and login budgets.

The relay asks the :class:`Gatekeeper` before it contacts the upstream (:meth:`~Gatekeeper.admit`)
and when a client names the user it logs in as (:meth:`~Gatekeeper.check_login`), before the
credential leaves. The gatekeeper keeps the counts that no single session can: sessions per
client address and failed logins per address over a sliding window. It does no I/O; times
are passed in, so tests need no clock.

Replies follow RFC 3206: ``[SYS/PERM]`` for a refusal that will not change by retrying (the
network is not allowed), ``[SYS/TEMP]`` for one that will (capacity, a cool-down), ``[AUTH]``
for a refusal about the credentials or the user.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from collections import Counter, deque
from collections.abc import Sequence

from pop3proxy.addresses import client_ip
from pop3proxy.config import Settings
from pop3proxy.policy import ALLOW, IPAddress, Policy, Verdict, combine

__all__ = ["Gatekeeper", "client_ip"]

REFUSE_NETWORK = (
    b"-ERR [SYS/PERM] plaintext POP3 is not allowed from your network: "
    b"use POP3S (port 995, TLS) instead\r\n"
)
REFUSE_CAPACITY = b"-ERR [SYS/TEMP] too many sessions, try again later\r\n"
REFUSE_CLIENT_CAPACITY = b"-ERR [SYS/TEMP] too many sessions from your address, try again later\r\n"
REFUSE_SESSION_FAILURES = b"-ERR [AUTH] too many failed logins in this session\r\n"
REFUSE_CLIENT_FAILURES = (
    b"-ERR [SYS/TEMP] too many failed logins from your address, try again later\r\n"
)
REFUSE_USER_NETWORK = b"-ERR [AUTH] this user may not log in from your network\r\n"
#: A policy bound to user names cannot tell whose credential this is (GSSAPI, NTLM, a PLAIN
#: login acting for another user...): fail closed, and say what works.
REFUSE_USER_UNKNOWN = (
    b"-ERR [AUTH] this login method does not show the user name, which this proxy must "
    b"check: use USER/PASS, AUTH PLAIN or AUTH LOGIN\r\n"
)

#: Failed logins of an address (within the window) that cost no delay: a typo is free.
FREE_FAILURES = 2


class Gatekeeper:
    """Admission control shared by all sessions of one proxy.

    Args:
        settings: ``allow``, ``user_networks``, session caps and login budgets.
        policies: further policies (e.g. migration phases), asked after the built-in checks.
    """

    def __init__(self, settings: Settings, policies: Sequence[Policy] = ()) -> None:
        self.active = 0
        self.active_by_client: Counter[IPAddress] = Counter()
        self._failures: dict[IPAddress, deque[float]] = {}
        self.reconfigure(settings, policies)

    def reconfigure(self, settings: Settings, policies: Sequence[Policy] = ()) -> None:
        """Take new settings (SIGHUP); open sessions keep what they were admitted with."""
        self.settings = settings
        self.policies = tuple(policies)

    # ------------------------------------------------------------------ connections

    def admit(self, client: IPAddress, now: dt.datetime) -> Verdict:
        """Decide on a new connection, before any upstream connection is made."""
        settings = self.settings
        if not any(client in network for network in settings.allow):
            return Verdict("deny", reason="acl", reply=REFUSE_NETWORK)
        if self.active >= settings.max_sessions:
            return Verdict("deny", reason="capacity", reply=REFUSE_CAPACITY)
        if self.active_by_client[client] >= settings.max_sessions_per_client:
            return Verdict("deny", reason="client_capacity", reply=REFUSE_CLIENT_CAPACITY)
        return combine([policy.on_connect(client, now) for policy in self.policies])

    def session_started(self, client: IPAddress) -> None:
        self.active += 1
        self.active_by_client[client] += 1

    def session_ended(self, client: IPAddress) -> None:
        self.active -= 1
        self.active_by_client[client] -= 1
        if self.active_by_client[client] <= 0:
            del self.active_by_client[client]

    # ------------------------------------------------------------------ logins

    def check_login(
        self,
        client: IPAddress,
        user: str | None,
        *,
        session_failures: int,
        monotonic: float,
        now: dt.datetime,
    ) -> Verdict:
        """Decide on a login attempt, before the credential is sent upstream.

        ``user`` None: the engine cannot read whose credential it is. The login budgets still
        apply, and a binding of user names to networks refuses it (fail closed).
        """
        settings = self.settings
        if session_failures >= settings.max_login_failures:
            return Verdict("deny", reason="session_login_failures", reply=REFUSE_SESSION_FAILURES)
        if self.recent_failures(client, monotonic) >= settings.client_login_failures:
            return Verdict("deny", reason="client_login_failures", reply=REFUSE_CLIENT_FAILURES)
        if user is None:
            if settings.user_networks:
                return Verdict("deny", reason="user_unknown", reply=REFUSE_USER_UNKNOWN)
        else:
            bound = [nets for glob, nets in settings.user_networks if _matches(user, glob)]
            if bound and not any(client in net for nets in bound for net in nets):
                return Verdict("deny", reason="user_network", reply=REFUSE_USER_NETWORK)
        if not self.policies:
            return ALLOW
        return combine([policy.on_login(client, user, now) for policy in self.policies])

    def record_login_failure(self, client: IPAddress, monotonic: float) -> float:
        """Count a failed login; return how long to hold back its reply (seconds)."""
        recent = self._failures.setdefault(client, deque())
        self._expire(recent, monotonic)
        recent.append(monotonic)
        ceiling = self.settings.login_failure_delay
        if ceiling is None or len(recent) <= FREE_FAILURES:
            return 0.0
        # Guessing gets slower and slower: 1 s, 2 s, 4 s... up to the ceiling.
        return float(min(ceiling, 2.0 ** min(len(recent) - FREE_FAILURES - 1, 16)))

    def recent_failures(self, client: IPAddress, monotonic: float) -> int:
        """Failed logins from ``client`` within the window; forgets it when there are none."""
        recent = self._failures.get(client)
        if recent is None:
            return 0
        self._expire(recent, monotonic)
        if not recent:
            del self._failures[client]
        return len(recent)

    def _expire(self, recent: deque[float], monotonic: float) -> None:
        horizon = monotonic - self.settings.login_failure_window
        while recent and recent[0] < horizon:
            recent.popleft()


def _matches(user: str, glob: str) -> bool:
    """User names compare case-insensitively, as mail systems treat them."""
    return fnmatch.fnmatchcase(user.lower(), glob.lower())
