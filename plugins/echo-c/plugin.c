/*
 * echo-c: sends every text and binary message back to its sender.
 *
 * The C twin of plugins/echo (Rust): a failed send is logged at warn level.
 * Built by ./dev examples (or ./build.sh in a project made by
 * `wasmgate new --lang c`).
 */
#include "wasmgate.h"

void wg_on_message(wg_conn conn, const wg_message *msg) {
    wg_error err = wg_send(conn, msg);
    if (err != WG_OK)
        wg_logf(WG_LOG_WARN, "echo to %llu failed: %s", (unsigned long long)conn,
                wg_error_name(err));
}
