// Training: the job list, the start form, pause/resume/cancel, and a live loss curve fed by the job's
// events (GET /api/v1/training/events/{jobId}: the stored events replayed, then followed until it ends).

import { call, getJson, sseEvents } from "./api.js";
import { LossChart } from "./chart.js";

const $ = (sel) => document.querySelector(sel);
const EVERY_MS = 3000;
const FINISHED = new Set(["completed", "failed", "cancelled"]);

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  return td;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

export class Training {
  constructor(toast) {
    this.toast = toast;
    this.timer = null;
    this.jobId = null;
    this.job = null; // the selected job's last status
    this.stream = null; // AbortController of the events stream
    this.chart = new LossChart($("#loss-chart"));
    $("#jobs-refresh").addEventListener("click", () => this.refresh());
    $("#start-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.start();
    });
    for (const verb of ["pause", "resume", "cancel"]) {
      $(`#job-${verb}`).addEventListener("click", () => this.control(verb));
    }
  }

  async keyChanged() {
    try {
      const models = (await getJson("/models")).models;
      const select = $("#t-baseModel");
      const keep = select.value;
      select.replaceChildren(...models.map((m) => new Option(m.id, m.id, false, m.id === keep)));
      const trainable = models.find((m) => (m.capabilities || []).includes("training"));
      if (!keep && trainable) select.value = trainable.id;
    } catch (error) {
      this.toast(`Models: ${error.message}`);
    }
  }

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
    let list;
    try {
      list = await getJson("/training/list?limit=50");
    } catch (error) {
      this.toast(`Training jobs: ${error.message}`);
      return;
    }
    const rows = list.jobs.map((job) => {
      const row = document.createElement("tr");
      row.dataset.job = job.jobId;
      row.className = job.jobId === this.jobId ? "selected" : "";
      const status = cell(job.status);
      status.dataset.state = job.status;
      row.append(cell(job.jobId), cell(job.baseModel), cell(job.adapterName), status, cell(when(job.createdAt)));
      row.addEventListener("click", () => this.select(job.jobId));
      return row;
    });
    $("#jobs tbody").replaceChildren(...rows);
    if (this.jobId) this.showStatus();
  }

  async showStatus() {
    try {
      this.render(await getJson(`/training/status/${encodeURIComponent(this.jobId)}`));
    } catch (error) {
      this.toast(`Job ${this.jobId}: ${error.message}`);
    }
  }

  render(job) {
    if (job.jobId !== this.jobId) return;
    this.job = job;
    const p = job.progress;
    $("#job-status").textContent = job.status;
    $("#job-status").dataset.state = job.status;
    const parts = [`step ${p.currentStep} / ${p.totalSteps}`, `epoch ${p.currentEpoch}`];
    if (p.currentStep) parts.push(`loss ${p.loss.toFixed(4)}`);
    if (p.evalLoss !== undefined) parts.push(`eval loss ${p.evalLoss.toFixed(4)}`);
    if (p.tokensPerSecond !== undefined) parts.push(`${p.tokensPerSecond.toFixed(0)} tokens/s`);
    if (job.estimatedTimeRemainingSeconds) parts.push(`~${job.estimatedTimeRemainingSeconds} s left`);
    $("#job-progress").textContent = parts.join(" · ");
    $("#job-message").textContent = job.error ? `${job.error.code}: ${job.error.message}` : job.message || "";
    $("#job-pause").disabled = !["queued", "running"].includes(job.status);
    $("#job-resume").disabled = job.status !== "paused";
    $("#job-cancel").disabled = FINISHED.has(job.status);
  }

  select(jobId) {
    this.stream?.abort();
    this.jobId = jobId;
    for (const row of document.querySelectorAll("#jobs tbody tr")) {
      row.className = row.dataset.job === jobId ? "selected" : "";
    }
    $("#job-detail").hidden = false;
    $("#job-title").textContent = jobId;
    this.chart.clear();
    $("#chart-count").textContent = "";
    this.showStatus();
    this.follow(jobId);
  }

  // Reads the job's events into the chart; a dropped connection resumes after the last event seen.
  async follow(jobId) {
    const controller = new AbortController();
    this.stream = controller;
    let lastId = null;
    for (let attempt = 0; attempt < 20 && !controller.signal.aborted; attempt++) {
      try {
        const headers = lastId ? { "Last-Event-ID": lastId } : {};
        const response = await call(`/training/events/${encodeURIComponent(jobId)}`, {
          signal: controller.signal,
          headers,
        });
        for await (const { id, data } of sseEvents(response)) {
          if (data === "[DONE]") return;
          if (id) lastId = id;
          this.chart.add(data.kind, data.progress);
          const { lossPoints, evalPoints } = $("#loss-chart").dataset;
          $("#chart-count").textContent = `(${lossPoints} steps, ${evalPoints} evals)`;
          if (data.kind !== "step") this.showStatus();
          else if (data.progress && this.job?.jobId === jobId) {
            this.render({ ...this.job, status: data.status, progress: data.progress });
          }
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error.status && error.status < 500) {
          this.toast(`Events of ${jobId}: ${error.message}`);
          return;
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  async control(verb) {
    const jobId = this.jobId;
    try {
      const job = await getJson(`/training/${verb}/${encodeURIComponent(jobId)}`, { method: "POST" });
      this.toast(`${jobId}: ${job.status}${job.message ? ` (${job.message})` : ""}`);
      if (verb === "resume" && (!this.stream || this.stream.signal.aborted)) this.follow(jobId);
    } catch (error) {
      this.toast(`${verb} ${jobId}: ${error.message}`);
    }
    this.refresh();
  }

  async start() {
    const value = (id) => $(`#t-${id}`).value.trim();
    const number = (id) => Number(value(id));
    const body = {
      baseModel: value("baseModel"),
      datasetPath: value("datasetPath"),
      outputDir: value("outputDir"),
      hyperParams: {
        epochs: number("epochs"),
        batchSize: number("batchSize"),
        learningRate: number("learningRate"),
        maxSeqLength: number("maxSeqLength"),
        saveSteps: number("saveSteps"),
        evalSteps: number("evalSteps"),
        evalSplit: number("evalSplit"),
      },
      loraConfig: { r: number("r"), loraAlpha: number("loraAlpha") },
    };
    if (value("adapterName")) body.adapterName = value("adapterName");
    const result = $("#start-result");
    try {
      const started = await getJson("/training/start", { method: "POST", body });
      result.textContent = `${started.jobId}: ${started.message}`;
      result.className = "muted";
      await this.refresh();
      this.select(started.jobId);
    } catch (error) {
      result.textContent = `${error.code}: ${error.message}`;
      result.className = "error";
    }
  }
}
