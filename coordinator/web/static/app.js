// meshlink console: live tables and the graph, rendered from the JSON
// snapshot that /console/events streams. No framework, no inline script
// (the Content-Security-Policy forbids it), and only textContent for data,
// so nothing from the mesh is ever parsed as HTML.
"use strict";
(function () {
  const csrf = (document.querySelector('meta[name="csrf"]') || {}).content || "";
  const page = document.body.dataset.page;

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      e.setAttribute(k, v);
    }
    for (const k of kids.flat(Infinity)) {
      if (k === undefined || k === null || k === false) continue;
      e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    }
    return e;
  }
  const muted = (t) => el("span", { class: "muted" }, t);
  const pill = (cls, t) => el("span", { class: "pill " + cls }, t);
  function bytes(n) {
    if (n < 1024) return n + " B";
    const u = "KMGTPE"; let i = -1;
    do { n /= 1024; i++; } while (n >= 1024 && i < u.length - 1);
    return n.toFixed(1) + " " + u[i] + "iB";
  }
  function ago(s) {
    if (!s || s.startsWith("0001")) return "never";
    const d = (Date.now() - new Date(s).getTime()) / 1000;
    if (d < 5) return "just now";
    if (d < 60) return Math.round(d) + "s ago";
    if (d < 3600) return Math.round(d / 60) + "m ago";
    if (d < 172800) return Math.round(d / 3600) + "h ago";
    return new Date(s).toISOString().slice(0, 10);
  }
  // HTTP figures in the words of pages.go's httpPartsOf.
  function httpParts(v) {
    const ms = (x) => (x < 10 ? x.toFixed(1) : x.toFixed(0)) + " ms";
    return {
      rate: v.window_s > 0 ? v.rps.toFixed(1) + " req/s" : "— req/s",
      errors: (v.error_rate * 100).toFixed(1) + "% errors",
      p50: "p50 " + ms(v.p50_ms),
      p99: "p99 " + (v.p99_over ? "> " : "") + ms(v.p99_ms),
    };
  }
  function httpFig(v) {
    if (!v) return "";
    const p = httpParts(v);
    return p.rate + " · " + p.errors + " · " + p.p50 + " · " + p.p99;
  }
  const when = (s) => (!s || s.startsWith("0001")) ? "never" : new Date(s).toLocaleString();
  function postButton(action, label, question) {
    const f = el("form", { method: "post", action: action, class: "confirm", "data-confirm": question },
      el("input", { type: "hidden", name: "csrf", value: csrf }), el("button", { class: "danger" }, label));
    return f;
  }
  function empty(cols, text) { return el("tr", { class: "empty" }, el("td", { colspan: cols }, text)); }
  function fill(name, rows, cols, emptyText) {
    const tb = document.querySelector('tbody[data-live="' + name + '"]');
    if (!tb) return;
    tb.replaceChildren(...(rows.length ? rows : [empty(cols, emptyText)]));
  }

  const render = {
    sites(s) {
      fill("nodes", s.nodes.map((n) => el("tr", { "data-node": n.id },
        el("td", null, el("strong", null, n.name), n.hostname && el("div", { class: "muted small" }, n.hostname), el("div", { class: "muted small mono" }, n.key_fp)),
        el("td", null, n.online ? pill("ok", "online") : pill("off", "offline"), n.ephemeral && [" ", pill("", "ephemeral")]),
        el("td", { class: "mono small" }, n.addresses.map((a) => el("div", null, a))),
        el("td", { class: "mono small" }, n.endpoints.length ? n.endpoints.map((a) => el("div", null, a)) : muted("—")),
        el("td", { class: "small" }, n.paths.length ? n.paths.map((p) => el("div", null, pill(p.path, p.path), " " + p.peer_name,
          p.relay ? [" ", muted("via"), " ", el("span", { class: "via" }, p.relay)] : null,
          p.rtt_us ? [" ", muted(p.rtt_us + " µs")] : null)) : muted("no report yet")),
        el("td", { class: "small" }, n.online ? "now" : ago(n.last_seen)),
        el("td", { class: "small" }, n.key_expired ? [pill("off", "expired"), " "] : null, when(n.key_expiry)),
        el("td", null, n.owner || muted("—")),
        el("td", { class: "small" }, n.tags.map((t) => [el("span", { class: "tag" }, t), " "])),
        el("td", null, postButton("/console/nodes/" + n.id + "/remove", "Remove", "Remove " + n.name + " from the mesh?")),
      )), 10, "No sites yet. Mint a join token on the Tokens page and start meshlink agent with it.");
      const none = () => el("td", { class: "muted", title: "a standalone relay keeps its own counters" }, "—");
      fill("relays", (s.relays || []).map((r) => el("tr", { "data-relay": r.name },
        el("td", null, el("strong", null, r.name), " ", r.embedded ? pill("ok", "embedded") : pill("", "standalone")),
        el("td", { class: "mono small" }, r.url),
        el("td", { class: "mono small", title: r.fingerprint }, r.fingerprint_short),
        el("td", { class: "mono small" }, r.key_fp || muted("—")),
        r.stats ? el("td", null, r.stats.clients) : none(),
        r.stats ? el("td", null, bytes(r.stats.bytes_relayed), " ",
          el("div", { class: "muted small" }, r.stats.packets_relayed + " packets" + (r.stats.dropped ? ", " + r.stats.dropped + " dropped" : ""))) : none(),
      )), 6, "No relay is online: the coordinator's own relay is off (--relay=false) and no standalone relay (meshlink relay) is connected. Sites that cannot reach each other directly stay apart.");
    },
    services(s) {
      fill("services", s.services.map((v) => el("tr", null,
        el("td", null, el("strong", null, v.name)),
        el("td", { class: "mono" }, v.vip),
        el("td", null, v.port),
        el("td", { class: "small" }, v.providers.map((p) => el("div", null, p.name + ":" + p.port + " ",
          !p.online ? pill("off", "down") : p.health === "unhealthy" ? pill("bad", "unhealthy") : pill("ok", "up"),
          el("span", { class: "muted" }, " prio " + p.priority + " · weight " + (p.weight || 1) + (p.version ? " · " + p.version : "") +
            " · " + p.open + " open · " + Math.round((p.share || 0) * 100) + "%" + (p.health_error ? " " + p.health_error : "")),
          p.http ? el("div", { class: "muted http-fig" }, httpFig(p.http)) : null)),
          v.hidden_providers ? el("div", { class: "muted" }, "+" + v.hidden_providers + " other site(s)") : null),
        el("td", { class: "small" }, v.consumers.length ? v.consumers.map((c) => el("div", null, c.name + " ", muted(c.open + " open"), c.http ? el("div", { class: "muted http-fig" }, httpFig(c.http)) : null, c.local_port ? [" ", el("span", { class: "pill", title: "port " + v.port + " needs privileges at this site: served on " + c.local_port + "; setcap cap_net_bind_service=+ep on meshlink gives it the real port" }, "local port " + c.local_port)] : null)) : muted("—")),
        el("td", null, v.open),
        el("td", null, v.total, v.failed ? [" ", pill("bad", v.failed + " failed")] : null),
        el("td", null, bytes(v.bytes)),
        el("td", { class: "small", "data-http": v.name }, v.http ? [httpFig(v.http), el("div", { class: "muted" }, v.http.requests + " requests, " + v.http.errors + " failed")] : muted("—")),
      )), 9, "No service is exposed yet: run meshlink expose NAME PORT on a site.");
    },
    tokens(s) {
      const admin = s.user.admin;
      fill("tokens", s.tokens.map((t) => {
        let state = pill("ok", "valid");
        if (t.revoked) state = pill("off", "revoked");
        else if (t.expired) state = pill("off", "expired");
        else if (!t.reusable && t.uses > 0) state = pill("off", "used");
        return el("tr", null,
          el("td", { class: "mono" }, t.id),
          admin ? el("td", null, t.owner || muted("—")) : null,
          el("td", null, (t.reusable ? "reusable" : "single-use") + (t.ephemeral ? ", ephemeral" : "")),
          el("td", { class: "small" }, when(t.expires)),
          el("td", null, t.uses),
          el("td", { class: "small" }, t.tags.map((x) => [el("span", { class: "tag" }, x), " "])),
          el("td", null, state),
          el("td", null, t.revoked ? null : postButton("/console/tokens/" + t.id + "/revoke", "Revoke", "Revoke token " + t.id + "?")));
      }), 8, "No tokens yet.");
    },
    events(s) {
      fill("events", s.events.map((e) => el("tr", null,
        el("td", { class: "small" }, when(e.at)), el("td", null, pill("ev-" + e.kind, e.kind)),
        el("td", null, e.actor), el("td", null, e.node || ""), el("td", null, e.message))), 5, "Nothing happened yet.");
    },
    graph(s) {
      drawGraph(s);
      fill("edges", (s.edges || []).map((e) => {
        const p = httpParts(e);
        return el("tr", { "data-edge": e.service + "/" + e.consumer_name + "/" + e.provider_name },
          el("td", null, el("strong", null, e.service)), el("td", null, e.consumer_name), el("td", null, e.provider_name),
          el("td", null, p.rate), el("td", null, e.error_rate > 0 ? pill("bad", p.errors) : p.errors), el("td", null, p.p50), el("td", null, p.p99),
          el("td", null, e.requests));
      }), 8, "No HTTP requests reported yet: figures appear for services exposed with --http once requests flow.");
    },
  };

  // The graph: provider sites | services | consumer sites, like a Sankey
  // diagram. A site that both provides and consumes appears on both sides.
  const SVG = "http://www.w3.org/2000/svg";
  function sv(tag, attrs, ...kids) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) e.setAttribute(k, v);
    for (const k of kids) if (k !== undefined && k !== null) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  }
  function drawGraph(s) {
    const svg = document.getElementById("graph");
    if (!svg) return;
    const online = {};
    for (const n of s.nodes) online[n.id] = n.online;
    const services = s.services.filter((v) => v.providers.length || v.consumers.length);
    const left = new Map(), right = new Map();
    for (const v of services) {
      for (const p of v.providers) left.set(p.node, p);
      for (const c of v.consumers) right.set(c.node, c);
    }
    const W = Math.max(svg.clientWidth || 900, 640), boxW = 170, boxH = 44, gap = 22;
    const rows = Math.max(left.size, right.size, services.length, 1);
    const H = Math.max(rows * (boxH + gap) + 40, 200);
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("height", H);
    const colX = [24, W / 2 - boxW / 2, W - boxW - 24];
    const place = (i, n) => 20 + i * (boxH + gap) + ((rows - n) * (boxH + gap)) / 2;
    const pos = { l: new Map(), s: new Map(), r: new Map() };
    [...left.keys()].forEach((id, i) => pos.l.set(id, place(i, left.size)));
    services.forEach((v, i) => pos.s.set(v.name, place(i, services.length)));
    [...right.keys()].forEach((id, i) => pos.r.set(id, place(i, right.size)));
    const edges = sv("g"), boxes = sv("g");
    function edge(x1, y1, x2, y2, open, nbytes, http) {
      const mx = (x1 + x2) / 2, w = Math.min(1.5 + open * 1.5, 10);
      const bad = http && http.error_rate > 0.05;
      edges.append(sv("path", { class: "edge" + (open > 0 || (http && http.rps > 0) ? " active" : "") + (bad ? " failing" : ""), d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, "stroke-width": w }));
      if (open > 0 || nbytes > 0) edges.append(sv("text", { class: "edge-label", x: mx, y: (y1 + y2) / 2 - 4, "text-anchor": "middle" }, open + " open · " + bytes(nbytes)));
      if (http) {
        const p = httpParts(http);
        edges.append(sv("text", { class: "edge-label http" + (bad ? " failing" : ""), x: mx, y: (y1 + y2) / 2 + 10, "text-anchor": "middle" },
          p.rate + " · " + (http.error_rate * 100).toFixed(1) + "% err · " + p.p99));
      }
    }
    function box(cls, x, y, title, sub) {
      boxes.append(sv("g", { class: cls, transform: `translate(${x},${y})` },
        sv("rect", { width: boxW, height: boxH, rx: 8 }),
        sv("text", { x: 10, y: 18 }, title.length > 22 ? title.slice(0, 21) + "…" : title),
        sv("text", { x: 10, y: 35, class: "sub" }, sub)));
    }
    for (const v of services) {
      const ys = pos.s.get(v.name) + boxH / 2;
      for (const p of v.providers) edge(colX[0] + boxW, pos.l.get(p.node) + boxH / 2, colX[1], ys, p.open, p.bytes_sent + p.bytes_received, p.http);
      for (const c of v.consumers) edge(colX[1] + boxW, ys, colX[2], pos.r.get(c.node) + boxH / 2, c.open, c.bytes_sent + c.bytes_received, c.http);
      box("svc", colX[1], pos.s.get(v.name), v.name, v.vip + ":" + v.port + (v.hidden_providers ? " · +" + v.hidden_providers + " hidden" : ""));
    }
    for (const [id, p] of left) box("site" + (online[id] ? "" : " off"), colX[0], pos.l.get(id), p.name, "provides");
    for (const [id, c] of right) box("site" + (online[id] ? "" : " off"), colX[2], pos.r.get(id), c.name, "consumes");
    const kids = [edges, boxes];
    if (!services.length) kids.push(sv("text", { x: W / 2, y: 60, "text-anchor": "middle", class: "sub" }, "No service has providers or consumers yet."));
    if (left.size) kids.push(sv("text", { x: colX[0], y: 14, class: "sub" }, "PROVIDERS"));
    if (right.size) kids.push(sv("text", { x: colX[2], y: 14, class: "sub" }, "CONSUMERS"));
    svg.replaceChildren(...kids);
  }

  document.addEventListener("submit", (ev) => {
    const q = ev.target.dataset && ev.target.dataset.confirm;
    if (q && !window.confirm(q)) ev.preventDefault();
  });
  document.addEventListener("click", (ev) => {
    const id = ev.target.dataset && ev.target.dataset.copy;
    if (!id) return;
    const src = document.getElementById(id);
    src.select();
    if (navigator.clipboard) navigator.clipboard.writeText(src.value);
    ev.target.textContent = "Copied";
  });

  const draw = render[page];
  if (!draw || !window.EventSource) return;
  const dot = document.getElementById("live");
  const es = new EventSource("/console/events");
  let lastSnap = null;
  es.addEventListener("snapshot", (ev) => { lastSnap = JSON.parse(ev.data); draw(lastSnap); });
  es.addEventListener("logout", () => { es.close(); window.location.href = "/"; });
  es.onopen = () => dot && dot.classList.add("on");
  es.onerror = () => dot && dot.classList.remove("on");
  window.addEventListener("resize", () => { if (page === "graph" && lastSnap) drawGraph(lastSnap); });
})();
