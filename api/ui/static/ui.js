// prefq dashboard: live job page (events over SSE, uPlot curves, progress and time left) and the compare page.
// No build step: plain ES2020, loaded after the vendored htmx and uPlot.
"use strict";

const CHARTS = [
  { id: "loss", title: "Loss", keys: ["loss"] },
  { id: "accuracy", title: "Reward accuracy", keys: ["rewards/accuracies"] },
  { id: "margins", title: "Reward margin", keys: ["rewards/margins"] },
  { id: "rewards", title: "Chosen and rejected rewards", keys: ["rewards/chosen", "rewards/rejected"] },
  { id: "beta", title: "Beta", keys: ["beta"] },
  { id: "lr", title: "Learning rate", keys: ["learning_rate"], noEval: true },
  { id: "token-accuracy", title: "Token accuracy", keys: ["mean_token_accuracy"] },
  // GRPO: the grader's scores, the prompts that teach nothing (all answers scored alike), drift and answer length
  { id: "grader-reward", title: "Grader reward (mean and spread)", keys: ["reward", "reward_std"] },
  { id: "no-signal", title: "Prompts whose answers all scored the same", keys: ["frac_reward_zero_std"] },
  { id: "kl", title: "KL to the starting model", keys: ["kl"] },
  { id: "answer-length", title: "Answer length (tokens)", keys: ["completions/mean_length"] },
  { id: "grader-errors", title: "Answers whose grading failed", keys: ["graders/errors"] },
];
const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777", "#65a30d"];
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const PANEL_EVENTS = new Set(["claimed", "started", "eval", "checkpoint", "done", "succeeded", "failed", "cancelled",
  "cancel_requested", "retried", "requeued", "error", "stopped", "grader_error"]);

// One chart: series are [label, colour, isEval, {step: value}]; x is the union of their steps.
class Chart {
  constructor(box, title) {
    this.box = box;
    this.title = title;
    this.series = [];
    this.plot = null;
    this.pending = false;
  }
  line(label, colour, isEval) {
    let s = this.series.find((x) => x.label === label);
    if (!s) {
      s = { label, colour, isEval, points: new Map() };
      this.series.push(s);
      if (this.plot) { this.plot.destroy(); this.plot = null; }
    }
    return s;
  }
  add(label, colour, isEval, step, value) {
    if (typeof value !== "number" || !Number.isFinite(value) || typeof step !== "number") return;
    this.line(label, colour, isEval).points.set(step, value);
    this.schedule();
  }
  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }
  data() {
    const xs = [...new Set(this.series.flatMap((s) => [...s.points.keys()]))].sort((a, b) => a - b);
    return [xs, ...this.series.map((s) => xs.map((x) => (s.points.has(x) ? s.points.get(x) : null)))];
  }
  draw() {
    const data = this.data();
    this.box.hidden = false;
    this.box.dataset.points = String(this.series.reduce((n, s) => n + s.points.size, 0));
    const width = Math.max(240, this.box.clientWidth - 8);
    if (!this.plot) {
      const series = [{ label: "step" }, ...this.series.map((s) => ({
        label: s.label, stroke: s.colour, width: s.isEval ? 0 : 2, spanGaps: true,
        paths: s.isEval ? () => null : undefined,
        points: s.isEval ? { show: true, size: 8, fill: s.colour } : { show: false },
      }))];
      this.box.querySelector(".plot").textContent = "";
      this.plot = new uPlot({ title: this.title, width, height: 220, series, scales: { x: { time: false } },
        axes: [{ label: "step" }, {}] }, data, this.box.querySelector(".plot"));
    } else {
      this.plot.setData(data);
    }
  }
  resize() {
    if (this.plot) this.plot.setSize({ width: Math.max(240, this.box.clientWidth - 8), height: 220 });
  }
}

function makeCharts(root) {
  const charts = {};
  for (const def of CHARTS) {
    const box = document.createElement("figure");
    box.className = "chart";
    box.id = `chart-${def.id}`;
    box.hidden = true;
    box.dataset.points = "0";
    box.setAttribute("aria-label", def.title);
    box.innerHTML = '<div class="plot"></div>';
    root.appendChild(box);
    charts[def.id] = new Chart(box, def.title);
  }
  let timer = null;
  window.addEventListener("resize", () => {
    clearTimeout(timer);
    timer = setTimeout(() => Object.values(charts).forEach((c) => c.resize()), 150);
  });
  return charts;
}

function plotPoint(charts, prefix, colour, isEval, step, values) {
  for (const def of CHARTS) {
    if (isEval && def.noEval) continue;
    def.keys.forEach((key, i) => {
      const c = def.keys.length > 1 ? COLOURS[(COLOURS.indexOf(colour) + i) % COLOURS.length] : colour;
      const label = `${prefix}${key}${isEval ? " (eval)" : ""}`;
      if (key in values) charts[def.id].add(label, c, isEval, step, values[key]);
    });
  }
}

function trainValues(data) {
  return { loss: data.loss, learning_rate: data.learning_rate, ...(data.metrics || {}) };
}

function evalValues(data) {
  const out = {};
  for (const [k, v] of Object.entries(data.metrics || {})) out[k.replace(/^eval_/, "")] = v;
  return out;
}

function fmtSeconds(s) {
  if (!Number.isFinite(s) || s < 0) return "";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function startJobPage(root) {
  const charts = makeCharts(document.getElementById("charts"));
  const log = document.getElementById("events");
  const rates = [];  // [time, step] of the current attempt's progress events
  let attempt = null;
  let refresh = null;

  const panel = () => {  // re-read status, buttons, checkpoints and eval table, at most every 300 ms
    clearTimeout(refresh);
    refresh = setTimeout(() => htmx.ajax("GET", root.dataset.panel, { target: "#panel", swap: "outerHTML" }), 300);
  };

  let samplesTimer = null;
  const samples = () => {  // re-read the samples section when an evaluation brought new ones
    clearTimeout(samplesTimer);
    const box = document.getElementById("samples-box");
    samplesTimer = setTimeout(() => htmx.ajax("GET", box.dataset.samples, { target: "#samples-box", swap: "innerHTML" }), 500);
  };

  const progress = (data, at) => {
    const bar = document.getElementById("progress");
    if (!bar || !data.total_steps) return;
    bar.max = data.total_steps;
    bar.value = data.step;
    document.getElementById("progress-text").textContent = `${data.step}/${data.total_steps} steps`;
    rates.push([at, data.step]);
    if (rates.length > 20) rates.shift();
    const [t0, s0] = rates[0];
    const eta = document.getElementById("eta");
    if (rates.length > 1 && data.step > s0 && at > t0) {
      const left = (data.total_steps - data.step) / ((data.step - s0) / (at - t0));
      eta.textContent = data.step >= data.total_steps ? "" : `about ${fmtSeconds(left)} left`;
    }
  };

  const addRow = (e) => {
    const tr = document.createElement("tr");
    const when = new Date(e.created_at * 1000).toISOString().slice(11, 19);
    for (const text of [e.seq, e.attempt, when, e.type, JSON.stringify(e.data)]) {
      const td = document.createElement("td");
      td.textContent = String(text);
      tr.appendChild(td);
    }
    tr.className = `ev-${e.type}`;
    log.prepend(tr);
  };

  const source = new EventSource(root.dataset.stream);
  source.onmessage = (msg) => {
    const e = JSON.parse(msg.data);
    addRow(e);
    if (e.attempt !== attempt) { attempt = e.attempt; rates.length = 0; }
    if (e.type === "progress") {
      plotPoint(charts, "", COLOURS[0], false, e.data.step, trainValues(e.data));
      progress(e.data, e.created_at);
    } else if (e.type === "eval") {
      plotPoint(charts, "", COLOURS[1], true, e.data.step, evalValues(e.data));
    }
    if (PANEL_EVENTS.has(e.type)) panel();
    if (e.type === "samples") samples();
    const box = document.getElementById("evaluation-box");
    if (box && FINAL.has(e.type)) {  // the results are stored once the run has ended
      htmx.ajax("GET", box.dataset.evaluation, { target: "#evaluation-box", swap: "innerHTML" });
    }
    const current = Number(document.getElementById("panel")?.dataset.attempt || 0);
    if (FINAL.has(e.type) && e.attempt >= current) {  // not an earlier attempt's end, replayed
      source.close();
      document.getElementById("eta").textContent = "";
    }
  };
  source.onerror = () => {
    const status = document.getElementById("panel")?.dataset.status;
    if (FINAL.has(status)) source.close();  // the stream ends with the job; otherwise EventSource reconnects
  };
}

function startComparePage(data) {
  const charts = makeCharts(document.getElementById("charts"));
  Object.entries(data).forEach(([jobId, curves], i) => {
    const colour = COLOURS[(i * 2) % COLOURS.length];
    const prefix = `${jobId.slice(-6)} `;
    for (const [key, points] of Object.entries(curves.train)) {
      for (const [step, v] of points) plotPoint(charts, prefix, colour, false, step, { [key]: v });
    }
    for (const [key, points] of Object.entries(curves.eval)) {
      for (const [step, v] of points) plotPoint(charts, prefix, colour, true, step, { [key]: v });
    }
  });
}

// A refused htmx request (an upload over the server's size limit, a lost session) says why where it was aimed.
document.addEventListener("htmx:responseError", (ev) => {
  const target = ev.detail.target;
  let message = `the server answered ${ev.detail.xhr.status}`;
  try { message = JSON.parse(ev.detail.xhr.responseText).error.message; } catch (_) { /* not the API's error shape */ }
  if (target) {
    const p = document.createElement("p");
    p.className = "error";
    p.setAttribute("role", "alert");
    p.textContent = message;
    target.replaceChildren(p);
  }
});

document.addEventListener("DOMContentLoaded", () => {
  const job = document.getElementById("job");
  if (job) startJobPage(job);
  const compare = document.getElementById("compare-data");
  if (compare) startComparePage(JSON.parse(compare.textContent));
});
