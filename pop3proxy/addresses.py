"""Network addresses as the proxy writes and reads them: one spelling everywhere.

``host:port`` with IPv6 literals in brackets (RFC 3986 section 3.2.2), as logs, the inventory,
the admin endpoint and error messages all write it, and the client's IP address with an
IPv4-mapped IPv6 address unwrapped, so that allow lists, caps and the inventory see one address
per device whichever socket family accepted it. Nothing here imports from the rest of the
package.
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["IPAddress", "bracket_host", "client_ip", "format_address", "host_of"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def bracket_host(host: str) -> str:
    """``::1`` → ``[::1]``; names and IPv4 addresses unchanged (RFC 3986 section 3.2.2)."""
    return f"[{host}]" if ":" in host else host


def format_address(sockaddr: Any) -> str:
    """``("::1", 110, ...)`` → ``[::1]:110``: a socket address as the logs write it."""
    return f"{bracket_host(sockaddr[0])}:{sockaddr[1]}"


def host_of(text: object) -> str | None:
    """The host of a :func:`format_address` text: ``10.0.0.1:4321`` → ``10.0.0.1``,
    ``[::1]:4321`` → ``::1``; ``None`` for an empty or ``unknown`` address."""
    if not isinstance(text, str) or not text or text == "unknown":
        return None
    host = text.rpartition(":")[0] if text.count(":") == 1 or text.startswith("[") else text
    return host.strip("[]") or None


def client_ip(host: str) -> IPAddress:
    """The client's address, with IPv4-mapped IPv6 (``::ffff:10.1.2.3``) unwrapped and an
    IPv6 zone (``%eth0``) dropped. Raises :class:`ValueError` for anything else."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
