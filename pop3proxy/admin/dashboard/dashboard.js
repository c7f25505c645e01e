// pop3proxy dashboard: live sessions from the /events WebSocket, charts from /api/summary.
// Plain JavaScript, no libraries. Every value from the proxy is shown with textContent,
// never as HTML: user names and arguments come from POP3 clients.
"use strict";

(function () {
  const MAX_EVENTS = 100;
  const MAX_CLOSED = 50;
  const SUMMARY_INTERVAL_MS = 2000;

  const open = new Map();      // session_id -> session record
  let closed = [];             // most recent first
  let renderQueued = false;
  let backoff = 500;

  const $ = (id) => document.getElementById(id);

  function showError(message) {
    const box = $("page-error");
    box.hidden = false;
    box.textContent = "Dashboard error: " + message;
  }
  window.addEventListener("error", (e) => showError(e.message || String(e)));
  window.addEventListener("unhandledrejection", (e) => showError(String(e.reason)));

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function formatBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    n = Number(n) || 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }

  function shortTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleTimeString();
  }

  // -- the feed ------------------------------------------------------------------------------

  function setFeedState(state, text) {
    const badge = $("feed-status");
    badge.dataset.state = state;
    badge.textContent = text;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/events");
    ws.onopen = () => { backoff = 500; setFeedState("live", "live"); };
    ws.onmessage = (message) => {
      // One or more events per message, one JSON object per line.
      for (const line of String(message.data).split("\n")) {
        let event;
        try { event = JSON.parse(line); } catch (err) { continue; }
        handle(event);
      }
    };
    ws.onclose = () => {
      setFeedState("down", "disconnected, retrying");
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 10000);
    };
  }

  function remember(session) {
    closed = [session].concat(closed.filter((s) => s.session_id !== session.session_id));
    closed.length = Math.min(closed.length, MAX_CLOSED);
  }

  function handle(event) {
    const id = event.session_id;
    switch (event.event) {
      case "feed.snapshot":
        open.clear();
        for (const s of event.sessions || []) open.set(s.session_id, s);
        closed = (event.closed || []).slice().reverse().slice(0, MAX_CLOSED);
        break;
      case "feed.dropped":
        addEvent({ event: "feed.dropped", level: "warning", count: event.count });
        break;
      case "session.opened":
        open.set(id, {
          session_id: id, client: event.client, opened_at: event.timestamp, state: "connecting",
          user: null, commands: 0, last_command: null, tls_version: null,
        });
        break;
      default: {
        const s = open.get(id);
        if (s) {
          if (event.event === "upstream.tls_established") {
            s.state = "open"; s.tls_version = event.tls_version;
          } else if (event.event === "upstream.failed") {
            s.state = "upstream_failed"; s.reason = event.reason;
          } else if (event.event === "pop3.login" && event.result === "success") {
            s.user = event.user; s.state = "authenticated";
          } else if (event.event === "pop3.command") {
            s.commands += 1; s.last_command = event.verb;
          } else if (event.event === "session.closed") {
            open.delete(id);
            s.state = "closed";
            s.reason = event.reason;
            remember(s);
          }
        }
      }
    }
    if (event.event !== "feed.snapshot" && event.event !== "feed.dropped") addEvent(event);
    queueRender();
  }

  function describe(event) {
    const skip = new Set(["event", "level", "timestamp", "session_id"]);
    const parts = [];
    for (const [key, value] of Object.entries(event)) {
      if (skip.has(key) || value === null || value === undefined) continue;
      parts.push(key + "=" + (typeof value === "object" ? JSON.stringify(value) : value));
    }
    return parts.join(" ");
  }

  function addEvent(event) {
    const list = $("events");
    const item = el("li");
    item.dataset.level = event.level || "info";
    item.textContent = [shortTime(event.timestamp), event.session_id || "", event.event, describe(event)]
      .filter((p) => p !== "").join("  ");
    list.insertBefore(item, list.firstChild);
    while (list.children.length > MAX_EVENTS) list.removeChild(list.lastChild);
  }

  function queueRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => { renderQueued = false; renderSessions(); });
  }

  function renderSessions() {
    const body = $("sessions-body");
    const rows = Array.from(open.values()).reverse().concat(closed).slice(0, 100);
    body.replaceChildren();
    for (const s of rows) {
      const tr = el("tr");
      tr.dataset.state = s.state;
      tr.dataset.session = s.session_id;
      tr.append(
        el("td", s.session_id, "mono"), el("td", s.client, "mono"), el("td", s.user || ""),
        el("td", s.reason ? s.state + " (" + s.reason + ")" : s.state), el("td", s.commands),
        el("td", s.last_command || ""), el("td", s.tls_version || ""), el("td", shortTime(s.opened_at)),
      );
      body.append(tr);
    }
    $("sessions-empty").hidden = rows.length > 0;
    $("card-active").textContent = String(open.size);
  }

  // -- the summary and charts ------------------------------------------------------------------

  function bars(container, values, limit) {
    const entries = Object.entries(values || {}).filter(([, v]) => v > 0)
      .sort((a, b) => b[1] - a[1]).slice(0, limit || 10);
    const target = $(container);
    target.replaceChildren();
    if (entries.length === 0) { target.append(el("div", "none yet", "none")); return; }
    const max = Math.max(...entries.map(([, v]) => v));
    for (const [name, value] of entries) {
      const row = el("div", null, "row");
      row.dataset.name = name;
      const track = el("div", null, "track");
      const fill = el("div", null, "fill");
      fill.style.width = (100 * value / max).toFixed(1) + "%";
      track.append(fill);
      row.append(el("div", name, "name"), track, el("div", Math.round(value), "count"));
      target.append(row);
    }
  }

  const SVG = "http://www.w3.org/2000/svg";

  function history(data) {
    const svg = $("chart-history");
    svg.replaceChildren();
    const series = data.series || {};
    const names = ["sessions", "logins_ok", "logins_failed", "upstream_failures"];
    const length = (series.sessions || []).length;
    let max = 1;
    for (const name of names) for (const v of series[name] || []) max = Math.max(max, v);
    const width = 900, height = 180, pad = 6;
    const axis = document.createElementNS(SVG, "line");
    axis.setAttribute("class", "axis");
    axis.setAttribute("x1", 0); axis.setAttribute("x2", width);
    axis.setAttribute("y1", height - pad); axis.setAttribute("y2", height - pad);
    svg.append(axis);
    for (const name of names) {
      const values = series[name] || [];
      const points = values.map((v, i) => {
        const x = length > 1 ? (i * width) / (length - 1) : 0;
        const y = height - pad - ((height - 2 * pad) * v) / max;
        return x.toFixed(1) + "," + y.toFixed(1);
      });
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", name);
      line.setAttribute("points", points.join(" "));
      svg.append(line);
    }
    const minutes = Math.round((length * (data.step_s || 10)) / 60);
    $("history-span").textContent = "(last " + minutes + " min, per " + (data.step_s || 10) + " s, peak " + max + ")";
  }

  function renderSummary(s) {
    const p = s.proxy || {};
    $("proxy-info").textContent = "v" + p.version + "  ·  " + (p.listeners || []).join(", ") +
      " → " + p.upstream + "  ·  up " + Math.round(p.uptime_s || 0) + " s";
    $("card-sessions").textContent = String(s.sessions.opened);
    $("card-logins").textContent = s.logins.success + " / " + s.logins.failure;
    const upstreamErrors = Object.values(s.upstream_failures || {}).reduce((a, b) => a + b, 0);
    $("card-upstream-errors").textContent = String(upstreamErrors);
    $("card-cert").textContent = s.certificate_days_left === null ? "–" :
      s.certificate_days_left.toFixed(0) + " days";
    $("card-bytes").textContent = formatBytes((s.bytes || {}).to_client);
    bars("chart-networks", s.networks, 8);
    bars("chart-commands", s.commands, 10);
    bars("chart-upstream", s.upstream_failures, 8);
    history(s.history || {});
  }

  function renderReady(ready) {
    const badge = $("ready-status");
    if (!ready) { badge.dataset.state = "unknown"; badge.textContent = "readiness unknown"; }
    else if (ready.ready) { badge.dataset.state = "ready"; badge.textContent = "upstream ready"; }
    else { badge.dataset.state = "not-ready"; badge.textContent = "upstream not ready: " + ready.reason; }
  }

  async function pollSummary() {
    setTimeout(pollSummary, SUMMARY_INTERVAL_MS);
    let summary = null;
    let ready = null;
    let refused = 0;
    try {
      const response = await fetch("api/summary", { cache: "no-store" });
      if (response.ok) summary = await response.json();
      else if (response.status === 401 || response.status === 421) refused = response.status;
      // /readyz answers 503 with the same JSON when the upstream is down (cached briefly).
      ready = await (await fetch("readyz", { cache: "no-store" })).json();
    } catch (err) {
      // The proxy may be restarting; the feed badge says so too.
    }
    // Outside the try: a bug in rendering must surface as an error, not pass for a network
    // problem.
    if (summary) renderSummary(summary);
    renderReady(ready);
    // The token changed (401), or the page was opened by a name the proxy does not trust (421).
    if (refused === 401) showError("the admin endpoint asks for its token again: reload the page to log in");
    if (refused === 421) showError("open the dashboard by IP address, localhost or a name in --admin-host-names");
  }

  renderSessions();
  connect();
  pollSummary();
})();
