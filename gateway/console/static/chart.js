// A loss curve drawn as SVG: training loss per step and eval loss at each evaluation, on shared axes.

const NS = "http://www.w3.org/2000/svg";
const W = 640;
const H = 260;
const PAD = { left: 52, right: 12, top: 12, bottom: 30 };

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(value) {
  if (value === 0) return "0";
  const abs = Math.abs(value);
  return abs >= 100 || abs < 0.01 ? value.toExponential(1) : value.toFixed(abs >= 10 ? 1 : 3);
}

export class LossChart {
  constructor(svg) {
    this.svg = svg;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    this.clear();
  }

  clear() {
    this.loss = [];
    this.evalLoss = [];
    this.totalSteps = 0;
    this.draw();
  }

  add(kind, progress) {
    if (!progress) return;
    this.totalSteps = Math.max(this.totalSteps, progress.totalSteps || 0);
    if (kind === "step" && typeof progress.loss === "number") {
      this.loss.push([progress.currentStep, progress.loss]);
    } else if (kind === "eval" && typeof progress.evalLoss === "number") {
      this.evalLoss.push([progress.currentStep, progress.evalLoss]);
    }
    this.draw();
  }

  draw() {
    const svg = this.svg;
    svg.replaceChildren();
    svg.dataset.lossPoints = String(this.loss.length);
    svg.dataset.evalPoints = String(this.evalLoss.length);
    const all = [...this.loss, ...this.evalLoss];
    const x0 = PAD.left;
    const x1 = W - PAD.right;
    const y0 = H - PAD.bottom;
    const y1 = PAD.top;
    svg.append(el("rect", { x: x0, y: y1, width: x1 - x0, height: y0 - y1, class: "plot-area" }));
    if (!all.length) {
      svg.append(el("text", { x: (x0 + x1) / 2, y: (y0 + y1) / 2, class: "empty" }, "no loss reported yet"));
      return;
    }
    const maxStep = Math.max(this.totalSteps, ...all.map((p) => p[0]), 1);
    let lo = Math.min(...all.map((p) => p[1]));
    let hi = Math.max(...all.map((p) => p[1]));
    if (hi - lo < 1e-9) {
      lo -= 0.5;
      hi += 0.5;
    }
    const sx = (step) => x0 + ((x1 - x0) * step) / maxStep;
    const sy = (v) => y0 - ((y0 - y1) * (v - lo)) / (hi - lo);
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4;
      const y = sy(v);
      svg.append(el("line", { x1: x0, x2: x1, y1: y, y2: y, class: "grid" }));
      svg.append(el("text", { x: x0 - 6, y: y + 4, class: "tick y" }, fmt(v)));
    }
    for (const step of [0, Math.round(maxStep / 2), maxStep]) {
      svg.append(el("text", { x: sx(step), y: y0 + 18, class: "tick x" }, String(step)));
    }
    svg.append(el("text", { x: x1, y: H - 2, class: "axis-label" }, "step"));
    const line = (points, cls) => {
      const d = points.map(([s, v]) => `${sx(s).toFixed(1)},${sy(v).toFixed(1)}`).join(" ");
      svg.append(el("polyline", { points: d, class: cls }));
      for (const [s, v] of points.length <= 60 ? points : []) {
        svg.append(el("circle", { cx: sx(s), cy: sy(v), r: 2.5, class: cls }));
      }
    };
    line(this.loss, "series loss");
    line(this.evalLoss, "series eval");
  }
}
