// The console's shell: the API key dialog, the tabs, and a shared toast for errors.

import { call, forgetKey, storedKey, storeKey, whenUnauthorized } from "./api.js";
import { Chat } from "./chat.js";
import { Status } from "./status.js";
import { Training } from "./training.js";

const $ = (sel) => document.querySelector(sel);

export function toast(message) {
  const box = $("#toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), 6000);
}

const tabs = { chat: new Chat(toast), training: new Training(toast), status: new Status(toast) };
let active = "chat";

function show(name) {
  active = name;
  for (const button of document.querySelectorAll("[role=tab]")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const [tab, view] of Object.entries(tabs)) {
    $(`#tab-${tab}`).hidden = tab !== name;
    if (tab === name) view.activate();
    else view.deactivate();
  }
}

function askKey(reason = "") {
  const dialog = $("#key-dialog");
  const error = $("#key-error");
  error.textContent = reason;
  error.hidden = !reason;
  $("#key-input").value = "";
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
}

$("#key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("#key-input").value.trim();
  storeKey(key, $("#key-remember").checked);
  try {
    await call("/models"); // a cheap authenticated call: is the key right?
  } catch (error) {
    forgetKey();
    askKey(error.status === 401 ? `Refused: ${error.message}` : `The gateway did not answer: ${error.message}`);
    return;
  }
  $("#key-dialog").close();
  for (const view of Object.values(tabs)) view.keyChanged();
  show(active);
});

$("#change-key").addEventListener("click", () => askKey());
whenUnauthorized((message) => askKey(`Refused: ${message}`));

for (const button of document.querySelectorAll("[role=tab]")) {
  button.addEventListener("click", () => show(button.dataset.tab));
}

if (storedKey()) {
  for (const view of Object.values(tabs)) view.keyChanged();
  show(active);
} else {
  askKey();
}
