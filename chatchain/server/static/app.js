// The chat page of `chatchain serve`: sign in with a token, sessions, streamed replies.
//
// Model output is never injected as HTML: replies are Markdown rendered by marked with raw
// HTML escaped (so `<script>` shows as text), then sanitized by DOMPurify into DOM nodes; the
// user's own text is set with textContent. Replies stream over fetch + ReadableStream, since
// EventSource cannot send the Authorization header. URLs are relative, so the page also works
// behind a reverse proxy under a path prefix.

import { Marked } from "./vendor/marked/marked.esm.js";
import DOMPurify from "./vendor/dompurify/purify.es.js";
import { EventSourceParserStream } from "./vendor/eventsource-parser/stream.js";

// sessionStorage, not localStorage: the token is a long-lived bearer credential, so it stays
// in this tab only (a reload keeps it) and is gone when the tab closes, leaving nothing behind
// on a shared computer. Both are readable by script on this origin, which is why replies are
// never turned into HTML unsanitized and the page is served with a strict CSP.
const TOKEN_KEY = "chatchain.token";

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, type, message, retryAfter) {
    super(message);
    this.status = status;
    this.type = type;
    this.retryAfter = retryAfter;
  }
}

const UNREACHABLE =
  "Cannot reach the chat service: check that `chatchain serve` is running, then try again.";

// --- Markdown, safely ------------------------------------------------------------------

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}

const markdown = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    // Raw HTML in a reply is shown as the text it is, never parsed.
    html({ text }) {
      return escapeHtml(text);
    },
    // An image would be fetched as soon as it renders (a model told to put data in an image
    // URL would leak it): show a link instead, which the reader may follow or not.
    image({ href, text }) {
      return `<a href="${escapeHtml(href || "")}">${escapeHtml(text || href || "image")}</a>`;
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["style"],
};

function renderMarkdown(element, text) {
  element.replaceChildren(DOMPurify.sanitize(markdown.parse(text), PURIFY));
}

// --- State -----------------------------------------------------------------------------

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  sessions: [], // from GET v1/sessions
  fresh: new Set(), // ids made here that have no message on the server yet
  current: null,
  streaming: null, // the AbortController of the reply being streamed
};

// --- HTTP ------------------------------------------------------------------------------

async function api(path, { method = "GET", body, accept = "application/json", signal } = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, Accept: accept };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "Unreachable", UNREACHABLE);
  }
  if (!response.ok) throw await apiError(response);
  return response;
}

async function apiError(response) {
  let type = "";
  let message = "";
  try {
    const data = await response.json();
    type = data?.error?.type ?? "";
    message = data?.error?.message ?? "";
    if (!message && Array.isArray(data?.detail)) {
      message = data.detail.map((d) => d.msg).join("; ");
    }
  } catch {
    // Not JSON (a proxy's error page): the status says enough.
  }
  const fallback = `The server answered ${response.status} ${response.statusText}.`;
  return new ApiError(
    response.status,
    type,
    message || fallback,
    response.headers.get("Retry-After"),
  );
}

function describe(err) {
  if (!(err instanceof ApiError)) return `Something went wrong: ${err.message || err}`;
  if (err.status === 0) return err.message;
  let text = err.message;
  if (err.status === 429 && err.retryAfter) text += ` Try again in ${err.retryAfter} s.`;
  return `${text} (HTTP ${err.status}${err.type ? ` ${err.type}` : ""})`;
}

// A 401 anywhere means the token no longer works (revoked, rotated): back to sign in.
function handle(err) {
  if (err instanceof ApiError && err.status === 401) {
    signOut(`Your token was refused: ${err.message} Sign in again with a valid token.`);
  } else {
    showError(describe(err));
  }
}

// --- Errors ----------------------------------------------------------------------------

function showError(text) {
  $("error-text").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// --- Sign in and out -------------------------------------------------------------------

function showSignIn(message) {
  $("app").hidden = true;
  $("signin").hidden = false;
  const error = $("signin-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("token").value = "";
  $("token").focus();
}

function signOut(message) {
  state.streaming?.abort();
  state.token = null;
  state.sessions = [];
  state.fresh.clear();
  state.current = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("transcript").replaceChildren();
  $("session-list").replaceChildren();
  clearError();
  showSignIn(message);
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) {
    showSignIn("Paste your access token first (`chatchain users add NAME` prints one).");
    return;
  }
  state.token = token;
  try {
    await loadSessions();
  } catch (err) {
    state.token = null;
    if (err instanceof ApiError && err.status === 401) {
      showSignIn(`That token was refused: ${err.message}`);
    } else {
      showSignIn(describe(err));
    }
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  await enterApp();
}

async function enterApp() {
  $("signin").hidden = true;
  $("app").hidden = false;
  clearError();
  await openSession(sessionFromHash() ?? state.sessions[0]?.session_id ?? newSessionId());
  $("message").focus();
}

// --- Sessions --------------------------------------------------------------------------

function newSessionId() {
  const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
  const random = crypto.getRandomValues(new Uint8Array(3));
  const suffix = Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("");
  const id = `chat-${stamp}-${suffix}`;
  state.fresh.add(id);
  return id;
}

function sessionFromHash() {
  const hash = location.hash.slice(1);
  if (!hash) return null;
  try {
    return decodeURIComponent(hash) || null;
  } catch {
    return null;
  }
}

async function loadSessions() {
  const response = await api("v1/sessions");
  state.sessions = (await response.json()).sessions;
  for (const session of state.sessions) state.fresh.delete(session.session_id);
  renderSessions();
}

async function refreshSessions() {
  if (!state.token) return;
  try {
    await loadSessions();
  } catch (err) {
    handle(err);
  }
}

const WHEN = new Intl.DateTimeFormat(undefined, { dateStyle: "short", timeStyle: "short" });

function renderSessions() {
  const items = [];
  const known = new Set(state.sessions.map((s) => s.session_id));
  const rows = [...state.fresh]
    .filter((id) => !known.has(id))
    .map((id) => ({ session_id: id, message_count: 0, updated_at: null }))
    .concat(state.sessions);
  for (const session of rows) {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.dataset.session = session.session_id;
    open.title = session.session_id;
    if (session.session_id === state.current) open.setAttribute("aria-current", "true");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = session.session_id;
    const meta = document.createElement("small");
    meta.textContent = session.updated_at
      ? `${session.message_count} messages · ${WHEN.format(new Date(session.updated_at))}`
      : "new";
    open.append(name, meta);
    open.addEventListener("click", () => openSession(session.session_id));
    item.append(open);
    if (session.updated_at) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "delete";
      remove.textContent = "Delete";
      remove.setAttribute("aria-label", `Delete session ${session.session_id}`);
      remove.addEventListener("click", () => deleteSession(session.session_id));
      item.append(remove);
    }
    items.push(item);
  }
  $("session-list").replaceChildren(...items);
}

async function openSession(sessionId) {
  state.streaming?.abort();
  clearError();
  state.current = sessionId;
  if (sessionFromHash() !== sessionId) {
    history.replaceState(null, "", `#${encodeURIComponent(sessionId)}`);
  }
  $("session-title").textContent = sessionId;
  $("transcript").replaceChildren();
  renderSessions();
  if (state.fresh.has(sessionId)) return;
  try {
    const response = await api(`v1/sessions/${encodeURIComponent(sessionId)}/messages`);
    const data = await response.json();
    if (state.current !== sessionId) return; // another session was opened meanwhile
    addHistory(data.messages);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      // Not one of yours (or deleted): say so, and start a new session instead.
      const message = describe(err);
      await openSession(newSessionId());
      showError(message);
    } else {
      handle(err);
    }
  }
}

async function deleteSession(sessionId) {
  if (!confirm(`Delete session ${sessionId} and its messages?`)) return;
  try {
    await api(`v1/sessions/${encodeURIComponent(sessionId)}`, { method: "DELETE" });
  } catch (err) {
    handle(err);
    return;
  }
  state.fresh.delete(sessionId);
  await refreshSessions();
  if (state.current === sessionId) {
    await openSession(state.sessions[0]?.session_id ?? newSessionId());
  }
}

// --- Messages --------------------------------------------------------------------------

const ROLE_NAMES = { user: "You", assistant: "Assistant", system: "System", tool: "Tool" };

function addMessage({ role, text, interrupted = false }) {
  const article = document.createElement("article");
  article.className = `message ${role}`;
  const who = document.createElement("h3");
  who.textContent = ROLE_NAMES[role] ?? role;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "assistant") renderMarkdown(body, text);
  else body.textContent = text;
  article.append(who, body);
  if (role === "assistant") {
    const tools = document.createElement("div");
    tools.className = "tools";
    article.append(tools);
  }
  const footer = document.createElement("footer");
  article.append(footer);
  if (interrupted) markInterrupted(article, "interrupted");
  $("transcript").append(article);
  article.scrollIntoView({ block: "end" });
  return article;
}

// A transcript: a turn with tools is stored as the user's message, an assistant message with
// the calls (usually no text), one tool message per result, then the answer. The page shows
// the user's message and the answer, with one dim line per call under the answer.
function addHistory(messages) {
  const calls = new Map(); // id -> {name, args}, from the assistant messages that made them
  let lines = [];
  for (const message of messages) {
    if (message.role === "assistant" && message.tool_calls?.length) {
      for (const call of message.tool_calls) calls.set(call.id, call);
      if (!message.text) continue;
    }
    if (message.role === "tool") {
      const call = calls.get(message.tool_call_id) ?? { name: message.name, args: {} };
      // A failed call's result is "Error: " and the error, as the model was sent it.
      const error = message.status === "error" ? message.text.replace(/^Error: /, "") : null;
      lines.push({ ...call, status: message.status, error });
      continue;
    }
    const article = addMessage(message);
    if (message.role === "assistant") {
      for (const line of lines) toolLine(article, line);
      lines = [];
    }
  }
  if (lines.length) {
    // A turn stopped after its tools ran and before the answer: show the calls anyway.
    const article = addMessage({ role: "assistant", text: "", interrupted: true });
    for (const line of lines) toolLine(article, line);
  }
}

function shorten(text, most) {
  return text.length <= most ? text : `${text.slice(0, most - 1)}…`;
}

// One dim line per tool call, as the terminal chat prints it: "tool name(args) ok" or
// "... error: why"; "..." while it runs. Set as text: names, arguments and errors may hold
// anything the model or the tool wrote.
function toolLine(article, { id, name, args, status, error }) {
  const tools = article.querySelector(".tools");
  let line = id ? tools.querySelector(`p[data-call="${CSS.escape(id)}"]`) : null;
  if (!line) {
    line = document.createElement("p");
    line.className = "tool";
    if (id) line.dataset.call = id;
    tools.append(line);
  }
  const shown = Object.entries(args ?? {})
    .map(([key, value]) => `${key}=${JSON.stringify(value)}`)
    .join(", ");
  let outcome = "…";
  if (status === "success") outcome = "ok";
  else if (status === "error") outcome = `error: ${shorten(error ?? "", 100)}`;
  line.classList.toggle("failed", status === "error");
  line.textContent = `tool ${name}(${shorten(shown, 60)}) ${outcome}`;
}

function note(article, className, text) {
  const line = document.createElement("p");
  line.className = className;
  line.textContent = text;
  article.querySelector("footer").append(line);
}

function markInterrupted(article, why) {
  article.classList.add("interrupted");
  note(article, "badge", why);
}

// --- Sending and streaming -------------------------------------------------------------

function setStreaming(controller) {
  state.streaming = controller;
  $("send").disabled = controller !== null;
  $("stop").disabled = controller === null;
}

async function send(event) {
  event?.preventDefault();
  const input = $("message");
  const text = input.value;
  if (!text.trim() || state.streaming) return;
  clearError();
  const sessionId = state.current;
  const mine = addMessage({ role: "user", text });
  const reply = addMessage({ role: "assistant", text: "" });
  reply.setAttribute("aria-busy", "true");
  input.value = "";
  const controller = new AbortController();
  setStreaming(controller);
  let started = false;
  try {
    const response = await api(`v1/sessions/${encodeURIComponent(sessionId)}/messages`, {
      method: "POST",
      body: { text, vars: {} },
      accept: "text/event-stream",
      signal: controller.signal,
    });
    started = true;
    state.fresh.delete(sessionId);
    await readReply(response, reply);
  } catch (err) {
    if (err.name === "AbortError") {
      // The server keeps what it had streamed, marked interrupted, as a reload shows.
      started = true;
      markInterrupted(reply, "interrupted: stopped");
    } else if (!started) {
      // Refused before anything was stored: take the message back for another try.
      mine.remove();
      reply.remove();
      input.value = text;
      handle(err);
    } else {
      markInterrupted(reply, "interrupted: the connection was lost");
      showError(describe(err));
    }
  } finally {
    reply.removeAttribute("aria-busy");
    setStreaming(null);
    if (started) await refreshSessions();
    if (state.current === sessionId) input.focus();
  }
}

async function readReply(response, reply) {
  const body = reply.querySelector(".body");
  let text = "";
  let pending = false;
  const paint = () => {
    pending = false;
    renderMarkdown(body, text);
  };
  let finished = false;
  const events = response.body
    .pipeThrough(new TextDecoderStream())
    .pipeThrough(new EventSourceParserStream())
    .getReader();
  for (;;) {
    const { done, value: event } = await events.read();
    if (done) break;
    const data = JSON.parse(event.data);
    if (event.event === "text") {
      text += data.text;
      if (!pending) {
        pending = true;
        requestAnimationFrame(paint);
      }
    } else if (event.event === "tool") {
      toolLine(reply, data);
    } else if (event.event === "usage") {
      note(reply, "usage", data.line);
    } else if (event.event === "done") {
      finished = true;
      for (const notice of data.notices ?? []) note(reply, "notice", notice);
      if (data.interrupted) markInterrupted(reply, "interrupted");
    } else if (event.event === "error") {
      finished = true;
      const err = new ApiError(data.status, data.type, data.message, null);
      markInterrupted(reply, "interrupted: failed");
      showError(describe(err));
    }
  }
  paint();
  if (!finished) markInterrupted(reply, "interrupted: the connection was lost");
}

function stop() {
  state.streaming?.abort();
}

// --- Wiring ----------------------------------------------------------------------------

function onKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
}

async function start() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut(""));
  $("new-session").addEventListener("click", () => openSession(newSessionId()));
  $("composer").addEventListener("submit", send);
  $("message").addEventListener("keydown", onKey);
  $("stop").addEventListener("click", stop);
  $("error-close").addEventListener("click", clearError);
  window.addEventListener("hashchange", () => {
    const id = sessionFromHash();
    if (state.token && id && id !== state.current) openSession(id);
  });
  if (!state.token) {
    showSignIn("");
    return;
  }
  try {
    await loadSessions();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      signOut(`Your token was refused: ${err.message} Sign in again with a valid token.`);
    } else {
      showSignIn(describe(err));
    }
    return;
  }
  await enterApp();
}

start();
