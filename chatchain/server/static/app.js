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
import hljs from "./vendor/highlight.js/highlight.min.js";

// Code in replies is highlighted in place: highlight.js only adds classes to the text nodes
// DOMPurify let through, so nothing the model wrote becomes markup.
hljs.configure({ ignoreUnescapedHTML: true });

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
  for (const code of element.querySelectorAll("pre > code")) {
    hljs.highlightElement(code);
    code.parentElement.append(copyButton("Copy code", () => code.textContent));
  }
}

// A button that puts text on the clipboard and says so for a moment.
function copyButton(label, text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = label;
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text());
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed: select the text instead";
    }
    setTimeout(() => (button.textContent = label), 1500);
  });
  return button;
}

// --- State -----------------------------------------------------------------------------

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  sessions: [], // from GET v1/sessions
  fresh: new Set(), // ids made here that have no message on the server yet
  firstWords: new Map(), // of those, the first message sent (their title until they are listed)
  current: null,
  // Replies being written, by session id: {controller, nodes}. A reply keeps streaming when
  // its session is left; `nodes` then holds that session's transcript until it is opened
  // again or the reply ends.
  streams: new Map(),
  editing: null, // the session whose last message is being edited in the composer
};

const HELP = "Enter sends; Shift+Enter starts a new line; Esc stops a reply.";

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

// What the person at the page can do about each kind of failure. The server's own message
// is meant for whoever runs it (it may name settings such as CHATCHAIN_WINDOW_TOKENS): it
// goes to the browser's console, and the server logs the details; the page shows its
// status and type so that the operator can find them.
const FOR_PEOPLE = {
  SessionBusyError: "This session is still answering another message: wait for that reply, then send again.",
  ContextTooLongError: "This conversation has grown too long for the model: start a new session to go on.",
  PayloadTooLarge: "That message is too long for this server: shorten it, then send again.",
  InvalidInputError:
    "This message could not be sent as it is, most likely because it is too long for this " +
    "chat: shorten it, then send again.",
  TooManyRequests: "You have sent more requests than this server allows for now.",
  NotFound: "That session is no longer there (deleted in another tab?): reload the page.",
};
const SERVER_TROUBLE =
  "The assistant could not answer just now. Try again in a moment; if it keeps failing, tell " +
  "whoever runs this chat (their server log has the details).";

function describe(err) {
  if (!(err instanceof ApiError)) return `Something went wrong: ${err.message || err}`;
  if (err.status === 0) return err.message;
  let text = FOR_PEOPLE[err.type];
  if (text === undefined && (err.status >= 500 || err.status === 400)) text = SERVER_TROUBLE;
  if (text === undefined) text = err.message; // 402: the server wrote it for you
  else console.warn(`chatchain: HTTP ${err.status} ${err.type}: ${err.message}`);
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
  for (const stream of state.streams.values()) stream.controller.abort();
  state.streams.clear();
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
  loadAccount();
  const first = sessionFromHash() ?? state.sessions[0]?.session_id ?? newSessionId();
  await openSession(first, { push: false });
  $("message").focus();
}

// The header: the model that answers, and what is left of the user's tightest cap.
async function loadAccount() {
  try {
    const me = await (await api("v1/me")).json();
    $("model").textContent = me.model;
    $("budget").textContent = me.budget ? me.budget.line : "";
    $("budget").hidden = !me.budget;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) handle(err);
    // Otherwise the header stays as it was: the chat works without it.
  }
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

const WHEN_TODAY = new Intl.DateTimeFormat(undefined, { timeStyle: "short" });
const WHEN = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
const WHEN_FULL = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "long" });

// Short in the list (a time today, else a day), whole on hover.
function when(moment) {
  const today = moment.toDateString() === new Date().toDateString();
  return (today ? WHEN_TODAY : WHEN).format(moment);
}

function titleOf(sessionId) {
  const session = state.sessions.find((s) => s.session_id === sessionId);
  return session?.title ?? state.firstWords.get(sessionId) ?? "New chat";
}

function renderSessions() {
  const items = [];
  const known = new Set(state.sessions.map((s) => s.session_id));
  const rows = [...state.fresh]
    .filter((id) => !known.has(id))
    .map((id) => ({
      session_id: id,
      title: state.firstWords.get(id) ?? "New chat",
      message_count: 0,
      updated_at: null,
    }))
    .concat(state.sessions);
  for (const session of rows) {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.dataset.session = session.session_id;
    if (session.session_id === state.current) open.setAttribute("aria-current", "true");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = session.title;
    name.title = session.title;
    const meta = document.createElement("small");
    if (state.streams.has(session.session_id)) {
      meta.className = "writing";
      meta.textContent = "writing…";
    } else if (session.updated_at) {
      const moment = new Date(session.updated_at);
      meta.textContent = `${session.message_count} messages · ${when(moment)}`;
      meta.title = `Last message ${WHEN_FULL.format(moment)}`;
    } else {
      meta.textContent = "new";
    }
    open.append(name, meta);
    open.addEventListener("click", () => openSession(session.session_id));
    item.append(open);
    if (session.updated_at) {
      item.append(
        sessionAction("rename", "✎", `Rename session ${session.title}`, () =>
          renameSession(session),
        ),
        sessionAction("delete", "×", `Delete session ${session.title}`, () =>
          deleteSession(session.session_id, session.title),
        ),
      );
    }
    items.push(item);
  }
  $("session-list").replaceChildren(...items);
}

// A small icon button beside a session; its label names the session for screen readers.
function sessionAction(className, icon, label, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = icon;
  button.title = label;
  button.setAttribute("aria-label", label);
  button.addEventListener("click", action);
  return button;
}

async function renameSession(session) {
  const title = prompt("A new title for this session (empty: its first message):", session.title);
  if (title === null) return;
  try {
    await api(`v1/sessions/${encodeURIComponent(session.session_id)}/title`, {
      method: "PUT",
      body: { title },
    });
  } catch (err) {
    handle(err);
    return;
  }
  await refreshSessions();
  if (state.current === session.session_id) showTitle();
}

function showTitle() {
  const title = titleOf(state.current);
  $("session-title").textContent = title;
  document.title = `${title} · chatchain`;
}

// The invitation to write shows while the open session has no message.
function showEmpty() {
  $("empty").hidden = $("transcript").childElementCount > 0;
}

// Each session opened is a step of the browser's history (its id in the URL's fragment), so
// Back and Forward move between sessions; `push: false` when following them, or on entry.
async function openSession(sessionId, { push = true } = {}) {
  clearError();
  closeDrawer();
  if (state.editing) stopEditing();
  const leaving = state.streams.get(state.current);
  if (leaving && state.current !== sessionId) leaving.nodes = [...$("transcript").children];
  state.current = sessionId;
  if (sessionFromHash() !== sessionId) {
    const url = `#${encodeURIComponent(sessionId)}`;
    if (push) history.pushState(null, "", url);
    else history.replaceState(null, "", url);
  }
  showTitle();
  $("transcript").replaceChildren();
  renderSessions();
  setButtons();
  const live = state.streams.get(sessionId);
  if (live?.nodes) {
    // Its reply is still being written: show it as it goes on.
    $("transcript").replaceChildren(...live.nodes);
    live.nodes = null;
    showEmpty();
    return;
  }
  showEmpty();
  if (state.fresh.has(sessionId)) return;
  try {
    const response = await api(`v1/sessions/${encodeURIComponent(sessionId)}/messages`);
    const data = await response.json();
    if (state.current !== sessionId) return; // another session was opened meanwhile
    addHistory(data.messages);
    showEmpty();
    markLastTurn();
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      // Not one of yours (or deleted): say so, and start a new session instead. (The
      // server's message points API clients to GET /v1/sessions; people get the list.)
      const message =
        `There is no session '${sessionId}' among yours (it may have been deleted): here is ` +
        `a new one instead. (HTTP ${err.status} ${err.type})`;
      await openSession(newSessionId(), { push: false });
      showError(message);
    } else {
      handle(err);
    }
  }
}

async function deleteSession(sessionId, title) {
  if (!confirm(`Delete session ${title} and its messages?`)) return;
  state.streams.get(sessionId)?.controller.abort();
  try {
    await api(`v1/sessions/${encodeURIComponent(sessionId)}`, { method: "DELETE" });
  } catch (err) {
    handle(err);
    return;
  }
  state.fresh.delete(sessionId);
  await refreshSessions();
  if (state.current === sessionId) {
    await openSession(state.sessions[0]?.session_id ?? newSessionId(), { push: false });
  }
}

// --- The session list as a drawer on narrow screens -----------------------------------

function openDrawer() {
  $("app").classList.add("drawer-open");
  $("menu").setAttribute("aria-expanded", "true");
  $("scrim").hidden = false;
  $("session-list").querySelector("[aria-current]")?.focus();
}

function closeDrawer() {
  $("app").classList.remove("drawer-open");
  $("menu").setAttribute("aria-expanded", "false");
  $("scrim").hidden = true;
}

// --- Messages --------------------------------------------------------------------------

const ROLE_NAMES = { user: "You", assistant: "Assistant", system: "System", tool: "Tool" };

function addMessage({ role, text, interrupted = false, usage = null }) {
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
  if (role === "assistant") {
    article.text = text; // what Copy copies: the reply's Markdown as written
    footer.append(copyButton("Copy", () => article.text));
  }
  if (interrupted) markInterrupted(article, "interrupted");
  if (usage) note(article, "usage", usage.line);
  $("transcript").append(article);
  showEmpty();
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

// Send and Stop for the open session: another session's reply may be streaming meanwhile.
function setButtons() {
  const busy = state.streams.has(state.current);
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Regenerate the last reply, or send an edited last message in its place: the server
// replaces the session's last turn (the ledger keeps what it cost).
function lastTurn() {
  const nodes = [...$("transcript").children];
  const start = nodes.findLastIndex((node) => node.classList.contains("user"));
  return start < 0 ? [] : nodes.slice(start);
}

function regenerate() {
  const [mine] = lastTurn();
  if (mine) send(null, { text: mine.querySelector(".body").textContent, replace: true });
}

function editLast() {
  const [mine] = lastTurn();
  if (!mine) return;
  state.editing = state.current;
  $("message").value = mine.querySelector(".body").textContent;
  $("composer-help").textContent =
    "Editing your last message: Enter sends it in place of the last one; Esc cancels.";
  $("message").focus();
}

function stopEditing() {
  state.editing = null;
  $("composer-help").textContent = HELP;
}

// Regenerate under the last reply and Edit under the last message of the open session, while
// no reply is being written there.
function markLastTurn() {
  for (const old of $("transcript").querySelectorAll(".regenerate, .edit")) old.remove();
  if (state.streams.has(state.current)) return;
  const [mine, ...rest] = lastTurn();
  const reply = rest.findLast((node) => node.classList.contains("assistant"));
  if (mine) mine.querySelector("footer").append(action("edit", "Edit", editLast));
  if (reply) reply.querySelector("footer").append(action("regenerate", "Regenerate", regenerate));
}

function action(className, text, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `copy ${className}`;
  button.textContent = text;
  button.addEventListener("click", onClick);
  return button;
}

async function send(event, { text: given, replace = false } = {}) {
  event?.preventDefault();
  const input = $("message");
  const text = given ?? input.value;
  if (!text.trim() || state.streams.has(state.current)) return;
  clearError();
  const sessionId = state.current;
  replace ||= state.editing === sessionId && given === undefined;
  stopEditing();
  const replaced = replace ? lastTurn() : [];
  for (const node of replaced) node.remove();
  if (state.fresh.has(sessionId) && !state.firstWords.has(sessionId)) {
    state.firstWords.set(sessionId, text.split(/\s+/).join(" ").trim().slice(0, 80));
  }
  const mine = addMessage({ role: "user", text });
  const reply = addMessage({ role: "assistant", text: "" });
  reply.setAttribute("aria-busy", "true");
  input.value = "";
  const controller = new AbortController();
  state.streams.set(sessionId, { controller, nodes: null });
  setButtons();
  markLastTurn();
  renderSessions();
  let started = false;
  try {
    const response = await api(`v1/sessions/${encodeURIComponent(sessionId)}/messages`, {
      method: "POST",
      body: { text, vars: {}, replace_last: replace },
      accept: "text/event-stream",
      signal: controller.signal,
    });
    started = true;
    showTitle();
    await readReply(response, reply);
  } catch (err) {
    if (err.name === "AbortError") {
      // The server keeps what it had streamed, marked interrupted, as a reload shows.
      started = true;
      markInterrupted(reply, "interrupted: stopped");
    } else if (!started) {
      // Refused before anything was stored: take the message back for another try.
      state.firstWords.delete(sessionId);
      mine.remove();
      reply.remove();
      // The server put the replaced turn back: so does the page.
      if (state.current === sessionId) $("transcript").append(...replaced);
      if (state.current === sessionId) {
        input.value = given === undefined ? text : "";
        showEmpty();
      }
      handle(err);
    } else {
      markInterrupted(reply, "interrupted: the connection was lost");
      showError(describe(err));
    }
  } finally {
    reply.removeAttribute("aria-busy");
    state.streams.delete(sessionId);
    setButtons();
    renderSessions();
    if (state.current === sessionId) markLastTurn();
    if (started) {
      await refreshSessions();
      if (state.current === sessionId) showTitle();
      if (!$("budget").hidden) loadAccount(); // what is left, when there is a cap to show
    }
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
      reply.text = text;
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
  state.streams.get(state.current)?.controller.abort();
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
  $("menu").addEventListener("click", () =>
    $("app").classList.contains("drawer-open") ? closeDrawer() : openDrawer(),
  );
  $("scrim").addEventListener("click", closeDrawer);
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    if ($("app").classList.contains("drawer-open")) closeDrawer();
    else if (state.editing && !state.streams.has(state.current)) {
      stopEditing();
      $("message").value = "";
    } else stop();
  });
  // Back and Forward (and a fragment typed in the address bar).
  window.addEventListener("popstate", () => {
    const id = sessionFromHash();
    if (state.token && id && id !== state.current) openSession(id, { push: false });
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
