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

function drawLoss(points) {
  const svg = document.getElementById("losschart");
  if (!svg) return;
  const count = document.getElementById("losscount");
  svg.replaceChildren();
  if (points.length < 2) {
    if (count) count.textContent = points.length ? "1 point" : "no loss reported yet";
    return;
  }
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => (x1 === x0 ? 0 : ((x - x0) / (x1 - x0)) * 590 + 5);
  const sy = (y) => (y1 === y0 ? 100 : 195 - ((y - y0) / (y1 - y0)) * 190);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" "));
  line.setAttribute("class", "lossline");
  svg.appendChild(line);
  if (count) count.textContent = points.length + " points, steps " + x0 + "–" + x1 + ", loss " + y1.toFixed(4) + " → " + ys[ys.length - 1].toFixed(4);
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
  else if (page === "job") {
    const job = jobPage();
    connect((payload) => job.update(payload));
  }
});
