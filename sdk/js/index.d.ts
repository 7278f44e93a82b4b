/**
 * wasmgate: WebSocket handlers for wasmgate, in JavaScript.
 *
 * Declarations for `wasmgate.js` (import it as `"wasmgate"`; `build.sh`
 * maps that name to the SDK). The contract is `wit/plugin.wit`
 * (`wasmgate:plugin@0.1.1`, world `resumable-plugin`).
 *
 * Conventions: connection and timer ids are `bigint` (the contract's `u64`);
 * a message is a `string` (text) or a `Uint8Array` (binary); host calls
 * that the contract lets fail throw a {@link GatewayError}.
 */

/** Anything the SDK takes as bytes. */
export type Bytes = Uint8Array | ArrayBuffer | ArrayBufferView;

/** A complete WebSocket message: a string for text, a Uint8Array for binary. */
export type Message = string | Uint8Array;

/** Anything `send` and `broadcast` take: a string (text) or bytes (binary). */
export type MessageData = string | Bytes;

/** A connection, by handle or by id (a bigint, or a safe-integer number). */
export type ConnectionLike = Connection | bigint | number;

/** A timer's id, as returned by {@link Connection.setTimer}. */
export type TimerId = bigint;

/** Why a host call failed: the cases of the contract's `gateway-error`. */
export type GatewayErrorKind =
  /** The connection is closing or closed; nothing more can be sent to it. */
  | "closed"
  /** No open connection with that id exists on this route. */
  | "unknown-connection"
  /** The message, key, value, reason or name is larger than the limit. */
  | "too-large"
  /** The connection's outbound buffer is full: the message was not queued. */
  | "backpressure"
  /** A per-connection quota (timers, metadata entries, rooms) is used up. */
  | "limit-reached"
  /** Only allowed on connections served by this instance (timers). */
  | "not-owner"
  /** An argument is invalid; `detail` says which and why. */
  | "invalid-argument";

/** A host call failed: the contract's `gateway-error`, as an exception. */
export class GatewayError extends Error {
  constructor(kind: GatewayErrorKind, detail?: string, cause?: unknown);
  readonly name: "GatewayError";
  /** Why the call failed. */
  readonly kind: GatewayErrorKind;
  /** For `"invalid-argument"`, the host's explanation; otherwise `undefined`. */
  readonly detail: string | undefined;
}

/**
 * A connection's metadata: string entries the gateway keeps until the
 * connection closes (they survive migrations and hibernation). Keys at most
 * 256 bytes, values at most 64 KiB, at most 64 entries per connection by default (`max_metadata_entries`).
 */
export class Metadata {
  constructor(id: bigint);
  /** The connection's id. */
  readonly id: bigint;
  /**
   * Reads an entry; `undefined` if there is none.
   * @throws {GatewayError} `unknown-connection`.
   */
  get(key: string): string | undefined;
  /**
   * Sets an entry.
   * @throws {GatewayError} `too-large`, `limit-reached`, `unknown-connection`.
   */
  set(key: string, value: string): void;
  /**
   * Removes an entry and returns its old value (`undefined` if none).
   * @throws {GatewayError} `unknown-connection`.
   */
  remove(key: string): string | undefined;
}

/**
 * A handle to one connection of this route. Cheap to create; holding it
 * does not keep the connection open. Compare connections by `id`.
 */
export class Connection {
  constructor(id: bigint | number);
  /** Wraps a raw connection id. */
  static fromId(id: bigint | number): Connection;
  /** The connection's id: unique for the gateway's lifetime, never reused. */
  readonly id: bigint;
  /**
   * Queues a message: text for a string, binary for bytes.
   * @throws {GatewayError} `closed`, `backpressure`, `too-large`, `unknown-connection`.
   */
  send(data: MessageData): void;
  /** Queues a text message. @throws {GatewayError} As `send`. */
  sendText(text: string): void;
  /** Queues a binary message. @throws {GatewayError} As `send`. */
  sendBinary(data: Bytes): void;
  /**
   * Queues `JSON.stringify(value)` (bigints as exact JSON numbers) as text.
   * @throws {GatewayError} `invalid-argument` if it cannot be serialized; otherwise as `send`.
   */
  sendJson(value: unknown): void;
  /**
   * Starts the closing handshake; `onClose` runs later with this code.
   * @param code 1000 (default), 1001, 1002, 1003, 1007 to 1011, or 3000 to 4999.
   * @param reason At most 123 bytes of UTF-8 (default `""`).
   * @throws {GatewayError} `invalid-argument`, `too-large`, `closed`, `unknown-connection`.
   */
  close(code?: number, reason?: string): void;
  /**
   * Joins a room (1 to 256 bytes; created on first join). Idempotent.
   * @throws {GatewayError} `invalid-argument`, `too-large`, `limit-reached`, `unknown-connection`.
   */
  join(room: string): void;
  /**
   * Leaves a room; returns whether the connection was in it.
   * @throws {GatewayError} `unknown-connection`.
   */
  leave(room: string): boolean;
  /** The rooms this connection is in. @throws {GatewayError} `unknown-connection`. */
  rooms(): string[];
  /** The connection's metadata entries. */
  readonly metadata: Metadata;
  /**
   * Starts a timer: `onTimer(conn, timerId)` runs after `delayMs`
   * milliseconds (rounded down, clamped to 1 .. 2^32-1), then every
   * `delayMs` if `repeat`. At most 64 timers per connection by default (`max_timers`).
   * @throws {GatewayError} `limit-reached`, `not-owner`, `closed`, `unknown-connection`.
   */
  setTimer(delayMs: number, options?: { repeat?: boolean }): TimerId;
  /** Cancels a timer; returns whether it was still pending. */
  cancelTimer(timerId: TimerId | number): boolean;
  /** `Connection(<id>)`. */
  toString(): string;
}

/** Cancels a timer; returns whether it was still pending. */
export function cancelTimer(timerId: TimerId | number): boolean;

/** A room of this route, by name. */
export class Room {
  constructor(name: string);
  /** The room's name. */
  readonly name: string;
  /**
   * Queues a message to every member except `except`; returns how many got
   * it (members whose buffer is full are skipped).
   * @throws {GatewayError} `too-large`, `invalid-argument`.
   */
  broadcast(data: MessageData, except?: ConnectionLike): number;
  /** Broadcasts a text message. @throws {GatewayError} As `broadcast`. */
  broadcastText(text: string, except?: ConnectionLike): number;
  /**
   * Broadcasts `JSON.stringify(value)` (bigints as exact JSON numbers).
   * @throws {GatewayError} `invalid-argument` if it cannot be serialized; otherwise as `broadcast`.
   */
  broadcastJson(value: unknown, except?: ConnectionLike): number;
  /** How many connections are in the room (0 if it does not exist). */
  size(): number;
  /** The connections in the room, in no particular order. */
  members(): Connection[];
}

/** A handle to the room called `name`. */
export function room(name: string): Room;

/** One value of the route's `[route.config]` table; `undefined` if unset. */
export function config(key: string): string | undefined;

/** The whole `[route.config]` table as `[key, value]` pairs, sorted by key. */
export function configAll(): [string, string][];

/** Writing to the gateway's log, tagged with the route, plugin and connection. */
export const log: {
  readonly trace: (message: unknown) => void;
  readonly debug: (message: unknown) => void;
  readonly info: (message: unknown) => void;
  readonly warn: (message: unknown) => void;
  readonly error: (message: unknown) => void;
};

/** One HTTP header. */
export interface Header {
  name: string;
  value: string;
}

/** Response headers: an object, or an iterable of pairs or records. */
export type HeadersInit = Record<string, string> | Iterable<readonly [string, string] | Header>;

/** The HTTP upgrade request that opens a connection. */
export class Request {
  constructor(raw: {
    method: string;
    path: string;
    query?: string;
    headers: Header[];
    remoteAddr: string;
    subprotocols: string[];
  });
  /** Always `"GET"` for an upgrade. */
  readonly method: string;
  /** The path without the query string, e.g. `"/chat"`. */
  readonly path: string;
  /** The raw query string without `?`, or `undefined`. */
  readonly query: string | undefined;
  /** Every header in the order received; names are lower-case. */
  readonly headers: Header[];
  /** The peer's address as `"ip:port"`. */
  readonly remoteAddr: string;
  /** The subprotocols the client offered, in its order of preference. */
  readonly subprotocols: string[];
  /** The first value of a header, by case-insensitive name. */
  header(name: string): string | undefined;
  /**
   * The first value of a query parameter, percent-decoded (`+` is a space;
   * invalid UTF-8 becomes U+FFFD); `undefined` if absent.
   */
  queryParam(name: string): string | undefined;
}

/** The contract's `open-response` variant. */
export type OpenResponseVariant =
  | { tag: "accept"; val: { subprotocol?: string; headers: Header[] } }
  | { tag: "reject"; val: { status: number; headers: Header[]; body: Uint8Array } };

/** What `onOpen` answers. `onOpen` returning nothing accepts. */
export class OpenResponse {
  constructor(variant: OpenResponseVariant);
  readonly variant: OpenResponseVariant;
  /** Accepts without a subprotocol. */
  static accept(headers?: HeadersInit): OpenResponse;
  /** Accepts selecting `subprotocol`, one of `request.subprotocols`. */
  static acceptWith(subprotocol: string, headers?: HeadersInit): OpenResponse;
  /**
   * Refuses the upgrade with `status` (400 to 599) and `body` (plain text
   * UTF-8 unless `headers` has a `content-type`).
   */
  static reject(status: number, body?: string | Bytes, headers?: HeadersInit): OpenResponse;
}

/** A fragment of a message, on routes with `deliver = "fragments"`. */
export interface Fragment {
  /** Whether the message is text (UTF-8, possibly split mid-character) or binary. */
  text: boolean;
  /** Whether this is the message's first fragment. */
  first: boolean;
  /** Whether this is the message's final fragment (FIN). */
  fin: boolean;
  /** The fragment's payload. */
  data: Uint8Array;
}

/**
 * The event handlers of a plugin; every method is optional. Methods are
 * called with `this` set to the handler. A method that throws (or whose
 * promise rejects) is logged and closes the connection with 1011; in
 * `onOpen` the upgrade is refused with 500.
 */
export interface Handler {
  /** Accept or reject a connection (returning nothing accepts). Synchronous. */
  onOpen?(conn: Connection, request: Request): OpenResponse | void;
  /** A complete message arrived. */
  onMessage?(conn: Connection, message: Message): void | Promise<void>;
  /** On `deliver = "fragments"` routes: a fragment arrived. */
  onFragment?(conn: Connection, fragment: Fragment): void | Promise<void>;
  /** The connection closed (once per accepted connection; 1005 no code, 1006 vanished). */
  onClose?(conn: Connection, code: number, reason: string): void | Promise<void>;
  /** A timer fired. */
  onTimer?(conn: Connection, timerId: TimerId): void | Promise<void>;
  /** The connection continues on a fresh instance: rebuild state from metadata. */
  onResume?(conn: Connection, request: Request): void | Promise<void>;
}

/** The objects a plugin's entry module exports as `handler` and `resume`. */
export interface PluginExports {
  readonly handler: {
    onOpen(conn: bigint, request: unknown): OpenResponseVariant;
    onMessage(conn: bigint, message: { tag: "text"; val: string } | { tag: "binary"; val: Uint8Array }): void;
    onFragment(conn: bigint, fragment: Fragment): void;
    onClose(conn: bigint, code: number, reason: string): void;
    onTimer(conn: bigint, timer: bigint): void;
  };
  readonly resume: {
    onResume(conn: bigint, request: unknown): void;
  };
}

/**
 * Turns a handler into the plugin's exports (the Rust SDK's `export!`):
 * `export const { handler, resume } = definePlugin({ ... });`
 * @throws {TypeError} The handler is not an object, or has a misspelt or non-function `on...` method.
 */
export function definePlugin(handler: Handler): PluginExports;
