"""Who may use the proxy, decided per connection and per login; pure, no I/O.

The relay asks twice: :meth:`Policy.on_connect` before any upstream connection is made
(client address only), and :meth:`Policy.on_login` when the engine has read the user name
(USER, APOP, AUTH), before the credential reaches the upstream. Each answer is a
:class:`Verdict`. Several policies are chained: the first ``deny`` wins; ``warn`` notices
are collected.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pop3proxy.addresses import IPAddress

__all__ = ["ALLOW", "IPAddress", "Network", "Policy", "Verdict", "combine", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs as the admin writes them (host bits allowed: ``10.1.2.3/8`` means ``10.0.0.0/8``).

    Raises:
        ValueError: naming the item that is not a network.
    """
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a network such as 10.0.0.0/8 or fd00::/8") from None
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One decision.

    Attributes:
        action: ``allow``; ``warn`` (allowed, but logged and counted as a client that must
            migrate); ``deny`` (refused with ``reply``).
        reason: a stable word for logs and metrics (``acl``, ``user_network``, ``phase``...).
        reply: the full POP3 line (with CRLF) sent to a denied client.
        rule: the name of the rule that decided, for the logs.
        notice: for ``warn``: text the proxy may add to the greeting after ``+OK``.
        dry_run: the verdict would have been ``deny`` but only logs (``--dry-run``).
    """

    action: Literal["allow", "warn", "deny"]
    reason: str = ""
    reply: bytes | None = None
    rule: str | None = None
    notice: str | None = None
    dry_run: bool = False


ALLOW = Verdict("allow")


class Policy(Protocol):
    """A source of verdicts; implementations must be quick (they run per session)."""

    def on_connect(self, client: IPAddress, now: dt.datetime) -> Verdict: ...

    def on_login(self, client: IPAddress, user: str | None, now: dt.datetime) -> Verdict:
        """``user`` None: a credential leaves for a user the engine cannot read."""
        ...


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """The first ``deny``, else the first ``warn``, else ``ALLOW``."""
    for action in ("deny", "warn"):
        for verdict in verdicts:
            if verdict.action == action:
                return verdict
    return ALLOW
