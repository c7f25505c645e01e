"""Who may use the admin endpoint: the bearer token, and which ``Host`` names are trusted.

The token (``--admin-token-file FILE``, or the token itself in ``POP3PROXY_ADMIN_TOKEN``; never
a flag, since every local user can read a process's argv) is required, when set, by
everything but the probes. A client presents it as ``Authorization: Bearer TOKEN`` (Prometheus,
``pop3proxy watch``, ``pop3proxy healthcheck``) or as the password of HTTP Basic with any user
name (RFC 7617): that is what a browser's own login prompt sends, and a browser sends it again
by itself for the dashboard's ``fetch`` calls and its WebSocket, to which a page cannot add
a header. Presented tokens are compared in constant time and never logged.

A ``Host`` is trusted when it is an IP address literal, ``localhost`` or a name under
``.localhost`` (browsers resolve those themselves), the ``--admin`` host, or one of
``--admin-host-names``. A page of another site can make its own name resolve to this
endpoint's address (DNS rebinding) and so read it "same-origin"; its name is none of those.

Standard library only: ``pop3proxy healthcheck`` imports this module.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "MAX_TOKEN_LENGTH",
    "MIN_TOKEN_LENGTH",
    "AdminToken",
    "host_name",
    "parse_admin_token",
    "parse_admin_token_file",
    "presented_token",
    "trusted_host",
]

#: Shortest token, in octets: 16 random characters are out of reach of guessing over HTTP.
MIN_TOKEN_LENGTH: Final = 16
#: Longest token, in octets: it travels in every request head (16 KiB at most).
MAX_TOKEN_LENGTH: Final = 1024
_GENERATE: Final = "e.g. openssl rand -hex 32"


@dataclass(frozen=True, slots=True)
class AdminToken:
    """The admin token; its ``repr`` never shows it.

    Attributes:
        value: the token's octets (printable ASCII, no white space).
        source: where it came from (``file /run/secrets/admin-token``, ``environment``).
    """

    value: bytes = field(repr=False)
    source: str = "environment"

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value presents this token (constant time)."""
        presented = presented_token(authorization)
        return presented is not None and hmac.compare_digest(presented, self.value)

    def header(self) -> str:
        """The ``Authorization`` header value a client sends."""
        return "Bearer " + self.value.decode("ascii")


def parse_admin_token(value: bytes, source: str) -> AdminToken:
    """Check a token (surrounding white space, such as a file's last newline, removed).

    Raises:
        ValueError: with a short description of the problem that never quotes the token.
    """
    token = value.strip()
    if not token:
        raise ValueError(f"holds no token ({_GENERATE})")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"holds {len(token)} octets, fewer than {MIN_TOKEN_LENGTH} ({_GENERATE})")
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError(f"holds more than {MAX_TOKEN_LENGTH} octets")
    if not all(0x21 <= octet <= 0x7E for octet in token):
        raise ValueError("must be printable ASCII without spaces (it travels in an HTTP header)")
    return AdminToken(token, source)


def parse_admin_token_file(raw: object) -> AdminToken:
    """A setting parser: the name of a file holding the token.

    Raises:
        ValueError: the file is missing, a directory, unreadable, or its token is bad; the
            message never quotes the file's contents.
    """
    path = Path(_file_name(raw))
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a directory, expected a file holding the token") from None
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or type(exc).__name__}") from None
    return parse_admin_token(data, f"file {path}")


def _file_name(raw: object) -> str:
    if isinstance(raw, str) and raw:
        return raw
    raise ValueError("expected a file name")


def presented_token(authorization: str | None) -> bytes | None:
    """The token in an ``Authorization`` header value, or None.

    ``Bearer TOKEN`` (RFC 6750 §2.1), or ``Basic`` (RFC 7617) with the token as the password
    and any user name; scheme names are case-insensitive (RFC 9110 §11.1).
    """
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials.encode("latin-1") or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return None
        _user, colon, password = decoded.partition(b":")
        return password if colon and password else None
    return None


def host_name(host: str) -> str:
    """The name in a ``Host`` header value: no port, no brackets, lower case, no final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.removesuffix(".")


def trusted_host(host: str | None, names: Collection[str]) -> bool:
    """Whether a request's ``Host`` is one a browser can only use for this very endpoint.

    ``names`` are the extra names allowed (the ``--admin`` host, ``--admin-host-names``). A
    request without ``Host`` (HTTP/1.0) does not come from a browser: trusted.
    """
    if host is None:
        return True
    name = host_name(host)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return True
    if name == "localhost" or name.endswith(".localhost"):
        return True
    return bool(name) and name in {host_name(n) for n in names}
