"""The admin endpoint: health, readiness, Prometheus metrics, the live event feed, the dashboard.

One HTTP listener (``--admin HOST:PORT``, 127.0.0.1:9110 by default, never the POP3 port)
serves plain HTTP with an h11 front door and upgrades ``/events`` to a WebSocket with
trio-websocket (which alone would answer every plain request with a bare 400).
Everything it shows comes from the session events of :class:`pop3proxy.telemetry.Telemetry`,
which are already redacted: the metrics and the feed never see more than the log does.

- :mod:`.metrics`: a ``prometheus_client`` registry per app, fed by a telemetry sink, with
  bounded label sets;
- :mod:`.readiness`: the cached upstream probe behind ``/readyz``;
- :mod:`.feed`: WebSocket fan-out with a bounded queue per watcher that drops, never blocks;
- :mod:`.http`: the listener, routing and limits; ``http.admin_service`` is the app service;
- :mod:`.auth`: the admin token and the trusted ``Host`` names (standard library only);
- :mod:`.healthcheck`: the ``pop3proxy healthcheck`` client (standard library only).

Nothing is imported here, so ``pop3proxy healthcheck`` stays light.
"""

from __future__ import annotations
