"""Unit tests of the sans-IO POP3 engine (``pop3proxy.pop3``)."""

from __future__ import annotations
