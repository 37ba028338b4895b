// In-Place LoRA Trainer: live loss chart (and learning rate) plus the latest preview on the
// "LoRA Trainer" node. Fed by the server's "inplace_lora.progress" messages; after a page reload the
// chart is rebuilt from GET /inplace_lora/history, which keeps every trainer node's last run. A resumed
// run's first message carries the steps before its checkpoint (a dashed line marks where it resumed).
// With a validation set, every message carries the validation losses so far ([[step, loss]]), drawn as
// green points joined by a line on the training loss' scale.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_CLASS = "InplaceLoRA_Trainer";
const EVENT = "inplace_lora.progress";
const HISTORY = "/inplace_lora/history";
const runs = new Map(); // node id -> {points: [[step, loss, lr]], validation: [[step, loss]], status, step, ...}
const VALIDATION_COLOR = "#3cc864";
const charts = new Set(); // one LossChart per trainer node on the canvas (ids can change on load)

function ema(values, beta = 0.9) {
  let avg = null;
  return values.map((v) => (avg = avg === null ? v : beta * avg + (1 - beta) * v));
}

function fmt(v) {
  if (v === 0) return "0";
  return Math.abs(v) < 0.01 || Math.abs(v) >= 1000 ? v.toExponential(2) : v.toFixed(4);
}

class LossChart {
  constructor(node) {
    this.node = node;
    this.root = document.createElement("div");
    this.root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;" +
      "font:11px sans-serif;color:#ccc;box-sizing:border-box;padding:2px";
    this.status = document.createElement("div");
    this.status.textContent = "Queue the prompt to train; the loss appears here.";
    this.canvas = document.createElement("canvas");
    this.canvas.style.cssText = "width:100%;height:150px;background:#1b1b1b;border-radius:4px";
    this.image = document.createElement("img");
    this.image.style.cssText = "width:100%;height:180px;object-fit:contain;display:none;align-self:center;" +
      "image-rendering:pixelated";
    this.root.append(this.status, this.canvas, this.image);
    this.widget = node.addDOMWidget("inplace_lora_chart", "inplace-lora-chart", this.root, {
      serialize: false,
      getMinHeight: () => 380,
    });
  }

  draw(run) {
    const pts = (run && run.points) || [];
    const ctx = this.canvas.getContext("2d");
    const w = (this.canvas.width = Math.max(200, this.canvas.clientWidth || 300));
    const h = (this.canvas.height = 150);
    ctx.clearRect(0, 0, w, h);
    const L = 44, R = 40, T = 8, B = 16;
    ctx.strokeStyle = "#444";
    ctx.strokeRect(L, T, w - L - R, h - T - B);
    if (run) {
      const sps = run.seconds_per_step ? `, ${run.seconds_per_step.toFixed(2)} s/step` : "";
      this.status.textContent = `${run.name || ""} ${run.status || ""}: step ${run.step || 0}/${run.total || "?"}` +
        `${sps}${run.message ? " - " + run.message : ""}`;
    }
    if (run && run.preview) {
      const p = run.preview;
      const src = api.apiURL(`/view?filename=${encodeURIComponent(p.filename)}&subfolder=${encodeURIComponent(p.subfolder)}&type=${p.type}`);
      if (this.image.dataset.src !== src) {
        this.image.dataset.src = src;
        this.image.src = src;
      }
      this.image.style.display = "block";
    }
    if (!pts.length) return;
    const steps = pts.map((p) => p[0]), loss = pts.map((p) => p[1]), lr = pts.map((p) => p[2] || 0);
    const val = (run.validation || []).filter((p) => Number.isFinite(p[1]));
    let lo = Math.min(...loss, ...val.map((p) => p[1])), hi = Math.max(...loss, ...val.map((p) => p[1]));
    if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
    const s0 = steps[0], s1 = Math.max(steps[steps.length - 1], s0 + 1);
    const X = (s) => L + ((w - L - R) * (s - s0)) / (s1 - s0);
    const Y = (v, a, b) => h - B - ((h - T - B) * (v - a)) / (b - a);
    const line = (vals, a, b, color, width) => {
      ctx.strokeStyle = color; ctx.lineWidth = width; ctx.beginPath();
      vals.forEach((v, i) => (i ? ctx.lineTo(X(steps[i]), Y(v, a, b)) : ctx.moveTo(X(steps[i]), Y(v, a, b))));
      ctx.stroke();
    };
    if (run.resumed_at && run.resumed_at > s0) { // a resumed run: its earlier steps come from the run folder
      ctx.strokeStyle = "#666"; ctx.setLineDash([3, 3]); ctx.beginPath();
      ctx.moveTo(X(run.resumed_at), T); ctx.lineTo(X(run.resumed_at), h - B); ctx.stroke(); ctx.setLineDash([]);
    }
    line(loss, lo, hi, "#5b7fbf", 1);
    line(ema(loss), lo, hi, "#9fc3ff", 2);
    if (val.length) {
      ctx.strokeStyle = ctx.fillStyle = VALIDATION_COLOR; ctx.lineWidth = 2; ctx.beginPath();
      val.forEach(([s, v], i) => (i ? ctx.lineTo(X(s), Y(v, lo, hi)) : ctx.moveTo(X(s), Y(v, lo, hi))));
      ctx.stroke();
      for (const [s, v] of val) { ctx.beginPath(); ctx.arc(X(s), Y(v, lo, hi), 3, 0, 2 * Math.PI); ctx.fill(); }
    }
    const lrMax = Math.max(...lr) || 1;
    line(lr, 0, lrMax * 1.05, "#f0a030", 1);
    ctx.fillStyle = "#9fc3ff";
    ctx.fillText(fmt(hi), 2, T + 8);
    ctx.fillText(fmt(lo), 2, h - B);
    ctx.fillStyle = "#f0a030";
    ctx.fillText(`lr ${fmt(lrMax)}`, w - R + 2, T + 8);
    ctx.fillStyle = "#aaa";
    const summary = `step ${steps[steps.length - 1]}  loss ${fmt(loss[loss.length - 1])}  avg ${fmt(ema(loss).pop())}`;
    ctx.fillText(summary, L + 4, h - 3);
    if (val.length) { // the last validation loss, in its series' colour, after the summary
      ctx.fillStyle = VALIDATION_COLOR;
      ctx.fillText(`val ${fmt(val[val.length - 1][1])}`, L + 12 + ctx.measureText(summary).width, h - 3);
    }
  }
}

function redraw(nodeId) {
  for (const chart of charts) {
    if (String(chart.node.id) === String(nodeId)) chart.draw(runs.get(String(nodeId)));
  }
}

function onProgress(event) {
  const d = event.detail || {};
  const id = String(d.node);
  let run = runs.get(id);
  if (!run || d.status === "starting" || run.prompt_id !== d.prompt_id) {
    run = { points: [] };
    runs.set(id, run);
  }
  const { points, ...rest } = d;
  Object.assign(run, rest);
  if (Array.isArray(points)) run.points.push(...points);
  redraw(id);
}

async function restoreHistory() {
  try {
    const response = await api.fetchApi(HISTORY);
    if (!response.ok) return;
    const data = await response.json();
    for (const [id, run] of Object.entries(data)) {
      runs.set(String(id), { ...run, points: run.points || [] });
      redraw(id);
    }
  } catch (err) {
    console.warn("In-Place LoRA Trainer: could not load the training history", err);
  }
}

// A pack folder named like the pyproject project is registered twice (WEB_DIRECTORY and [tool.comfy] web).
if (!window.__inplaceLoraTrainerChart) {
  window.__inplaceLoraTrainerChart = true;
  api.addEventListener(EVENT, onProgress);
  app.registerExtension({
    name: "inplace_lora_trainer.loss_chart",
    async setup() {
      await restoreHistory();
    },
    nodeCreated(node) {
      if (node.comfyClass !== NODE_CLASS) return;
      const chart = new LossChart(node);
      charts.add(chart);
      // A workflow saved before `preview_steps` existed has the chart's empty slot where its value now
      // goes (values are stored by position): put the input's default back.
      const onConfigure = node.onConfigure;
      node.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        const steps = this.widgets?.find((w) => w.name === "preview_steps");
        if (steps && typeof steps.value !== "number") steps.value = steps.options?.default ?? 20;
        return result;
      };
      const onRemoved = node.onRemoved;
      node.onRemoved = function () {
        charts.delete(chart);
        return onRemoved?.apply(this, arguments);
      };
      const size = node.computeSize();
      node.setSize([Math.max(node.size[0], 420), Math.max(node.size[1], size[1])]);
      requestAnimationFrame(() => chart.draw(runs.get(String(node.id))));
    },
    loadedGraphNode(node) {
      if (node.comfyClass === NODE_CLASS) requestAnimationFrame(() => redraw(node.id));
    },
  });
}
