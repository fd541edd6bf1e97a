// lorad dashboard: live updates over server-sent events (/events). No framework, no build step.
"use strict";

const ACTIVE = ["preparing", "training", "rendering", "publishing"];

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function queueRow(r) {
  const tr = el("tr");
  tr.dataset.id = r.id;
  tr.className = "state-" + r.state.split(" ")[0];
  const id = el("td", "id");
  const link = el("a", null, r.id);
  link.href = "/jobs/" + encodeURIComponent(r.id);
  id.appendChild(link);
  tr.appendChild(id);
  tr.appendChild(el("td", "dataset", r.dataset));
  const state = el("td", "state", r.state);
  if (r.error) state.appendChild(el("div", "err", r.error));
  tr.appendChild(state);
  const progress = el("td", "progress");
  const bar = el("progress");
  bar.max = 100;
  bar.value = r.pct;
  progress.appendChild(bar);
  progress.appendChild(document.createTextNode(" "));
  progress.appendChild(el("span", "steps", r.total ? r.step + "/" + r.total : ""));
  tr.appendChild(progress);
  tr.appendChild(el("td", "loss", r.loss === null ? "" : String(r.loss)));
  tr.appendChild(el("td", "eta", r.eta));
  tr.appendChild(el("td", "engine", r.engine));
  const worker = el("td", "worker", r.worker);
  if (r.waiting) worker.appendChild(el("div", "waiting", r.waiting));
  tr.appendChild(worker);
  return tr;
}

function updateQueue(payload) {
  const body = document.querySelector("#queue tbody");
  if (!body) return;
  if (payload.full) {
    body.replaceChildren(...payload.rows.map(queueRow));
    if (!payload.rows.length) {
      const tr = el("tr", "empty");
      const td = el("td", null, "no jobs yet: drop READY into a dataset folder");
      td.colSpan = 8;
      tr.appendChild(td);
      body.appendChild(tr);
    }
    return;
  }
  for (const r of payload.rows) {
    const old = body.querySelector('tr[data-id="' + CSS.escape(r.id) + '"]');
    const fresh = queueRow(r);
    if (old) old.replaceWith(fresh);
    else body.prepend(fresh);
  }
}

const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// The same smoothing as daemon/metrics.py smooth_curve: at most `slices` means of equal,
// consecutive slices (a moving average that also thins a long run).
function smooth(points, slices) {
  const n = Math.min(slices, points.length);
  const out = [];
  for (let i = 0; i < n; i++) {
    const chunk = points.slice(Math.floor((i * points.length) / n), Math.floor(((i + 1) * points.length) / n));
    out.push([chunk.reduce((a, p) => a + p[0], 0) / chunk.length, chunk.reduce((a, p) => a + p[1], 0) / chunk.length]);
  }
  return out;
}

function fmt(v) {
  return Math.abs(v) >= 100 ? v.toFixed(0) : Number(v.toPrecision(3)).toString();
}

function drawLoss(points) {
  const svg = document.getElementById("losschart");
  if (!svg) return;
  const count = document.getElementById("losscount");
  svg.replaceChildren();
  if (points.length < 2) {
    if (count) count.textContent = points.length ? "1 point" : "no loss reported yet";
    return;
  }
  const W = 640, H = 240, L = 56, R = 10, T = 10, B = 34;
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => (x1 === x0 ? L : L + ((x - x0) / (x1 - x0)) * (W - L - R));
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.appendChild(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "lossaxis" }));
  svg.appendChild(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, class: "lossaxis" }));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    svg.appendChild(svgEl("line", { x1: L - 4, y1: sy(y), x2: L, y2: sy(y), class: "lossaxis" }));
    svg.appendChild(svgEl("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end", class: "losstick ytick" }, fmt(y)));
    const x = x0 + ((x1 - x0) * i) / 4;
    svg.appendChild(svgEl("line", { x1: sx(x), y1: H - B, x2: sx(x), y2: H - B + 4, class: "lossaxis" }));
    svg.appendChild(svgEl("text", { x: sx(x), y: H - B + 16, "text-anchor": "middle", class: "losstick xtick" }, String(Math.round(x))));
  }
  svg.appendChild(svgEl("text", { x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle", class: "losstick" }, "step"));
  svg.appendChild(svgEl("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle", class: "losstick", transform: "rotate(-90 12 " + (T + H - B) / 2 + ")" }, "loss"));
  for (const p of points) {
    svg.appendChild(svgEl("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 1.8, class: "lossraw" }));
  }
  const smoothed = smooth(points, 30);  // CURVE_POINTS in daemon/metrics.py
  svg.appendChild(svgEl("polyline", {
    points: smoothed.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" "),
    class: "losssmooth",
  }));
  const first = smoothed[0][1], last = smoothed[smoothed.length - 1][1];
  if (count) count.textContent = points.length + " points, steps " + x0 + "–" + x1 + ", loss " + fmt(first) + " → " + fmt(last) + " (smoothed)";
}

function sampleCell(url, step, prompt) {
  const td = el("td");
  if (!url) return td;
  const a = el("a");
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener";
  const img = el("img", "sample");
  img.src = url;
  img.alt = "step " + step + ", " + prompt;
  a.appendChild(img);
  td.appendChild(a);
  return td;
}

function drawSamples(grid) {
  const box = document.getElementById("samples");
  if (!box || !grid.rows.length) return;
  const table = el("table", "samples");
  table.id = "samplegrid";
  const head = el("tr");
  head.appendChild(el("th", null, "step"));
  for (const p of grid.prompts) head.appendChild(el("th", null, p));
  const thead = el("thead");
  thead.appendChild(head);
  const body = el("tbody");
  for (const r of grid.rows) {
    const tr = el("tr");
    tr.dataset.step = r.step;
    tr.appendChild(el("th", null, String(r.step)));
    r.images.forEach((url, i) => tr.appendChild(sampleCell(url, r.step, grid.prompts[i])));
    body.appendChild(tr);
  }
  table.append(thead, body);
  box.replaceChildren(table);
}

let samplesFetched = 0;

function refreshSamples() {
  const box = document.getElementById("samples");
  if (!box || Date.now() - samplesFetched < 2000) return;
  samplesFetched = Date.now();
  fetch(box.dataset.url, { cache: "no-store" })
    .then((r) => r.json())
    .then((grid) => {
      const shown = box.querySelectorAll("img.sample").length;
      const now = grid.rows.reduce((a, r) => a + r.images.filter(Boolean).length, 0);
      if (now !== shown) drawSamples(grid);
    })
    .catch(() => {});
}

function jobPage() {
  const section = document.getElementById("job");
  const seriesNode = document.getElementById("series");
  const points = seriesNode ? JSON.parse(seriesNode.textContent) : [];
  drawLoss(points);
  return {
    id: section.dataset.id,
    points: points,
    update(payload) {
      const r = payload.rows.find((row) => row.id === this.id);
      if (!r) return;
      const state = document.getElementById("state");
      const before = state.textContent;
      state.textContent = r.state;
      state.className = "state-" + r.state.split(" ")[0];
      document.getElementById("bar").value = r.pct;
      document.getElementById("steps").textContent = r.total ? r.step + "/" + r.total : "";
      document.getElementById("eta").textContent = r.eta ? "ETA " + r.eta : "";
      document.getElementById("loss").textContent = r.loss === null ? "" : String(r.loss);
      if (ACTIVE.includes(r.state.split(" ")[0]) || before !== r.state) refreshSamples();
      const last = this.points[this.points.length - 1];
      if (r.loss !== null && r.step && (!last || last[0] < r.step)) {
        this.points.push([r.step, r.loss]);
        drawLoss(this.points);
      }
      // The renders exist once rendering is over: show them without a reload.
      const compare = document.getElementById("compare");
      if (compare && compare.hidden && (r.state === "publishing" || r.state === "done") && before !== r.state) {
        compare.src = document.querySelector(".renders").dataset.compare + "?t=" + Date.now();
        compare.hidden = false;
        const none = document.getElementById("norender");
        if (none) none.remove();
      }
    },
  };
}

function connect(onJobs) {
  const live = document.getElementById("live");
  const source = new EventSource("/events");
  source.addEventListener("open", () => { live.textContent = "● live"; live.classList.add("on"); });
  source.addEventListener("error", () => {
    live.textContent = "○ reconnecting"; live.classList.remove("on");
    // A 503 (too many live-update streams open) closes an EventSource for good: try again later.
    if (source.readyState === EventSource.CLOSED) setTimeout(() => connect(onJobs), 10000);
  });
  source.addEventListener("jobs", (event) => onJobs(JSON.parse(event.data)));
  window.addEventListener("pagehide", () => source.close(), { once: true });
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "queue") connect(updateQueue);
  else if (page === "loras") connect(() => {});  // the live marker: the daemon's real state
  else if (page === "job") {
    const job = jobPage();
    connect((payload) => job.update(payload));
  }
});
