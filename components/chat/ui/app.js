// Keel chat: a small single-page client of the chat component's API.
// Live delivery comes over server-sent events from the host; on every
// (re)connect the open conversation is re-read after the last message
// shown, so nothing is lost when a node restarts.
"use strict";

const BASE = location.pathname.replace(/[^/]*$/, ""); // e.g. "/chat/"
const PAGE = 50;
const DEFAULT_ROOM = "lobby";
const NAME = /^[a-z0-9_-]{1,32}$/;

const $ = (id) => document.getElementById(id);

const state = {
  token: localStorage.getItem("chat.token"),
  user: localStorage.getItem("chat.user"),
  info: null, // GET me
  rooms: new Set([DEFAULT_ROOM]), // joined rooms (live channels)
  serverRooms: new Map(), // name -> last id, as the node knows them
  peers: new Set(), // users with a direct-message conversation
  presence: new Map(), // user -> entry
  unread: new Map(), // "room/x" | "dm/y" -> count
  view: null, // {kind: "room" | "dm", id}
  shown: new Map(), // message id -> <li> of the open conversation
  source: null, // EventSource
  retry: 0,
  retryTimer: null,
};

// ---- API ----

class HttpError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
  }
}

async function call(method, path, body, options = {}) {
  const headers = {};
  if (state.token) headers.authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(BASE + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    keepalive: !!options.keepalive,
  });
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    // No JSON body.
  }
  if (response.status === 401 && path !== "signin") {
    signOut("Your session has ended. Sign in again.");
  }
  if (!response.ok) throw new HttpError(response.status, data);
  return data;
}

const enc = encodeURIComponent;
const convPath = (view) =>
  view.kind === "room" ? `rooms/${enc(view.id)}/messages` : `dm/${enc(view.id)}/messages`;
const viewKey = (view) => `${view.kind}/${view.id}`;

// ---- sign-in ----

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("signin-error").textContent = "";
  const user = $("signin-user").value.trim();
  const password = $("signin-password").value;
  try {
    const reply = await call("POST", "signin", { user, password });
    state.token = reply.token;
    state.user = reply.user;
    localStorage.setItem("chat.token", reply.token);
    localStorage.setItem("chat.user", reply.user);
    $("signin-password").value = "";
    await start();
  } catch (e) {
    $("signin-error").textContent = e.message;
  }
});

$("signout").addEventListener("click", async () => {
  try {
    await call("PUT", "presence", { status: "offline" });
  } catch (_) {
    // Signing out anyway.
  }
  signOut("");
});

function signOut(message) {
  if (state.source) state.source.close();
  state.source = null;
  clearTimeout(state.retryTimer);
  state.token = null;
  state.info = null;
  localStorage.removeItem("chat.token");
  setConnection("offline");
  $("chat-view").hidden = true;
  $("whoami").hidden = true;
  $("signin-view").hidden = false;
  $("signin-error").textContent = message;
  if (state.user) $("signin-user").value = state.user;
}

async function start() {
  state.info = await call("GET", "me");
  state.user = state.info.user;
  const saved = JSON.parse(localStorage.getItem(`chat.rooms.${state.user}`) || "[]");
  state.rooms = new Set([DEFAULT_ROOM, ...saved.filter((r) => NAME.test(r))]);
  $("signin-view").hidden = true;
  $("chat-view").hidden = false;
  $("whoami").hidden = false;
  renderMe();
  await Promise.all([loadRooms(), loadPeers(), loadPresence()]);
  const status = $("status").value || "online";
  call("PUT", "presence", { status }).catch(() => {});
  const last = JSON.parse(localStorage.getItem(`chat.view.${state.user}`) || "null");
  const view = last && (last.kind === "room" || last.kind === "dm") && NAME.test(last.id)
    ? last
    : { kind: "room", id: DEFAULT_ROOM };
  await open(view);
  connect();
}

function renderMe() {
  const info = state.info;
  $("me-user").textContent = info["display-name"] ? `${info["display-name"]} (${info.user})` : info.user;
  $("me-user").title = "Click to set your display name";
  $("me-where").textContent = `${info.region} / ${info.edge}`;
}

$("me-user").addEventListener("click", async () => {
  const name = prompt("Display name (empty to remove)", state.info["display-name"] || "");
  if (name === null) return;
  try {
    state.info = await call("PUT", "me", { "display-name": name });
    renderMe();
  } catch (e) {
    alert(e.message);
  }
});

$("status").addEventListener("change", () => {
  call("PUT", "presence", { status: $("status").value }).catch((e) => {
    $("send-error").textContent = e.message;
  });
});

addEventListener("pagehide", () => {
  if (state.token) call("PUT", "presence", { status: "offline" }, { keepalive: true }).catch(() => {});
});

// ---- live delivery ----

function setConnection(s) {
  const el = document.querySelector('[data-testid="connection"]');
  el.dataset.state = s;
  el.textContent = { live: "live", connecting: "connecting…", offline: "offline" }[s];
}

function channels() {
  return ["presence", `user/${state.user}`, ...[...state.rooms].map((r) => `room/${r}`)];
}

function connect() {
  if (state.source) state.source.close();
  clearTimeout(state.retryTimer);
  if (!state.token || !state.info) return;
  const query = channels().map((c) => `channel=${enc(c)}`);
  query.push(`token=${enc(state.token)}`);
  const source = new EventSource(`${state.info.live}?${query.join("&")}`);
  state.source = source;
  setConnection("connecting");
  source.addEventListener("open", () => {
    state.retry = 0;
    setConnection("live");
    catchUp();
  });
  source.addEventListener("ready", () => setConnection("live"));
  source.addEventListener("message", (e) => onRoomMessage(parse(e.data)));
  source.addEventListener("dm", (e) => onDirectMessage(parse(e.data)));
  source.addEventListener("presence", (e) => onPresence(parse(e.data)));
  source.addEventListener("error", () => {
    if (state.source !== source) return;
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up (e.g. the node answered an error): retry
      // ourselves, slower each time, after checking the session.
      setConnection("offline");
      const delay = Math.min(30000, 1000 * 2 ** state.retry++);
      state.retryTimer = setTimeout(async () => {
        try {
          state.info = await call("GET", "me");
          connect();
        } catch (_) {
          if (state.token) connect();
        }
      }, delay);
    } else {
      setConnection("connecting");
    }
  });
}

function parse(data) {
  try {
    return JSON.parse(data);
  } catch (_) {
    return null;
  }
}

// Reads what arrived while the stream was down.
async function catchUp() {
  loadRooms().catch(() => {});
  loadPeers().catch(() => {});
  loadPresence().catch(() => {});
  if (!state.view) return;
  const view = state.view;
  for (let rounds = 0; rounds < 20; rounds++) {
    const last = lastShownId();
    const path = last
      ? `${convPath(view)}?after=${enc(last)}&limit=${PAGE}`
      : `${convPath(view)}?limit=${PAGE}`;
    const page = await call("GET", path);
    if (state.view !== view) return;
    page.messages.forEach(addMessage);
    if (!last && page.messages.length) $("older").hidden = !page.more;
    if (!last || !page.more) return;
  }
}

function onRoomMessage(m) {
  if (!m || !m.room) return;
  if (state.view && state.view.kind === "room" && state.view.id === m.room) {
    addMessage(m);
  } else {
    bump(`room/${m.room}`);
  }
  state.serverRooms.set(m.room, m.id);
  renderRooms();
}

function onDirectMessage(m) {
  if (!m || !m.to) return;
  const peer = m.from === state.user ? m.to : m.from;
  state.peers.add(peer);
  if (state.view && state.view.kind === "dm" && state.view.id === peer) {
    addMessage(m);
  } else if (m.from !== state.user) {
    bump(`dm/${peer}`);
  }
  renderPeers();
}

function onPresence(entry) {
  if (!entry || !entry.user) return;
  const old = state.presence.get(entry.user);
  if (!old || entry.at >= old.at) state.presence.set(entry.user, entry);
  renderPresence();
  renderPeers();
}

function bump(key) {
  state.unread.set(key, (state.unread.get(key) || 0) + 1);
}

// ---- rooms, peers, presence ----

async function loadRooms() {
  const rooms = await call("GET", "rooms");
  state.serverRooms = new Map(rooms.map((r) => [r.name, r["last-id"]]));
  renderRooms();
}

async function loadPeers() {
  const peers = await call("GET", "dm");
  peers.forEach((p) => state.peers.add(p.user));
  renderPeers();
}

async function loadPresence() {
  const list = await call("GET", "presence");
  state.presence = new Map(list.map((e) => [e.user, e]));
  renderPresence();
  renderPeers();
}

function item(testid, key, label, onclick) {
  const li = document.createElement("li");
  li.dataset.testid = testid;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = label;
  li.append(name);
  const count = state.unread.get(key);
  if (count) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.testid = "unread";
    badge.textContent = String(count);
    li.append(badge);
  }
  if (state.view && viewKey(state.view) === key) li.classList.add("active");
  li.addEventListener("click", onclick);
  return li;
}

function renderRooms() {
  const names = [...new Set([...state.rooms, ...state.serverRooms.keys()])].sort();
  $("rooms").replaceChildren(
    ...names.map((name) => {
      const li = item("room-item", `room/${name}`, `# ${name}`, () => joinRoom(name));
      li.dataset.room = name;
      if (!state.rooms.has(name)) li.classList.add("unjoined");
      return li;
    }),
  );
}

function renderPeers() {
  const peers = [...state.peers].filter((p) => p !== state.user).sort();
  $("dms").replaceChildren(
    ...peers.map((peer) => {
      const li = item("dm-user", `dm/${peer}`, peer, () => open({ kind: "dm", id: peer }));
      li.dataset.user = peer;
      const dot = document.createElement("span");
      dot.className = "dot";
      dot.dataset.status = (state.presence.get(peer) || {}).status || "offline";
      li.prepend(dot);
      return li;
    }),
  );
}

function renderPresence() {
  const entries = [...state.presence.values()].sort((a, b) => a.user.localeCompare(b.user));
  $("presence").replaceChildren(
    ...entries.map((e) => {
      const li = document.createElement("li");
      li.dataset.testid = "presence-entry";
      li.dataset.user = e.user;
      li.dataset.status = e.status;
      li.title = `${e.status} at ${e.region} / ${e.edge}, ${new Date(e.at).toLocaleString()}`;
      const dot = document.createElement("span");
      dot.className = "dot";
      dot.dataset.status = e.status;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = e.user === state.user ? `${e.user} (you)` : e.user;
      const status = document.createElement("span");
      status.className = "place";
      status.dataset.testid = "presence-status";
      status.textContent = `${e.status} · ${e.region}/${e.edge}`;
      li.append(dot, name, status);
      if (e.user !== state.user) li.addEventListener("click", () => open({ kind: "dm", id: e.user }));
      return li;
    }),
  );
}

async function joinRoom(name) {
  if (!state.rooms.has(name)) {
    state.rooms.add(name);
    localStorage.setItem(`chat.rooms.${state.user}`, JSON.stringify([...state.rooms]));
    await call("PUT", `rooms/${enc(name)}`).catch(() => {});
    connect(); // the stream's channels are fixed: reopen it with the new room
  }
  await open({ kind: "room", id: name });
}

$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("join-room").value.trim().toLowerCase();
  if (!NAME.test(name)) return;
  $("join-room").value = "";
  joinRoom(name);
});

$("dm-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const peer = $("dm-user").value.trim().toLowerCase();
  if (!NAME.test(peer)) return;
  $("dm-user").value = "";
  state.peers.add(peer);
  open({ kind: "dm", id: peer });
});

// ---- the open conversation ----

async function open(view) {
  state.view = view;
  state.shown = new Map();
  state.unread.delete(viewKey(view));
  localStorage.setItem(`chat.view.${state.user}`, JSON.stringify(view));
  $("messages").replaceChildren();
  $("older").hidden = true;
  $("send-error").textContent = "";
  $("view-title").textContent = view.kind === "room" ? `# ${view.id}` : `@ ${view.id}`;
  renderRooms();
  renderPeers();
  try {
    const page = await call("GET", `${convPath(view)}?limit=${PAGE}`);
    if (state.view !== view) return;
    page.messages.forEach(addMessage);
    $("older").hidden = !page.more;
    scrollToEnd();
  } catch (e) {
    $("send-error").textContent = e.message;
  }
  $("message-input").focus();
}

function firstShownId() {
  const first = $("messages").firstElementChild;
  return first ? first.dataset.id : null;
}

function lastShownId() {
  const last = $("messages").lastElementChild;
  return last ? last.dataset.id : null;
}

$("older").addEventListener("click", async () => {
  const view = state.view;
  const first = firstShownId();
  if (!view || !first) return;
  const scroller = $("scroller");
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  const page = await call("GET", `${convPath(view)}?before=${enc(first)}&limit=${PAGE}`);
  if (state.view !== view) return;
  page.messages.forEach(addMessage);
  $("older").hidden = !page.more;
  scroller.scrollTop = scroller.scrollHeight - fromBottom;
});

function addMessage(m) {
  if (!m || state.shown.has(m.id)) return;
  const scroller = $("scroller");
  const atEnd = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  const li = document.createElement("li");
  li.dataset.testid = "message-item";
  li.dataset.id = m.id;
  if (m.from === state.user) li.classList.add("mine");
  const from = document.createElement("span");
  from.className = "from";
  from.dataset.testid = "message-from";
  from.textContent = m.name ? `${m.name} (${m.from})` : m.from;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `${new Date(m.at).toLocaleTimeString()} · ${m.region}/${m.edge}`;
  const text = document.createElement("div");
  text.className = "text";
  text.dataset.testid = "message-text";
  text.textContent = m.text;
  li.append(from, meta, text);
  // Ids order by time: keep the list sorted even when messages from
  // far away arrive late.
  const list = $("messages");
  let next = null;
  for (let el = list.lastElementChild; el && el.dataset.id > m.id; el = el.previousElementSibling) {
    next = el;
  }
  list.insertBefore(li, next);
  state.shown.set(m.id, li);
  if (atEnd && !next) scrollToEnd();
}

function scrollToEnd() {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
}

$("send-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("message-input");
  const text = input.value.trim();
  if (!text || !state.view) return;
  $("send-error").textContent = "";
  try {
    const m = await call("POST", convPath(state.view), { text });
    input.value = "";
    addMessage(m);
    scrollToEnd();
    if (m.to) {
      state.peers.add(m.to);
      renderPeers();
    }
  } catch (e) {
    $("send-error").textContent = e.message;
  }
});

// ---- boot ----

if (state.token && state.user) {
  start().catch(() => signOut(""));
} else {
  signOut("");
}
