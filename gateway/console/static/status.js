// The status page: /api/v1/health/details and /api/v1/models, polled every few seconds while it is shown,
// and the gateway's Prometheus text at /metrics (same origin) for the per-worker slots and the request rate.

import { getJson } from "./api.js";
import { lastAnswer } from "./chat.js";

const $ = (sel) => document.querySelector(sel);
const EVERY_MS = 3000;
const GENERATION_ROUTE = /inference|completions/;

// Prometheus text format -> [{name, labels, value}] (samples only; HELP/TYPE lines skipped).
export function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    const match = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[key] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

async function gatewayMetrics() {
  try {
    const response = await fetch("/metrics");
    return response.ok ? parseMetrics(await response.text()) : null;
  } catch {
    return null; // a gateway without /metrics: the page shows the rest
  }
}

export class Status {
  constructor(toast) {
    this.toast = toast;
    this.timer = null;
    this.previous = null; // {at, generations}: the last poll's generation-request count
  }

  keyChanged() {}

  activate() {
    if (this.timer) return;
    this.refresh();
    this.timer = setInterval(() => this.refresh(), EVERY_MS);
  }

  deactivate() {
    clearInterval(this.timer);
    this.timer = null;
  }

  async refresh() {
    let health;
    let models;
    let metrics;
    try {
      // 503 (DOWN) still carries the details.
      [health, models, metrics] = await Promise.all([
        getJson("/health/details", { okStatuses: [503] }),
        getJson("/models"),
        gatewayMetrics(),
      ]);
    } catch (error) {
      $("#overall").textContent = "unreachable";
      $("#overall").dataset.state = "DOWN";
      $("#status-updated").textContent = error.message;
      return;
    }
    const { gateway, coordinator, nats } = health.components;
    $("#overall").textContent = health.status;
    $("#overall").dataset.state = health.status;
    $("#status-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;

    const workers = coordinator.details.workers;
    $("#workers").textContent = `${workers.healthy} / ${workers.total} healthy`;
    $("#workers-detail").textContent = workers.unhealthy ? `${workers.unhealthy} unhealthy` : "";

    const queue = coordinator.details.queue;
    const pending = queue.pendingTasks ?? "?";
    $("#queue").textContent = `${pending} / ${queue.maxSize} pending`;
    $("#queue-meter").value = queue.pendingTasks && queue.maxSize ? queue.pendingTasks / queue.maxSize : 0;

    this.showThroughput(metrics);
    if (metrics) this.showWorkers(metrics);

    $("#nats").textContent = nats.status === "UP" ? `${nats.details.latencyMs} ms` : nats.status;
    $("#gateway-uptime").textContent = `gateway ${gateway.status}, up ${gateway.details.uptime}`;

    const rows = models.models.map((m) => {
      const row = document.createElement("tr");
      row.dataset.model = m.id;
      for (const text of [m.id, m.status, m.engine, (m.loraAdapters || []).join(", ")]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      row.children[1].dataset.state = m.status;
      return row;
    });
    $("#models-table tbody").replaceChildren(...rows);
  }

  // Generation requests per second through this gateway (from its /metrics counter, between two polls), and
  // the console's own measure of its last streamed answer.
  showThroughput(metrics) {
    let rate = null;
    if (metrics) {
      const generations = metrics
        .filter((m) => m.name === "cy_llm:http_requests_total" && GENERATION_ROUTE.test(m.labels.route || ""))
        .reduce((sum, m) => sum + m.value, 0);
      const now = performance.now();
      if (this.previous) rate = ((generations - this.previous.generations) * 1000) / (now - this.previous.at);
      this.previous = { at: now, generations };
    }
    $("#throughput").textContent = rate === null ? "–" : `${rate.toFixed(2)} req/s`;
    const lines = [rate === null ? "" : "generation requests through this gateway, last few seconds"];
    if (lastAnswer.at && lastAnswer.seconds > 0) {
      lines.push(
        `last chat answer here (${lastAnswer.model}): ${(lastAnswer.chunks / lastAnswer.seconds).toFixed(1)} ` +
          `chunks/s, ${lastAnswer.chunks} chunks in ${lastAnswer.seconds.toFixed(2)} s`,
      );
    }
    $("#throughput-detail").textContent = lines.filter(Boolean).join("; ");
  }

  showWorkers(metrics) {
    const fields = {
      "cy_llm:worker_slots_total": "total",
      "cy_llm:worker_slots_busy": "busy",
      "cy_llm:worker_healthy": "healthy",
    };
    const byWorker = new Map();
    for (const m of metrics) {
      const field = fields[m.name];
      if (!field) continue;
      const worker = byWorker.get(m.labels.worker) || { ...m.labels };
      worker[field] = m.value;
      byWorker.set(m.labels.worker, worker);
    }
    const rows = [...byWorker.values()].map((w) => {
      const row = document.createElement("tr");
      row.dataset.worker = w.worker;
      const health = w.healthy ? "healthy" : "unhealthy";
      for (const text of [w.worker, w.model, w.engine, health, `${w.busy ?? "?"} / ${w.total ?? "?"}`]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      row.children[3].dataset.state = w.healthy ? "UP" : "DOWN";
      return row;
    });
    $("#workers-table tbody").replaceChildren(...rows);
  }
}
