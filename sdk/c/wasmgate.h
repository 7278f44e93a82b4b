/**
 * @file wasmgate.h
 * @brief wasmgate SDK for C: WebSocket route handlers as WebAssembly components.
 *
 * A wasmgate plugin handles the events of one route: a connection opens, a
 * message arrives, a timer fires, the connection closes. This header turns
 * the WIT contract (`wit/plugin.wit`, package `wasmgate:plugin@0.1.1`, world
 * `resumable-plugin`) into a small C API that mirrors the Rust SDK
 * (`sdk/src/lib.rs`) in C naming.
 *
 * **Handlers.** Define the callbacks you need, with exactly these
 * signatures: wg_on_open(), wg_on_message(), wg_on_fragment(), wg_on_close(),
 * wg_on_timer(), wg_on_resume(). The SDK (`wasmgate.c`) defines every one of
 * them as a weak symbol that does nothing (wg_on_open() accepts), so the
 * ones you leave out keep that default. `wasmgate.c` owns the component's
 * exports: it converts what the gateway hands over into the `wg_*` types,
 * calls your callback, and frees everything afterwards.
 *
 * @code
 * #include "wasmgate.h"
 *
 * void wg_on_message(wg_conn conn, const wg_message *msg) {
 *     wg_error err = wg_send(conn, msg);              // echo it back
 *     if (err != WG_OK)
 *         wg_logf(WG_LOG_WARN, "echo to %llu failed: %s",
 *                 (unsigned long long)conn, wg_error_name(err));
 * }
 * @endcode
 *
 * Build with `sdk/c/build.sh PLUGIN_DIR OUT.wasm` and point a route's
 * `plugin` at `OUT.wasm`.
 *
 * **Errors.** Every host call that can fail returns a ::wg_error: #WG_OK or
 * the reason (the WIT `gateway-error` cases). Nothing fails silently. Out of
 * memory is not an error code: like a Rust plugin, the SDK traps (the
 * gateway then closes the connection with 1011, or answers the upgrade with
 * HTTP 500).
 *
 * **Strings.** Strings passed *in* are NUL-terminated UTF-8 (`const char *`;
 * NULL is treated as ""), except where a `_n` variant takes a length. The
 * SDK checks that they are valid UTF-8 before calling the host (which would
 * trap on invalid UTF-8): a call that can fail then returns
 * #WG_ERR_INVALID_ARGUMENT (wg_last_error_detail() names the argument and
 * the offset), room and config look-ups find nothing, and log lines and
 * response headers are sent with U+FFFD in place of the invalid bytes.
 * Strings handed *to* your callbacks are borrowed: valid until the callback
 * returns, always NUL-terminated (also with a length where they may contain
 * NUL bytes). Strings and arrays the SDK *returns* are owned by the caller
 * and are released with one `free()` each; every function says so.
 *
 * **State.** Global variables live in the plugin instance's linear memory.
 * By default every connection has its own instance, so globals are
 * per-connection; with `isolation = "shared"` one instance serves every
 * connection of the route (key state by connection id). Guest memory is
 * lost when an instance is replaced (hibernation, `on_reload = "migrate"`,
 * a shared instance after a trap): keep what must survive in metadata
 * (wg_metadata_set()) and rebuild it in wg_on_resume().
 *
 * **Never block.** A WASI call that would wait (sleep, poll) traps: wait
 * with wg_set_timer() instead. There are no files, environment or network.
 */
#ifndef WASMGATE_H
#define WASMGATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** @brief The SDK version: the version of the WIT contract it implements. */
#define WASMGATE_SDK_VERSION "0.1.1"

/** @brief Marks a printf-like function (format argument `fmt`, first variadic `args`). */
#if defined(__GNUC__) || defined(__clang__)
#define WG_PRINTF_LIKE(fmt, args) __attribute__((__format__(__printf__, fmt, args)))
#else
#define WG_PRINTF_LIKE(fmt, args)
#endif

/* ------------------------------------------------------------------------ */
/** @name Basic types
 * @{ */

/**
 * @brief Identifies one WebSocket connection of this route.
 *
 * Unique for the gateway's lifetime and never reused; only meaningful
 * within the route that issued it.
 */
typedef uint64_t wg_conn;

/** @brief Identifies one timer started with wg_set_timer() (ids count per connection). */
typedef uint64_t wg_timer;

/**
 * @brief "No connection": pass as the `except` argument of the broadcast
 * functions to send to every member of a room.
 */
#define WG_NO_CONN UINT64_MAX

/**
 * @brief A borrowed string with a length (UTF-8 unless said otherwise).
 *
 * Strings the SDK hands to a callback as a ::wg_str are NUL-terminated as
 * well (`ptr[len] == 0`), so `ptr` can be used as a C string when the text
 * cannot contain NUL bytes. Borrowed: valid until the callback returns.
 */
typedef struct wg_str {
    const char *ptr; /**< The bytes; never NULL (an empty string is ""). */
    size_t len;      /**< The number of bytes, without the terminating NUL. */
} wg_str;

/** @brief A ::wg_str of a string literal, without strlen(): `WG_STR("hi")`. */
#define WG_STR(literal) ((wg_str){"" literal, sizeof(literal) - 1})

/**
 * @brief Why a host call failed: the WIT `gateway-error` cases, plus #WG_OK.
 *
 * For #WG_ERR_INVALID_ARGUMENT the host also says why: see
 * wg_last_error_detail(). wg_error_name() gives each a printable name.
 */
typedef enum wg_error {
    /** Success. Always 0, so `if (wg_join(...))` tests for failure. */
    WG_OK = 0,
    /** The connection is closing or closed; nothing more can be sent to it. */
    WG_ERR_CLOSED,
    /** No open connection with that id exists on this route. */
    WG_ERR_UNKNOWN_CONNECTION,
    /** The message, key, value, reason or name is larger than the limit. */
    WG_ERR_TOO_LARGE,
    /** The connection's outbound buffer is full (a slow consumer): the
     *  message was not queued. The route's `slow_consumer` policy says
     *  whether the connection is also being closed. */
    WG_ERR_BACKPRESSURE,
    /** A per-connection quota (timers, metadata entries, rooms) is used up. */
    WG_ERR_LIMIT_REACHED,
    /** Only allowed on connections served by this instance (for example timers). */
    WG_ERR_NOT_OWNER,
    /** An argument is invalid; wg_last_error_detail() says which and why. */
    WG_ERR_INVALID_ARGUMENT,
} wg_error;

/**
 * @brief The name of an error, as the WIT spells it.
 * @param err Any value; unknown values give "unknown-error".
 * @return A static string: "ok", "closed", "unknown-connection",
 *         "too-large", "backpressure", "limit-reached", "not-owner" or
 *         "invalid-argument". Never NULL; do not free.
 */
const char *wg_error_name(wg_error err);

/**
 * @brief The host's explanation of the last #WG_ERR_INVALID_ARGUMENT.
 * @return A NUL-terminated string owned by the SDK ("" if no call has
 *         failed with invalid-argument yet), valid until the next SDK call
 *         that fails with #WG_ERR_INVALID_ARGUMENT. Do not free.
 */
const char *wg_last_error_detail(void);

/** @brief The kind of a ::wg_message. */
typedef enum wg_message_kind {
    WG_TEXT = 0,   /**< A text message: valid UTF-8 (it may contain NUL bytes). */
    WG_BINARY = 1, /**< A binary message: any bytes. */
} wg_message_kind;

/**
 * @brief A complete WebSocket message.
 *
 * In wg_on_message() it is borrowed: `data` is valid until the callback
 * returns (copy what you keep) and is NUL-terminated (`data[len] == 0`) for
 * both kinds. To send one, fill it yourself:
 * `wg_message m = {WG_TEXT, "hi", 2};`.
 */
typedef struct wg_message {
    wg_message_kind kind; /**< #WG_TEXT or #WG_BINARY. */
    const char *data;     /**< The payload (cast to `const uint8_t *` for binary). */
    size_t len;           /**< The payload's length in bytes (0 for an empty message). */
} wg_message;

/**
 * @brief One fragment of a message, for routes with `deliver = "fragments"`.
 *
 * Borrowed: `data` is valid until wg_on_fragment() returns and is
 * NUL-terminated (`data[len] == 0`).
 */
typedef struct wg_fragment {
    bool text;           /**< The message is text (its bytes are UTF-8, but a
                              character may be split between fragments), else binary. */
    bool first;          /**< This is the message's first fragment. */
    bool fin;            /**< This is the message's final fragment (the FIN bit). */
    const uint8_t *data; /**< The fragment's payload. */
    size_t len;          /**< The payload's length in bytes. */
} wg_fragment;

/** @brief One HTTP header of the upgrade request (borrowed, NUL-terminated). */
typedef struct wg_header {
    const char *name;  /**< Lower-case name, for example "sec-websocket-protocol". */
    const char *value; /**< Value; invalid UTF-8 arrives replaced by U+FFFD. */
} wg_header;

/**
 * @brief The HTTP upgrade request that opens a connection.
 *
 * Borrowed: every pointer in it is valid until the callback that received
 * it (wg_on_open(), wg_on_resume()) returns. Every string is NUL-terminated.
 */
typedef struct wg_request {
    const char *method;      /**< The request method; always "GET". */
    const char *path;        /**< The path without the query string, for example "/chat". */
    const char *query;       /**< The raw query string without the leading '?', or NULL
                                  if the URL had none. See wg_request_query_param(). */
    const wg_header *headers; /**< Every request header, in the order received. */
    size_t header_count;     /**< How many entries `headers` has. */
    const char *remote_addr; /**< The peer's address as "ip:port". */
    const char *const *subprotocols; /**< The subprotocols the client offered in
                                  `Sec-WebSocket-Protocol`, in its order of preference
                                  (filtered by the route's `subprotocols`). */
    size_t subprotocol_count; /**< How many entries `subprotocols` has. */
} wg_request;

/**
 * @brief What wg_on_open() answers: accept the connection or reject the
 * upgrade. Opaque; change it with wg_accept(), wg_accept_with(),
 * wg_reject(), wg_reject_n() and wg_response_header(). It starts as
 * "accept, no subprotocol, no headers".
 */
typedef struct wg_open_response wg_open_response;

/** @brief How severe a log line is. */
typedef enum wg_log_level {
    WG_LOG_TRACE = 0, /**< Very detailed tracing. */
    WG_LOG_DEBUG = 1, /**< Debugging detail. */
    WG_LOG_INFO = 2,  /**< Normal operation. */
    WG_LOG_WARN = 3,  /**< Something unexpected that the plugin handled. */
    WG_LOG_ERROR = 4, /**< Something failed. */
} wg_log_level;

/** @} */

/* ------------------------------------------------------------------------ */
/** @name Event handlers (define the ones you need)
 *
 * Calls for one connection never overlap: each handler returns before the
 * next event is delivered. Every argument is borrowed for the duration of
 * the call. A trap (abort(), an out-of-bounds access, running past the
 * route's `max_call_time`) closes the connection with 1011, or answers the
 * upgrade with HTTP 500 in wg_on_open(); with `isolation = "shared"` it also
 * replaces the instance (every connection's guest memory is lost). To fail
 * one connection without trapping, call wg_fail().
 * @{ */

/**
 * @brief A client asks to open a connection; accept or reject it.
 *
 * Runs before the handshake completes. Host calls for `conn` (send, join,
 * metadata, timers) already work; what is sent is delivered right after the
 * handshake. A rejected connection's rooms, metadata and timers are
 * discarded without wg_on_close().
 * Default: accept.
 *
 * @param conn The new connection.
 * @param req  The upgrade request (borrowed).
 * @param resp The answer, initially "accept": leave it, or call wg_reject(),
 *             wg_accept_with()...
 */
void wg_on_open(wg_conn conn, const wg_request *req, wg_open_response *resp);

/**
 * @brief A complete message arrived (not on routes with `deliver = "fragments"`).
 * Default: ignore it.
 * @param conn The connection it came from.
 * @param msg  The message (borrowed; NUL-terminated data).
 */
void wg_on_message(wg_conn conn, const wg_message *msg);

/**
 * @brief On routes with `deliver = "fragments"` only: a fragment of a
 * message arrived, in order (instead of wg_on_message()). An unfragmented
 * message is one fragment that is both first and final. Default: ignore it.
 * @param conn     The connection it came from.
 * @param fragment The fragment (borrowed).
 */
void wg_on_fragment(wg_conn conn, const wg_fragment *fragment);

/**
 * @brief The connection closed: exactly once per accepted connection,
 * however it ended (unless the plugin itself trapped). Default: nothing.
 *
 * Sending to `conn` fails with #WG_ERR_CLOSED here; its metadata and rooms
 * are still readable (so you can tell its rooms who left).
 * @param conn   The connection.
 * @param code   The peer's close code when the peer closed first, else the
 *               code the gateway or plugin sent; 1005 when the peer's close
 *               frame had no code, 1006 when the peer vanished.
 * @param reason The close reason (borrowed, NUL-terminated UTF-8, often empty).
 */
void wg_on_close(wg_conn conn, uint16_t code, wg_str reason);

/**
 * @brief A timer set with wg_set_timer() fired. Default: nothing.
 * @param conn  The connection that set it.
 * @param timer The id wg_set_timer() returned.
 */
void wg_on_timer(wg_conn conn, wg_timer timer);

/**
 * @brief The connection continues on a new instance of the plugin: after a
 * reload on a route with `on_reload = "migrate"`, when a hibernated
 * connection wakes (`hibernate_after`), or when a shared instance was
 * replaced. This instance has none of the previous one's memory (globals
 * start fresh); the connection's rooms, metadata and timers are intact, so
 * rebuild per-connection state from wg_metadata_get() here. Runs before the
 * event that woke the connection. A trap closes the connection with 1011.
 * Default: nothing.
 * @param conn The connection.
 * @param req  The original upgrade request (borrowed).
 */
void wg_on_resume(wg_conn conn, const wg_request *req);

/** @} */

/* ------------------------------------------------------------------------ */
/** @name Answering wg_on_open()
 *
 * The SDK copies every string given here; the caller keeps ownership of its
 * arguments. Only call these on the `resp` your wg_on_open() received.
 * @{ */

/**
 * @brief Accept the connection without a subprotocol (the default).
 * Drops any subprotocol, status, body and headers set before.
 * @param resp The answer to change.
 */
void wg_accept(wg_open_response *resp);

/**
 * @brief Accept the connection selecting `subprotocol`.
 *
 * It must be one of `req->subprotocols`; anything else makes the gateway
 * refuse the upgrade with HTTP 500. Drops headers set before.
 * @param resp        The answer to change.
 * @param subprotocol The subprotocol (copied). NULL is the same as wg_accept().
 */
void wg_accept_with(wg_open_response *resp, const char *subprotocol);

/**
 * @brief Reject the upgrade with an HTTP `status` and a plain-text `body`,
 * like the Rust SDK's `OpenResponse::reject`: the response carries
 * `content-type: text/plain; charset=utf-8` (replaced if you add your own
 * `content-type` with wg_response_header()). Drops headers set before.
 * @param resp   The answer to change.
 * @param status The HTTP status, 400 to 599 (the gateway sends others as 500).
 * @param body   The body, NUL-terminated (copied; NULL is empty).
 */
void wg_reject(wg_open_response *resp, uint16_t status, const char *body);

/**
 * @brief wg_reject() with a body of `len` bytes (may contain NUL bytes).
 * @param resp   The answer to change.
 * @param status The HTTP status, 400 to 599.
 * @param body   The body (copied; may be NULL when `len` is 0).
 * @param len    The body's length in bytes.
 */
void wg_reject_n(wg_open_response *resp, uint16_t status, const void *body, size_t len);

/**
 * @brief Adds a response header: to the `101 Switching Protocols` response
 * when accepting, to the error response when rejecting. Call it after
 * choosing with wg_accept()/wg_accept_with()/wg_reject(), which drop
 * headers. On a reject, a `content-type` header (any case) replaces the
 * default one. Names and values must be valid HTTP (else the gateway
 * answers 500).
 * @param resp  The answer to change.
 * @param name  Header name (copied; invalid UTF-8 becomes U+FFFD).
 * @param value Header value (copied; invalid UTF-8 becomes U+FFFD).
 */
void wg_response_header(wg_open_response *resp, const char *name, const char *value);

/** @} */

/* ------------------------------------------------------------------------ */
/** @name Reading the upgrade request
 * @{ */

/**
 * @brief The first value of a header, by ASCII case-insensitive name.
 * @param req  The request (from wg_on_open() or wg_on_resume()).
 * @param name The header name, any case.
 * @return The value, borrowed from `req` (valid as long as `req`; do not
 *         free), or NULL if the request has no such header.
 */
const char *wg_request_header(const wg_request *req, const char *name);

/**
 * @brief The first value of a query-string parameter, percent-decoded
 * (`+` is a space), exactly as the Rust SDK's `Request::query_param`:
 * invalid `%` escapes are kept as they are, and decoded bytes that are not
 * valid UTF-8 become U+FFFD. `a&b=` gives "" for both `a` and `b`.
 * @param req  The request.
 * @param name The parameter name, compared with the decoded names.
 * @return A new NUL-terminated string the caller frees with free(), or NULL
 *         if the parameter is absent (or the URL had no query).
 */
char *wg_request_query_param(const wg_request *req, const char *name);

/** @} */

/* ------------------------------------------------------------------------ */
/** @name Sending and closing
 *
 * Messages to one connection are delivered in the order they were queued.
 * The SDK does not keep the buffers passed in; the caller keeps ownership.
 * @{ */

/**
 * @brief Queues any message (for example the one wg_on_message() received:
 * an echo) to a connection of this route.
 * @param conn The destination.
 * @param msg  The message (read during the call only).
 * @return #WG_OK, #WG_ERR_CLOSED, #WG_ERR_UNKNOWN_CONNECTION,
 *         #WG_ERR_TOO_LARGE (over the route's limits),
 *         #WG_ERR_BACKPRESSURE (outbound buffer full: not queued) or
 *         #WG_ERR_INVALID_ARGUMENT (text that is not valid UTF-8).
 */
wg_error wg_send(wg_conn conn, const wg_message *msg);

/**
 * @brief Queues a text message.
 * @param conn The destination.
 * @param text NUL-terminated UTF-8.
 * @return As wg_send().
 */
wg_error wg_send_text(wg_conn conn, const char *text);

/**
 * @brief Queues a text message of `len` bytes (it may contain NUL bytes).
 * @param conn The destination.
 * @param text UTF-8 bytes (invalid UTF-8: #WG_ERR_INVALID_ARGUMENT, nothing sent).
 * @param len  Its length in bytes.
 * @return As wg_send().
 */
wg_error wg_send_text_n(wg_conn conn, const char *text, size_t len);

/**
 * @brief Queues a binary message.
 * @param conn The destination.
 * @param data The bytes (may be NULL when `len` is 0).
 * @param len  Their number.
 * @return As wg_send().
 */
wg_error wg_send_binary(wg_conn conn, const void *data, size_t len);

/**
 * @brief Starts the closing handshake of a connection of this route.
 *
 * Messages already queued are sent first; wg_on_close() runs later, once,
 * with this code.
 * @param conn   The connection.
 * @param code   1000, 1001, 1002, 1003, 1007 to 1011, or 3000 to 4999.
 * @param reason At most 123 bytes of UTF-8, NUL-terminated (NULL is "").
 * @return #WG_OK, #WG_ERR_INVALID_ARGUMENT (code, or a reason that is not
 *         UTF-8), #WG_ERR_TOO_LARGE
 *         (reason), #WG_ERR_CLOSED (already closing), #WG_ERR_UNKNOWN_CONNECTION.
 */
wg_error wg_close(wg_conn conn, uint16_t code, const char *reason);

/**
 * @brief Fails one connection without trapping: logs `what` at error level
 * and closes the connection with 1011 "internal error" (errors of that
 * close are ignored). What the Python SDK does when a handler raises.
 * @param conn The connection.
 * @param what What went wrong (NUL-terminated; NULL logs a generic line).
 */
void wg_fail(wg_conn conn, const char *what);

/** @} */

/* ------------------------------------------------------------------------ */
/** @name Rooms
 *
 * Rooms are named groups of connections of this route, created on first
 * join and gone when empty. Names are 1 to 256 bytes of UTF-8.
 * Connections leave all their rooms when they close.
 * @{ */

/**
 * @brief Adds a connection to a room (joining twice changes nothing).
 * @param conn The connection.
 * @param room The room's name.
 * @return #WG_OK, #WG_ERR_INVALID_ARGUMENT or #WG_ERR_TOO_LARGE (name),
 *         #WG_ERR_LIMIT_REACHED (too many rooms), #WG_ERR_CLOSED,
 *         #WG_ERR_UNKNOWN_CONNECTION.
 */
wg_error wg_join(wg_conn conn, const char *room);

/**
 * @brief Removes a connection from a room.
 * @param conn       The connection.
 * @param room       The room's name.
 * @param was_member Out (may be NULL): whether it was a member.
 * @return #WG_OK or the reason (#WG_ERR_UNKNOWN_CONNECTION,
 *         #WG_ERR_INVALID_ARGUMENT...).
 */
wg_error wg_leave(wg_conn conn, const char *room, bool *was_member);

/**
 * @brief The rooms a connection is in, in no particular order.
 * @param conn  The connection.
 * @param rooms Out: a NULL-terminated array of NUL-terminated names, in ONE
 *              allocation: release it (array and names) with a single
 *              `free(*rooms)`. Set to NULL on error.
 * @param count Out (may be NULL): the number of names.
 * @return #WG_OK or #WG_ERR_UNKNOWN_CONNECTION.
 */
wg_error wg_rooms(wg_conn conn, char ***rooms, size_t *count);

/**
 * @brief Queues a message to every member of a room except `except`.
 *
 * Members whose buffer is full are skipped (the route's slow-consumer
 * policy handles them).
 * @param room   The room's name.
 * @param msg    The message (read during the call only).
 * @param except A member to skip (usually the sender), or #WG_NO_CONN.
 * @param count  Out (may be NULL): how many connections it was queued for.
 * @return #WG_OK, #WG_ERR_TOO_LARGE, #WG_ERR_INVALID_ARGUMENT (room name,
 *         or text that is not valid UTF-8). `*count` is 0 on error.
 */
wg_error wg_room_broadcast(const char *room, const wg_message *msg, wg_conn except,
                           uint32_t *count);

/**
 * @brief Broadcasts a NUL-terminated text message; see wg_room_broadcast().
 * @param room   The room's name.
 * @param text   NUL-terminated UTF-8.
 * @param except A member to skip, or #WG_NO_CONN.
 * @param count  Out (may be NULL): how many connections it was queued for.
 * @return As wg_room_broadcast().
 */
wg_error wg_room_broadcast_text(const char *room, const char *text, wg_conn except,
                                uint32_t *count);

/**
 * @brief Broadcasts a binary message; see wg_room_broadcast().
 * @param room   The room's name.
 * @param data   The bytes (may be NULL when `len` is 0).
 * @param len    Their number.
 * @param except A member to skip, or #WG_NO_CONN.
 * @param count  Out (may be NULL): how many connections it was queued for.
 * @return As wg_room_broadcast().
 */
wg_error wg_room_broadcast_binary(const char *room, const void *data, size_t len,
                                  wg_conn except, uint32_t *count);

/**
 * @brief How many connections are in a room.
 * @param room The room's name.
 * @return The number of members (0 if the room does not exist).
 */
uint32_t wg_room_size(const char *room);

/**
 * @brief The connections in a room, in no particular order.
 * @param room    The room's name.
 * @param members Out: an array of ids the caller frees with free(); NULL
 *                when the room is empty.
 * @return The number of ids in `*members`.
 */
size_t wg_room_members(const char *room, wg_conn **members);

/** @} */

/* ------------------------------------------------------------------------ */
/** @name Metadata
 *
 * String entries kept by the gateway per connection until it closes:
 * readable by any connection of the route and in wg_on_close(), and kept
 * across instance replacement (hibernation, migration), unlike globals.
 * Keys are at most 256 bytes, values 64 KiB, at most 64 entries (by default) per
 * connection.
 * @{ */

/**
 * @brief Sets a metadata entry.
 * @param conn  The connection.
 * @param key   The key (NUL-terminated UTF-8).
 * @param value The value (NUL-terminated UTF-8; copied by the host).
 * @return #WG_OK, #WG_ERR_TOO_LARGE, #WG_ERR_LIMIT_REACHED, #WG_ERR_CLOSED,
 *         #WG_ERR_UNKNOWN_CONNECTION, #WG_ERR_INVALID_ARGUMENT (not UTF-8).
 */
wg_error wg_metadata_set(wg_conn conn, const char *key, const char *value);

/**
 * @brief Reads a metadata entry.
 * @param conn  The connection.
 * @param key   The key.
 * @param value Out: a new NUL-terminated string the caller frees with
 *              free(), or NULL if the entry is unset (or on error).
 * @return #WG_OK (also when unset), #WG_ERR_UNKNOWN_CONNECTION or
 *         #WG_ERR_INVALID_ARGUMENT (a key that is not UTF-8).
 */
wg_error wg_metadata_get(wg_conn conn, const char *key, char **value);

/**
 * @brief Removes a metadata entry.
 * @param conn      The connection.
 * @param key       The key.
 * @param old_value Out (may be NULL, then the old value is discarded): the
 *                  old value, a new string the caller frees with free(), or
 *                  NULL if the entry was unset.
 * @return #WG_OK (also when unset), #WG_ERR_UNKNOWN_CONNECTION or
 *         #WG_ERR_INVALID_ARGUMENT (a key that is not UTF-8).
 */
wg_error wg_metadata_remove(wg_conn conn, const char *key, char **old_value);

/** @} */

/* ------------------------------------------------------------------------ */
/** @name Timers
 * @{ */

/**
 * @brief Starts a timer for the connection whose event is being handled:
 * wg_on_timer() runs after `delay_ms` milliseconds, then every `delay_ms`
 * if `repeat`, until cancelled or the connection closes.
 * @param conn     The connection whose event is being handled (any other
 *                 gives #WG_ERR_NOT_OWNER, under `isolation = "shared"` too).
 * @param delay_ms The delay in milliseconds; 0 is raised to 1.
 * @param repeat   Fire every `delay_ms` rather than once.
 * @param timer    Out (may be NULL): the timer's id, for wg_cancel_timer()
 *                 and wg_on_timer().
 * @return #WG_OK, #WG_ERR_LIMIT_REACHED (64 timers per connection by default, or a rate limit),
 *         #WG_ERR_NOT_OWNER, #WG_ERR_CLOSED.
 */
wg_error wg_set_timer(wg_conn conn, uint32_t delay_ms, bool repeat, wg_timer *timer);

/**
 * @brief Cancels a timer of the connection whose event is being handled
 * (the host call takes no connection: timer ids count per connection).
 * @param timer The id wg_set_timer() gave.
 * @return Whether it was still pending (false for a one-shot timer that
 *         already fired, or an unknown id).
 */
bool wg_cancel_timer(wg_timer timer);

/** @} */

/* ------------------------------------------------------------------------ */
/** @name Configuration
 * @{ */

/**
 * @brief One value of the route's `[route.config]` table.
 * @param key The key.
 * @return A new NUL-terminated string the caller frees with free(), or NULL
 *         if the table has no such key.
 */
char *wg_config_get(const char *key);

/** @brief One `[route.config]` entry (see wg_config_all()). */
typedef struct wg_config_entry {
    const char *key;   /**< The key (NUL-terminated). */
    const char *value; /**< The value (NUL-terminated). */
} wg_config_entry;

/**
 * @brief The whole `[route.config]` table, sorted by key.
 * @param entries Out: an array of entries and their strings in ONE
 *                allocation: release it with a single `free(*entries)`.
 *                NULL when the table is empty.
 * @return The number of entries.
 */
size_t wg_config_all(wg_config_entry **entries);

/** @} */

/* ------------------------------------------------------------------------ */
/** @name Logging
 *
 * Each call writes one line to the gateway's log, tagged with the route,
 * the plugin and the connection (`RUST_LOG` decides which levels are
 * written). stdout and stderr (printf) also become log lines.
 * @{ */

/**
 * @brief Writes `msg` at `level`.
 * @param level The severity.
 * @param msg   NUL-terminated UTF-8 (NULL is ""; invalid bytes are logged as U+FFFD).
 */
void wg_log(wg_log_level level, const char *msg);

/**
 * @brief Writes a printf-formatted line at `level` (any length).
 * @param level The severity.
 * @param fmt   A printf format string, then its arguments.
 */
void wg_logf(wg_log_level level, const char *fmt, ...) WG_PRINTF_LIKE(2, 3);

/** @brief Logs `msg` at trace level. @param msg NUL-terminated UTF-8. */
void wg_log_trace(const char *msg);
/** @brief Logs `msg` at debug level. @param msg NUL-terminated UTF-8. */
void wg_log_debug(const char *msg);
/** @brief Logs `msg` at info level. @param msg NUL-terminated UTF-8. */
void wg_log_info(const char *msg);
/** @brief Logs `msg` at warn level. @param msg NUL-terminated UTF-8. */
void wg_log_warn(const char *msg);
/** @brief Logs `msg` at error level. @param msg NUL-terminated UTF-8. */
void wg_log_error(const char *msg);

/** @} */

/* ------------------------------------------------------------------------ */
/** @name JSON strings
 *
 * For building JSON by hand: escapes a string's contents exactly as
 * `serde_json` does (so output matches the Rust SDK byte for byte): `"` and
 * `\` are backslash-escaped, `\b \f \n \r \t` use their short forms, other
 * bytes below 0x20 become `\u00XX` (lower-case hex), everything else
 * (non-ASCII UTF-8, DEL, `/`) is copied as is. The surrounding quotes are
 * not added. Note that serde_json's `json!` objects have their keys sorted:
 * write them in that order to match.
 * @{ */

/**
 * @brief Escapes `len` bytes of `s` into `buf`, snprintf-style.
 * @param buf  Where to write (may be NULL when `size` is 0).
 * @param size The size of `buf` in bytes; at most `size - 1` characters and
 *             a NUL are written (nothing when `size` is 0).
 * @param s    The string's bytes (may contain NUL bytes).
 * @param len  Its length in bytes.
 * @return The length of the full escaped text, without the NUL. It did not
 *         fit (and was cut) if the return value is `>= size`.
 */
size_t wg_json_escape(char *buf, size_t size, const char *s, size_t len);

/**
 * @brief Escapes `len` bytes of `s` into a new string.
 * @param s        The string's bytes (may contain NUL bytes).
 * @param len      Its length in bytes.
 * @param out_len  Out (may be NULL): the escaped length, without the NUL.
 * @return A new NUL-terminated string the caller frees with free().
 */
char *wg_json_escape_alloc(const char *s, size_t len, size_t *out_len);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* WASMGATE_H */
