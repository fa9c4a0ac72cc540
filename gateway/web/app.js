// The web chat page: log in with a token, conversations with contacts and
// groups, delivery/read ticks, presence, typing. All protocol work is in
// switchboard.js; this file is state + rendering. History lives in this
// browser's localStorage (the server keeps only what is not yet delivered).
import { Client, idProblem } from "./switchboard.js";

const $ = (id) => document.getElementById(id);
const RANK = { failed: -1, pending: 0, sent: 1, delivered: 2, read: 3 };
const TICKS = { failed: "!", pending: "🕓", sent: "✓", delivered: "✓✓", read: "✓✓" };
const KEEP = 200;                    // messages kept per conversation
const TYPING_SHOWN_MS = 6000;

let client = null;
let me = "";
let device = "";
let current = null;                  // the open conversation's peer (user id or #group)
const convs = new Map();             // peer -> {msgs, unread, presence, typingUntil, group}
const ownById = new Map();           // msg id (string) -> own message, to apply receipts
const early = new Map();             // receipts that came before their ACK
let renderQueued = false;

// -- persistence --------------------------------------------------------------------------
const key = (what) => `sb:${me}:${what}`;
function userOfToken(token) {
  try {
    const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const raw = Uint8Array.from(atob(b64 + "===".slice((b64.length + 3) % 4)), (c) => c.charCodeAt(0));
    return new TextDecoder().decode(raw.subarray(1, 1 + raw[0]));
  } catch { return ""; }
}
function save() {
  const out = {};
  for (const [peer, c] of convs) out[peer] = { msgs: c.msgs.slice(-KEEP), unread: c.unread, group: c.group };
  localStorage.setItem(key("history"), JSON.stringify(out));
  if (client) localStorage.setItem(key(`${device}:resume`), client.ackedHwm.toString());
}
function load() {
  convs.clear();
  ownById.clear();
  const data = JSON.parse(localStorage.getItem(key("history")) || "{}");
  for (const [peer, c] of Object.entries(data)) {
    const conv = conv_(peer);
    Object.assign(conv, { msgs: c.msgs || [], unread: c.unread || 0 });
    for (const m of conv.msgs) {
      if (m.mine && m.id) ownById.set(m.id, m);
      if (m.mine && m.state === "pending") m.state = "failed";   // its send died with the last page
    }
  }
}
function conv_(peer) {
  let c = convs.get(peer);
  if (!c) {
    c = { msgs: [], unread: 0, presence: null, typingUntil: 0, group: peer.startsWith("#") };
    convs.set(peer, c);
    if (!c.group && client) client.subscribe(peer);
  }
  return c;
}

// -- rendering ----------------------------------------------------------------------------
function render() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; renderSidebar(); renderChat(); });
}
function avatar(el, name) {
  el.textContent = (name.replace(/^#/, "")[0] || "?").toUpperCase();
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.charCodeAt(0)) % 360;
  el.style.background = `hsl(${h} 45% 50%)`;
}
function lastSeen(p) {
  if (!p) return "";
  if (p.online) return "online";
  if (!p.lastSeenMs) return "offline";
  const d = new Date(p.lastSeenMs);
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const today = new Date().toDateString() === d.toDateString();
  return `last seen ${today ? "today" : d.toLocaleDateString()} at ${time}`;
}
function renderSidebar() {
  const ul = $("contacts");
  const items = [...convs.entries()].sort((a, b) => lastTs(b[1]) - lastTs(a[1]));
  ul.replaceChildren(...items.map(([peer, c]) => {
    const li = document.createElement("li");
    li.className = "contact" + (peer === current ? " active" : "");
    li.dataset.peer = peer;
    const av = document.createElement("span");
    av.className = "avatar";
    avatar(av, peer);
    const info = document.createElement("div");
    info.className = "info";
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = peer;
    const last = document.createElement("div");
    last.className = "last";
    const lm = c.msgs[c.msgs.length - 1];
    last.textContent = typing(c) ? "typing…" : lm ? (lm.mine ? "You: " : "") + lm.text : "";
    info.append(name, last);
    const dot = document.createElement("span");
    dot.className = "dot" + (c.presence?.online ? " online" : "");
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = c.unread ? String(c.unread) : "";
    li.append(av, info, badge, dot);
    li.onclick = () => open(peer);
    return li;
  }));
}
const lastTs = (c) => (c.msgs.length ? c.msgs[c.msgs.length - 1].ts : 0);
const typing = (c) => c.typingUntil > Date.now();
function renderChat() {
  const c = current && convs.get(current);
  $("composer").hidden = !c;
  $("peer-name").textContent = current || "Pick a conversation";
  avatar($("peer-avatar"), current || "?");
  if (!c) { $("messages").replaceChildren(); $("peer-status").textContent = ""; return; }
  $("peer-status").textContent = typing(c) ? "typing…" : c.group ? "group" : lastSeen(c.presence);
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren(...c.msgs.map((m) => {
    const li = document.createElement("li");
    li.className = "msg" + (m.mine ? " mine" : "");
    if (m.id) li.dataset.id = m.id;
    if (m.mine) li.dataset.state = m.state;
    if (c.group && !m.mine) {
      const from = document.createElement("div");
      from.className = "from";
      from.textContent = m.from;
      li.append(from);
    }
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = m.text;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = new Date(m.ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (m.mine) {
      const t = document.createElement("span");
      t.className = "tick";
      t.textContent = TICKS[m.state];
      t.title = m.state;
      meta.append(t);
    }
    li.append(text, meta);
    return li;
  }));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

// -- conversation actions -------------------------------------------------------------------
function open(peer) {
  current = peer;
  conv_(peer);
  $("app").classList.add("open");
  markRead();
  render();
  $("composer-input").focus();
}
function markRead() {
  const c = current && convs.get(current);
  if (!c || document.visibilityState !== "visible" || !client?.connected) return;
  const unread = c.msgs.filter((m) => !m.mine && !m.readSent && m.id);
  if (unread.length) {
    client.read(...unread.map((m) => ({ sender: m.from, id: BigInt(m.id), group: m.group,
      originId: BigInt(m.originId || 0) })));
    unread.forEach((m) => { m.readSent = true; });
  }
  if (c.unread) { c.unread = 0; save(); render(); }
}
function upgrade(m, state) {
  if (RANK[state] > RANK[m.state]) m.state = state;
}
async function sendText(text) {
  const peer = current;
  const c = conv_(peer);
  const m = { mine: true, text, ts: Date.now(), state: "pending", id: null };
  c.msgs.push(m);
  render();
  try {
    const ack = await client.send(peer, text);
    m.id = ack.id.toString();
    m.ts = ack.ts;
    upgrade(m, "sent");
    ownById.set(m.id, m);
    for (const kind of early.get(m.id) || []) upgrade(m, kind);
    early.delete(m.id);
  } catch (err) {
    m.state = "failed";
    m.error = String(err.message || err);
  }
  save();
  render();
}

// -- client events ----------------------------------------------------------------------------
function onMessage(m) {
  const mine = m.mirror || m.sender === me;
  const peer = m.group || (m.mirror ? m.peer : m.sender);
  const c = conv_(peer);
  const entry = { mine, id: m.id.toString(), ts: Number(m.ts), from: m.sender, group: !!m.group,
    originId: m.originId.toString(), text: m.text ?? `[${m.payload.length} bytes]` };
  if (mine) {
    entry.state = "sent";
    entry.id = (m.group ? m.originId : m.originId || m.id).toString();   // receipts name the sender's ACK id
    ownById.set(entry.id, entry);
  } else {
    if (peer !== current || document.visibilityState !== "visible") c.unread++;
  }
  c.typingUntil = 0;
  c.msgs.push(entry);
  if (c.msgs.length > KEEP) c.msgs.splice(0, c.msgs.length - KEEP);
  client.ack(m);
  if (peer === current) markRead();
  save();
  render();
}
function onReceipt(r) {
  const id = r.msgId.toString();
  const m = ownById.get(id);
  if (!m) {
    early.set(id, [...(early.get(id) || []), r.kind]);
  } else {
    upgrade(m, r.kind);
  }
  save();
  render();
}

function start(token, dev) {
  me = userOfToken(token) || "me";
  device = dev;
  load();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const resume = BigInt(localStorage.getItem(key(`${device}:resume`)) || "0");
  client = new Client({ url: `${proto}//${location.host}/ws`, token, device, resumeAfter: resume });
  client.addEventListener("message", (e) => onMessage(e.detail));
  client.addEventListener("receipt", (e) => onReceipt(e.detail));
  client.addEventListener("presence", (e) => {
    const c = conv_(e.detail.user);
    c.presence = e.detail;
    if (e.detail.online === false) c.typingUntil = 0;
    render();
  });
  client.addEventListener("typing", (e) => {
    const c = conv_(e.detail.peer);
    c.typingUntil = e.detail.typing ? Date.now() + TYPING_SHOWN_MS : 0;
    render();
    setTimeout(render, TYPING_SHOWN_MS + 50);
  });
  client.addEventListener("status", (e) => {
    $("conn-status").textContent = { online: "online", connecting: "connecting…", offline: "reconnecting…",
      closed: "disconnected" }[e.detail];
    if (e.detail === "online") markRead();
  });
  client.addEventListener("error", (e) => { $("conn-status").textContent = String(e.detail.message || e.detail); });
  for (const [peer, c] of convs) if (!c.group) client.subscribe(peer);
  return client.connect().then((w) => {
    me = w.user;
    $("me").textContent = `${w.user} · ${w.device}`;
    avatar($("me-avatar"), w.user);
    $("login").hidden = true;
    $("app").hidden = false;
    render();
  });
}

// -- wiring -----------------------------------------------------------------------------------
$("login-device").value = localStorage.getItem("sb:device") || `web-${Math.random().toString(36).slice(2, 6)}`;
$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("login-token").value.trim();
  const dev = $("login-device").value.trim();
  $("login-error").textContent = idProblem(dev, "A device name");   // ids count bytes, not characters
  if ($("login-error").textContent) return;
  $("login-button").disabled = true;
  start(token, dev).then(() => {
    sessionStorage.setItem("sb:token", token);
    localStorage.setItem("sb:device", dev);
  }).catch((err) => {
    $("login-error").textContent = String(err.message || err);
    client?.close();
    client = null;
  }).finally(() => { $("login-button").disabled = false; });
});
$("logout").addEventListener("click", () => {
  client?.close();
  sessionStorage.removeItem("sb:token");
  location.reload();
});
$("add-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const peer = $("add-contact").value.trim();
  $("add-error").textContent = idProblem(peer, peer.startsWith("#") ? "A group id" : "A user id");
  if (!peer || $("add-error").textContent) return;
  $("add-contact").value = "";
  open(peer);
  save();
});
$("group-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const id = $("group-id").value.trim();
  const members = $("group-members").value.split(",").map((s) => s.trim()).filter(Boolean);
  const name = $("group-name").value.trim() || id;
  $("group-error").textContent = idProblem(id, "A group id") || idProblem(name, "A group name") ||
    members.map((m) => idProblem(m, `Member ${m}`) || (m.startsWith("#") ? `Member ${m} is a group id` : ""))
      .find(Boolean) || "";
  if ($("group-error").textContent) return;
  try {
    await client.group("create", id, { name, members });
    e.target.reset();
    open(id);
    save();
  } catch (err) {
    $("group-error").textContent = String(err.message || err);
  }
});
let typingSent = 0;
let typingStop = null;
$("composer-input").addEventListener("input", () => {
  if (!current || current.startsWith("#") || !client?.connected) return;
  const now = Date.now();
  if (now - typingSent > 3000) { client.typing(current, true); typingSent = now; }
  clearTimeout(typingStop);
  const peer = current;
  typingStop = setTimeout(() => { client?.typing(peer, false); typingSent = 0; }, 4000);
});
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("composer-input").value;
  if (!text.trim() || !current) return;
  $("composer-input").value = "";
  if (typingSent && !current.startsWith("#")) { client.typing(current, false); typingSent = 0; }
  clearTimeout(typingStop);
  sendText(text);
});
document.addEventListener("visibilitychange", markRead);
const saved = sessionStorage.getItem("sb:token");
if (saved) {
  $("login-token").value = saved;
  $("login-button").click();
}
