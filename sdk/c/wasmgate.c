/**
 * @file wasmgate.c
 * @brief The wasmgate C SDK: the idiomatic API of wasmgate.h over the
 * bindings `wasmgate bindings c` generates (plugin.h / plugin.c).
 *
 * This file owns every export of the component (the `handler` and `resume`
 * interfaces): it converts the canonical-ABI values the gateway hands over
 * into the `wg_*` types, calls the author's callbacks (weak no-op defaults
 * below), and frees what the canonical ABI allocated once they return.
 *
 * Memory rules of the canonical ABI, as wit-bindgen-c implements them:
 * - arguments of an export are owned by the callee (freed here after the
 *   callback returns);
 * - results of an import (strings, lists) are allocated in guest memory with
 *   `cabi_realloc` and owned by the caller (freed here, or handed to the
 *   author, who frees them with free());
 * - the result of `on-open` is freed by the generated post-return function,
 *   which calls free() on every string and list whose length is not 0, so
 *   those must be malloc'd, and empty ones must not be.
 *
 * `cabi_realloc` is defined here (plugin.c's is weak): it allocates one byte
 * more than asked and stores a NUL there, so every string the gateway hands
 * to the plugin is NUL-terminated without a copy, and a zero-size allocation
 * is a static, NUL-filled buffer that is never freed (the generated free
 * functions skip empty strings and lists).
 */
#include "wasmgate.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"

/* ------------------------------------------------------------------------ */
/* Allocation */

/** What every empty string and list points to: NUL bytes, never freed. */
static _Alignas(8) char wg__empty[8];

/**
 * The canonical ABI's allocator (exported as `cabi_realloc`; overrides the
 * weak one of plugin.c). Traps on out of memory, like the generated one.
 */
__attribute__((__export_name__("cabi_realloc"))) void *cabi_realloc(void *ptr, size_t old_size,
                                                                  size_t align, size_t new_size) {
    (void)old_size;
    (void)align; /* malloc aligns to 16 on wasm32; the ABI asks for at most 8 */
    if (ptr == (void *)wg__empty) ptr = NULL;
    if (new_size == 0) {
        free(ptr);
        return wg__empty;
    }
    char *ret = realloc(ptr, new_size + 1);
    if (!ret) abort();
    ret[new_size] = '\0';
    return ret;
}

/** malloc that traps on out of memory. */
static void *wg__xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) abort();
    return p;
}

/** A malloc'd copy of `len` bytes plus a NUL. */
static char *wg__dup_n(const char *s, size_t len) {
    char *p = wg__xmalloc(len + 1);
    if (len) memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

/** A borrowed canonical string of a C string (NULL is ""). */
static plugin_string_t wg__str(const char *s) {
    if (!s) s = "";
    return (plugin_string_t){(uint8_t *)s, strlen(s)};
}

/**
 * Hands a canonical string the host allocated (NUL-terminated by
 * cabi_realloc) to the author, who frees it with free().
 */
static char *wg__take(plugin_string_t *s) {
    char *p;
    if (s->len == 0) {
        p = wg__dup_n("", 0); /* the empty ones point to wg__empty */
    } else {
        p = (char *)s->ptr;
    }
    s->ptr = NULL;
    s->len = 0;
    return p;
}

/* ------------------------------------------------------------------------ */
/* Errors */

/** The detail of the last invalid-argument error (owned here). */
static char *wg__detail;

const char *wg_error_name(wg_error err) {
    switch (err) {
    case WG_OK: return "ok";
    case WG_ERR_CLOSED: return "closed";
    case WG_ERR_UNKNOWN_CONNECTION: return "unknown-connection";
    case WG_ERR_TOO_LARGE: return "too-large";
    case WG_ERR_BACKPRESSURE: return "backpressure";
    case WG_ERR_LIMIT_REACHED: return "limit-reached";
    case WG_ERR_NOT_OWNER: return "not-owner";
    case WG_ERR_INVALID_ARGUMENT: return "invalid-argument";
    }
    return "unknown-error";
}

const char *wg_last_error_detail(void) { return wg__detail ? wg__detail : ""; }

/** Converts (and frees) a gateway-error the host returned. */
static wg_error wg__error(wasmgate_plugin_types_gateway_error_t *e) {
    switch (e->tag) {
    case WASMGATE_PLUGIN_TYPES_GATEWAY_ERROR_CLOSED: return WG_ERR_CLOSED;
    case WASMGATE_PLUGIN_TYPES_GATEWAY_ERROR_UNKNOWN_CONNECTION: return WG_ERR_UNKNOWN_CONNECTION;
    case WASMGATE_PLUGIN_TYPES_GATEWAY_ERROR_TOO_LARGE: return WG_ERR_TOO_LARGE;
    case WASMGATE_PLUGIN_TYPES_GATEWAY_ERROR_BACKPRESSURE: return WG_ERR_BACKPRESSURE;
    case WASMGATE_PLUGIN_TYPES_GATEWAY_ERROR_LIMIT_REACHED: return WG_ERR_LIMIT_REACHED;
    case WASMGATE_PLUGIN_TYPES_GATEWAY_ERROR_NOT_OWNER: return WG_ERR_NOT_OWNER;
    case WASMGATE_PLUGIN_TYPES_GATEWAY_ERROR_INVALID_ARGUMENT:
        free(wg__detail);
        wg__detail = wg__take(&e->val.invalid_argument);
        return WG_ERR_INVALID_ARGUMENT;
    default:
        wasmgate_plugin_types_gateway_error_free(e);
        return WG_ERR_INVALID_ARGUMENT;
    }
}

/* ------------------------------------------------------------------------ */
/* Default handlers: weak, so that the author's definitions replace them. */

__attribute__((weak)) void wg_on_open(wg_conn conn, const wg_request *req, wg_open_response *resp) {
    (void)conn;
    (void)req;
    (void)resp; /* starts as "accept" */
}

__attribute__((weak)) void wg_on_message(wg_conn conn, const wg_message *msg) {
    (void)conn;
    (void)msg;
}

__attribute__((weak)) void wg_on_fragment(wg_conn conn, const wg_fragment *fragment) {
    (void)conn;
    (void)fragment;
}

__attribute__((weak)) void wg_on_close(wg_conn conn, uint16_t code, wg_str reason) {
    (void)conn;
    (void)code;
    (void)reason;
}

__attribute__((weak)) void wg_on_timer(wg_conn conn, wg_timer timer) {
    (void)conn;
    (void)timer;
}

__attribute__((weak)) void wg_on_resume(wg_conn conn, const wg_request *req) {
    (void)conn;
    (void)req;
}

/* ------------------------------------------------------------------------ */
/* Requests */

/** A wg_request viewing a canonical request; its two arrays are malloc'd. */
static void wg__request_view(const wasmgate_plugin_types_request_t *r, wg_request *out) {
    wg_header *headers = NULL;
    const char **subprotocols = NULL;
    if (r->headers.len) {
        headers = wg__xmalloc(r->headers.len * sizeof *headers);
        for (size_t i = 0; i < r->headers.len; i++) {
            headers[i].name = (const char *)r->headers.ptr[i].name.ptr;
            headers[i].value = (const char *)r->headers.ptr[i].value.ptr;
        }
    }
    if (r->subprotocols.len) {
        subprotocols = wg__xmalloc(r->subprotocols.len * sizeof *subprotocols);
        for (size_t i = 0; i < r->subprotocols.len; i++)
            subprotocols[i] = (const char *)r->subprotocols.ptr[i].ptr;
    }
    out->method = (const char *)r->method.ptr;
    out->path = (const char *)r->path.ptr;
    out->query = r->query.is_some ? (const char *)r->query.val.ptr : NULL;
    out->headers = headers;
    out->header_count = r->headers.len;
    out->remote_addr = (const char *)r->remote_addr.ptr;
    out->subprotocols = subprotocols;
    out->subprotocol_count = r->subprotocols.len;
}

static void wg__request_view_free(wg_request *req) {
    free((void *)req->headers);
    free((void *)req->subprotocols);
}

static int wg__ascii_lower(int c) { return (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c; }

static bool wg__eq_ignore_ascii_case(const char *a, const char *b) {
    for (; *a && *b; a++, b++)
        if (wg__ascii_lower((unsigned char)*a) != wg__ascii_lower((unsigned char)*b)) return false;
    return *a == *b;
}

const char *wg_request_header(const wg_request *req, const char *name) {
    if (!req || !name) return NULL;
    for (size_t i = 0; i < req->header_count; i++)
        if (wg__eq_ignore_ascii_case(req->headers[i].name, name)) return req->headers[i].value;
    return NULL;
}

static int wg__hex(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/**
 * The UTF-8 sequence at in[i] (i < n): returns its width (1 to 4) if it is
 * valid, else 0 and sets *skip to the length of its maximal invalid prefix
 * (at least 1), the unit that one U+FFFD replaces (what Rust and Python do).
 */
static size_t wg__utf8_seq(const unsigned char *in, size_t n, size_t i, size_t *skip) {
    unsigned char b = in[i];
    size_t width = 0;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) {
        width = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
        width = 3;
        if (b == 0xE0) lo = 0xA0; /* no overlong forms */
        if (b == 0xED) hi = 0x9F; /* no surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        width = 4;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F; /* at most U+10FFFF */
    } else {
        *skip = 1;
        return 0;
    }
    size_t valid = 1;
    if (i + 1 < n && in[i + 1] >= lo && in[i + 1] <= hi) {
        valid = 2;
        while (valid < width && i + valid < n && in[i + valid] >= 0x80 && in[i + valid] <= 0xBF)
            valid++;
    }
    if (valid == width) return width;
    *skip = valid;
    return 0;
}

/** Whether s[0..n] is valid UTF-8; if not, *bad is the offset of the first error. */
static bool wg__utf8_valid(const char *s, size_t n, size_t *bad) {
    const unsigned char *in = (const unsigned char *)s;
    size_t i = 0, skip;
    while (i < n) {
        /* ASCII fast path, 8 bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, in + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
        }
        if (i >= n) break;
        size_t width = wg__utf8_seq(in, n, i, &skip);
        if (!width) {
            *bad = i;
            return false;
        }
        i += width;
    }
    return true;
}

/**
 * Writes `in` to `out` as valid UTF-8, each maximal invalid subpart replaced
 * by U+FFFD: what Rust's String::from_utf8_lossy does. `out` has room for
 * 3 * n bytes. Returns the number of bytes written.
 */
static size_t wg__utf8_lossy(const unsigned char *in, size_t n, char *out) {
    size_t i = 0, o = 0, skip = 1;
    while (i < n) {
        size_t width = wg__utf8_seq(in, n, i, &skip);
        if (width) {
            memcpy(out + o, in + i, width);
            o += width;
            i += width;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i += skip;
        }
    }
    return o;
}

/** A malloc'd, NUL-terminated, valid UTF-8 copy of s[0..n] (invalid bytes as U+FFFD). */
static char *wg__lossy_dup(const char *s, size_t n, size_t *out_len) {
    size_t bad, len = n;
    char *out;
    if (wg__utf8_valid(s, n, &bad)) {
        out = wg__dup_n(s, n);
    } else {
        out = wg__xmalloc(3 * n + 1);
        len = wg__utf8_lossy((const unsigned char *)s, n, out);
        out[len] = '\0';
    }
    if (out_len) *out_len = len;
    return out;
}

/**
 * Percent-decodes s[0..n] (`+` is a space; invalid escapes kept) as the
 * Rust SDK does, then makes it valid UTF-8. Returns a malloc'd string.
 */
static char *wg__percent_decode(const char *s, size_t n, size_t *out_len) {
    unsigned char *bytes = wg__xmalloc(n + 1);
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '+') {
            bytes[m++] = ' ';
        } else if (c == '%' && i + 2 < n && wg__hex((unsigned char)s[i + 1]) >= 0 &&
                   wg__hex((unsigned char)s[i + 2]) >= 0) {
            bytes[m++] = (unsigned char)(wg__hex((unsigned char)s[i + 1]) * 16 +
                                         wg__hex((unsigned char)s[i + 2]));
            i += 2;
        } else {
            bytes[m++] = c;
        }
    }
    char *out = wg__xmalloc(3 * m + 1);
    size_t len = wg__utf8_lossy(bytes, m, out);
    out[len] = '\0';
    free(bytes);
    if (out_len) *out_len = len;
    return out;
}

char *wg_request_query_param(const wg_request *req, const char *name) {
    if (!req || !req->query || !name) return NULL;
    size_t name_len = strlen(name);
    const char *q = req->query;
    const char *end = q + strlen(q);
    for (const char *pair = q;;) {
        const char *amp = memchr(pair, '&', (size_t)(end - pair));
        const char *pair_end = amp ? amp : end;
        const char *eq = memchr(pair, '=', (size_t)(pair_end - pair));
        const char *key_end = eq ? eq : pair_end;
        size_t key_len;
        char *key = wg__percent_decode(pair, (size_t)(key_end - pair), &key_len);
        bool match = key_len == name_len && memcmp(key, name, name_len) == 0;
        free(key);
        if (match) {
            if (!eq) return wg__dup_n("", 0);
            return wg__percent_decode(eq + 1, (size_t)(pair_end - eq - 1), NULL);
        }
        if (!amp) return NULL;
        pair = amp + 1;
    }
}

/** The text message being handled (valid UTF-8: sending it back skips the check). */
static const char *wg__rx_ptr;
static size_t wg__rx_len;

/**
 * Whether s[0..n] is valid UTF-8, checked before a host call (lifting
 * invalid UTF-8 would trap). If not, sets the invalid-argument detail.
 */
static bool wg__utf8_ok(const char *s, size_t n, const char *what) {
    size_t bad;
    if (s == wg__rx_ptr && n == wg__rx_len) return true;
    if (wg__utf8_valid(s, n, &bad)) return true;
    char buf[128];
    snprintf(buf, sizeof buf, "%s is not valid UTF-8 (invalid byte at offset %zu)", what, bad);
    free(wg__detail);
    wg__detail = wg__dup_n(buf, strlen(buf));
    return false;
}

/** wg__utf8_ok() for a canonical string. */
static bool wg__str_ok(plugin_string_t s, const char *what) {
    return wg__utf8_ok((const char *)s.ptr, s.len, what);
}

/* ------------------------------------------------------------------------ */
/* Open responses */

/** One header of an open response, malloc'd. */
typedef struct wg__hdr {
    char *name;
    size_t name_len;
    char *value;
    size_t value_len;
} wg__hdr;

struct wg_open_response {
    bool reject;
    uint16_t status;
    char *subprotocol; /* accept only; NULL for none */
    wg__hdr *headers;
    size_t header_count, header_cap;
    char *body; /* reject only */
    size_t body_len;
};

static void wg__response_clear(wg_open_response *r) {
    for (size_t i = 0; i < r->header_count; i++) {
        free(r->headers[i].name);
        free(r->headers[i].value);
    }
    free(r->headers);
    free(r->subprotocol);
    free(r->body);
    memset(r, 0, sizeof *r);
}

void wg_accept(wg_open_response *resp) {
    if (resp) wg__response_clear(resp);
}

void wg_accept_with(wg_open_response *resp, const char *subprotocol) {
    if (!resp) return;
    wg__response_clear(resp);
    if (subprotocol) resp->subprotocol = wg__lossy_dup(subprotocol, strlen(subprotocol), NULL);
}

void wg_reject_n(wg_open_response *resp, uint16_t status, const void *body, size_t len) {
    if (!resp) return;
    wg__response_clear(resp);
    resp->reject = true;
    resp->status = status;
    resp->body = wg__dup_n(body ? body : "", body ? len : 0);
    resp->body_len = body ? len : 0;
}

void wg_reject(wg_open_response *resp, uint16_t status, const char *body) {
    wg_reject_n(resp, status, body, body ? strlen(body) : 0);
}

void wg_response_header(wg_open_response *resp, const char *name, const char *value) {
    if (!resp) return;
    if (!name) name = "";
    if (!value) value = "";
    if (resp->header_count == resp->header_cap) {
        size_t cap = resp->header_cap ? 2 * resp->header_cap : 4;
        wg__hdr *h = realloc(resp->headers, cap * sizeof *h);
        if (!h) abort();
        resp->headers = h;
        resp->header_cap = cap;
    }
    wg__hdr *h = &resp->headers[resp->header_count++];
    h->name = wg__lossy_dup(name, strlen(name), &h->name_len);
    h->value = wg__lossy_dup(value, strlen(value), &h->value_len);
}

/**
 * A canonical string that the post-return function will free: `s` (malloc'd)
 * itself when not empty, else the static empty buffer (and `s` is freed).
 */
static plugin_string_t wg__give(char *s, size_t len) {
    if (len == 0) {
        free(s);
        return (plugin_string_t){(uint8_t *)wg__empty, 0};
    }
    return (plugin_string_t){(uint8_t *)s, len};
}

/** Moves `r` into the canonical result `out` (ownership goes to post-return). */
static void wg__response_lower(wg_open_response *r, wasmgate_plugin_types_open_response_t *out) {
    static const char content_type[] = "content-type";
    static const char text_plain[] = "text/plain; charset=utf-8";
    bool add_type = r->reject;
    if (add_type)
        for (size_t i = 0; i < r->header_count; i++)
            if (wg__eq_ignore_ascii_case(r->headers[i].name, content_type)) add_type = false;
    size_t n = r->header_count + (add_type ? 1 : 0);
    wasmgate_plugin_types_list_header_t headers = {(wasmgate_plugin_types_header_t *)wg__empty, 0};
    if (n) {
        headers.ptr = wg__xmalloc(n * sizeof *headers.ptr);
        headers.len = n;
        size_t k = 0;
        if (add_type) {
            headers.ptr[k].name = wg__give(wg__dup_n(content_type, sizeof content_type - 1),
                                           sizeof content_type - 1);
            headers.ptr[k].value =
                wg__give(wg__dup_n(text_plain, sizeof text_plain - 1), sizeof text_plain - 1);
            k++;
        }
        for (size_t i = 0; i < r->header_count; i++, k++) {
            headers.ptr[k].name = wg__give(r->headers[i].name, r->headers[i].name_len);
            headers.ptr[k].value = wg__give(r->headers[i].value, r->headers[i].value_len);
        }
    }
    free(r->headers);
    memset(out, 0, sizeof *out);
    if (r->reject) {
        out->tag = WASMGATE_PLUGIN_TYPES_OPEN_RESPONSE_REJECT;
        out->val.reject.status = r->status;
        out->val.reject.headers = headers;
        plugin_string_t body = wg__give(r->body, r->body_len);
        out->val.reject.body = (plugin_list_u8_t){body.ptr, body.len};
        free(r->subprotocol);
    } else {
        out->tag = WASMGATE_PLUGIN_TYPES_OPEN_RESPONSE_ACCEPT;
        out->val.accept.headers = headers;
        if (r->subprotocol) {
            out->val.accept.subprotocol.is_some = true;
            out->val.accept.subprotocol.val = wg__give(r->subprotocol, strlen(r->subprotocol));
        }
        free(r->body);
    }
    memset(r, 0, sizeof *r);
}

/* ------------------------------------------------------------------------ */
/* The exports */

void exports_wasmgate_plugin_handler_on_open(uint64_t conn, wasmgate_plugin_types_request_t *req,
                                             wasmgate_plugin_types_open_response_t *ret) {
    wg_request view;
    wg_open_response resp;
    memset(&resp, 0, sizeof resp);
    wg__request_view(req, &view);
    wg_on_open(conn, &view, &resp);
    wg__request_view_free(&view);
    wasmgate_plugin_types_request_free(req);
    wg__response_lower(&resp, ret);
}

void exports_wasmgate_plugin_handler_on_message(uint64_t conn, wasmgate_plugin_types_message_t *msg) {
    wg_message m;
    if (msg->tag == WASMGATE_PLUGIN_TYPES_MESSAGE_TEXT) {
        m.kind = WG_TEXT;
        m.data = (const char *)msg->val.text.ptr;
        m.len = msg->val.text.len;
    } else {
        m.kind = WG_BINARY;
        m.data = (const char *)msg->val.binary.ptr;
        m.len = msg->val.binary.len;
    }
    if (!m.data) m.data = wg__empty;
    if (m.kind == WG_TEXT) {
        wg__rx_ptr = m.data;
        wg__rx_len = m.len;
    }
    wg_on_message(conn, &m);
    wg__rx_ptr = NULL;
    wg__rx_len = 0;
    wasmgate_plugin_types_message_free(msg);
}

void exports_wasmgate_plugin_handler_on_fragment(uint64_t conn,
                                                 wasmgate_plugin_types_fragment_t *fragment) {
    wg_fragment f = {
        .text = fragment->text,
        .first = fragment->first,
        .fin = fragment->fin,
        .data = fragment->data.ptr ? fragment->data.ptr : (const uint8_t *)wg__empty,
        .len = fragment->data.len,
    };
    wg_on_fragment(conn, &f);
    wasmgate_plugin_types_fragment_free(fragment);
}

void exports_wasmgate_plugin_handler_on_close(uint64_t conn, uint16_t code, plugin_string_t *reason) {
    wg_str r = {reason->ptr ? (const char *)reason->ptr : wg__empty, reason->len};
    wg_on_close(conn, code, r);
    plugin_string_free(reason);
}

void exports_wasmgate_plugin_handler_on_timer(uint64_t conn, uint64_t timer) {
    wg_on_timer(conn, timer);
}

void exports_wasmgate_plugin_resume_on_resume(uint64_t conn, wasmgate_plugin_types_request_t *req) {
    wg_request view;
    wg__request_view(req, &view);
    wg_on_resume(conn, &view);
    wg__request_view_free(&view);
    wasmgate_plugin_types_request_free(req);
}

/* ------------------------------------------------------------------------ */
/* Sending and closing */

/** A canonical message viewing `len` bytes at `data` (read by the host only). */
static wasmgate_plugin_types_message_t wg__message(wg_message_kind kind, const void *data, size_t len) {
    wasmgate_plugin_types_message_t m;
    if (!data || !len) data = wg__empty;
    if (kind == WG_TEXT) {
        m.tag = WASMGATE_PLUGIN_TYPES_MESSAGE_TEXT;
        m.val.text = (plugin_string_t){(uint8_t *)data, len};
    } else {
        m.tag = WASMGATE_PLUGIN_TYPES_MESSAGE_BINARY;
        m.val.binary = (plugin_list_u8_t){(uint8_t *)data, len};
    }
    return m;
}

static wg_error wg__send(wg_conn conn, wg_message_kind kind, const void *data, size_t len) {
    wasmgate_plugin_types_message_t m = wg__message(kind, data, len);
    if (kind == WG_TEXT && !wg__str_ok(m.val.text, "the text message")) return WG_ERR_INVALID_ARGUMENT;
    wasmgate_plugin_types_gateway_error_t err;
    return wasmgate_plugin_host_send(conn, &m, &err) ? WG_OK : wg__error(&err);
}

wg_error wg_send(wg_conn conn, const wg_message *msg) {
    if (!msg) return wg__send(conn, WG_TEXT, NULL, 0);
    return wg__send(conn, msg->kind, msg->data, msg->len);
}

wg_error wg_send_text(wg_conn conn, const char *text) {
    return wg__send(conn, WG_TEXT, text, text ? strlen(text) : 0);
}

wg_error wg_send_text_n(wg_conn conn, const char *text, size_t len) {
    return wg__send(conn, WG_TEXT, text, text ? len : 0);
}

wg_error wg_send_binary(wg_conn conn, const void *data, size_t len) {
    return wg__send(conn, WG_BINARY, data, data ? len : 0);
}

wg_error wg_close(wg_conn conn, uint16_t code, const char *reason) {
    plugin_string_t r = wg__str(reason);
    wasmgate_plugin_types_gateway_error_t err;
    if (!wg__str_ok(r, "the close reason")) return WG_ERR_INVALID_ARGUMENT;
    return wasmgate_plugin_host_close(conn, code, &r, &err) ? WG_OK : wg__error(&err);
}

void wg_fail(wg_conn conn, const char *what) {
    wg_logf(WG_LOG_ERROR, "connection %llu failed: %s", (unsigned long long)conn,
            what ? what : "(no reason given)");
    (void)wg_close(conn, 1011, "internal error");
}

/* ------------------------------------------------------------------------ */
/* Rooms */

wg_error wg_join(wg_conn conn, const char *room) {
    plugin_string_t r = wg__str(room);
    wasmgate_plugin_types_gateway_error_t err;
    if (!wg__str_ok(r, "the room name")) return WG_ERR_INVALID_ARGUMENT;
    return wasmgate_plugin_host_join(conn, &r, &err) ? WG_OK : wg__error(&err);
}

wg_error wg_leave(wg_conn conn, const char *room, bool *was_member) {
    plugin_string_t r = wg__str(room);
    bool member = false;
    wasmgate_plugin_types_gateway_error_t err;
    if (was_member) *was_member = false;
    if (!wg__str_ok(r, "the room name")) return WG_ERR_INVALID_ARGUMENT;
    wg_error e = wasmgate_plugin_host_leave(conn, &r, &member, &err) ? WG_OK : wg__error(&err);
    if (was_member) *was_member = member;
    return e;
}

wg_error wg_rooms(wg_conn conn, char ***rooms, size_t *count) {
    plugin_list_string_t list;
    wasmgate_plugin_types_gateway_error_t err;
    if (rooms) *rooms = NULL;
    if (count) *count = 0;
    if (!wasmgate_plugin_host_rooms_of(conn, &list, &err)) return wg__error(&err);
    if (rooms) {
        /* One block: the pointer array (NULL-terminated), then the names. */
        size_t size = (list.len + 1) * sizeof(char *);
        for (size_t i = 0; i < list.len; i++) size += list.ptr[i].len + 1;
        char **array = wg__xmalloc(size);
        char *p = (char *)(array + list.len + 1);
        for (size_t i = 0; i < list.len; i++) {
            array[i] = p;
            memcpy(p, list.ptr[i].ptr, list.ptr[i].len);
            p[list.ptr[i].len] = '\0';
            p += list.ptr[i].len + 1;
        }
        array[list.len] = NULL;
        *rooms = array;
    }
    if (count) *count = list.len;
    plugin_list_string_free(&list);
    return WG_OK;
}

static wg_error wg__broadcast(const char *room, wg_message_kind kind, const void *data, size_t len,
                              wg_conn except, uint32_t *count) {
    plugin_string_t r = wg__str(room);
    wasmgate_plugin_types_message_t m = wg__message(kind, data, len);
    uint64_t ex = except;
    uint32_t n = 0;
    wasmgate_plugin_types_gateway_error_t err;
    if (count) *count = 0;
    if (!wg__str_ok(r, "the room name")) return WG_ERR_INVALID_ARGUMENT;
    if (kind == WG_TEXT && !wg__str_ok(m.val.text, "the text message")) return WG_ERR_INVALID_ARGUMENT;
    wg_error e = wasmgate_plugin_host_broadcast(&r, &m, except == WG_NO_CONN ? NULL : &ex, &n, &err)
                     ? WG_OK
                     : wg__error(&err);
    if (count) *count = n;
    return e;
}

wg_error wg_room_broadcast(const char *room, const wg_message *msg, wg_conn except, uint32_t *count) {
    if (!msg) return wg__broadcast(room, WG_TEXT, NULL, 0, except, count);
    return wg__broadcast(room, msg->kind, msg->data, msg->len, except, count);
}

wg_error wg_room_broadcast_text(const char *room, const char *text, wg_conn except, uint32_t *count) {
    return wg__broadcast(room, WG_TEXT, text, text ? strlen(text) : 0, except, count);
}

wg_error wg_room_broadcast_binary(const char *room, const void *data, size_t len, wg_conn except,
                                  uint32_t *count) {
    return wg__broadcast(room, WG_BINARY, data, data ? len : 0, except, count);
}

uint32_t wg_room_size(const char *room) {
    plugin_string_t r = wg__str(room);
    if (!wg__str_ok(r, "the room name")) return 0; /* no such room */
    return wasmgate_plugin_host_room_size(&r);
}

size_t wg_room_members(const char *room, wg_conn **members) {
    plugin_string_t r = wg__str(room);
    plugin_list_connection_id_t list;
    if (members) *members = NULL;
    if (!wg__str_ok(r, "the room name")) return 0; /* no such room */
    wasmgate_plugin_host_room_members(&r, &list);
    size_t n = list.len;
    if (members) {
        /* The host's array is malloc'd by cabi_realloc: hand it over. */
        *members = n ? list.ptr : NULL;
    } else {
        plugin_list_connection_id_free(&list);
    }
    return n;
}

/* ------------------------------------------------------------------------ */
/* Metadata */

wg_error wg_metadata_set(wg_conn conn, const char *key, const char *value) {
    plugin_string_t k = wg__str(key), v = wg__str(value);
    wasmgate_plugin_types_gateway_error_t err;
    if (!wg__str_ok(k, "the metadata key") || !wg__str_ok(v, "the metadata value"))
        return WG_ERR_INVALID_ARGUMENT;
    return wasmgate_plugin_host_metadata_set(conn, &k, &v, &err) ? WG_OK : wg__error(&err);
}

/** Hands an option<string> result to the author (`out` may be NULL: freed). */
static void wg__take_option(plugin_option_string_t *o, char **out) {
    if (out) *out = o->is_some ? wg__take(&o->val) : NULL;
    else plugin_option_string_free(o);
}

wg_error wg_metadata_get(wg_conn conn, const char *key, char **value) {
    plugin_string_t k = wg__str(key);
    plugin_option_string_t ret;
    wasmgate_plugin_types_gateway_error_t err;
    if (value) *value = NULL;
    if (!wg__str_ok(k, "the metadata key")) return WG_ERR_INVALID_ARGUMENT;
    if (!wasmgate_plugin_host_metadata_get(conn, &k, &ret, &err)) return wg__error(&err);
    wg__take_option(&ret, value);
    return WG_OK;
}

wg_error wg_metadata_remove(wg_conn conn, const char *key, char **old_value) {
    plugin_string_t k = wg__str(key);
    plugin_option_string_t ret;
    wasmgate_plugin_types_gateway_error_t err;
    if (old_value) *old_value = NULL;
    if (!wg__str_ok(k, "the metadata key")) return WG_ERR_INVALID_ARGUMENT;
    if (!wasmgate_plugin_host_metadata_remove(conn, &k, &ret, &err)) return wg__error(&err);
    wg__take_option(&ret, old_value);
    return WG_OK;
}

/* ------------------------------------------------------------------------ */
/* Timers */

wg_error wg_set_timer(wg_conn conn, uint32_t delay_ms, bool repeat, wg_timer *timer) {
    uint64_t id = 0;
    wasmgate_plugin_types_gateway_error_t err;
    wg_error e = wasmgate_plugin_host_set_timer(conn, delay_ms ? delay_ms : 1, repeat, &id, &err)
                     ? WG_OK
                     : wg__error(&err);
    if (timer) *timer = id;
    return e;
}

bool wg_cancel_timer(wg_timer timer) { return wasmgate_plugin_host_cancel_timer(timer); }

/* ------------------------------------------------------------------------ */
/* Configuration */

char *wg_config_get(const char *key) {
    plugin_string_t k = wg__str(key), ret;
    if (!wg__str_ok(k, "the config key")) return NULL; /* no such key */
    if (!wasmgate_plugin_host_config_get(&k, &ret)) return NULL;
    return wg__take(&ret);
}

size_t wg_config_all(wg_config_entry **entries) {
    plugin_list_tuple2_string_string_t list;
    wasmgate_plugin_host_config_all(&list);
    size_t n = list.len;
    if (entries) {
        *entries = NULL;
        if (n) {
            size_t size = n * sizeof(wg_config_entry);
            for (size_t i = 0; i < n; i++) size += list.ptr[i].f0.len + list.ptr[i].f1.len + 2;
            wg_config_entry *array = wg__xmalloc(size);
            char *p = (char *)(array + n);
            for (size_t i = 0; i < n; i++) {
                array[i].key = p;
                memcpy(p, list.ptr[i].f0.ptr, list.ptr[i].f0.len);
                p[list.ptr[i].f0.len] = '\0';
                p += list.ptr[i].f0.len + 1;
                array[i].value = p;
                memcpy(p, list.ptr[i].f1.ptr, list.ptr[i].f1.len);
                p[list.ptr[i].f1.len] = '\0';
                p += list.ptr[i].f1.len + 1;
            }
            *entries = array;
        }
    }
    plugin_list_tuple2_string_string_free(&list);
    return n;
}

/* ------------------------------------------------------------------------ */
/* Logging */

void wg_log(wg_log_level level, const char *msg) {
    plugin_string_t m = wg__str(msg);
    size_t bad;
    if ((unsigned)level > WG_LOG_ERROR) level = WG_LOG_ERROR;
    if (wg__utf8_valid((const char *)m.ptr, m.len, &bad)) {
        wasmgate_plugin_host_log((wasmgate_plugin_types_log_level_t)level, &m);
        return;
    }
    /* Invalid UTF-8 would trap: log it with U+FFFD instead. */
    char *fixed = wg__lossy_dup((const char *)m.ptr, m.len, &m.len);
    m.ptr = (uint8_t *)fixed;
    wasmgate_plugin_host_log((wasmgate_plugin_types_log_level_t)level, &m);
    free(fixed);
}

void wg_logf(wg_log_level level, const char *fmt, ...) {
    char small[256];
    va_list ap;
    if (!fmt) {
        wg_log(level, "");
        return;
    }
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        wg_log(level, fmt);
        return;
    }
    if ((size_t)n < sizeof small) {
        wg_log(level, small);
        return;
    }
    char *big = wg__xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    wg_log(level, big);
    free(big);
}

void wg_log_trace(const char *msg) { wg_log(WG_LOG_TRACE, msg); }
void wg_log_debug(const char *msg) { wg_log(WG_LOG_DEBUG, msg); }
void wg_log_info(const char *msg) { wg_log(WG_LOG_INFO, msg); }
void wg_log_warn(const char *msg) { wg_log(WG_LOG_WARN, msg); }
void wg_log_error(const char *msg) { wg_log(WG_LOG_ERROR, msg); }

/* ------------------------------------------------------------------------ */
/* JSON */

size_t wg_json_escape(char *buf, size_t size, const char *s, size_t len) {
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    char esc[6];
#define WG__PUT(c)                                                                                \
    do {                                                                                          \
        if (o + 1 < size) buf[o] = (c);                                                           \
        o++;                                                                                      \
    } while (0)
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *e = NULL;
        size_t elen = 2;
        switch (c) {
        case '"': e = "\\\""; break;
        case '\\': e = "\\\\"; break;
        case '\b': e = "\\b"; break;
        case '\f': e = "\\f"; break;
        case '\n': e = "\\n"; break;
        case '\r': e = "\\r"; break;
        case '\t': e = "\\t"; break;
        default:
            if (c < 0x20) {
                esc[0] = '\\';
                esc[1] = 'u';
                esc[2] = '0';
                esc[3] = '0';
                esc[4] = hex[c >> 4];
                esc[5] = hex[c & 0xF];
                e = esc;
                elen = 6;
            }
        }
        if (e) {
            for (size_t k = 0; k < elen; k++) WG__PUT(e[k]);
        } else {
            WG__PUT((char)c);
        }
    }
#undef WG__PUT
    if (size) buf[o < size ? o : size - 1] = '\0';
    return o;
}

char *wg_json_escape_alloc(const char *s, size_t len, size_t *out_len) {
    if (!s) len = 0;
    size_t n = wg_json_escape(NULL, 0, s, len);
    char *out = wg__xmalloc(n + 1);
    wg_json_escape(out, n + 1, s, len);
    if (out_len) *out_len = n;
    return out;
}
