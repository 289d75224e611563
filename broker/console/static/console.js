// The broker's web console: plain ES module, no build step, nothing fetched but this broker's /console/api.
// The admin token stays in this tab (sessionStorage) and travels in the Authorization header, never in a URL.
import { lineChart } from "./chart.js";

const API = "api/";
const TOKEN_KEY = "broker-console-token";
const REFRESH_MS = 1000;
const $ = (sel) => document.querySelector(sel);

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let letters = [];
const selected = new Set();
let lastOverview = null;

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? `${status}: ${body.message}` : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, params = {}, method = "GET") {
  const pairs = Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined);
  const qs = new URLSearchParams(pairs).toString();
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const r = await fetch(API + path + (qs ? `?${qs}` : ""), { method, headers, cache: "no-store" });
  const json = (r.headers.get("content-type") || "").startsWith("application/json");
  const body = json ? await r.json() : await r.blob();
  if (!r.ok) throw new ApiError(r.status, json ? body : null);
  return body;
}

// ---- small helpers ---------------------------------------------------------------------------------------------

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  tr.append(td);
  return td;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

const ago = (ms) => `${age((Date.now() - ms) / 1000)} ago`;
const rate = (v) => (v === null || v === undefined ? "–" : v.toFixed(1));

const problems = new Map();
function problem(where, err) {
  if (err) problems.set(where, err instanceof ApiError && (err.status === 401 || err.status === 403)
    ? `${err.message}. The console needs a token with the admin permission: enter it above.`
    : String(err.message || err));
  else problems.delete(where);
  const box = $("#problem");
  box.hidden = problems.size === 0;
  box.textContent = [...new Set(problems.values())].join(" · ");
}

// ---- live view -------------------------------------------------------------------------------------------------

function renderOverview(o) {
  lastOverview = o;
  $("#node").textContent = `node ${o.node}`;
  const ready = $("#ready");
  ready.textContent = o.readyz.ready ? "ready" : "not ready";
  ready.className = `badge ${o.readyz.ready ? "ok" : "bad"}`;
  const why = o.readyz.reasons.join("; ");  // ready with reasons: degraded (a Redis Cluster master's breaker open)
  $("#reasons").textContent = o.readyz.ready ? (why ? `/readyz: ready, ${why}` : "/readyz: ready") : `/readyz: ${why}`;
  $("#updated").textContent = `refreshed ${new Date().toLocaleTimeString()} (${o.server_ms} ms)`;
  const notice = $("#notice");
  notice.hidden = !o.local_dev;
  notice.textContent = o.local_dev
    ? "Open mode (auth.mode = open) on this machine: the console needs no token. For local development only; " +
      "with tokens configured it takes a token with admin = true."
    : "";
  const nodes = $("#nodes tbody");
  nodes.replaceChildren(...o.nodes.map((n) => {
    const tr = document.createElement("tr");
    cell(tr, n.node, "mono");
    cell(tr, n.ready ? "yes" : "no", n.ready ? "" : "bad");
    cell(tr, Object.entries(n.breakers).map(([k, v]) => `${k}: ${v}`).join(", "));
    cell(tr, n.reasons.join("; ") || "–");
    cell(tr, Object.keys(n.loops).join(", ") || "–");
    cell(tr, `${n.heartbeat_age_s}s ago`);
    return tr;
  }));
  const last = o.chart[o.chart.length - 1];
  $("#pub-now").textContent = last ? rate(last.published_per_s) : "–";
  $("#ack-now").textContent = last ? rate(last.acked_per_s) : "–";
  lineChart($("#chart"), o.chart, [{ key: "published_per_s", cls: "pub" }, { key: "acked_per_s", cls: "ack" }]);
  renderGroups();
  if (o.job && o.job.state === "running") showJob(o.job);
}

function renderGroups() {
  if (!lastOverview) return;
  const needle = $("#queue-filter").value.trim().toLowerCase();
  const rows = lastOverview.groups.filter((g) => !needle || g.topic.toLowerCase().includes(needle));
  $("#queue-count").textContent = `${rows.length} of ${lastOverview.groups.length}` +
    (lastOverview.broken.length ? ` · unreadable: ${lastOverview.broken.join(", ")}` : "");
  $("#groups tbody").replaceChildren(...rows.map((g) => {
    const tr = document.createElement("tr");
    tr.dataset.pair = `${g.topic}/${g.group}`;
    cell(tr, g.topic);
    cell(tr, g.group);
    for (const k of ["ready", "leased", "delayed"]) cell(tr, g[k], "n");
    const dead = cell(tr, "", "n");
    if (g.dead) {
      const a = document.createElement("a");
      a.href = "#dlq";
      a.className = "dead";
      a.textContent = String(g.dead);
      a.addEventListener("click", () => { fillDlqForm({ topic: g.topic, group: g.group }); loadLetters(); });
      dead.append(a);
    } else dead.textContent = "0";
    cell(tr, g.consumers, "n");
    cell(tr, rate(g.published_per_s), "n");
    cell(tr, rate(g.acked_per_s), "n");
    cell(tr, age(g.oldest_ready_age_s), "n");
    return tr;
  }));
}

// One refresh loop: every second; every 5 s while the token is missing or refused (a page left open without one
// does not fill the broker's log), and at once when a token is entered.
let timer = null;
async function refresh() {
  clearTimeout(timer);
  let wait = REFRESH_MS;
  try {
    renderOverview(await api("overview"));
    problem("refresh", null);
  } catch (e) {
    problem("refresh", e);
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) wait = 5 * REFRESH_MS;
  } finally {
    clearTimeout(timer);
    timer = setTimeout(refresh, wait);
  }
}

// ---- dead letters ----------------------------------------------------------------------------------------------

function dlqFilters() {
  const form = new FormData($("#dlq-form"));
  return Object.fromEntries([...form.entries()].map(([k, v]) => [k, String(v).trim()]).filter(([, v]) => v));
}

function fillDlqForm(values) {
  for (const input of $("#dlq-form").querySelectorAll("input")) input.value = values[input.name] || "";
}

function updateButtons() {
  $("#reprocess-selected").disabled = selected.size === 0;
  $("#purge-selected").disabled = selected.size === 0;
}

// Only the newest search renders: an older one (the page's first load, the token's) that answers after it would
// otherwise show its unfiltered rows under the operator's filter.
let lettersSeq = 0;
async function loadLetters() {
  const seq = ++lettersSeq;
  try {
    const res = await api("dlq", dlqFilters());
    if (seq !== lettersSeq) return;
    letters = res.letters;
    problem("dlq", null);
    const ids = new Set(letters.map((d) => d.id));
    for (const id of [...selected]) if (!ids.has(id)) selected.delete(id);
    $("#letters tbody").replaceChildren(...letters.map((d) => {
      const tr = document.createElement("tr");
      tr.dataset.id = d.id;
      const td = document.createElement("td");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = selected.has(d.id);
      box.setAttribute("aria-label", `select ${d.id}`);
      box.addEventListener("change", () => { (box.checked ? selected.add(d.id) : selected.delete(d.id)); updateButtons(); });
      td.append(box);
      tr.append(td);
      cell(tr, d.id, "mono");
      cell(tr, `${d.topic}/${d.group}`);
      cell(tr, d.attempts, "n");
      cell(tr, d.reason);
      cell(tr, ago(d.died_at));
      cell(tr, d.last_error);
      tr.addEventListener("click", (ev) => { if (ev.target !== box) showLetter(d); });
      return tr;
    }));
    $("#letters-note").textContent = letters.length === 0 ? "No dead letters match."
      : `${letters.length} shown${res.more ? " (more match: narrow the filter, or export them all)" : ""}.`;
    updateButtons();
  } catch (e) {
    if (seq === lettersSeq) problem("dlq", e);
  }
}

async function showLetter(d) {
  const box = $("#letter");
  try {
    const res = await api("dlq/show", { id: d.id, topic: d.topic, group: d.group });
    const full = res.letters[0];
    for (const tr of document.querySelectorAll("#letters tr.selected")) tr.classList.remove("selected");
    const row = document.querySelector(`#letters tr[data-id="${CSS.escape(d.id)}"]`);
    if (row) row.classList.add("selected");
    const dl = document.createElement("dl");
    const field = (name, value) => {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      if (value instanceof Node) dd.append(value); else dd.textContent = value;
      dl.append(dt, dd);
    };
    const pre = (obj) => { const p = document.createElement("pre"); p.textContent = JSON.stringify(obj, null, 2); return p; };
    field("id", full.id);
    field("topic/group", `${full.topic}/${full.group}`);
    field("reason", full.reason);
    field("attempts", String(full.attempts));
    field("published", new Date(full.published_at).toISOString());
    field("died", `${new Date(full.died_at).toISOString()} (${ago(full.died_at)})`);
    field("expires in", age(full.ttl_s));
    field("last consumer", full.last_consumer || "–");
    field("ordering key", full.key || "–");
    field("headers", pre(full.headers));
    field("payload", pre(full.payload));
    const history = document.createElement("table");
    history.id = "history";
    history.innerHTML = "<thead><tr><th>attempt</th><th>at</th><th>consumer</th><th>error</th></tr></thead>";
    const body = document.createElement("tbody");
    for (const e of full.errors) {
      const tr = document.createElement("tr");
      cell(tr, e.attempt, "n");
      cell(tr, e.at ? new Date(Number(e.at)).toISOString() : "–");
      cell(tr, e.consumer || "–", "mono");
      cell(tr, e.error);
      body.append(tr);
    }
    history.append(body);
    field("history", history);
    const h = document.createElement("h3");
    h.textContent = `Dead letter ${full.id}`;
    box.replaceChildren(h, dl);
    box.hidden = false;
    problem("letter", null);
  } catch (e) {
    problem("letter", e);
  }
}

function confirmDialog(title, text, typed) {
  const dialog = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-typed").hidden = !typed;
  const word = $("#confirm-word");
  word.value = "";
  const ok = $("#confirm-ok");
  ok.disabled = typed;
  word.oninput = () => { ok.disabled = word.value.trim() !== "purge"; };
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

let following = null;
function showJob(job) {
  const line = `${job.verb} ${job.what ? `(${job.what}) ` : ""}${job.done}/${job.total}` +
    (job.state === "running" ? " …" : `: ${job.state}, ${job.verb === "purge" ? "purged" : "reprocessed"} ${job.moved}`) +
    (job.missing.length ? `, ${job.missing.length} gone before` : "") + (job.error ? ` (${job.error})` : "");
  $("#job").textContent = line;
  if (job.state === "running" && following !== job.id) followJob(job.id);
}

async function followJob(id) {
  following = id;
  try {
    for (;;) {
      const job = await api(`jobs/${encodeURIComponent(id)}`);
      $("#job").dataset.state = job.state;
      showJob(job);
      if (job.state !== "running") break;
      await new Promise((r) => setTimeout(r, 300));
    }
  } catch (e) {
    problem("job", e);
  } finally {
    following = null;
    loadLetters();
  }
}

async function act(verb, which) {
  const params = which === "selected" ? { ids: [...selected].join(",") } : dlqFilters();
  if (which !== "selected" && Object.keys(params).length === 0) params.all = "1";
  try {
    const preview = await api("dlq/preview", params);
    problem("act", null);
    if (preview.count === 0) {
      problem("act", new Error(`no dead letters match ${preview.selection}: nothing to ${verb}`));
      return;
    }
    const r = verb === "reprocess" ? $("#rate").value.trim() : "";
    const groups = Object.entries(preview.groups).map(([g, n]) => `${g}: ${n}`).join(", ");
    const title = `${verb === "purge" ? "Permanently delete" : "Reprocess"} ${preview.count} dead letter(s)?`;
    const text = `Selection: ${preview.selection} (${groups}).` +
      (verb === "reprocess" ? ` They go back to their group's queue${r ? ` at ${r} per second` : ""}, attempts reset.`
        : " They cannot be brought back: export them first if they may be needed.") +
      (preview.unknown.length ? ` Not found: ${preview.unknown.join(", ")}.` : "");
    if (!(await confirmDialog(title, text, verb === "purge"))) return;
    const job = await api(`dlq/${verb}`, { ...params, confirm: verb, expect: preview.count, rate: r }, "POST");
    selected.clear();
    showJob(job);
  } catch (e) {
    problem("act", e);
  }
}

async function exportLetters() {
  try {
    const blob = await api("dlq/export", dlqFilters());
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `dead-letters-${new Date().toISOString().replace(/[:.]/g, "-")}.jsonl`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
  } catch (e) {
    problem("export", e);
  }
}

// ---- message lookup --------------------------------------------------------------------------------------------

async function lookup(ev) {
  ev.preventDefault();
  const form = Object.fromEntries(new FormData($("#lookup-form")));
  const out = $("#lookup-result");
  try {
    const res = await api("message", { id: String(form.id).trim(), topic: String(form.topic).trim() });
    problem("lookup", null);
    if (res.rows.length === 0) {
      out.textContent = `Redis holds nothing of ${res.id}: acked by every group, expired, or never published.`;
      return;
    }
    const table = document.createElement("table");
    table.id = "lookup-rows";
    const head = document.createElement("tr");
    for (const c of res.columns) { const th = document.createElement("th"); th.textContent = c; head.append(th); }
    table.createTHead().append(head);
    const body = table.createTBody();
    for (const row of res.rows) {
      const tr = document.createElement("tr");
      for (const c of res.columns) cell(tr, typeof row[c] === "object" && row[c] !== null ? JSON.stringify(row[c]) : row[c]);
      body.append(tr);
    }
    out.replaceChildren(table);
  } catch (e) {
    problem("lookup", e);
  }
}

// ---- wiring ----------------------------------------------------------------------------------------------------

$("#token").value = token ? "********" : "";
$("#token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $("#token").value.trim();
  if (v && v !== "********") {
    token = v;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("#token").value = "********";
  }
  refresh();
  loadLetters();
});
$("#forget").addEventListener("click", () => { token = ""; sessionStorage.removeItem(TOKEN_KEY); $("#token").value = ""; });
$("#queue-filter").addEventListener("input", renderGroups);
$("#dlq-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadLetters(); });
$("#dlq-export").addEventListener("click", exportLetters);
$("#select-all").addEventListener("change", (ev) => {
  for (const d of letters) (ev.target.checked ? selected.add(d.id) : selected.delete(d.id));
  for (const box of document.querySelectorAll("#letters tbody input[type=checkbox]")) box.checked = ev.target.checked;
  updateButtons();
});
$("#reprocess-selected").addEventListener("click", () => act("reprocess", "selected"));
$("#reprocess-matching").addEventListener("click", () => act("reprocess", "matching"));
$("#purge-selected").addEventListener("click", () => act("purge", "selected"));
$("#purge-matching").addEventListener("click", () => act("purge", "matching"));
$("#lookup-form").addEventListener("submit", lookup);

refresh();
loadLetters();
