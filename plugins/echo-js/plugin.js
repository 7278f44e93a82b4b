// echo: sends every text and binary message back to its sender.
//
// The JavaScript twin of plugins/echo (Rust). Built by ./dev examples (or
// ./build.sh in a project made by `wasmgate new --lang js`).

import { definePlugin, log } from "wasmgate";

export const { handler, resume } = definePlugin({
  onMessage(conn, message) {
    try {
      conn.send(message);
    } catch (e) {
      log.warn(`echo to ${conn.id} failed: ${e}`);
    }
  },
});
