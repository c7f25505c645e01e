"""Real peers (Dovecot, the proxy as a subprocess) for the integration tests."""

from __future__ import annotations
