// The chat playground: a prompt streamed through POST /api/v1/inference/stream, with a Stop that aborts it.

import { call, getJson, sseEvents } from "./api.js";

const $ = (sel) => document.querySelector(sel);

// The console's own measure of generation speed: its last answer that streamed to its end.
export const lastAnswer = { chunks: 0, seconds: 0, firstChunkSeconds: null, model: "", at: null };

export class Chat {
  constructor(toast) {
    this.toast = toast;
    this.models = [];
    this.controller = null;
    $("#model").addEventListener("change", () => this.fillAdapters());
    $("#chat-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    $("#prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#chat-form").requestSubmit();
    });
    $("#stop").addEventListener("click", () => this.controller?.abort());
  }

  keyChanged() {
    this.loadModels();
  }

  activate() {
    this.loadModels();
  }

  deactivate() {}

  async loadModels() {
    try {
      this.models = (await getJson("/models")).models;
    } catch (error) {
      this.toast(`Models: ${error.message}`);
      return;
    }
    const select = $("#model");
    const keep = select.value;
    select.replaceChildren(
      ...this.models.map((m) => new Option(`${m.id} (${m.status})`, m.id, false, m.id === keep)),
    );
    if (!keep) {
      const ready = this.models.find((m) => m.status === "ready");
      if (ready) select.value = ready.id;
    }
    this.fillAdapters();
  }

  fillAdapters() {
    const select = $("#adapter");
    const keep = select.value;
    const model = this.models.find((m) => m.id === $("#model").value);
    const adapters = model?.loraAdapters || [];
    select.replaceChildren(
      new Option("(none: base model)", ""),
      ...adapters.map((name) => new Option(name, name, false, name === keep)),
    );
  }

  settings() {
    const number = (id) => Number($(`#${id}`).value);
    return {
      maxNewTokens: number("maxNewTokens"),
      temperature: number("temperature"),
      topP: number("topP"),
      repetitionPenalty: number("repetitionPenalty"),
    };
  }

  addTurn(role, text) {
    const turn = document.createElement("div");
    turn.className = `turn ${role}`;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    turn.append(body);
    $("#transcript").append(turn);
    turn.scrollIntoView({ block: "end" });
    return body;
  }

  async send() {
    const prompt = $("#prompt").value.trim();
    if (!prompt || this.controller) return;
    const modelId = $("#model").value;
    const adapter = $("#adapter").value;
    const body = { modelId, prompt, generation: this.settings() };
    if (adapter) body.adapter = adapter;
    this.addTurn("user", adapter ? `${prompt}  [${modelId} + ${adapter}]` : prompt);
    const out = this.addTurn("assistant", "");
    out.parentElement.classList.add("streaming");
    $("#prompt").value = "";
    this.controller = new AbortController();
    $("#send").disabled = true;
    $("#stop").disabled = false;
    const started = performance.now();
    let chunks = 0;
    let first = null;
    let finish = "";
    try {
      const response = await call("/inference/stream", { method: "POST", body, signal: this.controller.signal });
      for await (const { data } of sseEvents(response)) {
        if (data === "[DONE]") break;
        if (data.error) throw new Error(`${data.error.code}: ${data.error.message}`);
        const choice = data.choices?.[0];
        if (!choice) continue;
        if (choice.text) {
          first ??= (performance.now() - started) / 1000;
          chunks += 1;
          out.textContent += choice.text;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    } catch (error) {
      if (error.name === "AbortError") finish = "stopped";
      else {
        finish = "error";
        this.addTurn("error", error.message);
      }
    } finally {
      const seconds = (performance.now() - started) / 1000;
      if (finish === "length" || finish === "stop") {
        Object.assign(lastAnswer, { chunks, seconds, firstChunkSeconds: first, model: modelId, at: new Date() });
      }
      out.parentElement.classList.remove("streaming");
      out.parentElement.dataset.finish = finish;
      const rate = chunks && seconds ? `, ${(chunks / seconds).toFixed(1)} chunks/s` : "";
      const ttft = first === null ? "" : `, first chunk after ${first.toFixed(2)} s`;
      $("#chat-stats").textContent = `${finish || "done"}: ${chunks} chunks in ${seconds.toFixed(2)} s${rate}${ttft}`;
      this.controller = null;
      $("#send").disabled = false;
      $("#stop").disabled = true;
    }
  }
}
