// parley.js: a dependency-free JavaScript client for the parley broker (an ES module).
//
// It speaks the broker's WebSocket protocol with JSON text frames: each message is the proto3
// JSON form of a `Frame` (proto/proto/parley.proto: field names in lowerCamelCase, 64-bit
// integers as strings, bytes as base64). It mirrors the Rust client (client/src/session.rs):
//
// 1. on each connection: Login with the token, then the whole outbox again, in order, with the
//    same client message ids (the broker stores a retried send once), then a SyncRequest with
//    the cursor of every conversation it knows;
// 2. deliveries, sync and history pages go through an inbox that releases every message once,
//    in seq order per conversation (a message above a gap is held; a gap that lasts 500 ms
//    starts a sync); one cumulative DeliverAck per conversation acknowledges what was taken;
// 3. a Ping when nothing was sent for half the server's heartbeat, and the connection is
//    dropped when nothing was heard for twice the heartbeat (at least 5 s);
// 4. on any loss of the connection it reconnects by itself, after an exponential back-off
//    (100 ms doubling to 10 s) with "equal jitter" (a random wait between half and all of it),
//    at least the server's retry_after_ms.
//
// The outbox and the inbox live in memory: they outlive connections, not the page.
//
// Usage:
//   import { Client } from "./parley.js";
//   const c = new Client({ url: "ws://127.0.0.1:7401", token, onEvent: (e) => console.log(e) });
//   c.connect();
//   c.sendText("bob", "hello");      // returns the client message id (a string)
//   c.history("bob", 50);            // answered by a {type: "history"} event and messages
//
// Events given to onEvent: {type: "connected", user, device}, {type: "disconnected", reason},
// {type: "message", conversation, seq, from, body, own}, {type: "acked", clientMsgId, seq},
// {type: "synced"}, {type: "refused", clientMsgId, error}, {type: "error", error}, {type: "stopped", error}.

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;
/** Content type of UTF-8 text (the convention of the Rust client and `broker chat`). */
export const TEXT = 1;

const GAP_TIMEOUT_MS = 500;
const LOGIN_TIMEOUT_MS = 10000;
const BACKOFF_INITIAL_MS = 100;
const BACKOFF_MAX_MS = 10000;
const MIN_DEAD_AFTER_MS = 5000;
const MIN_RETRY_MS = 100;
// Errors after which reconnecting cannot help.
const FINAL_ERRORS = ["BAD_TOKEN", "TOKEN_EXPIRED", "REPLACED", "UNSUPPORTED_VERSION", "KICKED"];
// Errors for a send that are passing: it is retried with the same id.
const PASSING_ERRORS = ["RATE_LIMITED", "STORAGE_FAILURE", "INTERNAL", "SHUTTING_DOWN", "UNAVAILABLE"];
const CONVERSATION_TYPES = { 1: "DIRECT", 2: "GROUP", 3: "ROOM" };

/** The direct conversation with `user`. */
export function direct(user) {
  return { type: "DIRECT", id: user };
}

/** The map key of a conversation (its type by name, and its id). */
export function conversationKey(c) {
  const type = CONVERSATION_TYPES[c.type] || c.type || "DIRECT";
  return type + ":" + (c.id || "");
}

/** UTF-8 text as base64 (the JSON form of `bytes`). */
export function textToBase64(text) {
  const bytes = new TextEncoder().encode(text);
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

/** base64 as UTF-8 text (invalid sequences replaced). */
export function base64ToText(b64) {
  const s = atob(b64 || "");
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return new TextDecoder().decode(bytes);
}

/** A 64-bit integer field as a Number (they are strings in proto3 JSON). */
function num(v) {
  return v === undefined || v === null ? 0 : Number(v);
}

/** Per conversation: what was settled (the cursor) and what arrived above a gap. */
class Lane {
  constructor(conversation) {
    this.conversation = conversation;
    this.cursor = 0; // every seq up to here is settled
    this.pending = new Map(); // seq -> message (or {own: true}) above the cursor
    this.gapSince = null;
    this.ackDue = false;
  }
  // Releases what is contiguous above the cursor, in order.
  release(out) {
    while (this.pending.has(this.cursor + 1)) {
      this.cursor += 1;
      const m = this.pending.get(this.cursor);
      this.pending.delete(this.cursor);
      out.push(m);
    }
  }
  // A sync or history page for `seq` settles everything below it.
  skipBelow(seq, out) {
    const below = [...this.pending.keys()].filter((s) => s < seq).sort((a, b) => a - b);
    for (const s of below) {
      out.push(this.pending.get(s));
      this.pending.delete(s);
    }
    if (seq - 1 > this.cursor) this.cursor = seq - 1;
  }
  updateGap(now) {
    if (this.pending.size === 0) this.gapSince = null;
    else if (this.gapSince === null) this.gapSince = now;
  }
}

/** The client: one logged-in user and device, over one WebSocket at a time. */
export class Client {
  /**
   * options: url (ws://...), token, onEvent(event), clientName (default "parley-web"),
   * historyLimit (default 50).
   */
  constructor(options) {
    this.url = options.url;
    this.token = options.token;
    this.onEvent = options.onEvent || (() => {});
    this.clientName = options.clientName || "parley-web";
    this.user = null;
    this.device = null;
    this.ws = null;
    this.state = "disconnected"; // "connecting", "logging-in", "ready", "stopped"
    this.outbox = new Map(); // clientMsgId (string) -> {send, retryAt}
    this.lanes = new Map(); // conversation key -> Lane
    this.requests = new Map(); // requestId (string) -> kind
    this.sync = null; // requestId of the sync in flight
    this.failures = 0;
    this.reconnectTimer = null;
    this.retryAfterMs = 0;
    this.heartbeatMs = 30000;
    this.lastHeard = 0;
    this.lastSent = 0;
    this.connectedAt = 0;
    this.nonce = 0;
    this.nextRequest = 1;
    // Client message ids: a random base (so a reloaded page does not reuse ids) and a counter;
    // below 2^53, so exact as Numbers too.
    this.idBase = Math.floor(Math.random() * 2 ** 30) + 1;
    this.idCounter = 0;
    this.ticker = setInterval(() => this.tick(), 100);
  }

  /** Opens the connection (and keeps one open until stop()). */
  connect() {
    if (this.state === "stopped") return;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    let ws;
    try {
      ws = new WebSocket(this.url, "parley.v1");
    } catch (e) {
      this.lost("cannot open: " + e);
      return;
    }
    this.ws = ws;
    this.state = "connecting";
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.state = "logging-in";
      this.connectedAt = Date.now();
      this.lastHeard = Date.now();
      const id = this.request("login");
      this.transmit(id, {
        login: { protocolVersion: PROTOCOL_VERSION, token: this.token, clientName: this.clientName },
      });
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      if (typeof ev.data !== "string") return; // the broker answers in the form we used: text
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      this.handleFrame(frame);
      this.flushAcks();
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.lost("closed (" + ev.code + ")");
    };
    ws.onerror = () => {};
  }

  /** Closes for good: no more reconnects. */
  stop() {
    this.state = "stopped";
    clearInterval(this.ticker);
    clearTimeout(this.reconnectTimer);
    if (this.ws) this.ws.close();
    this.ws = null;
  }

  /** Queues a text message to `peer` (a direct conversation); returns its client message id. */
  sendText(peer, text) {
    return this.send(direct(peer), TEXT, textToBase64(text));
  }

  /** Queues a message (body as base64) to `conversation`; returns its client message id. */
  send(conversation, contentType, bodyBase64) {
    this.idCounter += 1;
    const id = String(this.idBase * 2 ** 22 + this.idCounter);
    const send = { to: conversation, clientMsgId: id, contentType, body: bodyBase64 };
    this.outbox.set(id, { send, retryAt: 0 });
    if (this.state === "ready") this.transmitSend(send);
    return id;
  }

  /** Asks for the newest `limit` messages of the direct conversation with `peer`. */
  history(peer, limit) {
    if (this.state !== "ready") return null;
    const id = this.request("history");
    this.transmit(id, { historyRequest: { conversation: direct(peer), limit: limit || 50 } });
    return id;
  }

  /** The client message ids sent but not yet acknowledged. */
  unacked() {
    return [...this.outbox.keys()];
  }

  // --- internals ----------------------------------------------------------------------------

  request(kind) {
    const id = String(this.nextRequest++);
    this.requests.set(id, kind);
    return id;
  }

  transmit(requestId, body) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    const frame = Object.assign(requestId ? { requestId } : {}, body);
    this.ws.send(JSON.stringify(frame));
    this.lastSent = Date.now();
  }

  transmitSend(send) {
    this.transmit(send.clientMsgId, { send });
  }

  emit(event) {
    try {
      this.onEvent(event);
    } catch (e) {
      console.error("parley: onEvent threw", e);
    }
  }

  // The lane of a conversation (created on first use).
  lane(conversation) {
    const key = conversationKey(conversation);
    let lane = this.lanes.get(key);
    if (!lane) {
      lane = new Lane({ type: key.split(":")[0], id: conversation.id || "" });
      this.lanes.set(key, lane);
    }
    return lane;
  }

  // The connection is gone: schedule the next attempt.
  lost(reason) {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close();
      } catch (e) {
        /* already closed */
      }
    }
    this.requests.clear();
    this.sync = null;
    if (this.state === "stopped") return;
    this.state = "disconnected";
    this.emit({ type: "disconnected", reason });
    const nominal = Math.min(BACKOFF_INITIAL_MS * 2 ** Math.min(this.failures, 20), BACKOFF_MAX_MS);
    this.failures += 1;
    const wait = Math.max(nominal / 2 + Math.random() * (nominal / 2), this.retryAfterMs);
    this.retryAfterMs = 0;
    this.reconnectTimer = setTimeout(() => this.connect(), wait);
  }

  // Releases messages to the application.
  release(out) {
    for (const m of out) this.emit(m);
  }

  // A sync finished: the server sent all it had for this client, so every gap left is skipped,
  // releasing everything held.
  syncDone(out) {
    for (const lane of this.lanes.values()) {
      if (lane.pending.size === 0) continue;
      lane.skipBelow(Math.max(...lane.pending.keys()) + 1, out);
      lane.gapSince = null;
    }
  }

  // A message from a Deliver ("deliver"), a SyncPage or a HistoryPage ("page").
  receive(m, source, out) {
    const conversation = m.conversation || {};
    const seq = num(m.seq);
    const msg = {
      type: "message",
      conversation: { type: conversationKey(conversation).split(":")[0], id: conversation.id || "" },
      seq,
      from: m.fromUser || "",
      device: m.fromDevice || "",
      contentType: m.contentType || 0,
      body: base64ToText(m.body),
      kind: m.kind || "NORMAL",
      serverTime: num(m.serverTime),
      own: false,
    };
    if (seq === 0 || msg.conversation.type === "ROOM") {
      out.push(msg);
      return;
    }
    const lane = this.lane(conversation);
    if (source === "deliver") lane.ackDue = true;
    if (seq <= lane.cursor || lane.pending.has(seq)) return; // a duplicate
    if (source === "page") lane.skipBelow(seq, out);
    lane.pending.set(seq, msg);
    lane.release(out);
    lane.updateGap(Date.now());
  }

  handleFrame(frame) {
    this.lastHeard = Date.now();
    const requestId = frame.requestId || "";
    if (frame.loginResult) return this.onLogin(requestId, frame.loginResult);
    if (frame.error) return this.onError(requestId, frame.error);
    if (frame.ping) return this.transmit(requestId, { pong: { nonce: frame.ping.nonce || "0" } });
    if (frame.pong) return this.requests.delete(requestId);
    if (frame.sendAck) return this.onSendAck(frame.sendAck);
    if (frame.deliver) {
      const out = [];
      for (const m of frame.deliver.messages || []) this.receive(m, "deliver", out);
      return this.release(out);
    }
    if (frame.syncPage) {
      const out = [];
      const messages = (frame.syncPage.messages || []).slice().sort((a, b) => num(a.seq) - num(b.seq));
      for (const m of messages) this.receive(m, "page", out);
      if (frame.syncPage.done && this.sync === requestId) {
        this.syncDone(out);
        this.release(out);
        this.sync = null;
        this.requests.delete(requestId);
        this.emit({ type: "synced" });
      } else {
        this.release(out);
      }
      return;
    }
    if (frame.behind) return this.startSync();
    if (frame.historyPage) {
      if (!this.requests.delete(requestId)) return;
      const out = [];
      const messages = (frame.historyPage.messages || []).slice().sort((a, b) => num(a.seq) - num(b.seq));
      for (const m of messages) this.receive(m, "page", out);
      this.release(out);
      this.emit({ type: "history", conversation: frame.historyPage.conversation, count: messages.length });
    }
    // Anything else (presence, receipts, typing...) is not used by this client.
  }

  onLogin(requestId, r) {
    if (this.state !== "logging-in" || this.requests.get(requestId) !== "login") return;
    this.requests.delete(requestId);
    this.state = "ready";
    this.failures = 0;
    this.user = r.user;
    this.device = r.device;
    this.heartbeatMs = r.heartbeatIntervalMs || 30000;
    this.emit({ type: "connected", user: r.user, device: r.device });
    // The outbox first, in order, with the same ids; then the sync.
    for (const entry of this.outbox.values()) {
      entry.retryAt = 0;
      this.transmitSend(entry.send);
    }
    this.startSync();
  }

  onSendAck(a) {
    const id = String(a.clientMsgId || "0");
    const entry = this.outbox.get(id);
    this.outbox.delete(id);
    const conversation = a.conversation || (entry && entry.send.to);
    if (!conversation) return;
    const seq = num(a.seq);
    if (entry) this.emit({ type: "acked", clientMsgId: id, seq });
    if (seq === 0) return;
    const lane = this.lane(conversation);
    if (seq <= lane.cursor || lane.pending.has(seq)) return;
    // This device's own message: settled at its seq, shown as sent by us.
    lane.pending.set(seq, {
      type: "message",
      conversation: lane.conversation,
      seq,
      from: this.user || "",
      device: this.device || "",
      contentType: entry ? entry.send.contentType : 0,
      body: entry ? base64ToText(entry.send.body) : "",
      kind: "NORMAL",
      serverTime: num(a.serverTime),
      own: true,
    });
    const out = [];
    lane.release(out);
    lane.updateGap(Date.now());
    this.release(out);
  }

  onError(requestId, e) {
    const code = typeof e.code === "string" ? e.code : String(e.code || "");
    let sendId = e.clientMsgId && e.clientMsgId !== "0" ? String(e.clientMsgId) : null;
    if (!sendId && requestId && this.outbox.has(requestId)) sendId = requestId;
    if (sendId) {
      if (PASSING_ERRORS.includes(code)) {
        const entry = this.outbox.get(sendId);
        if (entry) entry.retryAt = Date.now() + Math.max(e.retryAfterMs || 0, MIN_RETRY_MS);
      } else if (this.outbox.delete(sendId)) {
        this.emit({ type: "refused", clientMsgId: sendId, error: e });
      }
    } else if (requestId && this.requests.has(requestId)) {
      if (this.sync === requestId) this.sync = null;
      this.requests.delete(requestId);
      this.emit({ type: "error", error: e });
    } else if (!e.fatal) {
      this.emit({ type: "error", error: e });
    }
    if (e.fatal) {
      if (FINAL_ERRORS.includes(code)) {
        this.emit({ type: "stopped", error: e });
        this.stop();
        return;
      }
      this.retryAfterMs = e.retryAfterMs || 0;
      this.lost("server: " + code + " " + (e.message || ""));
    }
  }

  startSync() {
    if (this.sync !== null || this.state !== "ready") return;
    const cursors = [];
    for (const lane of this.lanes.values()) {
      if (lane.conversation.type === "ROOM") continue;
      cursors.push({ conversation: lane.conversation, seq: String(lane.cursor) });
    }
    const id = this.request("sync");
    this.sync = id;
    this.transmit(id, { syncRequest: { cursors } });
  }

  // One cumulative DeliverAck for every conversation that took deliveries.
  flushAcks() {
    if (this.state !== "ready") return;
    const acks = [];
    for (const lane of this.lanes.values()) {
      if (!lane.ackDue) continue;
      lane.ackDue = false;
      if (lane.cursor > 0) acks.push({ conversation: lane.conversation, seq: String(lane.cursor) });
    }
    if (acks.length > 0) this.transmit(null, { deliverAck: { acks } });
  }

  // The clock: login and liveness deadlines, heartbeats, retries, lasting gaps.
  tick() {
    const now = Date.now();
    if (this.state === "logging-in" && now >= this.connectedAt + LOGIN_TIMEOUT_MS) {
      this.lost("login timed out");
      return;
    }
    if (this.state !== "ready") return;
    const deadAfter = Math.max(this.heartbeatMs * 2, MIN_DEAD_AFTER_MS);
    if (now >= this.lastHeard + deadAfter) {
      this.lost("nothing heard for " + deadAfter + " ms");
      return;
    }
    for (const entry of this.outbox.values()) {
      if (entry.retryAt && now >= entry.retryAt) {
        entry.retryAt = 0;
        this.transmitSend(entry.send);
      }
    }
    if (this.sync === null) {
      for (const lane of this.lanes.values()) {
        if (lane.gapSince !== null && now >= lane.gapSince + GAP_TIMEOUT_MS) {
          this.startSync();
          break;
        }
      }
    }
    if (now >= this.lastSent + this.heartbeatMs / 2) {
      this.nonce += 1;
      this.transmit(this.request("ping"), { ping: { nonce: String(this.nonce) } });
    }
  }
}
