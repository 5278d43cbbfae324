/* Nudge console: polls /console/api/live and /console/api/funnel, draws with uPlot,
   and looks customers up in /console/api/customer/{id}. Data is written with
   textContent only. */
"use strict";

const POLL_MS = 2000;
const FUNNEL_MS = 5000;
const KEEP = 180; // points per chart (6 minutes at 2 s)

const $ = (id) => document.getElementById(id);
const series = { t: [], accepted: [], applied: [], triggers: [], sends: [], p50: [], p95: [], p99: [] };
let previous = null;
let charts = null;

async function getJSON(url) {
  const reply = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (reply.status === 401) { window.location.reload(); throw new Error("signed out"); }
  const body = await reply.json();
  if (!reply.ok) { throw new Error((body.error && body.error.message) || reply.statusText); }
  return body;
}

function fmtInt(v) { return v === null || v === undefined ? "–" : String(Math.round(v)); }
function fmtRate(v) { return v === null || v === undefined ? "–" : (v >= 100 ? v.toFixed(0) : v.toFixed(1)); }
function fmtMs(s) { return s === null || s === undefined ? "–" : (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms"; }
function fmtSecs(s) { return s === null || s === undefined ? "–" : s.toFixed(1) + " s"; }
function fmtBytes(b) { return b ? (b / 1048576).toFixed(0) + " MB" : "–"; }
function fmtPct(v) { return v === null || v === undefined ? "–" : (v * 100).toFixed(1) + "%"; }
function fmtTime(ts) { return ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) : "–"; }

// The q-quantile of the observations between two polls, from cumulative bucket counts.
function quantile(le, cumNow, cumBefore, q) {
  const cum = cumNow.map((c, i) => c - ((cumBefore && cumBefore[i]) || 0));
  const total = cum.length ? cum[cum.length - 1] : 0;
  if (total <= 0) { return null; }
  const rank = q * total;
  for (let i = 0; i < cum.length; i++) {
    if (cum[i] >= rank) {
      if (le[i] === null) { return le[i - 1] || null; }
      const lower = i > 0 ? le[i - 1] : 0;
      const below = i > 0 ? cum[i - 1] : 0;
      const inBucket = cum[i] - below;
      return inBucket > 0 ? lower + (le[i] - lower) * ((rank - below) / inBucket) : le[i];
    }
  }
  return null;
}

function makeCharts() {
  if (typeof uPlot === "undefined") { return null; }
  const width = () => Math.max(($("chart-events").clientWidth || 420) - 10, 300);
  const opts = (title, names, colors) => ({
    width: width(), height: 200,
    series: [{}].concat(names.map((n, i) => ({ label: n, stroke: colors[i], width: 2 }))),
    axes: [{}, { size: 60 }],
    scales: { x: { time: true } },
  });
  return {
    events: new uPlot(opts("events", ["accepted/s", "applied/s"], ["#1f6feb", "#0a7d32"]),
      [[], [], []], $("chart-events")),
    triggers: new uPlot(opts("triggers", ["trigger fires/s", "sends/s"], ["#8250df", "#d1242f"]),
      [[], [], []], $("chart-triggers")),
    content: new uPlot(opts("content", ["p50", "p95", "p99"], ["#0a7d32", "#bf8700", "#d1242f"]),
      [[], [], [], []], $("chart-content")),
  };
}

function push(name, value) {
  series[name].push(value);
  if (series[name].length > KEEP) { series[name].shift(); }
}

function render(now) {
  const t = now.totals;
  const g = now.gauges;
  const sends = t.sent !== null ? t.sent : t.queued;
  $("label-sends").textContent = t.sent !== null ? "sends (delivered)" : "sends (queued in outbox)";
  $("total-accepted").textContent = fmtInt(t.accepted);
  $("total-applied").textContent = fmtInt(t.applied);
  $("total-triggers").textContent = fmtInt(t.triggers);
  $("total-sends").textContent = fmtInt(sends);
  $("total-content").textContent = fmtInt(t.content);
  $("profiles").textContent = fmtInt(g.profiles);
  $("stream-lag").textContent = fmtSecs(g.stream_lag_s);
  $("checkpoint-age").textContent = fmtSecs(g.checkpoint_age_s);
  $("queues").textContent = fmtInt(g.outbox) + " / " + (g.dlq === null ? "–" : fmtInt(g.dlq));
  $("memory").textContent = fmtBytes(g.memory_bytes);
  const status = $("status");
  status.textContent = `${fmtInt(g.shards_answered)}/${g.shards} shards answering · ${fmtTime(now.at)} UTC`;
  status.className = g.shards_answered < g.shards ? "status down" : "status";

  if (previous) {
    const dt = Math.max(now.at - previous.at, 0.001);
    const rate = (a, b) => Math.max((a || 0) - (b || 0), 0) / dt;
    const before = previous.totals;
    const prevSends = before.sent !== null ? before.sent : before.queued;
    const r = {
      accepted: rate(t.accepted, before.accepted),
      applied: rate(t.applied, before.applied),
      triggers: rate(t.triggers, before.triggers),
      sends: rate(sends, prevSends),
    };
    const lat = now.content_latency;
    const was = previous.content_latency;
    const sameBuckets = was && was.le.length === lat.le.length;
    const p = (q) => quantile(lat.le, lat.cum, sameBuckets ? was.cum : null, q);
    const p50 = p(0.5), p95 = p(0.95), p99 = p(0.99);
    $("rate-accepted").textContent = fmtRate(r.accepted);
    $("rate-applied").textContent = fmtRate(r.applied);
    $("rate-triggers").textContent = fmtRate(r.triggers);
    $("rate-sends").textContent = fmtRate(r.sends);
    $("content-p99").textContent = fmtMs(p99);
    push("t", now.at);
    for (const k of ["accepted", "applied", "triggers", "sends"]) { push(k, r[k]); }
    push("p50", p50 === null ? null : p50 * 1000);
    push("p95", p95 === null ? null : p95 * 1000);
    push("p99", p99 === null ? null : p99 * 1000);
    if (charts) {
      charts.events.setData([series.t, series.accepted, series.applied]);
      charts.triggers.setData([series.t, series.triggers, series.sends]);
      charts.content.setData([series.t, series.p50, series.p95, series.p99]);
    }
  }
  previous = now;
}

async function pollLive() {
  try {
    render(await getJSON("/console/api/live"));
  } catch (err) {
    $("status").textContent = "no answer: " + err.message;
    $("status").className = "status down";
  }
  setTimeout(pollLive, POLL_MS);
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) { td.className = cls; }
  row.appendChild(td);
  return td;
}

function headerRow(table, names) {
  const tr = document.createElement("tr");
  for (const n of names) { const th = document.createElement("th"); th.textContent = n; tr.appendChild(th); }
  table.createTHead().appendChild(tr);
}

function renderFunnel(body) {
  const box = $("funnel");
  box.textContent = "";
  if (!body.rules.length) {
    const p = document.createElement("p"); p.className = "empty"; p.textContent = "No rule has fired yet.";
    box.appendChild(p); return;
  }
  for (const rule of body.rules) {
    const h = document.createElement("h3");
    h.textContent = rule.rule;
    box.appendChild(h);
    const table = document.createElement("table");
    table.className = "funnel-table";
    table.dataset.rule = rule.rule;
    headerRow(table, ["variant", "fired", "sent", "opened", "clicked", `converted (${body.window})`,
      "open rate", "click rate", "conversion", "vs", "lift", "p-value"]);
    const tbody = table.createTBody();
    for (const v of rule.variants) {
      const tr = tbody.insertRow();
      cell(tr, v.variant === null ? "(all)" : v.variant);
      cell(tr, fmtInt(v.fired));
      cell(tr, fmtInt(v.sent !== null ? v.sent : v.queued)).title =
        v.sent !== null ? "delivered" : "queued in the outbox";
      cell(tr, fmtInt(v.opened));
      cell(tr, fmtInt(v.clicked));
      cell(tr, fmtInt(v.converted));
      cell(tr, fmtPct(v.open_rate));
      cell(tr, fmtPct(v.click_rate));
      cell(tr, fmtPct(v.conversion_rate));
      cell(tr, v.vs || "");
      cell(tr, v.lift === undefined || v.lift === null ? "" : fmtPct(v.lift));
      cell(tr, v.p_value === undefined ? "" : (v.p_value < 0.001 ? "<0.001" : v.p_value.toFixed(3)) + (v.significant ? " *" : ""),
        v.significant ? "sig" : "");
    }
    box.appendChild(table);
  }
}

async function refreshFunnel() {
  try {
    renderFunnel(await getJSON("/console/api/funnel?window=" + encodeURIComponent($("window").value)));
  } catch (err) { /* the live poll reports the connection */ }
}

async function pollFunnel() {
  await refreshFunnel();
  setTimeout(pollFunnel, FUNNEL_MS);
}

function fillTable(id, rows, columns) {
  const tbody = $(id).tBodies[0];
  tbody.textContent = "";
  for (const row of rows) {
    const tr = tbody.insertRow();
    for (const c of columns) { cell(tr, c(row)); }
  }
}

async function inspect(event) {
  event.preventDefault();
  const id = $("customer").value.trim();
  $("inspect-error").textContent = "";
  if (!id) { return; }
  try {
    const body = await getJSON("/console/api/customer/" + encodeURIComponent(id));
    $("inspector").hidden = false;
    $("inspect-id").textContent = body.id === body.customer ? body.id : `${body.customer} → ${body.id}`;
    $("inspect-profile").textContent = JSON.stringify(body.profile, null, 2);
    fillTable("inspect-timers", body.timers, [(w) => w.rule, (w) => String(w.step), (w) => w.due_iso || fmtTime(w.due)]);
    fillTable("inspect-sends", body.sends, [(s) => fmtTime(s.at), (s) => s.rule,
      (s) => (s.step === undefined ? "" : String(s.step)), (s) => s.variant || "", (s) => s.state,
      (s) => s.send_id || ""]);
    fillTable("inspect-explain", body.explain, [(r) => r.rule, (r) => r.status,
      (r) => (r.last ? `${r.last.outcome}${r.last.detail ? ": " + r.last.detail : ""}` : "")]);
  } catch (err) {
    $("inspector").hidden = true;
    $("inspect-error").textContent = err.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  charts = makeCharts();
  $("inspect").addEventListener("submit", inspect);
  $("window").addEventListener("change", refreshFunnel);
  pollLive();
  pollFunnel();
});
