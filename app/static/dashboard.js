// Lethe compliance dashboard: polls the JSON API with the viewer's key. No build step, no
// dependencies, no inline script or style (the page's Content-Security-Policy forbids them).
// The key lives in sessionStorage (this tab only) and travels only in the X-API-Key header;
// every value from the API is inserted as text, never as HTML. Each part of the page loads on
// its own: one that fails (a purged plot, a slow audit) shows why in its place, and the rest
// of the page stands.
"use strict";

const KEY_STORAGE = "lethe.apiKey";
const POLL_MS = 10000;
const VERSIONS_SHOWN = 12;
const MOVES_SHOWN = 5;
const SAMPLES_SHOWN = 5;
const GONE = [404, 410]; // an artifact the purge deleted
const openPanels = new Set(); // "v3:plots", ...: stay open across refreshes
const plotCache = new Map(); // artifact path @ audit time -> {url} or {gone: ApiError}
let pollTimer = null;

class ApiError extends Error {
  constructor(status, detail, body) {
    super(detail);
    this.status = status;
    this.body = body;
  }
}

class Unreachable extends Error {}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined && child !== false));
  return node;
}

function badge(value) {
  const text = value || "none";
  return el("span", { class: `badge ${text}`, text });
}

function when(iso) {
  return iso ? `${iso.slice(0, 16).replace("T", " ")} UTC` : "—";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
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

function percent(fraction) {
  return typeof fraction === "number" ? `${(100 * fraction).toFixed(1)}%` : "—";
}

async function request(path) {
  let response;
  try {
    response = await fetch(path, {
      headers: { "X-API-Key": sessionStorage.getItem(KEY_STORAGE) || "", Accept: "application/json" },
      cache: "no-store",
    });
  } catch (error) {
    throw new Unreachable(error.message); // no answer at all: the network or the server
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new ApiError(response.status, body.detail || response.statusText, body);
  }
  return response;
}

async function getJson(path) {
  return (await request(path)).json();
}

// Every named promise, settled: {ok: true, value} or {ok: false, error}.
async function settle(named) {
  const names = Object.keys(named);
  const outcomes = await Promise.allSettled(Object.values(named));
  return Object.fromEntries(
    outcomes.map((o, i) => [names[i], o.status === "fulfilled" ? { ok: true, value: o.value } : { ok: false, error: o.reason }]),
  );
}

function refusedKey(error) {
  return error instanceof ApiError && (error.status === 401 || error.status === 403);
}

function problemText(error) {
  if (error instanceof ApiError) return `the API answered ${error.status}: ${error.message}`;
  if (error instanceof Unreachable) return `the API could not be reached (${error.message})`;
  return `this page could not show it (${error})`; // unexpected data: say so, blame nobody else
}

// Renders one part of the page; an error shows in that part, and the rest of the page stands.
async function part(boxId, render) {
  try {
    await render();
  } catch (error) {
    if (refusedKey(error)) throw error;
    document.getElementById(boxId).replaceChildren(problem(error));
  }
}

function problem(error) {
  return el("p", { class: "problem", text: `Could not load this part: ${problemText(error)}.` });
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

// A <details> whose open state survives the refresh; `fill` builds its content when it opens.
function panel(key, title, fill) {
  const details = el("details", { "data-panel": key }, el("summary", { text: title }));
  const body = el("div");
  details.append(body);
  let filled = false;
  const open = () => {
    if (!filled) {
      filled = true;
      fill(body);
    }
  };
  details.addEventListener("toggle", () => {
    if (details.open) {
      openPanels.add(key);
      open();
    } else openPanels.delete(key);
  });
  if (openPanels.has(key)) {
    details.open = true;
    open();
  }
  return details;
}

function showCertificate(title, certificate) {
  document.getElementById("certificate-title").textContent = title;
  document.getElementById("certificate-body").textContent = JSON.stringify(certificate, null, 2);
  document.getElementById("certificate-dialog").showModal();
}

function certificateButton(label, title, load) {
  const button = el("button", { type: "button", class: "certificate", text: label });
  button.addEventListener("click", async () => {
    try {
      showCertificate(title, await load());
    } catch (error) {
      showCertificate(title, { error: problemText(error) });
    }
  });
  return button;
}

// ---- key figures ---------------------------------------------------------------------------

function renderTiles(result) {
  const box = document.getElementById("tiles");
  if (!result.ok) return box.replaceChildren(problem(result.error));
  const stats = result.value;
  const byState = stats.requests_by_state || {};
  const open = (byState.pending || 0) + (byState.processing || 0);
  const oldest = stats.oldest_open_received_at;
  const tiles = [
    tile("open requests", open),
    tile("overdue", stats.overdue, stats.overdue > 0),
    tile("oldest open", oldest ? duration(secondsBetween(oldest, new Date().toISOString())) : "—"),
    tile("time to erasure p50 / p95", `${duration(stats.time_to_erasure_p50_s)} / ${duration(stats.time_to_erasure_p95_s)}`),
    tile("completed", byState.completed || 0),
    tile("failed", byState.failed || 0, (byState.failed || 0) > 0),
  ];
  const held = (stats.jobs_by_state || {}).held;
  if (held !== undefined) tiles.push(tile("jobs held", held, held > 0));
  tiles.push(tile("serving version", stats.serving_version || "none"));
  box.replaceChildren(...tiles);
}

// ---- requests ------------------------------------------------------------------------------

function jobText(job) {
  if (!job) return "—";
  const parts = [`job ${job.id} ${job.state}`];
  if (job.state === "running") parts.push(`${job.progress}%`);
  const step = job.progress_detail;
  if (job.state === "running" && step && step.phase) {
    const count = step.total !== null && step.total !== undefined ? ` ${step.done}/${step.total} ${step.unit || ""}` : "";
    const left = typeof step.left_seconds === "number" ? `, about ${duration(step.left_seconds)} left` : "";
    parts.push(`· ${step.phase}${count}${left}`);
  }
  return parts.join(" ");
}

function openRow(r, now) {
  const left = secondsBetween(now, r.deadline);
  return el(
    "tr",
    { class: r.overdue ? "late" : "" },
    el("td", { class: "mono", text: r.sample_id }),
    el("td", {}, badge(r.state)),
    el("td", { text: when(r.received_at) }),
    el("td", { class: r.overdue ? "late-text" : "", text: r.overdue ? `overdue by ${duration(-left)}` : `${duration(left)} left` }),
    el("td", {}, r.job ? el("progress", { max: "100", value: String(r.job.progress) }) : null, ` ${jobText(r.job)}`),
  );
}

function renderOpen(pending, processing, overdue) {
  const box = document.getElementById("open");
  const failedPart = [pending, processing, overdue].find((result) => !result.ok);
  if (failedPart) return box.replaceChildren(problem(failedPart.error));
  const byId = new Map();
  for (const r of [...overdue.value.items, ...processing.value.items, ...pending.value.items]) byId.set(r.request_id, r);
  const open = [...byId.values()].sort(
    (a, b) => Number(b.overdue) - Number(a.overdue) || a.deadline.localeCompare(b.deadline),
  );
  const now = new Date().toISOString();
  box.replaceChildren(
    table(["sample", "state", "received", "deadline", "job"], open.map((r) => openRow(r, now)), "No open request."),
  );
  renderHeld(open);
}

// Jobs an operator must approve or reject (`held`): from the jobs of the open requests.
function renderHeld(open) {
  const jobs = new Map();
  for (const r of open) {
    if (r.job && r.job.state === "held") {
      const entry = jobs.get(r.job.id) || { job: r.job, samples: [] };
      entry.samples.push(r.sample_id);
      jobs.set(r.job.id, entry);
    }
  }
  const rows = [...jobs.values()].map(({ job, samples }) =>
    el(
      "tr",
      {},
      el("td", { text: `job ${job.id}` }),
      el("td", { text: `${samples.length} request(s): ${samples.slice(0, SAMPLES_SHOWN).join(", ")}${samples.length > SAMPLES_SHOWN ? ", …" : ""}` }),
      el("td", { text: job.held_reason || job.reason || job.error || "no reason given" }),
    ),
  );
  document.getElementById("held-section").hidden = !rows.length;
  document.getElementById("held").replaceChildren(table(["job", "requests", "reason"], rows, ""));
}

function renderFailed(result) {
  const section = document.getElementById("failed-section");
  const box = document.getElementById("failed");
  if (!result.ok) {
    section.hidden = false;
    return box.replaceChildren(problem(result.error));
  }
  const rows = result.value.items.map((r) =>
    el("tr", {}, el("td", { class: "mono", text: r.sample_id }), el("td", { text: when(r.updated_at) }), el("td", { text: r.error || "—" })),
  );
  section.hidden = !rows.length;
  box.replaceChildren(table(["sample", "failed", "why"], rows, ""));
}

function renderCompleted(result) {
  const box = document.getElementById("completed");
  if (!result.ok) return box.replaceChildren(problem(result.error));
  const rows = result.value.items.map((r) =>
    el(
      "tr",
      {},
      el("td", { class: "mono", text: r.sample_id }),
      el("td", { text: when(r.completed_at) }),
      el("td", { text: duration(secondsBetween(r.received_at, r.completed_at)) }),
      el("td", { text: r.completed_in_version ? `${r.completed_in_version}${r.certificate?.method ? ` (${r.certificate.method})` : ""}` : "—" }),
      el(
        "td",
        {},
        r.certificate
          ? certificateButton("certificate", `Certificate of request ${r.request_id}`, async () => r.certificate)
          : el("span", { class: "muted", text: "being issued" }),
      ),
    ),
  );
  box.replaceChildren(
    table(["sample", "completed", "time to erasure", "served by", "proof"], rows, "No completed request yet."),
  );
}

// ---- the serving model ---------------------------------------------------------------------

async function renderServing(result, models) {
  const box = document.getElementById("serving");
  if (!result.ok) return box.replaceChildren(problem(result.error));
  const serving = result.value;
  if (!serving.version) return box.replaceChildren(el("p", { class: "empty", text: "No version serves yet." }));
  const current = serving.version;
  const methods = new Map((models.ok ? models.value.items : []).map((v) => [v.version, v.method]));
  let chain;
  try {
    chain = (await getJson(`/models/${current.version}`)).lineage;
  } catch (error) {
    if (refusedKey(error)) throw error;
    chain = null;
  }
  const steps = (chain || [current.version]).flatMap((name, i) => [
    i ? el("span", { class: "muted", text: "←" }) : null,
    el("span", { class: i ? "step" : "step current" }, el("strong", { text: name }), methods.has(name) ? ` ${methods.get(name)}` : ""),
  ]);
  const moves = serving.history.slice(0, MOVES_SHOWN).map((h) => // newest first
    el(
      "tr",
      {},
      el("td", { text: h.version }),
      el("td", { text: when(h.started_at) }),
      el("td", { text: h.moved_by }),
      el("td", { text: h.reason }),
    ),
  );
  box.replaceChildren(
    el(
      "p",
      {},
      el("strong", { text: current.version }),
      ` ${current.method}, serving since ${when(current.promoted_at)} `,
      badge(current.state),
    ),
    el("div", { class: "lineage", "aria-label": "lineage, newest first" }, ...steps),
    ...(chain ? [] : [el("p", { class: "problem", text: "Could not load the lineage." })]),
    table(["served", "from", "moved by", "why"], moves, "No alias history."),
  );
}

// ---- versions and their audits -------------------------------------------------------------

function flatten(metrics, prefix = "") {
  return Object.entries(metrics).flatMap(([name, value]) => {
    const key = prefix ? `${prefix}.${name}` : name;
    if (name === "definition") return [];
    if (value && typeof value === "object" && !Array.isArray(value)) return flatten(value, key);
    if (Array.isArray(value) && value.length > 6) return [[key, `[${value.length} values]`]]; // curves
    return [[key, typeof value === "number" ? Number(value.toPrecision(4)) : JSON.stringify(value)]];
  });
}

function isRule(reason) {
  return typeof reason === "object" && reason !== null && "rule" in reason;
}

function ruleItem(reason) {
  if (!isRule(reason)) return el("li", { text: String(reason) });
  return el(
    "li",
    { class: reason.passed ? "" : "failed-rule" },
    badge(reason.passed ? "pass" : "fail"),
    " ",
    el("span", { class: "rule-name", text: reason.rule }),
    `: ${reason.reason}`,
  );
}

function accuracyLine(version, audit) {
  const test = audit?.metrics?.utility?.test;
  if (test && typeof test.parent === "number" && typeof test.candidate === "number") {
    const drop = typeof test.drop_points === "number" ? ` (${test.drop_points > 0 ? "−" : "+"}${Math.abs(test.drop_points).toFixed(1)} points)` : "";
    return el("p", {}, "test accuracy ", el("strong", { text: `${percent(test.parent)} → ${percent(test.candidate)}` }), drop);
  }
  const own = version.details?.test_accuracy;
  return typeof own === "number" ? el("p", {}, "test accuracy ", el("strong", { text: percent(own) })) : null;
}

function rulesSummary(audit) {
  const reasons = audit.reasons || [];
  const rules = reasons.filter(isRule);
  const failed = rules.filter((r) => !r.passed);
  const notes = reasons.filter((r) => !isRule(r));
  if (failed.length || notes.length) {
    return el("ul", { class: "reasons" }, ...failed.map(ruleItem), ...notes.map(ruleItem));
  }
  return rules.length ? el("p", { class: "muted", text: `All ${rules.length} rules passed.` }) : null;
}

// Per-sample decisions, when the audit reports them: counts, then the samples that did not pass.
function perSample(audit) {
  const samples = audit?.metrics?.per_sample?.samples;
  if (!Array.isArray(samples) || !samples.length) return null;
  const counts = new Map();
  for (const s of samples) counts.set(s.decision, (counts.get(s.decision) || 0) + 1);
  const notPassed = samples.filter((s) => s.decision !== "pass");
  return el(
    "div",
    { class: "per-sample" },
    el("p", {}, "per sample: ", ...[...counts].flatMap(([decision, n], i) => [i ? " · " : "", `${n} `, badge(decision)])),
    notPassed.length
      ? el(
          "ul",
          {},
          ...notPassed.slice(0, SAMPLES_SHOWN).map((s) => el("li", {}, el("span", { class: "mono", text: s.sample_id }), ` ${s.decision}: ${s.reason || ""}`)),
          notPassed.length > SAMPLES_SHOWN ? el("li", { class: "muted", text: `and ${notPassed.length - SAMPLES_SHOWN} more` }) : null,
        )
      : null,
  );
}

async function plotOutcome(path, stamp) {
  const key = `${path}@${stamp}`;
  if (!plotCache.has(key)) {
    try {
      plotCache.set(key, { url: URL.createObjectURL(await (await request(path)).blob()) });
    } catch (error) {
      if (!(error instanceof ApiError && GONE.includes(error.status))) throw error; // retried next time
      plotCache.set(key, { gone: error });
    }
  }
  return plotCache.get(key);
}

// The certificate a purged artifact's answer points to, if it names one.
function certificateOf(error) {
  const found = JSON.stringify(error.body || {}).match(/\/forget\/requests\/[^"/\s]+\/certificate/);
  return found ? found[0] : null;
}

async function fillPlot(figure, name, path, stamp) {
  try {
    const outcome = await plotOutcome(path, stamp);
    if (outcome.url) {
      const image = el("img", { class: "audit-plot", alt: name, src: outcome.url, title: "click to enlarge" });
      image.addEventListener("click", () => figure.classList.toggle("large"));
      figure.replaceChildren(image, el("figcaption", { text: name }));
      return;
    }
    showPurged(figure, name, certificateOf(outcome.gone));
  } catch (error) {
    figure.replaceChildren(el("p", { class: "problem", text: `${name}: ${problemText(error)}` }));
  }
}

// A plot an erasure purged: said so in its place, with the certificate that purged it.
function showPurged(figure, name, certificate) {
  figure.className = "purged";
  figure.replaceChildren(el("strong", { text: "purged" }), el("figcaption", { text: name }));
  if (certificate) figure.append(certificateButton("certificate", `Certificate for ${name}`, () => getJson(certificate)));
}

const IMAGE = /\.(png|jpe?g|svg)$/i;

// The audit's plots: those still stored load on demand; those the API lists as purged (or that
// answer 410 when fetched) show as purged.
function plots(audit, body) {
  const images = Object.entries(audit.artifacts || {}).filter(([name]) => IMAGE.test(name));
  const purged = Object.entries(audit.purged_artifacts || {}).filter(([name]) => IMAGE.test(name));
  if (!images.length && !purged.length) return body.replaceChildren(el("p", { class: "empty", text: "No plot." }));
  const figures = images.map(([name, path]) => {
    const figure = el("figure", {}, el("figcaption", { text: `${name}: loading…` }));
    fillPlot(figure, name, path, audit.finished_at);
    return figure;
  });
  for (const [name, purge] of purged) {
    const figure = el("figure");
    showPurged(figure, name, (purge.certificates || [])[0] || null);
    figures.push(figure);
  }
  body.replaceChildren(el("div", { class: "plots" }, ...figures));
}

function rulesPanel(audit, body) {
  const thresholds = flatten(audit.thresholds || {}).map(([k, v]) => el("tr", {}, el("td", { class: "mono", text: k }), el("td", { text: String(v) })));
  body.replaceChildren(
    el("ul", { class: "reasons" }, ...(audit.reasons || []).map(ruleItem)),
    el("div", { class: "scroll" }, table(["threshold", "value"], thresholds, "No threshold recorded.")),
  );
}

function figuresPanel(audit, body) {
  const rows = flatten(audit.metrics || {}).map(([k, v]) => el("tr", {}, el("td", { class: "mono", text: k }), el("td", { text: String(v) })));
  body.replaceChildren(el("div", { class: "scroll" }, table(["figure", "value"], rows, "No figure recorded.")));
}

function auditState(audit) {
  return audit.state === "done" ? audit.decision : audit.decision || audit.state;
}

function versionCard(version, servingName, result) {
  const name = version.version;
  const audit = result.ok ? result.value : null;
  const head = el(
    "div",
    { class: "head" },
    el("h3", { text: name }),
    el("span", { class: "method", text: `${version.method}${version.parent ? ` from ${version.parent}` : ""}` }),
    badge(version.state),
    audit ? el("span", { class: "decision" }, "audit ", badge(auditState(audit))) : null,
  );
  const card = el("article", { class: name === servingName ? "card is-serving" : "card", "data-version": name }, head);
  if (!audit) {
    card.append(problem(result.error));
    return card;
  }
  card.append(accuracyLine(version, audit) || "");
  if (audit.state !== "done") {
    const why = audit.reason || audit.detail;
    card.append(el("p", { class: "muted", text: why ? `${audit.state}: ${why}` : `audit ${audit.state}` }));
  } else {
    card.append(rulesSummary(audit) || "", perSample(audit) || "");
  }
  if (version.weights_purged) card.append(el("p", { class: "muted", text: "weights purged (they held erased samples)" }));
  if (audit.state === "done") {
    const count = [...Object.keys(audit.artifacts || {}), ...Object.keys(audit.purged_artifacts || {})].filter((n) => IMAGE.test(n)).length;
    card.append(
      el(
        "div",
        { class: "panels" },
        panel(`${name}:rules`, "rules and thresholds", (body) => rulesPanel(audit, body)),
        count ? panel(`${name}:plots`, `plots (${count})`, (body) => plots(audit, body)) : null,
        panel(`${name}:figures`, "all figures", (body) => figuresPanel(audit, body)),
      ),
    );
  }
  return card;
}

function cardOrProblem(version, servingName, result) {
  try {
    return versionCard(version, servingName, result);
  } catch (error) {
    return el("article", { class: "card", "data-version": version.version }, el("h3", { text: version.version }), problem(error));
  }
}

async function renderVersions(models, servingName) {
  const box = document.getElementById("versions");
  if (!models.ok) return box.replaceChildren(problem(models.error));
  const versions = models.value.items;
  if (!versions.length) return box.replaceChildren(el("p", { class: "empty", text: "No model version yet." }));
  const audits = await settle(Object.fromEntries(versions.map((v) => [v.version, getJson(`/audit/${v.version}`)])));
  const refused = Object.values(audits).find((a) => !a.ok && refusedKey(a.error));
  if (refused) throw refused.error;
  box.replaceChildren(...versions.map((v) => cardOrProblem(v, servingName, audits[v.version])));
}

// ---- polling -------------------------------------------------------------------------------

async function refresh() {
  const parts = await settle({
    stats: getJson("/stats"),
    pending: getJson("/forget/requests?state=pending&limit=100"),
    processing: getJson("/forget/requests?state=processing&limit=100"),
    overdue: getJson("/forget/requests?overdue=true&limit=100"),
    failed: getJson("/forget/requests?state=failed&limit=20"),
    completed: getJson("/forget/requests?state=completed&limit=15"),
    serving: getJson("/models/serving"),
    models: getJson(`/models?limit=${VERSIONS_SHOWN}`),
  });
  const failures = Object.values(parts).filter((part) => !part.ok);
  const refused = failures.find((part) => refusedKey(part.error));
  if (refused) throw refused.error;
  if (failures.length === Object.keys(parts).length) throw failures[0].error; // nothing answered
  const servingName = parts.serving.ok ? parts.serving.value.version?.version : undefined;
  await Promise.all([
    part("tiles", () => renderTiles(parts.stats)),
    part("open", () => renderOpen(parts.pending, parts.processing, parts.overdue)),
    part("failed", () => renderFailed(parts.failed)),
    part("completed", () => renderCompleted(parts.completed)),
    part("serving", () => renderServing(parts.serving, parts.models)),
    part("versions", () => renderVersions(parts.models, servingName)),
  ]);
  return failures.length;
}

function showStatus(text, isError = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function setConnected(connected) {
  document.querySelector("main").hidden = !connected;
  document.getElementById("key-form").hidden = connected;
  document.getElementById("session").hidden = !connected;
}

async function poll() {
  clearTimeout(pollTimer);
  try {
    const failures = await refresh();
    setConnected(true);
    const time = new Date().toISOString().slice(11, 19);
    const note = failures ? `; ${failures} part(s) could not be loaded, see below` : "";
    showStatus(`Updated ${time} UTC, refreshed every ${POLL_MS / 1000} s${note}.`, failures > 0);
  } catch (error) {
    if (refusedKey(error)) {
      sessionStorage.removeItem(KEY_STORAGE);
      setConnected(false);
      showStatus(`The API refused this key (${error.status}): ${error.message}. Enter another.`, true);
      return; // no retry with a key that cannot work
    }
    showStatus(`No answer this time: ${problemText(error)}. Retrying in ${POLL_MS / 1000} s.`, true);
  }
  pollTimer = setTimeout(poll, POLL_MS);
}

function start() {
  const input = document.getElementById("key-input");
  document.getElementById("key-form").addEventListener("submit", (event) => {
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
    showStatus("Key forgotten. Enter an API key to load the ledger.");
  });
  document.getElementById("certificate-close").addEventListener("click", () => {
    document.getElementById("certificate-dialog").close();
  });
  if (sessionStorage.getItem(KEY_STORAGE)) {
    showStatus("Loading…");
    poll();
  }
}

document.addEventListener("DOMContentLoaded", start);
