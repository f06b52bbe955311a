// The REST API (/api/v1 on this origin) with the key in X-API-Key, and server-sent events read over fetch
// (EventSource cannot send headers, and the key never goes into a URL).

const KEY_NAME = "cy-llm-api-key";

export function storedKey() {
  return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
}

export function storeKey(key, remember) {
  sessionStorage.setItem(KEY_NAME, key);
  if (remember) localStorage.setItem(KEY_NAME, key);
  else localStorage.removeItem(KEY_NAME);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let onUnauthorized = () => {};
export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

// fetch() against /api/v1; an error answer (the API's envelope) becomes an ApiError.
export async function call(path, { method = "GET", body, signal, headers = {}, okStatuses = [] } = {}) {
  const init = { method, signal, headers: { "X-API-Key": storedKey(), ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(`/api/v1${path}`, init);
  if (response.ok || okStatuses.includes(response.status)) return response;
  let code = "HTTP_" + response.status;
  let message = response.statusText;
  try {
    const error = (await response.json()).error;
    code = error.code;
    message = error.message;
  } catch {
    // not the API's envelope (a proxy in between): keep the status line
  }
  if (response.status === 401) onUnauthorized(message);
  throw new ApiError(response.status, code, message);
}

export async function getJson(path, options) {
  return (await call(path, options)).json();
}

// Yields {id, data} for each event of a text/event-stream response; `data` is parsed JSON, or the string
// "[DONE]". Comments (": keep-alive") are skipped.
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = parseBlock(block);
        if (event) yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function parseBlock(block) {
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "id") id = value;
  }
  if (!data.length) return null;
  const text = data.join("\n");
  return { id, data: text === "[DONE]" ? text : JSON.parse(text) };
}
