"""Settings of pop3proxy, and how they are read.

STUB: the Settings shape below is the contract; loading (flags > env > TOML file >
defaults) is being written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Endpoint", "Settings"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host and TCP port; IPv6 literals are written ``[::1]:110``."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``pop3proxy serve`` needs, validated."""

    listen: Endpoint = Endpoint("127.0.0.1", 110)
    upstream: Endpoint | None = None
    upstream_ca_file: Path | None = None
    upstream_server_name: str | None = None
    tls_min_version: str = "1.2"
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0
    log_level: str = "info"
    log_format: str = "auto"

    @property
    def tls_server_name(self) -> str:
        """The name the upstream certificate must match: never empty (no skipped check)."""
        if self.upstream_server_name:
            return self.upstream_server_name
        if self.upstream is None:
            raise ValueError("no upstream configured")
        return self.upstream.host
