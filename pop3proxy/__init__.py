"""pop3proxy: relays plaintext POP3 clients to a POP3S server over verified TLS.

The POP3 protocol logic lives in :mod:`pop3proxy.pop3` (sans-IO, no trio, no clock);
:mod:`pop3proxy.relay` and :mod:`pop3proxy.server` move the bytes.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
