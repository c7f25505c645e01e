"""``pop3proxy healthcheck``: exit 0 if the proxy's ``/readyz`` answers 200, else 1.

For a Docker ``HEALTHCHECK`` in an image without curl. Standard library only
(``http.client``), so it starts fast and needs nothing the image does not already have.
It reads the same ``admin`` setting as ``serve`` (flag, ``POP3PROXY_ADMIN``, config file), so
it finds the endpoint the proxy in the same container listens on; a wildcard listen address
(``0.0.0.0:9110``) is reached over loopback. It reads the admin token the same way too
(``--admin-token-file``, ``POP3PROXY_ADMIN_TOKEN``) and sends it: ``/readyz`` answers without
one, but tells only ready or not and a one-word reason.
"""

from __future__ import annotations

import http.client
import json
import sys
from typing import TextIO

from pop3proxy.addresses import bracket_host
from pop3proxy.admin.auth import AdminToken
from pop3proxy.config import Endpoint
from pop3proxy.terminal import printable

__all__ = ["EXIT_NOT_READY", "EXIT_READY", "base_url", "check", "connect_host"]

EXIT_READY = 0
EXIT_NOT_READY = 1

#: Wildcard listen addresses, and the loopback address a local client dials instead.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


def connect_host(endpoint: Endpoint) -> str:
    """The host a local client dials for the admin ``endpoint`` (wildcards become loopback)."""
    return _WILDCARDS.get(endpoint.host, endpoint.host)


def base_url(endpoint: Endpoint, scheme: str = "http") -> str:
    """``http://HOST:PORT`` of the admin endpoint, as a local client reaches it."""
    host = connect_host(endpoint)
    host = bracket_host(host)
    return f"{scheme}://{host}:{endpoint.port}"


def check(
    endpoint: Endpoint,
    *,
    token: AdminToken | None = None,
    timeout: float = 5.0,
    out: TextIO = sys.stdout,
) -> int:
    """Ask ``/readyz``; print one line; return :data:`EXIT_READY` or :data:`EXIT_NOT_READY`."""
    url = base_url(endpoint) + "/readyz"
    connection = http.client.HTTPConnection(connect_host(endpoint), endpoint.port, timeout=timeout)
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = token.header()
    try:
        connection.request("GET", "/readyz", headers=headers)
        response = connection.getresponse()
        body = response.read(64 * 1024)
    except (OSError, http.client.HTTPException) as exc:
        print(printable(f"not ready: {url}: {exc or type(exc).__name__}"), file=out)
        return EXIT_NOT_READY
    finally:
        connection.close()
    try:
        detail = json.loads(body)
    except ValueError:
        detail = {}
    if not isinstance(detail, dict):
        detail = {}
    if response.status == http.HTTPStatus.OK:
        # Without the proxy's token (when it has one), /readyz tells no more than "ready".
        upstream = detail.get("upstream")
        where = f": upstream {upstream} ({detail.get('tls_version')})" if upstream else ""
        print(printable(f"ready{where}"), file=out)
        return EXIT_READY
    reason = detail.get("reason") or response.reason
    error = detail.get("error")
    # The error is the upstream's or the verifier's own words: never raw to a terminal.
    text = f"not ready: HTTP {response.status} {reason}" + (f": {error}" if error else "")
    print(printable(text), file=out)
    return EXIT_NOT_READY
