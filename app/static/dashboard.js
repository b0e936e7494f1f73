// Lethe compliance dashboard: polls the JSON API with the viewer's key. No build step, no
// dependencies. The key lives in sessionStorage (this tab only) and travels only in the
// X-API-Key header; every value from the API is inserted as text, never as HTML.
"use strict";

const KEY_STORAGE = "lethe.apiKey";
const POLL_MS = 10000;
const VERSIONS_SHOWN = 10;
const imageUrls = new Map(); // artifact path + audit time -> object URL, so plots load once
let pollTimer = null;

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function badge(value) {
  return el("span", { class: `badge ${value || "none"}`, text: value || "none" });
}

function when(iso) {
  return iso ? `${iso.slice(0, 16).replace("T", " ")} UTC` : "—";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const sign = seconds < 0 ? "-" : "";
  const rest = Math.abs(seconds);
  if (rest < 60) return `${sign}${Math.round(rest)} s`;
  if (rest < 3600) return `${sign}${Math.round(rest / 60)} min`;
  const hours = Math.round(rest / 3600);
  const days = Math.floor(hours / 24);
  return days ? `${sign}${days} d ${hours % 24} h` : `${sign}${hours} h`;
}

function secondsBetween(fromIso, toIso) {
  return (Date.parse(toIso) - Date.parse(fromIso)) / 1000;
}

async function request(path) {
  const response = await fetch(path, {
    headers: { "X-API-Key": sessionStorage.getItem(KEY_STORAGE) || "", Accept: "application/json" },
    cache: "no-store",
  });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({}));
    throw new ApiError(response.status, problem.detail || response.statusText);
  }
  return response;
}

async function getJson(path) {
  return (await request(path)).json();
}

async function imageUrl(path, version) {
  const cacheKey = `${path}@${version}`;
  if (!imageUrls.has(cacheKey)) {
    imageUrls.set(cacheKey, URL.createObjectURL(await (await request(path)).blob()));
  }
  return imageUrls.get(cacheKey);
}

function table(headers, rows, emptyText) {
  if (!rows.length) return el("p", { class: "empty", text: emptyText });
  return el(
    "table",
    {},
    el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows),
  );
}

function tile(label, value, bad = false) {
  return el(
    "div",
    { class: bad ? "tile bad" : "tile" },
    el("div", { class: "value", text: String(value) }),
    el("div", { class: "label", text: label }),
  );
}

function renderTiles(stats) {
  const byState = stats.requests_by_state;
  const open = (byState.pending || 0) + (byState.processing || 0);
  const oldest = stats.oldest_open_received_at;
  document.getElementById("tiles").replaceChildren(
    tile("open requests", open),
    tile("overdue", stats.overdue, stats.overdue > 0),
    tile("oldest open", oldest ? duration(secondsBetween(oldest, new Date().toISOString())) : "—"),
    tile("time to erasure p50", duration(stats.time_to_erasure_p50_s)),
    tile("time to erasure p95", duration(stats.time_to_erasure_p95_s)),
    tile("completed", byState.completed || 0),
    tile("failed", byState.failed || 0, (byState.failed || 0) > 0),
    tile("serving version", stats.serving_version || "none"),
  );
}

function openRow(r) {
  const left = secondsBetween(new Date().toISOString(), r.deadline);
  const job = r.job ? `${r.job.state} ${r.job.progress}%${r.job.method ? ` (${r.job.method})` : ""}` : "—";
  return el(
    "tr",
    { class: r.overdue ? "late" : "" },
    el("td", { class: "mono", text: r.sample_id }),
    el("td", {}, badge(r.state)),
    el("td", { text: when(r.received_at) }),
    el("td", { text: when(r.deadline) }),
    el("td", { text: r.overdue ? `overdue by ${duration(-left)}` : duration(left) }),
    el("td", { text: job }),
    el("td", { class: "mono", text: r.request_id }),
  );
}

const OPEN_HEADERS = ["sample", "state", "received", "deadline", "time left", "job", "request"];

function renderOpen(overdue, pending, processing) {
  document
    .getElementById("overdue")
    .replaceChildren(table(OPEN_HEADERS, overdue.map(openRow), "No request is past its deadline."));
  const open = [...processing, ...pending].sort((a, b) => a.deadline.localeCompare(b.deadline));
  document
    .getElementById("open")
    .replaceChildren(table(OPEN_HEADERS, open.map(openRow), "No open request."));
}

function completedRow(r) {
  const certificate = r.certificate
    ? el(
        "details",
        {},
        el("summary", { text: "certificate" }),
        el("pre", { text: JSON.stringify(r.certificate, null, 2) }),
      )
    : el("span", { class: "empty", text: "none" });
  return el(
    "tr",
    { class: "completed-row" },
    el("td", { class: "mono", text: r.sample_id }),
    el("td", { text: when(r.received_at) }),
    el("td", { text: when(r.completed_at) }),
    el("td", { text: duration(secondsBetween(r.received_at, r.completed_at)) }),
    el("td", { text: r.completed_in_version || "—" }),
    el("td", {}, certificate),
  );
}

function renderCompleted(completed) {
  const headers = ["sample", "received", "completed", "time to erasure", "version", "proof"];
  document
    .getElementById("completed")
    .replaceChildren(table(headers, completed.map(completedRow), "No completed request yet."));
}

function renderServing(serving, detail, versionsByName) {
  const box = document.getElementById("serving");
  if (!serving.version) {
    box.replaceChildren(el("p", { class: "empty", text: "No version serves yet." }));
    return;
  }
  const chain = detail.lineage.map((name) => {
    const method = versionsByName.get(name)?.method;
    return method ? `${name} (${method})` : name;
  });
  const history = serving.history.map((h) =>
    el(
      "tr",
      {},
      el("td", { text: h.version }),
      el("td", { text: when(h.started_at) }),
      el("td", { text: h.ended_at ? when(h.ended_at) : "now" }),
      el("td", { text: h.moved_by }),
      el("td", { text: h.reason }),
    ),
  );
  box.replaceChildren(
    el(
      "p",
      {},
      el("strong", { text: serving.version.version }),
      ` ${serving.version.method}, promoted ${when(serving.version.promoted_at)} `,
      badge(serving.version.state),
    ),
    el("p", { class: "lineage", text: `Lineage: ${chain.join(" ← ")}` }),
    table(["version", "from", "to", "moved by", "reason"], history, "No alias history."),
  );
}

function flatten(metrics, prefix = "") {
  return Object.entries(metrics).flatMap(([name, value]) => {
    const key = prefix ? `${prefix}.${name}` : name;
    if (value && typeof value === "object" && !Array.isArray(value)) return flatten(value, key);
    if (Array.isArray(value) && value.length > 6) return [[key, `[${value.length} values]`]]; // curves
    return [[key, typeof value === "number" ? Number(value.toPrecision(4)) : JSON.stringify(value)]];
  });
}

function keyValueTable(title, values) {
  const rows = flatten(values).map(([k, v]) =>
    el("tr", {}, el("td", { class: "mono", text: k }), el("td", { text: String(v) })),
  );
  return el("div", {}, el("h3", { text: title }), table(["name", "value"], rows, "none"));
}

// The gate records one {rule, passed, reason} per rule; older reports may hold plain text.
function reasonItem(reason) {
  if (typeof reason !== "object" || reason === null) return el("li", { text: String(reason) });
  return el("li", {}, badge(reason.passed ? "pass" : "fail"), ` ${reason.rule}: ${reason.reason}`);
}

async function plots(audit) {
  const figures = await Promise.all(
    Object.entries(audit.artifacts)
      .filter(([name]) => /\.(png|jpe?g|svg)$/i.test(name))
      .map(async ([name, path]) =>
        el(
          "figure",
          {},
          el("img", { class: "audit-plot", alt: name, src: await imageUrl(path, audit.finished_at) }),
          el("figcaption", { text: name }),
        ),
      ),
  );
  return el("div", { class: "plots" }, ...figures);
}

async function versionCard(version, serving) {
  const response = await request(`/audit/${version.version}`);
  const audit = await response.json();
  const head = el(
    "h3",
    {},
    `${version.version} · ${version.method}${version.parent ? ` · from ${version.parent}` : ""} `,
    badge(version.state),
    " audit ",
    badge(audit.state === "done" ? audit.decision : audit.state),
  );
  const card = el("div", { class: version.version === serving ? "version is-serving" : "version" }, head);
  if (audit.state !== "done") return card;
  card.append(
    el("ul", { class: "reasons" }, ...audit.reasons.map(reasonItem)),
    el("div", { class: "columns" }, keyValueTable("metrics", audit.metrics), keyValueTable("gate thresholds", audit.thresholds)),
    await plots(audit),
  );
  return card;
}

async function refresh() {
  const [stats, overdue, pending, processing, completed, serving, models] = await Promise.all([
    getJson("/stats"),
    getJson("/forget/requests?overdue=true&limit=100"),
    getJson("/forget/requests?state=pending&limit=100"),
    getJson("/forget/requests?state=processing&limit=100"),
    getJson("/forget/requests?state=completed&limit=20"),
    getJson("/models/serving"),
    getJson(`/models?limit=${VERSIONS_SHOWN}`),
  ]);
  const versionsByName = new Map(models.items.map((v) => [v.version, v]));
  const servingName = serving.version?.version;
  const detail = servingName ? await getJson(`/models/${servingName}`) : null;
  const cards = await Promise.all(models.items.map((v) => versionCard(v, servingName)));
  renderTiles(stats);
  renderOpen(overdue.items, pending.items, processing.items);
  renderCompleted(completed.items);
  renderServing(serving, detail, versionsByName);
  document
    .getElementById("audits")
    .replaceChildren(...(cards.length ? cards : [el("p", { class: "empty", text: "No model version yet." })]));
}

function showStatus(text, isError = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function setConnected(connected) {
  document.querySelector("main").hidden = !connected;
  document.getElementById("forget-key").hidden = !connected;
}

async function poll() {
  clearTimeout(pollTimer);
  try {
    await refresh();
    setConnected(true);
    showStatus(`Updated ${new Date().toISOString().slice(11, 19)} UTC; refreshes every ${POLL_MS / 1000} s.`);
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      setConnected(false);
      showStatus(`The API refused this key (${error.status}): ${error.message}`, true);
      return; // no retry with a key that cannot work
    }
    showStatus(`Could not reach the API (${error.message}); retrying.`, true);
  }
  pollTimer = setTimeout(poll, POLL_MS);
}

function start() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  form.addEventListener("submit", (event) => {
    event.preventDefault(); // never a form submission: the key must not reach a URL
    if (!input.value.trim()) return;
    sessionStorage.setItem(KEY_STORAGE, input.value.trim());
    input.value = "";
    showStatus("Loading…");
    poll();
  });
  document.getElementById("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    clearTimeout(pollTimer);
    setConnected(false);
    showStatus("Key forgotten. Type an API key to load the ledger.");
  });
  if (sessionStorage.getItem(KEY_STORAGE)) poll();
}

document.addEventListener("DOMContentLoaded", start);
