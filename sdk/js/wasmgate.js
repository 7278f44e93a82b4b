/**
 * # wasmgate: WebSocket handlers for wasmgate, in JavaScript
 *
 * A wasmgate plugin is a WebAssembly component that handles the events of
 * one route: a connection opens, a message arrives, a timer fires, the
 * connection closes. This module turns the WIT contract (`wit/plugin.wit`,
 * `wasmgate:plugin@0.1.1`, world `resumable-plugin`) into a small API that
 * reads like the Rust SDK (`sdk/src/lib.rs`): write a handler object (every
 * method is optional) and export what {@link definePlugin} returns.
 *
 * ```js
 * import { definePlugin, room, log, OpenResponse } from "wasmgate";
 *
 * export const { handler, resume } = definePlugin({
 *   onOpen(conn, req) {
 *     const name = req.queryParam("name") ?? `guest-${conn.id}`;
 *     if (name.length > 32) return OpenResponse.reject(400, "name too long");
 *     conn.metadata.set("name", name);
 *     conn.join("lobby");
 *     return OpenResponse.accept();
 *   },
 *   onMessage(conn, message) {
 *     if (typeof message !== "string") return;
 *     const name = conn.metadata.get("name") ?? "";
 *     room("lobby").broadcastJson({ from: name, text: message }, conn);
 *   },
 *   onClose(conn, code, reason) {
 *     log.info(`${conn.id} left`);
 *   },
 * });
 * ```
 *
 * Build it with `sdk/js/build.sh PLUGIN_DIR OUT.wasm` and point a route's
 * `plugin` at the `.wasm` file.
 *
 * Conventions of the whole API:
 *
 * - Connection ids and timer ids are `bigint` (the contract's `u64`), exact.
 *   `Map`s keyed by them work (`new Map().set(5n, x).get(5n)`); functions
 *   that take an id also accept a safe-integer `number`.
 * - A message is a `string` (a text message) or a `Uint8Array` (a binary
 *   message). Wherever bytes are taken, any `ArrayBuffer` or
 *   `ArrayBufferView` (a `Uint8Array`, a `DataView`, a Node `Buffer`) will do.
 * - Every host call that the contract lets fail throws a {@link GatewayError}
 *   whose `kind` says why; none fails silently. Wrong argument types throw a
 *   `TypeError` before the host is called.
 * - Handlers are synchronous. A handler may return a promise: the microtasks
 *   it queues run before the call returns to the gateway, so `await`ing
 *   already-settled values works, but nothing can wait for time or I/O
 *   (`setTimeout` callbacks never run; `fetch` is not available). Wait with
 *   {@link Connection#setTimer} instead.
 * - An instance may serve one connection or many (`isolation = "shared"`),
 *   and is replaced on a migration, a hibernation or after a failure. Keep
 *   per-connection state keyed by `conn.id`, never in a "current connection"
 *   variable, and keep what must outlive the instance in
 *   {@link Connection#metadata}.
 *
 * @module wasmgate
 */

import * as host from "wasmgate:plugin/host@0.1.1";

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/** What each {@link GatewayError} kind means (the contract's wording). */
const KIND_TEXT = {
  closed: "the connection is closing or closed",
  "unknown-connection": "no open connection with that id exists on this route",
  "too-large": "larger than the limit",
  backpressure: "the connection's outbound buffer is full; the message was not queued",
  "limit-reached": "a per-connection quota (timers, metadata entries, rooms) is used up",
  "not-owner": "only allowed on connections served by this instance",
  "invalid-argument": "invalid argument",
};

/**
 * A host call failed: the contract's `gateway-error`, as an exception.
 *
 * `kind` is one of the contract's case names, as written there:
 *
 * | `kind`                 | meaning |
 * |------------------------|---------|
 * | `"closed"`             | the connection is closing or closed; nothing more can be sent to it |
 * | `"unknown-connection"` | no open connection with that id exists on this route |
 * | `"too-large"`          | the message, key, value, reason or name is larger than the limit |
 * | `"backpressure"`       | the connection's outbound buffer is full: the message was not queued (the route's `slow_consumer` policy says whether it is also being closed) |
 * | `"limit-reached"`      | a quota (timers, metadata, rooms, or a rate per second) is used up |
 * | `"not-owner"`          | only allowed on connections served by this instance (timers) |
 * | `"invalid-argument"`   | an argument is invalid; `detail` says which and why |
 *
 * ```js
 * try {
 *   conn.sendText("hi");
 * } catch (e) {
 *   if (e instanceof GatewayError && e.kind === "closed") return;
 *   throw e;
 * }
 * ```
 */
export class GatewayError extends Error {
  /**
   * @param {GatewayErrorKind} kind Why the call failed.
   * @param {string} [detail] For `"invalid-argument"`: which argument and why.
   * @param {unknown} [cause] The underlying error, if any.
   */
  constructor(kind, detail, cause) {
    const text = detail ?? KIND_TEXT[kind] ?? "host call failed";
    super(`${kind}: ${text}`, cause === undefined ? undefined : { cause });
    /** @type {string} */
    this.name = "GatewayError";
    /**
     * Why the call failed: `"closed"`, `"unknown-connection"`, `"too-large"`,
     * `"backpressure"`, `"limit-reached"`, `"not-owner"` or
     * `"invalid-argument"`.
     * @type {GatewayErrorKind}
     */
    this.kind = kind;
    /**
     * For `"invalid-argument"`, the host's explanation; otherwise `undefined`.
     * @type {string | undefined}
     */
    this.detail = detail;
  }
}

/**
 * @typedef {"closed" | "unknown-connection" | "too-large" | "backpressure"
 *   | "limit-reached" | "not-owner" | "invalid-argument"} GatewayErrorKind
 */

/**
 * Runs a host call whose WIT result is `result<T, gateway-error>`. The
 * bindings throw the error case as an error whose `payload` is the variant
 * (`{ tag, val }`); it becomes a GatewayError.
 * @template T
 * @param {() => T} call
 * @returns {T}
 */
function hostCall(call) {
  try {
    return call();
  } catch (e) {
    const payload = /** @type {any} */ (e)?.payload;
    if (payload !== null && typeof payload === "object" && typeof payload.tag === "string") {
      throw new GatewayError(payload.tag, typeof payload.val === "string" ? payload.val : undefined, e);
    }
    throw e;
  }
}

// ---------------------------------------------------------------------------
// Argument conversion
// ---------------------------------------------------------------------------

/** @param {string} what @param {unknown} value @returns {string} */
function str(what, value) {
  if (typeof value !== "string") {
    throw new TypeError(`${what} must be a string, got ${describeType(value)}`);
  }
  return value;
}

/** @param {unknown} value */
function describeType(value) {
  if (value === null) return "null";
  if (typeof value === "object") return value.constructor?.name ?? "object";
  return typeof value;
}

const U64_MAX = (1n << 64n) - 1n;

/**
 * An id (`u64`) from a bigint, a safe-integer number or a Connection.
 * @param {string} what
 * @param {unknown} value
 * @returns {bigint}
 */
function u64(what, value) {
  if (value instanceof Connection) return value.id;
  if (typeof value === "bigint" && value >= 0n && value <= U64_MAX) return value;
  if (typeof value === "number" && Number.isSafeInteger(value) && value >= 0) return BigInt(value);
  throw new TypeError(`${what} must be a non-negative integer id (bigint), got ${describeType(value)} ${String(value)}`);
}

/**
 * A byte view of `data`, without copying.
 * @param {string} what
 * @param {unknown} data
 * @returns {Uint8Array}
 */
function bytes(what, data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError(`${what} must be a Uint8Array, an ArrayBuffer or an ArrayBufferView, got ${describeType(data)}`);
}

/**
 * Bytes received from the bindings, as this module's own Uint8Array (no
 * copy). The generated bindings run in another global: their Uint8Array is
 * a different constructor, so `instanceof Uint8Array` would be false.
 * @param {Uint8Array} data
 * @returns {Uint8Array}
 */
function received(data) {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/**
 * The contract's `message` variant from a string (text) or bytes (binary).
 * @param {unknown} data
 */
function toWitMessage(data) {
  if (typeof data === "string") return { tag: "text", val: data };
  if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) return { tag: "binary", val: bytes("message", data) };
  throw new TypeError(
    `a message must be a string (text) or bytes (binary), got ${describeType(data)}; use sendJson/broadcastJson for other values`,
  );
}

/**
 * Serializes `value` as JSON for a text message. Bigints (connection and
 * timer ids) are written as JSON numbers, exactly, as serde writes a `u64`.
 * @param {unknown} value
 * @returns {string}
 */
function toJson(value) {
  let text;
  try {
    text = JSON.stringify(value, bigintReplacer);
  } catch (e) {
    throw new GatewayError("invalid-argument", `cannot serialize JSON: ${errorText(e)}`, e);
  }
  if (text === undefined) {
    throw new GatewayError("invalid-argument", `cannot serialize JSON: ${describeType(value)} has no JSON form`);
  }
  return text;
}

/** @param {string} _key @param {unknown} value */
function bigintReplacer(_key, value) {
  if (typeof value !== "bigint") return value;
  if (typeof JSON.rawJSON === "function") return JSON.rawJSON(value.toString());
  if (value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(value);
  throw new TypeError(`bigint ${value} has no exact JSON number in this engine`);
}

/** @param {unknown} e */
function errorText(e) {
  return e instanceof Error ? e.message : String(e);
}

/**
 * Headers as the contract's `list<header>`.
 * @param {HeadersInit | undefined} headers
 * @returns {{ name: string, value: string }[]}
 */
function toWitHeaders(headers) {
  if (headers === undefined || headers === null) return [];
  /** @type {Iterable<any>} */
  const entries =
    typeof (/** @type {any} */ (headers)[Symbol.iterator]) === "function"
      ? /** @type {Iterable<any>} */ (headers)
      : Object.entries(headers);
  const out = [];
  for (const entry of entries) {
    const [name, value] = Array.isArray(entry) ? entry : [entry?.name, entry?.value];
    out.push({ name: str("a header name", name), value: str("a header value", value) });
  }
  return out;
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

/**
 * A connection's metadata: string entries the gateway keeps for it until it
 * closes (they survive migrations, hibernation and instance failures, and
 * other connections of the route can read them through
 * `Connection.fromId(id).metadata`). Keys are at most 256 bytes, values at
 * most 64 KiB (UTF-8), and a connection holds at most 64 entries by default. Get one
 * with {@link Connection#metadata}.
 */
export class Metadata {
  /** @param {bigint} id */
  constructor(id) {
    /** @type {bigint} */
    this.id = id;
  }

  /**
   * Reads an entry.
   * @param {string} key
   * @returns {string | undefined} The value, or `undefined` if there is no such entry.
   * @throws {GatewayError} `unknown-connection`.
   */
  get(key) {
    const k = str("metadata key", key);
    return hostCall(() => host.metadataGet(this.id, k)) ?? undefined;
  }

  /**
   * Sets an entry, replacing any previous value.
   * @param {string} key At most 256 bytes.
   * @param {string} value At most 64 KiB.
   * @returns {void}
   * @throws {GatewayError} `too-large`, `limit-reached` (64 entries), `unknown-connection`.
   */
  set(key, value) {
    const k = str("metadata key", key);
    const v = str("metadata value", value);
    hostCall(() => host.metadataSet(this.id, k, v));
  }

  /**
   * Removes an entry.
   * @param {string} key
   * @returns {string | undefined} The old value, or `undefined` if there was none.
   * @throws {GatewayError} `unknown-connection`.
   */
  remove(key) {
    const k = str("metadata key", key);
    return hostCall(() => host.metadataRemove(this.id, k)) ?? undefined;
  }
}

/**
 * A handle to one connection of this route. Cheap to create; holding it
 * does not keep the connection open. Handlers receive one; make one for any
 * id with {@link Connection.fromId}. Two handles to the same connection are
 * different objects: compare `id`s.
 */
export class Connection {
  /**
   * @param {bigint | number} id A connection id (as received in an event or from {@link Room#members}).
   */
  constructor(id) {
    /**
     * The connection's id: unique for the gateway's lifetime, never reused,
     * meaningful only within this route.
     * @type {bigint}
     */
    this.id = u64("connection id", id);
  }

  /**
   * Wraps a raw connection id.
   * @param {bigint | number} id
   * @returns {Connection}
   */
  static fromId(id) {
    return new Connection(id);
  }

  /**
   * Queues a message: text for a string, binary for bytes. Messages to one
   * connection are delivered in the order they were queued.
   * @param {string | Uint8Array | ArrayBuffer | ArrayBufferView} data
   * @returns {void}
   * @throws {GatewayError} `closed`, `backpressure`, `too-large`, `unknown-connection`.
   * @throws {TypeError} `data` is neither a string nor bytes.
   */
  send(data) {
    const msg = toWitMessage(data);
    hostCall(() => host.send(this.id, msg));
  }

  /**
   * Queues a text message.
   * @param {string} text
   * @returns {void}
   * @throws {GatewayError} As {@link Connection#send}.
   */
  sendText(text) {
    const msg = { tag: "text", val: str("text", text) };
    hostCall(() => host.send(this.id, msg));
  }

  /**
   * Queues a binary message.
   * @param {Uint8Array | ArrayBuffer | ArrayBufferView} data
   * @returns {void}
   * @throws {GatewayError} As {@link Connection#send}.
   */
  sendBinary(data) {
    const msg = { tag: "binary", val: bytes("data", data) };
    hostCall(() => host.send(this.id, msg));
  }

  /**
   * Serializes `value` with `JSON.stringify` (bigints as JSON numbers) and
   * queues it as a text message.
   * @param {unknown} value
   * @returns {void}
   * @throws {GatewayError} `invalid-argument` if `value` cannot be serialized
   *   (a cycle, `undefined`); otherwise as {@link Connection#send}.
   */
  sendJson(value) {
    const msg = { tag: "text", val: toJson(value) };
    hostCall(() => host.send(this.id, msg));
  }

  /**
   * Starts the closing handshake. Messages already queued are sent first;
   * `onClose` runs later, once, with this code.
   * @param {number} [code=1000] 1000, 1001, 1002, 1003, 1007 to 1011, or 3000 to 4999.
   * @param {string} [reason=""] At most 123 bytes of UTF-8.
   * @returns {void}
   * @throws {GatewayError} `invalid-argument` (code), `too-large` (reason), `closed`, `unknown-connection`.
   */
  close(code = 1000, reason = "") {
    if (!Number.isInteger(code) || code < 0 || code > 0xffff) {
      throw new TypeError(`close code must be an integer from 0 to 65535, got ${String(code)}`);
    }
    const r = str("close reason", reason);
    hostCall(() => host.close(this.id, code, r));
  }

  /**
   * Joins a room of this route (created on first join). Joining a room the
   * connection is already in succeeds and changes nothing. Connections leave
   * all their rooms when they close.
   * @param {string} room A name of 1 to 256 bytes.
   * @returns {void}
   * @throws {GatewayError} `invalid-argument` (empty name), `too-large`, `limit-reached`, `unknown-connection`.
   */
  join(room) {
    const name = str("room name", room);
    hostCall(() => host.join(this.id, name));
  }

  /**
   * Leaves a room.
   * @param {string} room
   * @returns {boolean} Whether the connection was in it.
   * @throws {GatewayError} `unknown-connection`.
   */
  leave(room) {
    const name = str("room name", room);
    return hostCall(() => host.leave(this.id, name));
  }

  /**
   * The rooms this connection is in, in no particular order.
   * @returns {string[]}
   * @throws {GatewayError} `unknown-connection`.
   */
  rooms() {
    return Array.from(hostCall(() => host.roomsOf(this.id)));
  }

  /**
   * The connection's metadata entries: `conn.metadata.get(key)`,
   * `.set(key, value)`, `.remove(key)`.
   * @type {Metadata}
   */
  get metadata() {
    return new Metadata(this.id);
  }

  /**
   * Starts a timer for this connection (which must be served by this
   * instance): the handler's `onTimer(conn, timerId)` runs after `delayMs`
   * milliseconds, then every `delayMs` if `repeat` is set, until cancelled
   * or the connection closes. A connection holds at most 64 timers by default (`max_timers`).
   * @param {number} delayMs Milliseconds; rounded down and clamped to 1 .. 4294967295.
   * @param {{ repeat?: boolean }} [options] `repeat`: fire every `delayMs` (default false).
   * @returns {bigint} The timer's id, for {@link Connection#cancelTimer}.
   * @throws {GatewayError} `limit-reached`, `not-owner`, `closed`, `unknown-connection`.
   * @throws {TypeError} `delayMs` is not a finite number.
   */
  setTimer(delayMs, options = {}) {
    if (typeof delayMs !== "number" || !Number.isFinite(delayMs)) {
      throw new TypeError(`timer delay must be a finite number of milliseconds, got ${describeType(delayMs)} ${String(delayMs)}`);
    }
    const ms = Math.min(Math.max(Math.floor(delayMs), 1), 0xffffffff);
    const repeat = Boolean(options?.repeat);
    return hostCall(() => host.setTimer(this.id, ms, repeat));
  }

  /**
   * Cancels a timer (the same as the module's {@link cancelTimer}).
   * @param {bigint | number} timerId As returned by {@link Connection#setTimer}.
   * @returns {boolean} Whether it was still pending.
   */
  cancelTimer(timerId) {
    return cancelTimer(timerId);
  }

  /** @returns {string} `Connection(<id>)`. */
  toString() {
    return `Connection(${this.id})`;
  }
}

/**
 * Cancels a timer.
 * @param {bigint | number} timerId As returned by {@link Connection#setTimer}.
 * @returns {boolean} Whether it was still pending.
 */
export function cancelTimer(timerId) {
  const id = u64("timer id", timerId);
  return host.cancelTimer(id);
}

// ---------------------------------------------------------------------------
// Rooms
// ---------------------------------------------------------------------------

/**
 * A room of this route, by name. Rooms exist while they have members; a
 * handle to an empty room is still valid (its size is 0). Get one with
 * {@link room}.
 */
export class Room {
  /** @param {string} name */
  constructor(name) {
    /** The room's name. @type {string} */
    this.name = str("room name", name);
  }

  /**
   * Queues a message to every member except `except`.
   * @param {string | Uint8Array | ArrayBuffer | ArrayBufferView} data Text (a string) or binary (bytes).
   * @param {Connection | bigint | number} [except] A connection to leave out (usually the sender).
   * @returns {number} How many connections it was queued for; members whose
   *   buffer is full are skipped (and handled by the route's slow-consumer policy).
   * @throws {GatewayError} `too-large`, `invalid-argument`.
   */
  broadcast(data, except) {
    const msg = toWitMessage(data);
    const skip = except === undefined || except === null ? undefined : u64("except", except);
    return hostCall(() => host.broadcast(this.name, msg, skip));
  }

  /**
   * Broadcasts a text message.
   * @param {string} text
   * @param {Connection | bigint | number} [except]
   * @returns {number} How many connections it was queued for.
   * @throws {GatewayError} As {@link Room#broadcast}.
   */
  broadcastText(text, except) {
    return this.broadcast(str("text", text), except);
  }

  /**
   * Serializes `value` with `JSON.stringify` (bigints as JSON numbers) and
   * broadcasts it as a text message.
   * @param {unknown} value
   * @param {Connection | bigint | number} [except]
   * @returns {number} How many connections it was queued for.
   * @throws {GatewayError} `invalid-argument` if `value` cannot be serialized; otherwise as {@link Room#broadcast}.
   */
  broadcastJson(value, except) {
    return this.broadcast(toJson(value), except);
  }

  /**
   * How many connections are in the room (0 if it does not exist).
   * @returns {number}
   */
  size() {
    return host.roomSize(this.name);
  }

  /**
   * The connections in the room, in no particular order.
   * @returns {Connection[]}
   */
  members() {
    return Array.from(host.roomMembers(this.name), (id) => new Connection(BigInt(id)));
  }
}

/**
 * A handle to the room called `name`.
 * @param {string} name 1 to 256 bytes.
 * @returns {Room}
 */
export function room(name) {
  return new Room(name);
}

// ---------------------------------------------------------------------------
// Route configuration and logging
// ---------------------------------------------------------------------------

/**
 * One value of the route's `[route.config]` table.
 * @param {string} key
 * @returns {string | undefined} The value, or `undefined` if the key is not set.
 */
export function config(key) {
  return host.configGet(str("config key", key)) ?? undefined;
}

/**
 * The whole `[route.config]` table as `[key, value]` pairs, sorted by key
 * (`Object.fromEntries(configAll())` makes an object of it).
 * @returns {[string, string][]}
 */
export function configAll() {
  return Array.from(host.configAll(), ([k, v]) => /** @type {[string, string]} */ ([k, v]));
}

/** @param {"trace" | "debug" | "info" | "warn" | "error"} level @param {unknown} message */
function write(level, message) {
  host.log(level, typeof message === "string" ? message : String(message));
}

/**
 * Writing to the gateway's log, tagged with the route, the plugin and (in a
 * handler) the connection. Non-strings are converted with `String()`. The
 * gateway's `RUST_LOG` filter decides which levels are written (info and
 * above by default). `console.log` and `console.error` also work: each line
 * becomes a log line (stdout at info, stderr at warn).
 */
export const log = Object.freeze({
  /** Logs very detailed tracing. @param {unknown} message @returns {void} */
  trace: (message) => write("trace", message),
  /** Logs debugging detail. @param {unknown} message @returns {void} */
  debug: (message) => write("debug", message),
  /** Logs normal operation. @param {unknown} message @returns {void} */
  info: (message) => write("info", message),
  /** Logs something unexpected that the plugin handled. @param {unknown} message @returns {void} */
  warn: (message) => write("warn", message),
  /** Logs a failure. @param {unknown} message @returns {void} */
  error: (message) => write("error", message),
});

// ---------------------------------------------------------------------------
// Requests and open responses
// ---------------------------------------------------------------------------

const utf8Lossy = new TextDecoder("utf-8", { ignoreBOM: true });
const utf8 = new TextEncoder();

/**
 * Decodes `%XX` escapes and `+` in a query component; invalid escapes are
 * kept as they are, invalid UTF-8 becomes U+FFFD (as the Rust SDK does).
 * @param {string} s
 * @returns {string}
 */
function percentDecode(s) {
  if (!s.includes("%") && !s.includes("+")) return s;
  const input = utf8.encode(s);
  const out = new Uint8Array(input.length);
  let n = 0;
  for (let i = 0; i < input.length; i++) {
    const b = input[i];
    if (b === 0x2b) {
      out[n++] = 0x20;
    } else if (b === 0x25 && i + 2 < input.length) {
      const h = hexDigit(input[i + 1]);
      const l = hexDigit(input[i + 2]);
      if (h >= 0 && l >= 0) {
        out[n++] = h * 16 + l;
        i += 2;
      } else {
        out[n++] = b;
      }
    } else {
      out[n++] = b;
    }
  }
  return utf8Lossy.decode(out.subarray(0, n));
}

/** @param {number} c @returns {number} */
function hexDigit(c) {
  if (c >= 0x30 && c <= 0x39) return c - 0x30;
  if (c >= 0x41 && c <= 0x46) return c - 0x41 + 10;
  if (c >= 0x61 && c <= 0x66) return c - 0x61 + 10;
  return -1;
}

/** ASCII-only lower-casing, for case-insensitive header names. @param {string} s */
function asciiLower(s) {
  return s.replace(/[A-Z]/g, (c) => String.fromCharCode(c.charCodeAt(0) + 32));
}

/**
 * The HTTP upgrade request that opens a connection, as `onOpen` and
 * `onResume` receive it.
 */
export class Request {
  /**
   * @param {{ method: string, path: string, query?: string, headers: { name: string, value: string }[],
   *   remoteAddr: string, subprotocols: string[] }} raw The contract's `request` record.
   */
  constructor(raw) {
    /** The request method; always `"GET"` for an upgrade. @type {string} */
    this.method = raw.method;
    /** The path without the query string, for example `"/chat"`. @type {string} */
    this.path = raw.path;
    /** The raw query string without the leading `?`, or `undefined` if the URL had none. @type {string | undefined} */
    this.query = raw.query ?? undefined;
    /**
     * Every request header in the order received; names are lower-case,
     * values that were not UTF-8 have U+FFFD in place of the invalid bytes.
     * @type {{ name: string, value: string }[]}
     */
    this.headers = Array.from(raw.headers, (h) => ({ name: h.name, value: h.value }));
    /** The peer's address as `"ip:port"`. @type {string} */
    this.remoteAddr = raw.remoteAddr;
    /**
     * The subprotocols the client offered, in its order of preference (only
     * those the route's `subprotocols` list allows, if it has one).
     * @type {string[]}
     */
    this.subprotocols = Array.from(raw.subprotocols);
  }

  /**
   * The first value of a header, by case-insensitive (ASCII) name.
   * @param {string} name
   * @returns {string | undefined}
   */
  header(name) {
    const wanted = asciiLower(str("header name", name));
    for (const h of this.headers) {
      if (asciiLower(h.name) === wanted) return h.value;
    }
    return undefined;
  }

  /**
   * The first value of a query parameter, percent-decoded (`+` is a space;
   * invalid escapes are kept as they are; invalid UTF-8 becomes U+FFFD). A
   * parameter without `=` has the value `""`.
   * @param {string} name The decoded name.
   * @returns {string | undefined} `undefined` if the parameter is absent.
   */
  queryParam(name) {
    const wanted = str("query parameter name", name);
    if (this.query === undefined) return undefined;
    for (const pair of this.query.split("&")) {
      const eq = pair.indexOf("=");
      const k = eq < 0 ? pair : pair.slice(0, eq);
      const v = eq < 0 ? "" : pair.slice(eq + 1);
      if (percentDecode(k) === wanted) return percentDecode(v);
    }
    return undefined;
  }
}

/**
 * What `onOpen` answers: accept the connection (optionally selecting a
 * subprotocol) or refuse the upgrade with an HTTP response. Make one with
 * {@link OpenResponse.accept}, {@link OpenResponse.acceptWith} or
 * {@link OpenResponse.reject}. `onOpen` returning nothing accepts.
 */
export class OpenResponse {
  /**
   * Use the static helpers instead.
   * @param {{ tag: "accept", val: { subprotocol?: string, headers: { name: string, value: string }[] } }
   *   | { tag: "reject", val: { status: number, headers: { name: string, value: string }[], body: Uint8Array } }} variant
   *   The contract's `open-response` variant.
   */
  constructor(variant) {
    /** @readonly */
    this.variant = variant;
  }

  /**
   * Accepts the connection without a subprotocol.
   * @param {HeadersInit} [headers] Extra headers for the `101 Switching Protocols` response.
   * @returns {OpenResponse}
   */
  static accept(headers) {
    return new OpenResponse({ tag: "accept", val: { subprotocol: undefined, headers: toWitHeaders(headers) } });
  }

  /**
   * Accepts the connection selecting `subprotocol`, which must be one of
   * `request.subprotocols` (anything else makes the gateway refuse the
   * upgrade with 500).
   * @param {string} subprotocol
   * @param {HeadersInit} [headers] Extra headers for the `101` response.
   * @returns {OpenResponse}
   */
  static acceptWith(subprotocol, headers) {
    return new OpenResponse({
      tag: "accept",
      val: { subprotocol: str("subprotocol", subprotocol), headers: toWitHeaders(headers) },
    });
  }

  /**
   * Refuses the upgrade with an HTTP response, by default plain text
   * (`content-type: text/plain; charset=utf-8`). Rooms, metadata and timers
   * set for the connection in `onOpen` are discarded, and `onClose` does
   * not run.
   * @param {number} status 400 to 599 (the gateway sends anything else as 500).
   * @param {string | Uint8Array | ArrayBuffer | ArrayBufferView} [body=""] A string is sent as UTF-8.
   * @param {HeadersInit} [headers] Response headers; a `content-type` here replaces the default.
   * @returns {OpenResponse}
   */
  static reject(status, body = "", headers) {
    if (!Number.isInteger(status) || status < 0 || status > 0xffff) {
      throw new TypeError(`status must be an integer from 0 to 65535, got ${String(status)}`);
    }
    const extra = toWitHeaders(headers);
    const list = extra.some((h) => asciiLower(h.name) === "content-type")
      ? extra
      : [{ name: "content-type", value: "text/plain; charset=utf-8" }, ...extra];
    const payload = typeof body === "string" ? utf8.encode(body) : bytes("body", body);
    return new OpenResponse({ tag: "reject", val: { status, headers: list, body: payload } });
  }
}

/**
 * Response headers: an object of name/value pairs, or an iterable of
 * `[name, value]` pairs or `{ name, value }` records.
 * @typedef {Record<string, string> | Iterable<[string, string] | { name: string, value: string }>} HeadersInit
 */

// ---------------------------------------------------------------------------
// The handler and its exports
// ---------------------------------------------------------------------------

/**
 * A fragment of a message, for routes with `deliver = "fragments"`.
 * @typedef {object} Fragment
 * @property {boolean} text Whether the message is text (its bytes are then
 *   UTF-8, but a character may be split between fragments) or binary.
 * @property {boolean} first Whether this is the message's first fragment.
 * @property {boolean} fin Whether this is the message's final fragment.
 * @property {Uint8Array} data The fragment's payload.
 */

/**
 * The event handlers of a plugin. Every method is optional: without
 * `onOpen` every connection is accepted, and other events are ignored.
 * Methods are called with `this` set to the handler object. Calls for one
 * connection never overlap; with a shared instance, calls for different
 * connections interleave, so key state by `conn.id`.
 *
 * @typedef {object} Handler
 * @property {(conn: Connection, request: Request) => OpenResponse | void} [onOpen]
 *   A client asks to open a connection; accept or reject it (returning
 *   nothing accepts). Runs before the handshake completes; host calls are
 *   already allowed for `conn` and anything sent is delivered right after
 *   the handshake. Must return synchronously (not a promise).
 * @property {(conn: Connection, message: string | Uint8Array) => void | Promise<void>} [onMessage]
 *   A complete message arrived: a string for text, a Uint8Array for binary.
 *   Not called on routes with `deliver = "fragments"`.
 * @property {(conn: Connection, fragment: Fragment) => void | Promise<void>} [onFragment]
 *   On routes with `deliver = "fragments"` only: a fragment arrived, in order.
 * @property {(conn: Connection, code: number, reason: string) => void | Promise<void>} [onClose]
 *   The connection closed: exactly once per accepted connection. `code` is
 *   the peer's close code if it closed first, else the one sent; 1005 if the
 *   peer's close frame had none, 1006 if the peer vanished. Sending fails
 *   with `closed` here; metadata and rooms are still readable.
 * @property {(conn: Connection, timerId: bigint) => void | Promise<void>} [onTimer]
 *   A timer set with {@link Connection#setTimer} fired.
 * @property {(conn: Connection, request: Request) => void | Promise<void>} [onResume]
 *   The connection continues on a fresh instance of the plugin (after a
 *   reload with `on_reload = "migrate"`, a wake from hibernation, or a
 *   shared instance replaced after a failure): this instance has none of
 *   the previous one's memory, so rebuild per-connection state from
 *   metadata here. `request` is the original upgrade request. Runs before
 *   the event that woke the connection.
 */

const HANDLER_METHODS = ["onOpen", "onMessage", "onFragment", "onClose", "onTimer", "onResume"];

/** The gateway's answer when `on-open` fails. */
const OPEN_FAILED = () => OpenResponse.reject(500, "plugin failed\n");

/**
 * Logs a handler that threw and, unless the connection is already closing,
 * closes it with 1011 as the gateway does for a trap.
 * @param {string} method @param {Connection} conn @param {unknown} error @param {boolean} close
 */
function handlerFailed(method, conn, error, close) {
  let detail;
  try {
    detail = error instanceof Error ? `${error.name}: ${error.message}${stackText(error)}` : String(error);
  } catch {
    // A thrown value that cannot be made a string (Object.create(null), a
    // throwing toString) must not trap the instance either.
    detail = "a value that cannot be converted to a string";
  }
  try {
    host.log("error", `${method} threw for connection ${conn.id}${close ? "; closing it with 1011" : ""}: ${detail}`);
  } catch {
    // Logging cannot fail in practice; the close below matters more.
  }
  if (close) {
    try {
      host.close(conn.id, 1011, "internal error");
    } catch {
      // Already closing or closed: nothing more to do.
    }
  }
}

/**
 * An error's stack on one line (one log line per failure): the frames of
 * the bundled module (file `plugin.js`; lines are the bundle's, which
 * `WASMGATE_JS_BUNDLE` keeps), without the generated bindings' frames.
 * @param {Error} error
 */
function stackText(error) {
  const frames = String(error.stack ?? "")
    .split("\n")
    .map((f) => f.trim())
    .filter((f) => f !== "" && !f.includes("initializer.js"));
  return frames.length === 0 ? "" : ` (at ${frames.join(" < ")})`;
}

/**
 * Calls `handler[method]` for `conn`; an exception, or a rejection of a
 * returned promise, is logged and closes the connection with 1011 (or only
 * logged in `onClose`).
 * @param {Handler} handler @param {string} method @param {Connection} conn @param {unknown[]} args
 */
function dispatch(handler, method, conn, args) {
  const fn = /** @type {any} */ (handler)[method];
  if (typeof fn !== "function") return;
  const close = method !== "onClose";
  try {
    const result = fn.call(handler, conn, ...args);
    if (result !== null && typeof result === "object" && typeof result.then === "function") {
      result.then(undefined, (/** @type {unknown} */ e) => handlerFailed(method, conn, e, close));
    }
  } catch (e) {
    handlerFailed(method, conn, e, close);
  }
}

/**
 * Turns a handler into the plugin's exports (the Rust SDK's `export!`).
 * Export both results from the plugin's entry module under these exact names:
 *
 * ```js
 * export const { handler, resume } = definePlugin({ onMessage(conn, message) { conn.send(message); } });
 * ```
 *
 * `handler` implements the contract's `handler` interface and `resume` its
 * `resume` interface (the `resumable-plugin` world). Each event becomes a
 * call of the matching method with a {@link Connection} for the event's
 * connection id. A method that throws (or whose promise rejects) is logged
 * at error level with its stack; the connection is then closed with 1011
 * ("internal error"), and in `onOpen` the upgrade is refused with 500
 * ("plugin failed"), the answers the gateway gives when a plugin traps,
 * without losing the instance (which other connections may share).
 *
 * @param {Handler} handler The event handlers; every method is optional.
 * @returns {{ handler: object, resume: object }} The two export objects.
 * @throws {TypeError} `handler` is not an object, a handler property is not
 *   a function, or it has an `on...` property that is not a known event
 *   (a misspelt handler would otherwise never run). Thrown at build time.
 */
export function definePlugin(handler) {
  if (handler === null || (typeof handler !== "object" && typeof handler !== "function")) {
    throw new TypeError(`definePlugin takes a handler object, got ${describeType(handler)}`);
  }
  for (const key of allKeys(handler)) {
    const eventLike = /^on[A-Z_]/.test(key) || HANDLER_METHODS.some((m) => m.toLowerCase() === key.toLowerCase());
    if (eventLike && !HANDLER_METHODS.includes(key)) {
      throw new TypeError(`definePlugin: unknown handler method ${JSON.stringify(key)}; the events are ${HANDLER_METHODS.join(", ")}`);
    }
  }
  for (const key of HANDLER_METHODS) {
    const fn = /** @type {any} */ (handler)[key];
    if (fn !== undefined && typeof fn !== "function") {
      throw new TypeError(`definePlugin: ${key} must be a function, got ${describeType(fn)}`);
    }
  }
  const h = /** @type {Handler} */ (handler);
  return Object.freeze({
    handler: Object.freeze({
      /** @param {bigint} id @param {any} raw */
      onOpen(id, raw) {
        const conn = new Connection(id);
        if (typeof h.onOpen !== "function") return OpenResponse.accept().variant;
        try {
          const answer = h.onOpen.call(h, conn, new Request(raw));
          if (answer === undefined || answer === null) return OpenResponse.accept().variant;
          if (answer instanceof OpenResponse) return answer.variant;
          throw new TypeError(
            typeof (/** @type {any} */ (answer).then) === "function"
              ? "onOpen returned a promise: it must answer synchronously with an OpenResponse (or nothing)"
              : `onOpen must return an OpenResponse or nothing, got ${describeType(answer)}`,
          );
        } catch (e) {
          handlerFailed("onOpen", conn, e, false);
          return OPEN_FAILED().variant;
        }
      },
      /** @param {bigint} id @param {{ tag: string, val: any }} msg */
      onMessage(id, msg) {
        dispatch(h, "onMessage", new Connection(id), [msg.tag === "text" ? msg.val : received(msg.val)]);
      },
      /** @param {bigint} id @param {Fragment} f */
      onFragment(id, f) {
        const fragment = { text: f.text, first: f.first, fin: f.fin, data: received(f.data) };
        dispatch(h, "onFragment", new Connection(id), [fragment]);
      },
      /** @param {bigint} id @param {number} code @param {string} reason */
      onClose(id, code, reason) {
        dispatch(h, "onClose", new Connection(id), [code, reason]);
      },
      /** @param {bigint} id @param {bigint} timer */
      onTimer(id, timer) {
        dispatch(h, "onTimer", new Connection(id), [BigInt(timer)]);
      },
    }),
    resume: Object.freeze({
      /** @param {bigint} id @param {any} raw */
      onResume(id, raw) {
        dispatch(h, "onResume", new Connection(id), [new Request(raw)]);
      },
    }),
  });
}

/** Own and inherited (class) property names, without Object.prototype's. @param {object} obj */
function allKeys(obj) {
  const keys = new Set();
  for (let o = obj; o && o !== Object.prototype && o !== Function.prototype; o = Object.getPrototypeOf(o)) {
    for (const k of Object.getOwnPropertyNames(o)) keys.add(k);
  }
  return keys;
}
