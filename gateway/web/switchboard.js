// Switchboard JavaScript client: the binary protocol (docs/PROTOCOL.md) over a
// WebSocket, as an ES module with no build step and no dependencies.
//
//   import { Client } from "./switchboard.js";
//   const c = new Client({ url: "ws://host:7401/ws", token, device: "laptop" });
//   // or seeds tried in turn: new Client({ urls: ["ws://a:7401/ws", "ws://b:7401/ws"], token, device })
//   c.addEventListener("message", (e) => { show(e.detail); c.ack(e.detail); });
//   await c.connect();
//   const { id } = await c.send("bob", "hello");      // resolves once the server stored it
//
// Semantics follow gateway/client.py: every DELIVER reaches the application
// once (ids at or below the highest handed out are dropped), `resumeAfter` is
// the highest id the application acknowledged, sends without an ACK are
// sent again with their seqs, in order, after a reconnect (the server drops
// duplicates), subscriptions are renewed after every WELCOME. With several
// `urls` (seeds) a failed or lost connection moves on to the next one, with the
// backoff once per round of all of them; a GOAWAY REDIRECT (a cluster node that
// does not serve the user) is followed at once to the node named, keeping this
// URL's scheme and path, at most MAX_REDIRECTS - 1 times in a row (PROTOCOL.md
// section 3, GOAWAY).
//
// Events (CustomEvent, data in `detail`): welcome, message, receipt, presence,
// typing, status ("connecting" | "online" | "offline" | "closed"), error.
// Ids (msg ids, origin ids, seqs, producers, receipt ids, resumeAfter) are BigInt
// end to end: ids are ms << 22 | worker << 16 | sequence, above 2^53, where a
// Number has already lost digits. Methods taking ids (ack, read, resumeAfter)
// accept BigInt or a decimal string (how JSON keeps them) and refuse a Number
// that is not a safe integer. Timestamps (ts, lastSeenMs) are Numbers (ms).

export const FrameType = Object.freeze({
  HELLO: 0x01, WELCOME: 0x02, SEND: 0x03, ACK: 0x04, DELIVER: 0x05, RECEIVED: 0x06, PING: 0x07,
  PONG: 0x08, ERROR: 0x09, GOAWAY: 0x0a, RECEIPT: 0x0b, READ: 0x0c, SUBSCRIBE: 0x0d, PRESENCE: 0x0e,
  TYPING: 0x0f, PRIVACY: 0x10, GROUP: 0x11, GROUP_INFO: 0x12,
});
export const ErrorCode = Object.freeze({
  MALFORMED_FRAME: 1, FRAME_TOO_LARGE: 2, UNKNOWN_FRAME_TYPE: 3, UNEXPECTED_FRAME: 4,
  UNSUPPORTED_VERSION: 5, AUTH_FAILED: 10, TOKEN_EXPIRED: 11, HELLO_TIMEOUT: 12, BAD_RECIPIENT: 20,
  PAYLOAD_TOO_LARGE: 21, RATE_LIMITED: 22, QUOTA_EXCEEDED: 23, STORAGE_FULL: 24, UNAVAILABLE: 25,
  DEVICE_LIMIT: 26, NOT_A_MEMBER: 27, NOT_ADMIN: 28, GROUP_FULL: 29, NO_SUCH_GROUP: 30,
  GROUP_EXISTS: 31, BAD_REQUEST: 32, OUT_OF_ORDER: 33, FENCED: 34, INTERNAL: 50,
});
export const PROTOCOL_VERSION = 2;
// a SEND refused with these is sent again (same seq, in order, after a backoff); others fail it
const RESEND = new Set([ErrorCode.UNAVAILABLE, ErrorCode.STORAGE_FULL, ErrorCode.RATE_LIMITED,
  ErrorCode.OUT_OF_ORDER]);
const RESEND_FIRST_MS = 50, RESEND_MAX_MS = 2000;
const GROUP_OPS = { create: 1, add: 2, remove: 3, promote: 4, demote: 5, leave: 6, rename: 7, info: 8 };
const FATAL_AUTH = new Set([ErrorCode.AUTH_FAILED, ErrorCode.TOKEN_EXPIRED, ErrorCode.UNSUPPORTED_VERSION,
  ErrorCode.DEVICE_LIMIT, ErrorCode.FENCED]);
const FLAG_FATAL = 0x01, FLAG_SEND_ONLY = 0x01, FLAG_MIRROR = 0x02, FLAG_GROUP = 0x04, FLAG_MORE = 0x01;
const GOAWAY_REPLACED = 2, GOAWAY_REDIRECT = 6;
// REDIRECTs in a row without a WELCOME: the third is not followed (two nodes with
// different shard maps could bounce a client forever); the client goes on with its seeds
export const MAX_REDIRECTS = 3;
const MAX_IDS = 4096;
const MAX_SUBSCRIBE = 1024;
const U64_MAX = 0xFFFFFFFFFFFFFFFFn;
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder("utf-8", { fatal: true });

export class ServerError extends Error {
  constructor(code, reason, ref = 0n, fatal = false) {
    const name = Object.keys(ErrorCode).find((k) => ErrorCode[k] === code) || `code ${code}`;
    super(`${name}: ${reason}`);
    Object.assign(this, { code, reason, ref, fatal, name: "ServerError" });
  }
}

// -- ids ---------------------------------------------------------------------------------

/** A u64 as BigInt, exactly: a BigInt as it is, a decimal string parsed, a Number
 *  only while it is a safe integer (past 2^53 it has already been rounded). */
export function toU64(v) {
  let b = null;
  if (typeof v === "bigint") b = v;
  else if (typeof v === "string" && /^[0-9]{1,20}$/.test(v)) b = BigInt(v);
  else if (typeof v === "number" && Number.isSafeInteger(v)) b = BigInt(v);
  if (b === null) {
    throw new TypeError(`a u64 id must be a BigInt or a decimal string, not ${typeof v} ${String(v)}` +
      (Number.isInteger(v) ? " (a Number above 2^53 has lost digits)" : ""));
  }
  if (b < 0n || b > U64_MAX) throw new RangeError(`not a u64: ${b}`);
  return b;
}

/** Why `s` cannot be an id (a user, device or group id: 1..255 bytes of UTF-8), or "" if it
 * can. Lengths count bytes, not characters: 255 ASCII letters, or 85 characters such as €. */
export function idProblem(s, what = "an id") {
  const n = utf8.encode(s).length;
  return n >= 1 && n <= 255 ? "" : `${what} must be 1..255 bytes of UTF-8 (this is ${n})`;
}

// -- encoding ---------------------------------------------------------------------------

/** Builds one frame: u32 length, u8 type, u8 flags, body. */
class FrameWriter {
  constructor(type, flags = 0) {
    this.parts = [];
    this.size = 0;
    this.type = type;
    this.flags = flags;
  }
  bytes(b) { this.parts.push(b); this.size += b.length; return this; }
  u8(v) { return this.bytes(Uint8Array.of(v)); }
  u16(v) { const b = new Uint8Array(2); new DataView(b.buffer).setUint16(0, v); return this.bytes(b); }
  u64(v) { const b = new Uint8Array(8); new DataView(b.buffer).setBigUint64(0, toU64(v)); return this.bytes(b); }
  str8(s, min = 1) {
    const b = utf8.encode(s);
    if (b.length < min || b.length > 255) throw new RangeError(`id must be ${min}..255 bytes: ${s}`);
    return this.u8(b.length).bytes(b);
  }
  str16(s) {
    const b = utf8.encode(s);
    if (b.length > 65535) throw new RangeError("string too long");
    return this.u16(b.length).bytes(b);
  }
  done() {
    const out = new Uint8Array(6 + this.size);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, this.size + 2);
    out[4] = this.type;
    out[5] = this.flags;
    let o = 6;
    for (const p of this.parts) { out.set(p, o); o += p.length; }
    return out;
  }
}

// -- decoding ---------------------------------------------------------------------------

class Reader {
  constructor(bytes, start, end) {
    this.b = bytes; this.dv = new DataView(bytes.buffer, bytes.byteOffset); this.p = start; this.end = end;
  }
  need(n) { if (this.end - this.p < n) throw new Error("truncated frame"); }
  u8() { this.need(1); return this.b[this.p++]; }
  u16() { this.need(2); const v = this.dv.getUint16(this.p); this.p += 2; return v; }
  u32() { this.need(4); const v = this.dv.getUint32(this.p); this.p += 4; return v; }
  u64() { this.need(8); const v = this.dv.getBigUint64(this.p); this.p += 8; return v; }
  raw(n) { this.need(n); const v = this.b.subarray(this.p, this.p + n); this.p += n; return v; }
  str8() { return fromUtf8.decode(this.raw(this.u8())); }
  str16() { return fromUtf8.decode(this.raw(this.u16())); }
  rest() { return this.raw(this.end - this.p).slice(); }
}

/** Every protocol frame in one binary message (a message holds whole frames). */
export function decodeFrames(bytes) {
  const out = [];
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 0;
  while (pos < bytes.length) {
    if (bytes.length - pos < 6) throw new Error("message ends inside a frame header");
    const len = dv.getUint32(pos);
    if (len < 2 || pos + 4 + len > bytes.length) throw new Error("message ends inside a frame");
    const type = bytes[pos + 4], flags = bytes[pos + 5];
    out.push(decodeBody(type, flags, new Reader(bytes, pos + 6, pos + 4 + len)));
    pos += 4 + len;
  }
  return out;
}

function decodeBody(type, flags, r) {
  const T = FrameType;
  switch (type) {
    case T.WELCOME: return { type, version: r.u16(), sessionId: r.u64(), user: r.str8(), device: r.str8(),
      maxFrame: r.u32(), maxPayload: r.u32(), pingIntervalMs: r.u32(), serverTimeMs: r.u64(),
      producer: r.u64(), sendWindow: r.u32() };
    case T.ACK: return { type, seq: r.u64(), id: r.u64(), ts: r.u64() };
    case T.DELIVER: {
      const f = { type, id: r.u64(), ts: r.u64(), sender: r.str8(), senderDevice: r.str8(), peer: "",
        originId: 0n, mirror: !!(flags & FLAG_MIRROR), group: "" };
      if (flags & (FLAG_MIRROR | FLAG_GROUP)) {
        const peer = r.str8();
        f.originId = r.u64();
        if (flags & FLAG_GROUP) f.group = peer; else f.peer = peer;
      }
      f.payload = r.rest();
      return f;
    }
    case T.RECEIPT: return { type, id: r.u64(), kind: r.u8() === 2 ? "read" : "delivered", msgId: r.u64(),
      by: r.str8(), byDevice: r.str8(), ts: r.u64() };
    case T.PRESENCE: return { type, user: r.str8(), online: r.u8() !== 0, lastSeenMs: Number(r.u64()) };
    case T.TYPING: return { type, peer: r.str8(), typing: r.u8() !== 0 };
    // `text` is the answer's JSON, or a piece of it when `more` (the next GROUP_INFO continues it)
    case T.GROUP_INFO: return { type, requestId: r.u64(), text: r.str16(), more: !!(flags & FLAG_MORE) };
    case T.ERROR: return { type, code: r.u16(), ref: r.u64(), reason: r.str16(), fatal: !!(flags & FLAG_FATAL) };
    case T.GOAWAY: return { type, code: r.u16(), reconnectMs: r.u32(), reason: r.str16() };
    case T.PING: case T.PONG: return { type, nonce: r.u64() };
    default: throw new Error(`unknown frame type ${type}`);
  }
}

function randomId() {
  const b = new Uint8Array(8);
  crypto.getRandomValues(b.subarray(1));     // 56 random bits: room to count up
  return new DataView(b.buffer).getBigUint64(0);
}

/** The URL to follow a REDIRECT to: `address` (HOST:PORT, IPv6 as [ADDR]:PORT) in place of
 *  the current URL's host and port, keeping its scheme and path. Throws on a bad address. */
export function redirectUrl(current, address) {
  if (!/^(\[[0-9A-Fa-f:.]+\]|[^\s:/?#@[\]]+):[0-9]{1,5}$/.test(address)) {
    throw new RangeError(`GOAWAY REDIRECT to an address that is not HOST:PORT: ${address}`);
  }
  const u = new URL(current);
  u.host = address;
  return u.href;
}

// -- the client -------------------------------------------------------------------------

export class Client extends EventTarget {
  /**
   * @param {object} o
   * @param {string} [o.url]       ws://host:port/ws
   * @param {string[]} [o.urls]     seeds tried in turn instead of one url (the first is tried first)
   * @param {string} o.token       from `switchboard token issue`
   * @param {string} o.device      this device's id
   * @param {bigint|string} [o.resumeAfter] highest id already processed (persist it, as a string)
   * @param {boolean} [o.sendOnly]  a sender that is no device
   * @param {boolean} [o.reconnect] re-connect with backoff (default true)
   */
  constructor({ url, urls, token, device = "web", resumeAfter = 0n, sendOnly = false, reconnect = true,
    maxBackoffMs = 5000 }) {
    super();
    const problem = idProblem(device, "a device id");
    if (problem) throw new RangeError(problem);
    const seeds = urls?.length ? [...urls] : [url];
    for (const u of seeds) new URL(u);      // a bad seed fails here, not on the first reconnect
    Object.assign(this, { token, device, sendOnly, reconnect, maxBackoffMs });
    this.urls = seeds;
    this.seed = 0;                        // index of the seed in use (or the last tried)
    this.url = seeds[0];                  // the URL of the current connection (a seed, or a REDIRECT's)
    this.triesLeft = seeds.length;        // seeds left in this round before the backoff
    this.redirectTo = null;               // where the next try goes at once (a REDIRECT)
    this.hops = 0;                        // REDIRECTs since the last WELCOME (or the last seed)
    this.welcome = null;
    this.ws = null;
    this.seenHwm = toU64(resumeAfter);    // highest id handed to the application
    this.ackedHwm = this.seenHwm;         // highest id the application acknowledged: resume_after
    this.nextId = randomId();             // nonces and group request ids
    this.producer = 0n;                   // whose seqs our SENDs carry (from WELCOME)
    this.nextSeq = 1n;
    this.outbox = new Map();              // seq -> {frame, resolve, reject, sent, refused}, in seq order
    this.resendTimer = null;
    this.resendDelay = RESEND_FIRST_MS;
    this.requests = new Map();            // group request id -> {resolve, reject, pieces}
    this.pongs = new Map();
    this.watching = new Set();
    this.pending = [];                    // frames queued this task, sent as one message
    this.pendingSize = 0;
    this.closed = false;
    this.fatal = null;
    this.backoff = 100;
    this.reconnectHintMs = 0;
    this.reconnects = 0;
    this.pingTimer = null;
    this.lastHeard = 0;
  }

  get connected() { return !!this.ws && this.ws.readyState === WebSocket.OPEN && !!this.welcome; }

  _emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  /** Connect and complete HELLO/WELCOME; rejects on a fatal error (bad token...). */
  connect() {
    this.closed = false;
    return new Promise((resolve, reject) => this._open(resolve, reject));
  }

  _open(resolve, reject) {
    this._emit("status", "connecting");
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.welcome = null;
    let settled = false;
    ws.onopen = () => {
      const f = new FrameWriter(FrameType.HELLO, this.sendOnly ? FLAG_SEND_ONLY : 0)
        .u16(PROTOCOL_VERSION).str16(this.token).str8(this.device).u64(this.ackedHwm).u64(this.producer).done();
      ws.send(f);
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      this.lastHeard = Date.now();
      let frames;
      try {
        frames = decodeFrames(new Uint8Array(ev.data));
      } catch (err) {
        this._emit("error", err);
        ws.close(1002, "bad frame");
        return;
      }
      for (const f of frames) {
        if (f.type === FrameType.WELCOME && !settled) {
          settled = true;
          this._welcomed(f);
          resolve?.(f);
        } else if (f.type === FrameType.GOAWAY && f.code === GOAWAY_REDIRECT && !settled) {
          this.hops++;
          this.redirectTo = null;
          if (this.hops < MAX_REDIRECTS) {
            try { this.redirectTo = redirectUrl(this.url, f.reason); } catch (err) { this._emit("error", err); }
          }
          ws.close(1000, "redirected");
        } else if (f.type === FrameType.ERROR && f.fatal && !settled) {
          settled = true;
          const err = new ServerError(f.code, f.reason, f.ref, true);
          if (FATAL_AUTH.has(f.code)) this.fatal = err;
          this._emit("error", err);
          if (f.code !== ErrorCode.UNAVAILABLE || !this.reconnect) reject?.(err);
          else settled = false;             // the user's worker restarts: retried below
        } else {
          this._frame(f);
        }
      }
    };
    // a failed connect fires "error"; browsers then fire "close", but Node's WebSocket
    // (undici, Node 20) may not, and stays CONNECTING: the first of the two ends this try
    let ended = false;
    ws.onerror = () => ws.onclose({ code: 1006 });   // (closing it here would make undici fire error again)
    ws.onclose = (ev) => {
      if (ended || ws !== this.ws) return;
      ended = true;
      clearInterval(this.pingTimer);
      this.welcome = null;
      for (const { reject: rj } of this.pongs.values()) rj(new Error("connection lost"));
      this.pongs.clear();
      const next = this._nextTry();
      // without reconnect, a first connect still tries every seed (and follows REDIRECTs) once
      if (this.closed || this.fatal || (!this.reconnect && (settled || next.roundDone))) {
        this.closed = true;
        this._emit("status", "closed");
        if (!settled) reject?.(this.fatal || new Error(`connection closed (${ev.code})`));
        this._failAll(this.fatal || new Error("client closed"));
        return;
      }
      this._emit("status", "offline");
      setTimeout(() => {
        if (!this.closed) this._open(settled ? null : resolve, settled ? null : reject);
      }, next.wait);
    };
  }

  /** Where the next try goes, and after how long: a REDIRECT's URL at once (it is no
   * failure), else the next seed; the backoff only once every seed of the round failed. */
  _nextTry() {
    if (this.redirectTo) {
      this.url = this.redirectTo;
      this.redirectTo = null;
      return { wait: 0, roundDone: false };
    }
    this.hops = 0;
    this.seed = (this.seed + 1) % this.urls.length;
    this.url = this.urls[this.seed];
    let wait = this.reconnectHintMs, roundDone = false;
    if (--this.triesLeft <= 0) {
      roundDone = true;
      this.triesLeft = this.urls.length;
      wait = Math.max(this.reconnectHintMs, this.backoff) * (0.5 + Math.random() / 2);
      this.backoff = Math.min(this.backoff * 2, this.maxBackoffMs);
    }
    this.reconnectHintMs = 0;
    return { wait, roundDone };
  }

  _welcomed(w) {
    this.backoff = 100;
    this.hops = 0;
    this.triesLeft = this.urls.length;
    this.reconnects++;
    this.welcome = w;
    this.producer = w.producer;
    for (const entry of this.outbox.values()) entry.sent = entry.refused = false;
    this._sendOutbox();                     // in seq order, with their seqs: the server drops retries
    if (this.watching.size) this._subscribeFrames([...this.watching], true);
    clearInterval(this.pingTimer);
    const interval = Math.max(1000, w.pingIntervalMs);
    this.pingTimer = setInterval(() => {
      if (Date.now() - this.lastHeard > 2 * interval) { this.ws?.close(4000, "no answer"); return; }
      this._queue(new FrameWriter(FrameType.PING).u64(this.nextId++).done());
    }, interval);
    this._emit("status", "online");
    this._emit("welcome", w);
  }

  close() {
    this.closed = true;
    clearInterval(this.pingTimer);
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "bye");
  }

  // -- sending ----------------------------------------------------------------------------

  /** Frames written in one task go out as one WebSocket message (whole frames). */
  _queue(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    const limit = (this.welcome?.maxFrame ?? 4096) + 4;
    if (this.pendingSize + frame.length > limit) this._flush();
    this.pending.push(frame);
    this.pendingSize += frame.length;
    if (this.pending.length === 1) queueMicrotask(() => this._flush());
  }

  _flush() {
    if (!this.pending.length) return;
    const out = new Uint8Array(this.pendingSize);
    let o = 0;
    for (const f of this.pending) { out.set(f, o); o += f.length; }
    this.pending = [];
    this.pendingSize = 0;
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(out);
  }

  _check() {
    if (this.fatal) throw this.fatal;
    if (this.closed) throw new Error("client is closed");
  }

  /** Send text or bytes; resolves {seq, id, ts} when stored, rejects if refused for good.
   * Sends are one ordered stream (PROTOCOL.md section 6): at most welcome.sendWindow in flight,
   * the rest wait; one refused for now is sent again, in seq order, after a backoff. */
  send(to, payload) {
    this._check();
    const bytes = typeof payload === "string" ? utf8.encode(payload) : payload;
    if (this.welcome && bytes.length > this.welcome.maxPayload) {
      return Promise.reject(new ServerError(ErrorCode.PAYLOAD_TOO_LARGE, "payload too large"));
    }
    const seq = this.nextSeq;
    const frame = new FrameWriter(FrameType.SEND).u64(seq).str8(to).bytes(bytes).done();
    this.nextSeq++;                       // after the encoding: a bad recipient uses up no seq
    return new Promise((resolve, reject) => {
      this.outbox.set(seq, { frame, resolve, reject, sent: false, refused: false });
      this._sendOutbox();
    });
  }

  /** Write outbox entries not on the wire yet, oldest first, within the send window. */
  _sendOutbox() {
    if (!this.connected) return;
    let inFlight = 0;
    const window = this.welcome.sendWindow || 256;
    for (const entry of this.outbox.values()) {
      if (inFlight >= window) break;
      if (!entry.sent) { entry.sent = true; this._queue(entry.frame); }
      inFlight++;
    }
  }

  _answered(seq) {
    const entry = this.outbox.get(seq);
    if (entry) { this.outbox.delete(seq); this._sendOutbox(); }
    return entry;
  }

  _refused(seq) {
    const entry = this.outbox.get(seq);
    if (!entry) return;
    entry.refused = true;
    if (this.resendTimer) return;
    const delay = this.resendDelay * (0.5 + Math.random() / 2);
    this.resendDelay = Math.min(this.resendDelay * 2, RESEND_MAX_MS);
    this.resendTimer = setTimeout(() => {
      this.resendTimer = null;
      if (!this.connected) return;          // the reconnect resends the whole outbox
      // from the lowest refused one, every SEND on the wire without an answer, refused or not:
      // a later one's refusal may still be on its way, and a resend that skips it stores out of order
      let from = false;
      for (const e of this.outbox.values()) {
        from = from || e.refused;
        if (from && e.sent) { e.refused = false; this._queue(e.frame); }
      }
    }, delay);
  }

  /** Acknowledge delivered messages, or their ids (the server may drop them; the sender gets DELIVERED). */
  ack(...messages) {
    const ids = messages.map((m) => toU64(typeof m === "object" && m !== null ? m.id : m));
    for (const id of ids) if (id > this.ackedHwm) this.ackedHwm = id;
    this._received(ids);
  }

  _received(ids) {
    for (let i = 0; i < ids.length; i += MAX_IDS) {
      const chunk = ids.slice(i, i + MAX_IDS);
      const w = new FrameWriter(FrameType.RECEIVED).u16(chunk.length);
      for (const id of chunk) w.u64(id);
      this._queue(w.done());
    }
  }

  /** READ receipts to the senders of these messages (never for own/mirrored ones). */
  read(...messages) {
    const byPeer = new Map();
    for (const m of messages) {
      if (m.mirror || (this.welcome && m.sender === this.welcome.user)) continue;
      const list = byPeer.get(m.sender) || [];
      list.push(toU64(m.group ? m.originId : m.id));
      byPeer.set(m.sender, list);
    }
    for (const [peer, ids] of byPeer) {
      for (let i = 0; i < ids.length; i += MAX_IDS) {
        const chunk = ids.slice(i, i + MAX_IDS);
        const w = new FrameWriter(FrameType.READ).str8(peer).u16(chunk.length);
        for (const id of chunk) w.u64(id);
        this._queue(w.done());
      }
    }
  }

  /** Follow users' presence: a "presence" event now and on every change. */
  subscribe(...users) {
    const fresh = users.filter((u) => !this.watching.has(u));
    fresh.forEach((u) => this.watching.add(u));
    if (fresh.length && this.connected) this._subscribeFrames(fresh, true);
  }

  unsubscribe(...users) {
    const gone = users.filter((u) => this.watching.delete(u));
    if (gone.length && this.connected) this._subscribeFrames(gone, false);
  }

  /** SUBSCRIBE frames of at most 1024 users and maxFrame bytes each (1024 ids of 255 bytes
   * would be 262 KB, over the default limit of 64 KiB). */
  _subscribeFrames(users, on) {
    const room = (this.welcome?.maxFrame ?? 65536) - 2 - 3;
    let batch = [], size = 0;
    const write = () => {
      const w = new FrameWriter(FrameType.SUBSCRIBE).u8(on ? 1 : 0).u16(batch.length);
      for (const u of batch) w.str8(u);
      this._queue(w.done());
      batch = []; size = 0;
    };
    for (const u of users) {
      const cost = 1 + utf8.encode(u).length;
      if (batch.length && (batch.length === MAX_SUBSCRIBE || size + cost > room)) write();
      batch.push(u);
      size += cost;
    }
    if (batch.length) write();
  }

  /** Tell `peer` this user is (or stopped) typing: a hint, never stored. */
  typing(peer, typing = true) {
    if (this.connected) this._queue(new FrameWriter(FrameType.TYPING).str8(peer).u8(typing ? 1 : 0).done());
  }

  setPrivacy(hideLastSeen) {
    if (this.connected) this._queue(new FrameWriter(FrameType.PRIVACY).u8(hideLastSeen ? 1 : 0).done());
  }

  /** A group operation; resolves to the group {group, name, members: {user: role}}. One
   * request must fit in one frame (maxFrame): add many members with several "add"s. */
  group(action, group, arg = {}) {
    this._check();
    const op = GROUP_OPS[action];
    if (!op) throw new RangeError(`unknown group action ${action}`);
    const req = this.nextId++;
    const frame = new FrameWriter(FrameType.GROUP).u64(req).u8(op).str8(group).str16(JSON.stringify(arg)).done();
    const maxFrame = this.welcome?.maxFrame ?? 65536;
    if (frame.length - 4 > maxFrame) {
      throw new RangeError(`this ${action} request is ${frame.length - 4} bytes, over the server's frame limit ` +
        `of ${maxFrame}: send its members in several requests`);
    }
    return new Promise((resolve, reject) => {
      this.requests.set(req, { resolve, reject, pieces: [] });
      if (!this.connected) { this.requests.delete(req); reject(new Error("not connected")); return; }
      this._queue(frame);
    });
  }

  /** Round trip time in ms. */
  ping() {
    this._check();
    const nonce = this.nextId++;
    const start = performance.now();
    return new Promise((resolve, reject) => {
      this.pongs.set(nonce, { resolve: () => resolve(performance.now() - start), reject });
      this._queue(new FrameWriter(FrameType.PING).u64(nonce).done());
    });
  }

  // -- receiving --------------------------------------------------------------------------

  _frame(f) {
    const T = FrameType;
    switch (f.type) {
      case T.DELIVER: {
        if (f.id <= this.seenHwm) {
          if (f.id <= this.ackedHwm) this._received([f.id]);   // processed already: let the server drop it
          return;
        }
        this.seenHwm = f.id;
        let text = null;
        try { text = fromUtf8.decode(f.payload); } catch { /* binary payload */ }
        this._emit("message", { ...f, text });
        return;
      }
      case T.RECEIPT:
        this._received([f.id]);                     // informational: acknowledged at once
        if (f.id > this.seenHwm) {
          this.seenHwm = f.id;
          if (f.id > this.ackedHwm) this.ackedHwm = f.id;
          this._emit("receipt", f);
        }
        return;
      case T.ACK: {
        const entry = this._answered(f.seq);
        if (entry) {
          this.resendDelay = RESEND_FIRST_MS;
          entry.resolve({ seq: f.seq, id: f.id, ts: Number(f.ts) });
        }
        return;
      }
      case T.PRESENCE:
        if (this.watching.has(f.user)) this._emit("presence", f);
        return;
      case T.TYPING: this._emit("typing", f); return;
      case T.GROUP_INFO: {
        const req = this.requests.get(f.requestId);
        if (!req) return;
        req.pieces.push(f.text);
        if (f.more) return;                  // the answer continues in the next GROUP_INFO
        this.requests.delete(f.requestId);
        req.resolve(JSON.parse(req.pieces.join("")));
        return;
      }
      case T.PING: this._queue(new FrameWriter(T.PONG).u64(f.nonce).done()); return;
      case T.PONG: {
        const p = this.pongs.get(f.nonce);
        if (p) { this.pongs.delete(f.nonce); p.resolve(); }
        return;
      }
      case T.GOAWAY:
        this.reconnectHintMs = f.reconnectMs;
        if (f.code === GOAWAY_REPLACED) {
          this.fatal = new Error("replaced by another connection of this device");
          this._emit("error", this.fatal);
        }
        return;
      case T.ERROR: {
        const err = new ServerError(f.code, f.reason, f.ref, f.fatal);
        const req = f.ref ? this.requests.get(f.ref) : null;
        if (req) { this.requests.delete(f.ref); req.reject(err); return; }
        const pending = !f.fatal && this.outbox.has(f.ref);
        if (pending && RESEND.has(f.code)) {
          this._refused(f.ref);
        } else if (pending) {
          this._answered(f.ref).reject(err);       // refused for good, or a code this client does not know
        } else {
          if (FATAL_AUTH.has(f.code)) this.fatal = err;
          this._emit("error", err);
        }
        return;
      }
      default:
    }
  }

  _failAll(err) {
    for (const { reject } of this.outbox.values()) reject(err);
    this.outbox.clear();
    clearTimeout(this.resendTimer);
    this.resendTimer = null;
    for (const { reject } of this.requests.values()) reject(err);
    this.requests.clear();
  }
}
