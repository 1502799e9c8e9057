// The bitplan dashboard: one more client of the service's /v1 API (no private backend, no network beyond it).
// Jobs are followed live over their SSE event streams (read with fetch, so the API key goes in a header).

const KEY = "bitplan.apiKey";
const ACTIVE = new Set(["queued", "running", "cancelling"]);
const $ = (selector) => document.querySelector(selector);
const jobs = new Map();      // id -> job (as GET /v1/jobs/{id} returns it)
const streams = new Map();   // id -> AbortController of its event stream
let selectedJob = null;
let selectedArtifact = null;
let frontierData = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(path, { method = "GET", json, raw = false, signal } = {}) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body, signal });
  if (!response.ok) {
    let problem;
    try { problem = await response.json(); } catch { problem = { detail: response.statusText }; }
    throw new ApiError(response.status, problem);
  }
  return raw ? response : response.json();
}

// Every item of a list, following next_cursor while has_more (every list of the API pages the same way).
async function allPages(path) {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(cursor === null ? path : `${path}${sep}cursor=${encodeURIComponent(cursor)}`);
    items.push(...page.items);
    cursor = page.has_more ? page.next_cursor : null;
  } while (cursor !== null);
  return items;
}

const fmt = {
  num: (v, digits = 4) => (v === null || v === undefined ? "–" : Number(v).toPrecision(digits)),
  bytes: (v) => (v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US")),
  pct: (v) => `${Math.round(100 * v)}%`,
  eta: (s) => (s === null || s === undefined ? "" : s < 60 ? `${Math.round(s)} s` : `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, "0")}s`),
};

// ---------------------------------------------------------------- API key

function showKeyState() {
  $("#key-state").textContent = sessionStorage.getItem(KEY) ? "key set for this browser session" : "";
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("#api-key").value.trim();
  if (value) sessionStorage.setItem(KEY, value); else sessionStorage.removeItem(KEY);
  $("#api-key").value = "";
  showKeyState();
  loadAll();
});

// ---------------------------------------------------------------- the sweep form

function budgetsFrom(text) {
  const range = text.match(/^\s*([\d.]+)\s*:\s*([\d.]+)\s*:\s*([\d.]+)\s*$/);
  if (range) {
    const [start, stop, step] = range.slice(1).map(Number);
    if (!(step > 0) || stop < start) throw new Error("a range is start:stop:step with step > 0 and stop >= start");
    const values = [];
    for (let v = start; v <= stop + 1e-9; v += step) values.push(Number(v.toFixed(6)));
    return values;
  }
  const values = text.split(/[\s,]+/).filter(Boolean).map(Number);
  if (!values.length || values.some((v) => !Number.isFinite(v))) throw new Error("give numbers separated by commas");
  return values;
}

function clearErrors() {
  for (const field of document.querySelectorAll(".field")) {
    field.classList.remove("invalid");
    field.querySelector(".error").textContent = "";
  }
  $("#form-error").textContent = "";
}

function showProblem(error) {
  const param = error.problem && error.problem.param;
  const field = param && document.querySelector(`.field[data-param="${CSS.escape(param)}"]`);
  if (field) {
    field.classList.add("invalid");
    field.querySelector(".error").textContent = error.message;
    const input = field.querySelector("input, select");
    if (input) input.focus();
  } else {
    $("#form-error").textContent = error.message;
  }
}

$("#sweep-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const body = { model: $("#f-model").value.trim() };
  try {
    const latencyOnly = $("#f-budgets").value.trim() === "" && ($("#f-latency").value !== "" || $("#f-prefill").value !== "");
    const values = latencyOnly ? [] : budgetsFrom($("#f-budgets").value);
    if (latencyOnly) {
      // a latency budget alone: the size is free
    } else if ($("#f-budget-unit").value === "bytes") {
      if (values.length !== 1) throw new Error("a bytes budget is one number");
      body.bytes = values[0];
    } else {
      body.bits_per_weight = values;
    }
  } catch (error) {
    showProblem({ message: error.message, problem: { param: "bits_per_weight" } });
    return;
  }
  for (const [id, name] of [["#f-quantizer", "quantizer"], ["#f-target", "target"]]) {
    if ($(id).value) body[name] = $(id).value;
  }
  if ($("#f-tie").checked) body.tie_fused = true;
  if ($("#f-latency").value !== "") body.latency_ms_per_token = Number($("#f-latency").value);
  if ($("#f-prefill").value !== "") body.prefill_ms_per_token = Number($("#f-prefill").value);
  if ($("#f-formats").value.trim()) body.formats = $("#f-formats").value.trim();
  if ($("#f-eval-text").value.trim()) body.eval_text = $("#f-eval-text").value.trim();
  for (const [id, name] of [["#f-samples", "num_samples"], ["#f-seq-len", "seq_len"], ["#f-group-size", "group_size"]]) {
    if ($(id).value !== "") body[name] = Number($(id).value);
  }
  $("#start").disabled = true;
  $("#form-state").textContent = "submitting…";
  try {
    const job = await api("/v1/jobs", { method: "POST", json: body });
    $("#form-state").textContent = `started ${job.id}`;
    upsertJob(job);
    follow(job.id);
  } catch (error) {
    $("#form-state").textContent = "";
    showProblem(error);
  } finally {
    $("#start").disabled = false;
  }
});

async function loadChoices() {
  try {
    const schema = await (await fetch("/openapi.json")).json();
    const fields = schema.components.schemas.JobCreate.properties;
    for (const [id, name] of [["#f-quantizer", "quantizer"], ["#f-target", "target"]]) {
      const choices = fields[name].enum || [];
      $(id).replaceChildren(...choices.map((c) => el("option", { value: c, text: c, selected: c === fields[name].default })));
    }
  } catch { /* the form still works with free text */ }
  try {
    const models = await allPages("/v1/models");
    $("#models").replaceChildren(...models.map((m) => el("option", { value: m.id, text: m.name || m.reference })));
  } catch (error) {
    $("#jobs-error").textContent = error.message;
  }
}

// ---------------------------------------------------------------- jobs, live

function budgetsOf(job) {
  const budget = job.request.budget || {};
  if (budget.bits_per_weight && budget.bits_per_weight.length) return budget.bits_per_weight.join(", ") + " bpw";
  if (budget.bytes) return `${fmt.bytes(budget.bytes)} B`;
  if (budget.latency_ms_per_token) return `${budget.latency_ms_per_token} ms/token`;
  if (budget.prefill_ms_per_token) return `${budget.prefill_ms_per_token} ms/prompt token`;
  return `uniform ${budget.uniform_bits}`;
}

function jobRow(job) {
  const fraction = job.status === "succeeded" ? 1 : job.progress.fraction;
  const active = ACTIVE.has(job.status);
  const row = el("tr", { id: `job-${job.id}`, class: job.id === selectedJob ? "selected" : "" },
    el("td", {}, el("code", { title: job.id, text: job.id.slice(0, 8) })),
    el("td", { text: job.request.model.split("/").pop() }),
    el("td", { text: budgetsOf(job) }),
    el("td", { class: `status status-${job.status}`, text: job.status, title: job.error ? job.error.message : null }),
    el("td", {},
      el("span", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
                   "aria-valuenow": String(Math.round(100 * fraction)), "aria-label": `progress of ${job.id}` },
         el("span", { style: `width:${(100 * fraction).toFixed(1)}%` })),
      el("span", { class: "pct", text: fmt.pct(fraction) }),
      el("span", { class: "stage", text: active ? job.progress.stage || "" : job.error ? job.error.message : "" })),
    el("td", {}, el("span", { class: "eta", text: active ? fmt.eta(job.progress.eta_s) : "" })),
    el("td", {},
      active ? el("button", { type: "button", class: "cancel", text: "Cancel", onclick: () => cancel(job.id) })
             : job.status === "succeeded"
               ? el("button", { type: "button", class: "view", text: "Frontier", onclick: () => selectJob(job.id) })
               : ""));
  return row;
}

function upsertJob(job) {
  jobs.set(job.id, job);
  const body = $("#job-table tbody");
  const existing = document.getElementById(`job-${job.id}`);
  const row = jobRow(job);
  if (existing) {
    // keep the keyboard focus on the same button when the row is redrawn
    const focused = existing.contains(document.activeElement) ? document.activeElement.className : null;
    existing.replaceWith(row);
    if (focused) { const again = row.querySelector(`.${focused.split(" ")[0]}`); if (again) again.focus(); }
  } else {
    body.prepend(row);
  }
}

function updateProgress(id, data) {
  const job = jobs.get(id);
  if (!job) return;
  job.progress = { ...job.progress, stage: data.stage ?? job.progress.stage, fraction: data.fraction ?? job.progress.fraction };
  const row = document.getElementById(`job-${id}`);
  if (!row) return;
  const fraction = job.progress.fraction;
  row.querySelector(".bar > span").style.width = `${(100 * fraction).toFixed(1)}%`;
  row.querySelector(".bar").setAttribute("aria-valuenow", String(Math.round(100 * fraction)));
  row.querySelector(".pct").textContent = fmt.pct(fraction);
  row.querySelector(".stage").textContent = job.progress.stage || "";
}

const refreshing = new Map();
function refreshJob(id, delay = 0) {  // at most one GET per job in flight, coalescing bursts of events
  if (refreshing.has(id)) return;
  refreshing.set(id, setTimeout(async () => {
    try {
      const job = await api(`/v1/jobs/${id}`);
      upsertJob(job);
      if (!ACTIVE.has(job.status) && id === selectedJob) selectJob(id);
    } catch { /* the next event or list refresh tries again */ } finally { refreshing.delete(id); }
  }, delay));
}

function parseEvent(chunk) {
  const event = { kind: "message", data: {} };
  for (const line of chunk.split("\n")) {
    if (line.startsWith("event: ")) event.kind = line.slice(7);
    else if (line.startsWith("data: ")) { try { event.data = JSON.parse(line.slice(6)); } catch { /* keep-alive */ } }
    else if (line.startsWith("id: ")) event.id = line.slice(4);
  }
  return event;
}

async function follow(id) {
  if (streams.has(id)) return;
  const controller = new AbortController();
  streams.set(id, controller);
  try {
    const response = await api(`/v1/jobs/${id}/events/stream`, { raw: true, signal: controller.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event.kind === "progress") { updateProgress(id, event.data); refreshJob(id, 1000); }
        else if (event.kind !== "message") refreshJob(id);
      }
    }
  } catch { /* stream closed; the list refresh picks the job up again */ } finally {
    streams.delete(id);
    refreshJob(id);
  }
}

async function cancel(id) {
  try {
    upsertJob(await api(`/v1/jobs/${id}/cancel`, { method: "POST" }));
  } catch (error) {
    $("#jobs-error").textContent = error.message;
  }
}

async function loadJobs() {
  try {
    const jobs = await allPages("/v1/jobs?limit=200");
    $("#jobs-error").textContent = "";
    for (const job of jobs.reverse()) {
      upsertJob(job);
      if (ACTIVE.has(job.status)) follow(job.id);
    }
  } catch (error) {
    $("#jobs-error").textContent = error.message;
  }
}

// ---------------------------------------------------------------- the frontier chart

function scale(values, size, log) {
  const finite = values.filter((v) => Number.isFinite(v) && (!log || v > 0));
  let low = Math.min(...finite), high = Math.max(...finite);
  if (log) { low = Math.log10(low); high = Math.log10(high); }
  if (!(high > low)) { low -= 1; high += 1; }
  const pad = (high - low) * 0.05;
  low -= pad; high += pad;
  const floor = log ? 10 ** low : low;
  const f = (v) => {
    const x = log ? Math.log10(Math.max(v, floor)) : v;
    return ((x - low) / (high - low)) * size;
  };
  f.ticks = () => {
    const out = [];
    if (log) { for (let e = Math.ceil(low); e <= Math.floor(high); e++) out.push(10 ** e); }
    else { const step = niceStep((high - low) / 6); for (let v = Math.ceil(low / step) * step; v <= high; v += step) out.push(v); }
    return out;
  };
  return f;
}

function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
}

function drawChart() {
  const data = frontierData;
  if (!data) return;
  const xKey = $("#x-axis").value;
  const yMode = $("#y-axis").value;
  const W = 800, H = 450, L = 64, R = 16, T = 16, B = 44;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
                            "aria-label": "predicted loss and measured quality against size" });
  const has = (p) => p[xKey] !== null && p[xKey] !== undefined;  // untimed points have no time to sit at
  const xs = [...data.points, ...data.uniform, ...data.measured].filter(has).map((p) => p[xKey]);
  const ys = yMode === "kl"
    ? [...data.points, ...data.uniform].map((p) => p.predicted_loss).concat(data.measured.flatMap((p) => [p.predicted_loss, p.kl_mean]))
    : data.measured.flatMap((p) => [p.ppl, p.ppl_source]);
  const valid = ys.filter((v) => v !== null && v !== undefined);
  if (!valid.length) {
    $("#chart").replaceChildren(el("p", { class: "muted", text: "nothing measured for this axis yet" }));
    return;
  }
  const x = scale(xs, W - L - R, false);
  const yRaw = scale(valid, H - T - B, yMode === "kl");
  const px = (v) => L + x(v);
  const py = (v) => H - B - yRaw(v);
  for (const t of x.ticks()) {
    root.append(svg("line", { class: "grid", x1: px(t), x2: px(t), y1: T, y2: H - B }));
    root.append(svg("text", { x: px(t), y: H - B + 16, "text-anchor": "middle" },
                    xKey === "bytes" ? `${(t / 1e6).toPrecision(3)} MB` : t.toPrecision(3)));
  }
  for (const t of yRaw.ticks()) {
    root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: py(t), y2: py(t) }));
    root.append(svg("text", { x: L - 6, y: py(t) + 4, "text-anchor": "end" }, Number(t).toPrecision(2)));
  }
  root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  root.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  root.append(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" },
                  X_LABELS[xKey]));
  root.append(svg("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(T + H - B) / 2})` },
                  yMode === "kl" ? "nats per token (log scale)" : "perplexity"));
  const hover = (text) => () => { $("#hover-info").textContent = text; };
  if (yMode === "kl") {
    const path = data.points.filter(has).map((p, i) => `${i ? "L" : "M"}${px(p[xKey]).toFixed(1)},${py(p.predicted_loss).toFixed(1)}`).join("");
    root.append(svg("path", { class: "front", d: path }));
    const step = Math.max(1, Math.floor(data.points.length / 200));  // dots for hovering, thinned on big frontiers
    data.points.forEach((p, i) => {
      if (i % step || !has(p)) return;
      const dot = svg("circle", { class: "pt", cx: px(p[xKey]), cy: py(p.predicted_loss), r: 2.5 });
      const time = p.latency_ms ? `, ${fmt.num(p.latency_ms)} ms/token` : p.prefill_ms ? `, ${fmt.num(p.prefill_ms)} ms/prompt token` : "";
      const text = `predicted: ${fmt.num(p.bits_per_weight)} bits/weight, ${fmt.bytes(p.bytes)} bytes${time}, loss +${fmt.num(p.predicted_loss)}`;
      dot.append(svg("title", {}, text));
      dot.addEventListener("mouseenter", hover(text));
      root.append(dot);
    });
    for (const u of data.uniform.filter(has)) {
      const cx = px(u[xKey]), cy = py(u.predicted_loss);
      const box = svg("rect", { class: "uni", x: cx - 5, y: cy - 5, width: 10, height: 10 });
      const text = `${u.label}${u.formats ? ` (${u.formats.join(", ")})` : ""}: ${fmt.num(u.bits_per_weight)} bits/weight, predicted loss +${fmt.num(u.predicted_loss)}`;
      box.append(svg("title", {}, text));
      box.addEventListener("mouseenter", hover(text));
      root.append(box, svg("text", { x: cx + 7, y: cy - 7 }, u.label.replace("uniform ", "")));
    }
  } else if (data.measured.length && data.measured[0].ppl_source) {
    const y0 = py(data.measured[0].ppl_source);
    root.append(svg("line", { class: "srcline", x1: L, x2: W - R, y1: y0, y2: y0 }));
    root.append(svg("text", { x: W - R - 4, y: y0 - 4, "text-anchor": "end" }, "source model"));
  }
  for (const m of data.measured.filter(has)) {
    const cx = px(m[xKey]);
    const value = yMode === "kl" ? m.kl_mean : m.ppl;
    const text = `${m.artifact}: ${fmt.num(m.bits_per_weight)} bits/weight, ${fmt.bytes(m.bytes)} bytes; predicted +${fmt.num(m.predicted_loss)}; measured KL ${fmt.num(m.kl_mean)} (p99 ${fmt.num(m.kl_p99)}), ppl ${fmt.num(m.ppl)} vs source ${fmt.num(m.ppl_source)}`;
    const select = () => selectPoint(m.artifact);
    if (yMode === "kl" && m.predicted_loss !== null) {
      if (value !== null) root.append(svg("line", { class: "link", x1: cx, x2: cx, y1: py(m.predicted_loss), y2: py(value) }));
      const ring = svg("circle", { class: "pred", cx, cy: py(m.predicted_loss), r: 6 });
      ring.append(svg("title", {}, text));
      ring.addEventListener("mouseenter", hover(text));
      ring.addEventListener("click", select);
      root.append(ring);
    }
    if (value !== null && value !== undefined) {
      const dot = svg("circle", { class: `meas${m.artifact === selectedArtifact ? " sel" : ""}`, cx, cy: py(value), r: 6,
                                  tabindex: "0", role: "button", "aria-label": `select ${m.artifact}`, "data-artifact": m.artifact });
      dot.append(svg("title", {}, text));
      dot.addEventListener("mouseenter", hover(text));
      dot.addEventListener("focus", hover(text));
      dot.addEventListener("click", select);
      dot.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); select(); } });
      root.append(dot);
    }
  }
  $("#chart").replaceChildren(root);
}

function drawPointTable() {
  const rows = frontierData.measured.map((m) => el("tr", { class: m.artifact === selectedArtifact ? "selected" : "" },
    el("td", {}, el("code", { text: m.artifact })),
    el("td", { class: "num", text: fmt.num(m.bits_per_weight) }),
    el("td", { class: "num", text: fmt.bytes(m.bytes) }),
    el("td", { class: "num", text: fmt.num(m.predicted_loss) }),
    el("td", { class: "num", text: fmt.num(m.kl_mean) }),
    el("td", { class: "num", text: fmt.num(m.kl_p99) }),
    el("td", { class: "num", text: fmt.num(m.ppl) }),
    el("td", { class: "num", text: fmt.num(m.ppl_source) }),
    el("td", {}, el("button", { type: "button", class: "open-point", text: "Open", onclick: () => selectPoint(m.artifact) }))));
  $("#point-table tbody").replaceChildren(...rows);
}

async function selectJob(id) {
  selectedJob = id;
  for (const row of document.querySelectorAll("#job-table tbody tr")) row.classList.toggle("selected", row.id === `job-${id}`);
  $("#frontier").hidden = false;
  $("#frontier-title").textContent = `Frontier of ${id}`;
  $("#frontier-error").textContent = "";
  try {
    frontierData = await api(`/v1/jobs/${id}/frontier?axis=${axisOf($("#x-axis").value)}`);
  } catch (error) {
    frontierData = null;
    $("#chart").replaceChildren();
    $("#point-table tbody").replaceChildren();
    $("#frontier-error").textContent = error.message;
    return;
  }
  drawChart();
  drawPointTable();
}

const X_LABELS = { bits_per_weight: "bits per weight", bytes: "bytes of the quantized layers",
                   latency_ms: "predicted decode ms per token", prefill_ms: "predicted prefill ms per prompt token" };

function axisOf(xKey) {
  // the frontier along time is its own computation (the hull of time against loss): fetched per axis
  return { latency_ms: "latency", prefill_ms: "prefill" }[xKey] || "bytes";
}

$("#x-axis").addEventListener("change", () => {
  if (!selectedJob) return;
  if (frontierData && (frontierData.axis || "bytes") === axisOf($("#x-axis").value)) drawChart();
  else selectJob(selectedJob);
});
$("#y-axis").addEventListener("change", drawChart);
$("#frontier-csv").addEventListener("click", async (event) => {
  event.preventDefault();
  if (!selectedJob) return;
  const response = await api(`/v1/jobs/${selectedJob}/frontier?format=csv`, { raw: true });
  save(await response.blob(), `${selectedJob}-frontier.csv`);
});

// ---------------------------------------------------------------- one point: heatmap, certificate, files

const KIND_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                    "query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"];
const TIES = { q_proj: "qkv", k_proj: "qkv", v_proj: "qkv", query: "qkv", key: "qkv", value: "qkv",
               gate_proj: "gate_up", up_proj: "gate_up" };

function splitName(name) {
  const match = name.match(/^(.*?)\.(\d+)\.(.+)$/);
  if (!match) return { block: "–", kind: name };
  const kind = match[3].split(".").slice(-1)[0] in TIES ? match[3].split(".").slice(-1)[0] : match[3].replace(/^(self_attn|mlp|attention\.self)\./, "");
  return { block: Number(match[2]), kind };
}

function bitsColour(bits) {  // 2 bits red ... 8 bits green
  const t = Math.max(0, Math.min(1, (bits - 2) / 6));
  return `hsl(${Math.round(8 + t * 122)}, 70%, ${Math.round(78 - t * 18)}%)`;
}

function drawHeatmap(manifest) {
  const tied = manifest.tie_fused;
  const cells = new Map();
  const kinds = new Set();
  const blocks = new Set();
  for (const unit of manifest.units) {
    const { block, kind } = splitName(unit.name);
    kinds.add(kind); blocks.add(block);
    cells.set(`${block}|${kind}`, unit);
  }
  const order = [...kinds].sort((a, b) => {
    const ia = KIND_ORDER.indexOf(a), ib = KIND_ORDER.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
  });
  const tieClass = (kind) => (tied && TIES[kind] ? `tie-${TIES[kind]}` : "");
  const head = el("tr", {}, el("th", { scope: "col", text: "block" }),
                  ...order.map((k) => el("th", { scope: "col", class: tieClass(k), text: k.replace("_proj", "") })));
  const rows = [...blocks].sort((a, b) => a - b).map((block) => el("tr", {}, el("th", { scope: "row", text: String(block) }),
    ...order.map((kind) => {
      const unit = cells.get(`${block}|${kind}`);
      if (!unit) return el("td", { text: "" });
      const label = unit.format && !unit.format.startsWith("int") ? unit.format : String(unit.bits);
      return el("td", { class: tieClass(kind), style: `background:${bitsColour(unit.bits)}`,
                        title: `${unit.name}: ${unit.format || `${unit.bits} bits`}, ${fmt.bytes(unit.bytes)} bytes`, text: label });
    })));
  $("#heatmap").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
  $("#tie-legend").textContent = tied
    ? "Underlined columns are tied (q/k/v share one width, gate/up another): runtimes fuse them."
    : "No ties: every layer chose on its own.";
}

function latencyText(latency) {
  if (!latency) return "–";
  const measured = latency.measured_ms_per_token ? `, measured ${fmt.num(latency.measured_ms_per_token)}` : "";
  return `budget ${fmt.num(latency.budget_ms_per_token)} ms/token: predicted ${fmt.num(latency.predicted_ms_per_token)}${measured}`;
}

function drawCertificate(job, index, manifest) {
  const allocation = job.allocation[index] || {};
  const budget = (job.request.budget.bits_per_weight || [])[index];
  const gap = allocation.objective && allocation.lower_bound !== null && allocation.lower_bound !== undefined
    ? Math.max(0, (allocation.objective - allocation.lower_bound) / Math.abs(allocation.objective)) : null;
  const facts = [
    ["budget", budget !== undefined ? `${budget} bits per weight`
      : job.request.budget.bytes ? `${fmt.bytes(job.request.budget.bytes)} bytes` : "latency only"],
    ["achieved", `${fmt.num(allocation.bits_per_weight)} bits per weight, ${fmt.bytes(allocation.bytes)} bytes`],
    ["solver", `${(manifest.solver || {}).name || "–"}: ${allocation.status}`],
    ["predicted loss", fmt.num(allocation.objective)],
    ["lower bound", fmt.num(allocation.lower_bound)],
    ["gap", gap === null ? "–" : gap < 1e-6 ? "0% (proven optimal)" : `${(100 * gap).toPrecision(2)}%`],
    ["decode latency", latencyText(allocation.latency)],
    ["measured KL", allocation.quality ? `${fmt.num(allocation.quality.kl_mean)} nats (${allocation.quality.text})` : fmt.num(allocation.kl_divergence)],
  ];
  $("#certificate").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
}

function save(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

async function download(artifact, file) {
  $("#download-state").textContent = `downloading ${file.name}…`;
  try {
    const response = await api(`/v1/artifacts/${artifact}/files/${encodeURIComponent(file.name)}`, { raw: true });
    const blob = await response.blob();
    const digest = [...new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()))]
      .map((b) => b.toString(16).padStart(2, "0")).join("");
    $("#download-state").textContent = digest === file.sha256
      ? `${file.name}: sha256 checked (${digest.slice(0, 12)}…)` : `${file.name}: sha256 MISMATCH`;
    save(blob, file.name);
  } catch (error) {
    $("#download-state").textContent = error.message;
  }
}

async function selectPoint(artifact) {
  selectedArtifact = artifact;
  drawChart();
  drawPointTable();
  const job = jobs.get(selectedJob);
  const index = Number(artifact.split("-").pop());
  const info = await api(`/v1/artifacts/${artifact}`);
  $("#point").hidden = false;
  $("#point-title").textContent = `Allocation of ${artifact}`;
  drawCertificate(job, index, info.manifest);
  drawHeatmap(info.manifest);
  $("#files tbody").replaceChildren(...info.files.map((file) => el("tr", {},
    el("td", { text: file.name }), el("td", { class: "num", text: fmt.bytes(file.bytes) }),
    el("td", {}, el("code", { title: file.sha256, text: `${file.sha256.slice(0, 16)}…` })),
    el("td", {}, el("button", { type: "button", class: "download", "data-file": file.name, text: "Download",
                                onclick: () => download(artifact, file) })))));
}

// ---------------------------------------------------------------- start

function loadAll() {
  loadChoices();
  loadJobs();
}

showKeyState();
loadAll();
setInterval(loadJobs, 5000);  // jobs started elsewhere (CLI, another tab) appear too
