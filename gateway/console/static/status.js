// The status page: /api/v1/health/details and /api/v1/models, polled every few seconds while it is shown.

import { getJson } from "./api.js";
import { lastAnswer } from "./chat.js";

const $ = (sel) => document.querySelector(sel);
const EVERY_MS = 3000;

export class Status {
  constructor(toast) {
    this.toast = toast;
    this.timer = null;
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
    try {
      // 503 (DOWN) still carries the details.
      [health, models] = await Promise.all([
        getJson("/health/details", { okStatuses: [503] }),
        getJson("/models"),
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

    // The gateway reports no throughput; this is the console's own measure of its last streamed answer.
    if (lastAnswer.at && lastAnswer.seconds > 0) {
      $("#throughput").textContent = `${(lastAnswer.chunks / lastAnswer.seconds).toFixed(1)} chunks/s`;
      $("#throughput-detail").textContent =
        `last chat answer (${lastAnswer.model}): ${lastAnswer.chunks} chunks in ${lastAnswer.seconds.toFixed(2)} s, ` +
        `measured by this console at ${lastAnswer.at.toLocaleTimeString()}`;
    } else {
      $("#throughput").textContent = "–";
      $("#throughput-detail").textContent = "send a chat message to measure it";
    }

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
}
