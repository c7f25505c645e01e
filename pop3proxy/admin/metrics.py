"""Prometheus metrics of the proxy, fed by the session events; and the figures the dashboard charts.

:class:`Metrics` owns one ``CollectorRegistry`` per app (never the process-global one, so
several apps, e.g. in tests, never share counters). Its :meth:`Metrics.sink` is a telemetry
sink: it runs on the relay's task for every session event, so each event costs a dictionary
look-up and a few counter increments, nothing more.

Label values never carry a secret and never grow without bound: verbs are the engine's known
verbs (anything else is ``OTHER``), SASL mechanisms a fixed list, client networks the
configured ``allow`` networks plus ``other``, and free-form reasons the first
:data:`MAX_REASONS` well-formed ones. There is no per-user or per-address label.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from pop3proxy import __version__
from pop3proxy.config import DEFAULT_ALLOW, Settings
from pop3proxy.policy import Network
from pop3proxy.pop3 import KNOWN_VERBS, UNKNOWN_VERB

__all__ = ["History", "Metrics", "NetworkClassifier", "ReasonLabel"]

OTHER: Final = "other"
#: Most distinct values of a free-form reason label (close reasons, failure reasons...).
MAX_REASONS: Final = 32
_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")

#: Label values of the ``verb`` label: the engine's verbs, ``UNKNOWN``, and ``OTHER``.
VERBS: Final = frozenset({*KNOWN_VERBS, UNKNOWN_VERB})
#: Login mechanisms worth their own label value (USER/PASS, APOP, SASL names).
MECHANISMS: Final = frozenset(
    {
        "USER", "APOP", "PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "XOAUTH2", "OAUTHBEARER",
        "EXTERNAL", "ANONYMOUS", "GSSAPI", "NTLM", "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS",
    }
)  # fmt: skip
STATUSES: Final = frozenset({"+OK", "-ERR"})
LOGIN_RESULTS: Final = frozenset({"success", "failure"})
#: Directions of the ``pop3proxy_bytes_total`` counter, as named in ``session.closed``.
DIRECTIONS: Final = ("from_client", "to_client", "from_upstream", "to_upstream")

#: RETR/TOP reply sizes, in octets: 1 KiB to 64 MiB.
SIZE_BUCKETS: Final = tuple(float(1 << n) for n in range(10, 27, 2))
#: Session durations in seconds: a poll takes a second, an idle client ten minutes.
DURATION_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0)


class ReasonLabel:
    """A free-form label (``reason``, ``phase``): values as they come, at most ``limit`` of them.

    A value that is not a short lower-case word, or that would be one too many, becomes
    ``other``: the label set stays bounded whatever the relay (or a future version) reports.
    """

    def __init__(self, limit: int = MAX_REASONS) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: object) -> str:
        text = str(value)
        if text in self._seen:
            return text
        if len(self._seen) >= self.limit or not _REASON.match(text):
            return OTHER
        self._seen.add(text)
        return text


def _capped(value: object, allowed: frozenset[str], other: str = OTHER) -> str:
    text = str(value)
    return text if text in allowed else other


class NetworkClassifier:
    """Maps a client ``ip:port`` to the most specific configured network, or ``other``."""

    def __init__(self, networks: Iterable[Network]) -> None:
        unique = {str(n): n for n in networks}
        self.networks: tuple[Network, ...] = tuple(
            sorted(unique.values(), key=lambda n: n.prefixlen, reverse=True)
        )
        self.labels: tuple[str, ...] = (*(str(n) for n in self.networks), OTHER)

    def classify(self, client: str) -> str:
        host = client.rpartition(":")[0].removeprefix("[").removesuffix("]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return OTHER
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for network in self.networks:
            if ip.version == network.version and ip in network:
                return str(network)
        return OTHER


class History:
    """Event counts per time step (10 s) over the last ``length`` steps, for the dashboard charts.

    O(1) per event: only the newest bucket is touched; a new step appends zeroed buckets.
    """

    SERIES: Final = ("sessions", "logins_ok", "logins_failed", "upstream_failures", "commands")

    def __init__(
        self, step: float = 10.0, length: int = 90, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.step = step
        self.length = length
        self.clock = clock
        self._buckets: deque[dict[str, int]] = deque(maxlen=length)
        self._index: int | None = None

    def _zero(self) -> dict[str, int]:
        return dict.fromkeys(self.SERIES, 0)

    def _current(self) -> dict[str, int]:
        index = int(self.clock() // self.step)
        if self._index is None:
            self._buckets.append(self._zero())
        elif index != self._index:
            for _ in range(min(index - self._index, self.length)):
                self._buckets.append(self._zero())
        self._index = index
        return self._buckets[-1]

    def add(self, series: str, count: int = 1) -> None:
        self._current()[series] += count

    def snapshot(self) -> dict[str, Any]:
        """``{"step_s": 10, "series": {"sessions": [oldest, ..., newest], ...}}`` (full length)."""
        self._current()
        padding = [self._zero()] * (self.length - len(self._buckets))
        buckets = [*padding, *self._buckets]
        return {
            "step_s": self.step,
            "series": {name: [b[name] for b in buckets] for name in self.SERIES},
        }


class Metrics:
    """The registry and the sink that feeds it.

    Args:
        settings: returns the current settings (they may be replaced on reload); only
            ``allow`` is read, for the client networks.
    """

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ns = "pop3proxy"
        self.sessions_opened = Counter(
            "sessions_opened", "POP3 client sessions accepted", namespace=ns, registry=r
        )
        self.sessions_active = Gauge(
            "sessions_active", "POP3 client sessions open now", namespace=ns, registry=r
        )
        self.sessions_closed = Counter(
            "sessions_closed", "POP3 sessions closed, by reason", ["reason"], namespace=ns,
            registry=r,
        )  # fmt: skip
        self.sessions_refused = Counter(
            "sessions_refused", "POP3 sessions refused before relaying (acl, capacity...)",
            ["reason"], namespace=ns, registry=r,
        )  # fmt: skip
        self.plaintext_sessions = Counter(
            "plaintext_sessions", "plaintext POP3 sessions by configured client network",
            ["network"], namespace=ns, registry=r,
        )  # fmt: skip
        self.logins = Counter(
            "logins", "logins by mechanism and result", ["mechanism", "result"], namespace=ns,
            registry=r,
        )  # fmt: skip
        self.commands = Counter(
            "commands", "POP3 commands by verb and reply status", ["verb", "status"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.bytes = Counter(
            "bytes", "octets relayed, by direction, counted when the session closes",
            ["direction"], namespace=ns, registry=r,
        )  # fmt: skip
        self.message_size = Histogram(
            "message_size_bytes", "size of RETR and TOP replies (octets, +OK only)", ["verb"],
            namespace=ns, registry=r, buckets=SIZE_BUCKETS,
        )  # fmt: skip
        self.session_duration = Histogram(
            "session_duration_seconds", "duration of POP3 sessions", namespace=ns, registry=r,
            buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.upstream_failures = Counter(
            "upstream_failures", "failed connections to the upstream, by phase and reason",
            ["phase", "reason"], namespace=ns, registry=r,
        )  # fmt: skip
        self.certificate_days = Gauge(
            "upstream_certificate_expiry_days",
            "days until the upstream certificate expires (NaN until one was seen)",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.upstream_ready = Gauge(
            "upstream_ready", "1 if the last readiness probe of the upstream succeeded",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.feed_watchers = Gauge(
            "feed_watchers", "WebSocket watchers of /events", namespace=ns, registry=r
        )
        self.feed_dropped = Counter(
            "feed_dropped_events", "events not sent to a watcher that was too slow",
            namespace=ns, registry=r,
        )  # fmt: skip
        build = Gauge("build_info", "pop3proxy version", ["version"], namespace=ns, registry=r)
        build.labels(__version__).set(1)
        ProcessCollector(registry=r)

        self.history = History()
        self._open: set[str] = set()
        self._not_after: float | None = None
        self._not_after_text: str | None = None
        self._close_reasons = ReasonLabel()
        self._failure_phases = ReasonLabel(limit=8)
        self._failure_reasons = ReasonLabel()
        self._allow: object = None
        self._networks = NetworkClassifier(())
        # Children of the per-command metrics, by label values: ``labels()`` costs more than
        # the increment. Created on first use, as ``labels()`` would, so the output is the same.
        self._command_counters: dict[tuple[str, str], Counter] = {}
        self._message_sizes: dict[str, Histogram] = {}
        self.sessions_active.set_function(lambda: len(self._open))
        self.certificate_days.set_function(self._days_left)
        self._handlers: Mapping[str, Callable[[Mapping[str, Any]], None]] = {
            "session.opened": self._on_opened,
            "session.closed": self._on_closed,
            "upstream.tls_established": self._on_tls,
            "upstream.failed": self._on_upstream_failed,
            "pop3.login": self._on_login,
            "pop3.command": self._on_command,
        }
        self._classifier()  # label values of the networks exist from the first scrape
        for direction in DIRECTIONS:
            self.bytes.labels(direction)

    # -- the sink ---------------------------------------------------------------------------

    def sink(self, event: str, level: str, fields: Mapping[str, Any]) -> None:
        """Telemetry sink: update the metrics for one event; O(1), never raises."""
        handler = self._handlers.get(event)
        if handler is None:
            return
        try:  # not contextlib.suppress: that costs a context manager per event
            handler(fields)
        except Exception:  # a malformed field must not cost the session
            return

    def _classifier(self) -> NetworkClassifier:
        allow = getattr(self._settings(), "allow", DEFAULT_ALLOW)
        if allow is not self._allow:  # settings replaced (reload): rebuild once
            self._allow = allow
            self._networks = NetworkClassifier(allow)
            for label in self._networks.labels:
                self.plaintext_sessions.labels(label)
        return self._networks

    def _on_opened(self, fields: Mapping[str, Any]) -> None:
        self.sessions_opened.inc()
        self._open.add(str(fields.get("session_id")))
        network = self._classifier().classify(str(fields.get("client", "")))
        self.plaintext_sessions.labels(network).inc()
        self.history.add("sessions")

    def _on_closed(self, fields: Mapping[str, Any]) -> None:
        self._open.discard(str(fields.get("session_id")))
        reason = self._close_reasons(fields.get("reason"))
        self.sessions_closed.labels(reason).inc()
        if reason.startswith("refused_"):  # turned away before relaying (acl, capacity...)
            self.sessions_refused.labels(reason.removeprefix("refused_")).inc()
        duration = fields.get("duration_s")
        if isinstance(duration, int | float):
            self.session_duration.observe(duration)
        for direction in DIRECTIONS:
            octets = fields.get(f"bytes_{direction}")
            if isinstance(octets, int) and octets > 0:
                self.bytes.labels(direction).inc(octets)

    def _on_tls(self, fields: Mapping[str, Any]) -> None:
        self.observe_certificate(fields.get("peer_not_after"))

    def _on_upstream_failed(self, fields: Mapping[str, Any]) -> None:
        phase = self._failure_phases(fields.get("phase"))
        reason = self._failure_reasons(fields.get("reason"))
        self.upstream_failures.labels(phase, reason).inc()
        self.history.add("upstream_failures")

    def _on_login(self, fields: Mapping[str, Any]) -> None:
        mechanism = _capped(str(fields.get("mechanism", "")).upper(), MECHANISMS)
        result = _capped(fields.get("result"), LOGIN_RESULTS)
        self.logins.labels(mechanism, result).inc()
        self.history.add("logins_ok" if result == "success" else "logins_failed")

    def _on_command(self, fields: Mapping[str, Any]) -> None:
        verb = _capped(fields.get("verb"), VERBS, "OTHER")
        status = _capped(fields.get("status"), STATUSES)
        counter = self._command_counters.get((verb, status))
        if counter is None:  # bounded: both label values are capped
            counter = self._command_counters[verb, status] = self.commands.labels(verb, status)
        counter.inc()
        self.history.add("commands")
        octets = fields.get("reply_octets")
        if verb in {"RETR", "TOP"} and status == "+OK" and isinstance(octets, int):
            sizes = self._message_sizes.get(verb)
            if sizes is None:
                sizes = self._message_sizes[verb] = self.message_size.labels(verb)
            sizes.observe(octets)

    # -- other sources ------------------------------------------------------------------------

    def observe_certificate(self, not_after: object) -> None:
        """Record the upstream certificate's ``notAfter`` (ISO 8601, from ``describe_peer``)."""
        if not isinstance(not_after, str) or not_after == self._not_after_text:
            return
        try:
            self._not_after = datetime.fromisoformat(not_after).timestamp()
        except ValueError:
            return
        self._not_after_text = not_after

    def _days_left(self) -> float:
        if self._not_after is None:
            return math.nan
        return round((self._not_after - time.time()) / 86400, 3)

    def set_ready(self, ready: bool) -> None:
        self.upstream_ready.set(1 if ready else 0)

    # -- output ---------------------------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if ``accept`` asks) and its type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def summary(self) -> dict[str, Any]:
        """Totals for the dashboard (``/api/summary``), read from the same metrics."""
        closed = _totals(self.sessions_closed, "reason")
        logins = _totals(self.logins, "mechanism", "result")
        commands = _totals(self.commands, "verb", "status")
        failures = _totals(self.upstream_failures, "phase", "reason")
        days = self._days_left()
        by_verb: dict[str, float] = {}
        for (verb, _status), count in commands.items():
            by_verb[verb] = by_verb.get(verb, 0) + count
        by_reason: dict[str, float] = {}
        for (_phase, reason), count in failures.items():
            by_reason[reason] = by_reason.get(reason, 0) + count
        return {
            "sessions": {
                "opened": _totals(self.sessions_opened).get((), 0),
                "active": len(self._open),
                "closed": {k[0]: v for k, v in closed.items()},
                "refused": {k[0]: v for k, v in _totals(self.sessions_refused, "reason").items()},
            },
            "logins": {
                "success": sum(v for k, v in logins.items() if k[1] == "success"),
                "failure": sum(v for k, v in logins.items() if k[1] == "failure"),
                "by_mechanism": {f"{m} {r}": v for (m, r), v in logins.items()},
            },
            "commands": by_verb,
            "command_errors": {v: c for (v, s), c in commands.items() if s == "-ERR"},
            "networks": {k[0]: v for k, v in _totals(self.plaintext_sessions, "network").items()},
            "upstream_failures": by_reason,
            "bytes": {k[0]: v for k, v in _totals(self.bytes, "direction").items()},
            "certificate_days_left": None if math.isnan(days) else days,
            "feed": {
                "watchers": _gauge_value(self.feed_watchers),
                "dropped": _totals(self.feed_dropped).get((), 0),
            },
            "history": self.history.snapshot(),
        }


def _totals(metric: Counter, *labels: str) -> dict[tuple[str, ...], float]:
    """A counter's ``_total`` samples keyed by the values of ``labels``."""
    totals: dict[tuple[str, ...], float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = tuple(sample.labels[name] for name in labels)
                totals[key] = totals.get(key, 0) + sample.value
    return totals


def _gauge_value(metric: Gauge) -> float:
    return sum(sample.value for family in metric.collect() for sample in family.samples)
