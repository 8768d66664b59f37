// llmlb-node's operator page. It polls the node's JSON routes with one request in flight at a
// time (a round's requests one after the other, the next round scheduled when the last ends, none
// while the tab is hidden), drives the management routes, and streams the playground's answers.
// No build step, no dependencies.
"use strict";

const KEY_ITEM = "llmlb-node-api-key";
const query = new URLSearchParams(location.search);
const POLL_MS = Math.max(100, Number(query.get("poll")) || 1000);
const OFFLINE_POLL_MS = Math.max(POLL_MS, 5000);
const ANSWER_WITHIN_MS = 10000; // a poll the node does not answer in this time: unreachable
const CATALOG_EVERY = 10; // rounds between two reads of the catalog (changes trigger one too)
const MAX_MESSAGES = 5;
const INFO_MESSAGE_MS = 8000;
const CONFIRM_MS = 5000;

const $ = (id) => document.getElementById(id);

// ---- a tiny DOM helper ---------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "class") el.className = value;
    else if (name.startsWith("data-") || name === "title" || name === "role") el.setAttribute(name, value);
    else el[name] = value;
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child);
  }
  return el;
}

// ---- formatting ----------------------------------------------------------------------------
function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "—";
  seconds = Math.round(seconds);
  if (seconds < 60) return `${seconds}s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m}m ${String(seconds % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

function describeError(err) {
  if (err instanceof ApiError) return `${err.status}${err.code ? " " + err.code : ""}: ${err.message}`;
  if (err && err.name === "TimeoutError") return "the node did not answer in time";
  return err && err.message ? err.message : String(err);
}

// ---- HTTP ----------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let clockOffset = 0; // the node's clock minus ours (keep-alive countdowns use the node's)

function authHeaders(extra) {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function request(path, { method = "GET", body, signal, within = ANSWER_WITHIN_MS } = {}) {
  const headers = authHeaders(body === undefined ? {} : { "Content-Type": "application/json" });
  // A stopped or hung node never answers: give up (a pull or a stream waits as long as it takes).
  if (!signal && within) signal = AbortSignal.timeout(within);
  const init = { method, headers, signal, cache: "no-store" };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  const date = Date.parse(resp.headers.get("date") || "");
  if (Number.isFinite(date)) clockOffset = date - Date.now();
  return resp;
}

async function api(path, options = {}) {
  const resp = await request(path, options);
  if (resp.ok || (options.accept || []).includes(resp.status)) return resp.json();
  throw await apiError(resp);
}

async function apiError(resp) {
  let code = null;
  let message = resp.statusText || "request failed";
  try {
    const err = (await resp.json()).error || {};
    code = err.code || null;
    message = err.message || message;
  } catch (_) {
    // not JSON: keep the status text
  }
  const err = new ApiError(resp.status, code, message);
  if (resp.status === 401) needKey(err);
  return err;
}

// ---- messages ------------------------------------------------------------------------------
function say(text, err) {
  const item = h("li", { class: err ? "error" : "info", role: err ? "alert" : null },
    h("span", null, err ? h("strong", null, text + " ") : text, err ? describeError(err) : null),
    h("button", { type: "button", class: "link", "data-dismiss": "1", title: "Dismiss" }, "×"));
  const list = $("messages");
  list.prepend(item);
  while (list.children.length > MAX_MESSAGES) list.lastElementChild.remove();
  if (!err) setTimeout(() => item.remove(), INFO_MESSAGE_MS);
}

// ---- the API key ---------------------------------------------------------------------------
let waitingForKey = false;

function needKey(err) {
  waitingForKey = true;
  const had = sessionStorage.getItem(KEY_ITEM) !== null;
  $("auth").hidden = false;
  document.body.classList.add("locked");
  $("auth-error").hidden = !had;
  $("auth-error").textContent = had ? `The node refused this key (${describeError(err)}).` : "";
  $("forget-key").hidden = true;
  setBadge("error", "API key needed");
  state.shown.delete("health"); // the next answer re-draws the badge, even if unchanged
  if (!had) $("auth-key").focus();
}

function keyEntered(ev) {
  ev.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("auth-key").value.trim());
  $("auth-key").value = "";
  waitingForKey = false;
  refresh(true);
}

function keyAccepted() {
  $("auth").hidden = true;
  document.body.classList.remove("locked");
  $("forget-key").hidden = sessionStorage.getItem(KEY_ITEM) === null;
}

function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
  $("auth-error").hidden = true;
  $("forget-key").hidden = true;
  refresh(true);
}

// ---- polling -------------------------------------------------------------------------------
const state = {
  rounds: 0,
  timer: 0,
  busy: false,
  again: false, // a refresh was asked for while a round ran: run one more at once
  catalogDue: true,
  models: [], // the catalog and hand-installed models, merged
  architectures: new Map(),
  downloads: [],
  slots: [],
  health: null,
  answeredAt: null, // when the node last answered a whole round
  shown: new Map(), // section -> the JSON of what it shows (re-rendered only on change)
  pending: new Set(), // "action:model" while its request runs
  confirming: null, // the model whose delete awaits a second click
};

function schedule(delay) {
  if (state.timer || state.busy || waitingForKey || document.hidden) return;
  state.timer = setTimeout(round, delay);
}

function refresh(catalog) {
  if (catalog) state.catalogDue = true;
  if (state.busy) { state.again = true; return; }
  clearTimeout(state.timer);
  state.timer = 0;
  schedule(0);
}

async function round() {
  state.timer = 0;
  if (waitingForKey || document.hidden) return; // resumed by the key form or visibilitychange
  state.busy = true;
  let delay = POLL_MS;
  let fetched = false;
  try {
    await fetchRound();
    fetched = true;
  } catch (err) {
    unreachable(err);
    delay = OFFLINE_POLL_MS;
  } finally {
    state.busy = false;
    if (state.again) { state.again = false; delay = 0; }
    schedule(delay);
  }
  if (fetched) { state.answeredAt = new Date(); keyAccepted(); render(); } // outside the try: a bug here is an uncaught error
}

function unreachable(err) {
  if (err instanceof ApiError && err.status === 401) return; // needKey() has said so
  setBadge("error", "unreachable");
  state.shown.delete("health");
  const last = state.answeredAt ? state.answeredAt.toLocaleTimeString() : "never";
  facts([["Status", `no answer: ${describeError(err)}`], ["Last answer", last]], $("health"));
}

async function fetchRound() {
  // One after the other: the page holds one connection for polling, whatever else it runs
  // (a browser opens at most 6 to a host; pulls and the playground hold theirs for long).
  const downloads = await api("/v0/downloads");
  const ps = await api("/api/ps");
  const health = await api("/api/health", { accept: [503] }); // offline still has a body
  const models = state.catalogDue ? await fetchCatalog() : null;
  const before = downloadIds();
  state.downloads = downloads.downloads || [];
  state.slots = ps.models || [];
  state.health = health;
  state.rounds++;
  if (models) { state.models = models; state.catalogDue = false; }
  // A download started or ended (here or by any client): the installed marks change.
  if (before !== downloadIds() || state.rounds % CATALOG_EVERY === 0) state.catalogDue = true;
}

function downloadIds() {
  return state.downloads.map((d) => d.model_id).sort().join(" ");
}

async function fetchCatalog() {
  const supported = await api("/v0/supported-models");
  const tags = await api("/api/tags");
  const installed = new Map((tags.models || []).map((m) => [m.id || m.name, m]));
  for (const id of installed.keys()) if (!state.architectures.has(id)) await fetchArchitecture(id);
  for (const id of state.architectures.keys()) if (!installed.has(id)) state.architectures.delete(id);
  const rows = (supported.models || []).map((m) => catalogRow(m, installed.get(m.id)));
  const known = new Set(rows.map((r) => r.id));
  for (const [id, record] of installed) if (!known.has(id)) rows.push(catalogRow({ id }, record));
  return rows;
}

async function fetchArchitecture(id) {
  try {
    const status = await api(`/v0/models/${encodeURIComponent(id)}/status`);
    state.architectures.set(id, status.architecture || null);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) throw err;
    state.architectures.set(id, null);
  }
}

function catalogRow(entry, record) {
  return {
    id: entry.id,
    name: entry.name && entry.name !== entry.id ? entry.name : null,
    installed: Boolean(record) || Boolean(entry.is_local),
    runnable: entry.runnable !== false,
    reason: entry.unusable_reason || entry.reason || null,
    size: record && record.size ? record.size : entry.size_bytes ?? null,
    architecture: entry.architecture || null,
    source: record ? record.source : entry.repo_id || entry.source || null,
  };
}

// ---- rendering -----------------------------------------------------------------------------
function render() {
  const loaded = new Map(state.slots.map((s) => [s.id, s]));
  const downloading = new Map(state.downloads.map((d) => [d.model_id, d]));
  show("downloads", state.downloads.map(downloadView), renderDownloads);
  show("models", state.models.map((m) => modelView(m, loaded.get(m.id), downloading.get(m.id))), renderModels);
  show("slots", state.slots.map(slotView), renderSlots);
  show("health", healthView(state.health), renderHealth);
  show("play-model", state.models.filter((m) => m.installed && m.runnable).map((m) => m.id), renderModelChoice);
}

function show(id, view, draw) {
  const json = JSON.stringify(view);
  if (state.shown.get(id) === json) return;
  state.shown.set(id, json);
  draw($(id), view);
}

function setBadge(status, text) {
  const badge = $("health-badge");
  badge.dataset.status = status;
  badge.textContent = text;
}

// downloads
function downloadView(d) {
  const total = d.total_bytes || null;
  const rate = d.bytes_per_s || 0;
  const left = total ? total - d.downloaded_bytes : null;
  return {
    id: d.model_id,
    status: d.stage || d.status, // the finer state: waiting, downloading, verifying...
    source: d.source,
    done: d.downloaded_bytes || 0,
    total,
    percent: total ? Math.floor((100 * d.downloaded_bytes) / total) : null,
    rate,
    eta: left !== null && rate > 0 ? left / rate : null,
    failures: (d.failures || []).map((f) => `${f.source} [${f.kind}] ${f.message}`),
  };
}

function renderDownloads(box, views) {
  if (!views.length) { box.replaceChildren(h("p", { class: "muted" }, "No download running.")); return; }
  box.replaceChildren(...views.map((v) => h("div", { class: "download", "data-model": v.id },
    h("div", { class: "head" }, h("strong", null, v.id),
      h("span", { class: "mark downloading" }, v.percent === null ? v.status : `${v.status} ${v.percent}%`),
      h("span", { class: "muted" }, v.source ? `from ${v.source}` : "finding a source…")),
    h("progress", { max: v.total || 1, value: v.total ? v.done : 0, title: `${v.percent ?? 0}%` }),
    h("div", { class: "figures" },
      h("span", { "data-figure": "bytes" }, `${bytes(v.done)} of ${v.total ? bytes(v.total) : "?"}`),
      h("span", { "data-figure": "rate" }, v.rate > 0 ? `${bytes(v.rate)}/s` : "stalled"),
      h("span", { "data-figure": "eta" }, `ETA ${duration(v.eta)}`)),
    v.failures.length ? h("div", { class: "muted small" }, "Sources that failed before this one:") : null,
    v.failures.length ? h("ul", { class: "failures" }, v.failures.map((f) => h("li", null, f))) : null)));
}

// models
function modelView(m, slot, download) {
  return {
    ...m,
    architecture: m.architecture || state.architectures.get(m.id) || null,
    loaded: slot ? slot.state : null,
    downloading: download ? download.progress : null,
    pending: [...state.pending].filter((p) => p.endsWith(":" + m.id)).map((p) => p.split(":")[0]),
    confirming: state.confirming === m.id,
  };
}

function renderModels(box, views) {
  if (!views.length) { box.replaceChildren(h("p", { class: "muted" }, "The catalog is empty.")); return; }
  const head = h("thead", null, h("tr", null, ["Model", "State", "Size", "Architecture", "Source", ""].map((t) => h("th", null, t))));
  box.replaceChildren(h("table", { class: "models" }, head, h("tbody", null, views.map(modelRow))));
}

function modelRow(v) {
  return h("tr", { "data-model": v.id },
    h("td", { class: "ident" }, h("strong", null, v.id), v.name ? h("span", { class: "muted" }, v.name) : null),
    h("td", { "data-label": "State" }, h("span", { class: "marks" }, marks(v))),
    h("td", { class: "num", "data-label": "Size" }, bytes(v.size)),
    h("td", { "data-label": "Architecture" }, v.architecture || "—"),
    h("td", { "data-label": "Source", class: "mono small" }, v.source || "—"),
    h("td", { class: "actions-cell" }, h("span", { class: "actions" }, actions(v))));
}

function marks(v) {
  const out = [];
  if (v.downloading !== null) out.push(h("span", { class: "mark downloading" }, `downloading ${Math.floor(v.downloading * 100)}%`));
  else if (v.installed) out.push(h("span", { class: "mark installed" }, "installed"));
  else out.push(h("span", { class: "mark" }, "not installed"));
  if (v.loaded === "ready") out.push(h("span", { class: "mark loaded" }, "loaded"));
  else if (v.loaded) out.push(h("span", { class: "mark loading" }, v.loaded));
  if (!v.runnable) out.push(h("span", { class: "mark unusable", title: v.reason || "this node cannot run it" }, "unusable"));
  return out;
}

function actions(v) {
  const button = (action, label, extra) => h("button", {
    type: "button", "data-action": action, "data-model": v.id, disabled: v.pending.includes(action), ...extra,
  }, label);
  const out = [];
  if (!v.installed && v.runnable && v.downloading === null) out.push(button("pull", "Pull", { class: "primary" }));
  if (v.loaded) out.push(button("unload", "Unload"));
  if (v.installed || v.downloading !== null) {
    out.push(button("delete", v.confirming ? "Confirm delete" : "Delete", { class: "danger" }));
  }
  return out;
}

// slots
function slotView(s) {
  const expires = s.expires_at ? Date.parse(s.expires_at) : null;
  return {
    id: s.id,
    embedding: Boolean(s.embedding),
    state: s.state,
    active: s.active_requests ?? 0,
    queued: s.queued_requests ?? 0,
    keepAlive: expires === null ? (s.active_requests ? "in use" : "never expires")
      : duration(Math.max(0, (expires - (Date.now() + clockOffset)) / 1000)),
    estimate: s.memory_estimate || bytes(s.memory_estimate_bytes),
    rss: s.memory_rss_bytes ? bytes(s.memory_rss_bytes) : "—",
  };
}

function renderSlots(box, views) {
  if (!views.length) { box.replaceChildren(h("p", { class: "muted" }, "Nothing loaded.")); return; }
  box.replaceChildren(...views.map((v) => h("div", { class: "slot", "data-model": v.id },
    h("strong", null, v.id), " ", h("span", { class: `mark ${v.state === "ready" ? "loaded" : "loading"}` }, v.state),
    v.embedding ? h("span", { class: "mark" }, "embedding") : null,
    facts([["Requests", `${v.active} active, ${v.queued} queued`], ["Keep-alive left", v.keepAlive],
      ["Memory estimate", v.estimate], ["RSS growth", v.rss]]))));
}

function facts(pairs, box) {
  const list = box || h("dl", { class: "facts" });
  list.replaceChildren(...pairs.filter(([, v]) => v !== null && v !== undefined).flatMap(([k, v]) => [h("dt", null, k), h("dd", null, String(v))]));
  return list;
}

// health
function healthView(b) {
  if (!b) return null;
  const load = b.load || {};
  const memory = b.memory || {};
  const gpu = b.gpu || {};
  const sync = b.sync_progress;
  return {
    status: b.status || "unknown",
    version: b.version || null,
    pairs: [
      ["Status", b.status],
      ["Requests", load.active_requests === undefined ? null : `${load.active_requests} of ${load.max_concurrent_requests ?? "?"}`],
      ["RAM", memory.ram_total_bytes ? `${bytes(memory.ram_used_bytes)} used of ${bytes(memory.ram_total_bytes)}` : null],
      ["GPUs", gpu.device_count === undefined ? null : gpu.device_count
        ? `${gpu.device_count}, ${bytes(gpu.used_memory_bytes)} used of ${bytes(gpu.total_memory_bytes)}` : "none"],
      ["Capability score", gpu.capability_score ?? null],
      ["Sync", b.sync_state ? b.sync_state + (sync ? ` (${sync.model_id}: ${bytes(sync.downloaded_bytes)} of ${bytes(sync.total_bytes)})` : "") : null],
      ["Loaded", b.loaded_models ? b.loaded_models.join(", ") || "none" : null],
    ],
  };
}

function renderHealth(box, view) {
  if (!view) return;
  setBadge(view.status, view.status);
  $("version").textContent = view.version ? `v${view.version}` : "";
  facts(view.pairs, box);
}

// ---- model actions -------------------------------------------------------------------------
const ACTIONS = {
  pull: (id) => api("/api/models/pull", { method: "POST", body: { model: id, stream: false }, within: 0 }),
  unload: (id) => api("/api/models/unload", { method: "POST", body: { model: id }, within: 60000 }),
  delete: (id) => api(`/api/models/${encodeURIComponent(id)}`, { method: "DELETE", within: 60000 }),
};
const DONE = { pull: "installed", unload: "unloaded", delete: "deleted" };

function onModelClick(ev) {
  const button = ev.target.closest("button[data-action]");
  if (!button) return;
  const { action, model } = button.dataset;
  if (action === "delete" && state.confirming !== model) {
    state.confirming = model;
    setTimeout(() => { if (state.confirming === model) { state.confirming = null; render(); } }, CONFIRM_MS);
    render();
    return;
  }
  state.confirming = null;
  run(action, model);
}

async function run(action, id) {
  const key = `${action}:${id}`;
  state.pending.add(key);
  render();
  if (action === "pull") refresh(false); // the download shows up at once
  try {
    const body = await ACTIONS[action](id);
    say(`${id}: ${body.status === "not_loaded" ? "was not loaded" : DONE[action]}.`);
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) say(`${action} ${id} refused:`, err);
  } finally {
    state.pending.delete(key);
    refresh(true);
  }
}

// ---- playground ----------------------------------------------------------------------------
let playing = null; // the AbortController of the answer streaming now

function renderModelChoice(select, ids) {
  const chosen = select.value;
  select.replaceChildren(...ids.map((id) => h("option", { value: id }, id)));
  if (ids.includes(chosen)) select.value = chosen;
  $("play-hint").hidden = ids.length > 0;
  $("play-send").disabled = playing !== null || !ids.length;
}

async function play(ev) {
  ev.preventDefault();
  const chat = document.querySelector("input[name=mode]:checked").value === "chat";
  const model = $("play-model").value;
  const prompt = $("play-prompt").value;
  const body = { model, max_tokens: Number($("play-max").value) || 64, stream: true };
  body.stream_options = { include_usage: true }; // the last chunk counts the tokens
  if (chat) body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  playing = new AbortController();
  setPlaying(true);
  const text = document.createTextNode("");
  $("play-output").replaceChildren(text);
  const meter = { start: performance.now(), first: 0, last: 0, tokens: 0, counted: null };
  $("play-stats").textContent = "waiting for the first token…";
  try {
    const resp = await request(chat ? "/v1/chat/completions" : "/v1/completions", { method: "POST", body, signal: playing.signal });
    if (!resp.ok) throw await apiError(resp);
    await readAnswer(resp, chat, text, meter);
    $("play-stats").textContent = stats(meter, "done");
  } catch (err) {
    const stopped = err && err.name === "AbortError";
    $("play-stats").textContent = stats(meter, stopped ? "stopped" : "failed");
    if (!stopped && !(err instanceof ApiError && err.status === 401)) say("The playground's request failed:", err);
  } finally {
    playing = null;
    setPlaying(false);
  }
}

async function readAnswer(resp, chat, text, meter) {
  for await (const event of serverSentEvents(resp.body)) {
    if (event.comment) { if (!meter.tokens) $("play-stats").textContent = event.comment; continue; }
    if (event.data === "[DONE]") return;
    const chunk = JSON.parse(event.data);
    if (chunk.error) throw new ApiError(resp.status, chunk.error.code, chunk.error.message);
    if (chunk.usage) meter.counted = chunk.usage.completion_tokens ?? null;
    const choice = (chunk.choices || [])[0] || {};
    const piece = chat ? (choice.delta || {}).content : choice.text;
    if (!piece) continue;
    const now = performance.now();
    meter.first = meter.first || now;
    meter.last = now;
    meter.tokens++;
    text.appendData(piece);
    $("play-output").dataset.tokens = meter.tokens;
    $("play-stats").textContent = stats(meter, "streaming");
  }
}

async function* serverSentEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const event = parseEvent(block);
        if (event) yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function parseEvent(block) {
  const data = [];
  let comment = null;
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith(":")) comment = line.slice(1).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (data.length) return { data: data.join("\n") };
  return comment ? { comment } : null;
}

function stats(m, phase) {
  if (!m.tokens) return phase;
  const ttft = m.first - m.start;
  const rate = m.tokens > 1 && m.last > m.first ? ((m.tokens - 1) * 1000) / (m.last - m.first) : null;
  const tokens = m.counted ?? m.tokens; // the node's count once it sent it, else the chunks seen
  const parts = [`TTFT ${Math.round(ttft)} ms`, rate === null ? null : `${rate.toFixed(1)} tok/s`, `${tokens} tokens`, phase];
  return parts.filter(Boolean).join(" · ");
}

function setPlaying(on) {
  $("play-send").disabled = on || !$("play-model").options.length;
  $("play-stop").disabled = !on;
}

// ---- start ---------------------------------------------------------------------------------
function start() {
  $("auth-form").addEventListener("submit", keyEntered);
  $("forget-key").addEventListener("click", forgetKey);
  $("models").addEventListener("click", onModelClick);
  $("messages").addEventListener("click", (ev) => {
    if (ev.target.closest("[data-dismiss]")) ev.target.closest("li").remove();
  });
  $("play-form").addEventListener("submit", play);
  $("play-stop").addEventListener("click", () => playing && playing.abort());
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(false); });
  setPlaying(false);
  refresh(true);
}

start();
