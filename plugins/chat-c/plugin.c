/*
 * chat-c: rooms chosen by the query string (`/chat?room=lobby&name=ana`).
 *
 * The C twin of plugins/chat (Rust), message for message. Every text message
 * is broadcast to the other members of the sender's room as
 * {"from":..,"room":..,"text":..,"type":"message"}; joins and leaves are
 * announced to the room as {"name":..,"room":..,"type":"join"|"leave"}. The
 * newcomer gets {"members":N,"name":..,"room":..,"type":"welcome"}. Keys are
 * sorted, as serde_json writes the Rust plugin's json! values. Binary
 * messages are refused with close code 1003 (unsupported data).
 *
 * All state is connection metadata (kept by the gateway), so the plugin
 * works unchanged with per-connection or shared instances, hibernation and
 * migration.
 *
 * Build: sdk/c/build.sh plugins/chat-c target/c/chat-c.wasm
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasmgate.h"

#define MAX_NAME 64

/*
 * 1 to 64 bytes of UTF-8 without a control character (Unicode Cc: U+0000 to
 * U+001F and U+007F to U+009F), like the Rust plugin's char::is_control
 * check. `s` is valid UTF-8 (the SDK's query_param guarantees it).
 */
static bool valid(const char *s) {
    size_t len = strlen(s);
    if (len == 0 || len > MAX_NAME) return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7F) return false;
        /* U+0080..U+009F is C2 80..C2 9F in UTF-8 */
        if (c == 0xC2 && i + 1 < len && (unsigned char)s[i + 1] <= 0x9F) return false;
    }
    return true;
}

/*
 * Formats a JSON object whose string values were escaped with
 * wg_json_escape_alloc; returns a malloc'd string (free it).
 */
static char *format(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *format(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) abort();
    char *out = malloc((size_t)n + 1);
    if (!out) abort();
    va_start(ap, fmt);
    vsnprintf(out, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return out;
}

static char *esc(const char *s) { return wg_json_escape_alloc(s, strlen(s), NULL); }

/* Announces {"name":..,"room":..,"type":<type>} to the room, except `conn`. */
static void announce(wg_conn conn, const char *type, const char *room, const char *name) {
    char *r = esc(room), *n = esc(name);
    char *json = format("{\"name\":\"%s\",\"room\":\"%s\",\"type\":\"%s\"}", n, r, type);
    (void)wg_room_broadcast_text(room, json, conn, NULL);
    free(json);
    free(r);
    free(n);
}

void wg_on_open(wg_conn conn, const wg_request *req, wg_open_response *resp) {
    char *room = wg_request_query_param(req, "room");
    if (!room) room = strdup("lobby");
    char *name = wg_request_query_param(req, "name");
    if (!name) name = format("guest-%llu", (unsigned long long)conn);
    if (!valid(room) || !valid(name)) {
        wg_reject(resp, 400, "room and name must be 1 to 64 printable characters");
    } else if (wg_metadata_set(conn, "name", name) != WG_OK ||
               wg_metadata_set(conn, "room", room) != WG_OK || wg_join(conn, room) != WG_OK) {
        wg_reject(resp, 503, "cannot join the room");
    } else {
        announce(conn, "join", room, name);
        char *r = esc(room), *n = esc(name);
        char *json = format("{\"members\":%u,\"name\":\"%s\",\"room\":\"%s\",\"type\":\"welcome\"}",
                            (unsigned)wg_room_size(room), n, r);
        (void)wg_send_text(conn, json);
        free(json);
        free(r);
        free(n);
        /* resp stays "accept" */
    }
    free(room);
    free(name);
}

/* The connection's name and room from its metadata; false if either is unset. */
static bool name_and_room(wg_conn conn, char **name, char **room) {
    *name = *room = NULL;
    if (wg_metadata_get(conn, "name", name) == WG_OK && *name &&
        wg_metadata_get(conn, "room", room) == WG_OK && *room)
        return true;
    free(*name);
    free(*room);
    return false;
}

void wg_on_message(wg_conn conn, const wg_message *msg) {
    if (msg->kind == WG_BINARY) {
        (void)wg_close(conn, 1003, "chat accepts text messages only");
        return;
    }
    char *name, *room;
    if (!name_and_room(conn, &name, &room)) return;
    char *n = esc(name), *r = esc(room);
    char *t = wg_json_escape_alloc(msg->data, msg->len, NULL); /* text may hold NUL */
    char *json = format("{\"from\":\"%s\",\"room\":\"%s\",\"text\":\"%s\",\"type\":\"message\"}", n,
                        r, t);
    (void)wg_room_broadcast_text(room, json, conn, NULL);
    free(json);
    free(t);
    free(r);
    free(n);
    free(room);
    free(name);
}

void wg_on_close(wg_conn conn, uint16_t code, wg_str reason) {
    (void)code;
    (void)reason;
    char *name, *room;
    if (!name_and_room(conn, &name, &room)) return;
    announce(conn, "leave", room, name);
    free(room);
    free(name);
}
