// echo: sends every text and binary message back to its sender.
//
// The JavaScript twin of plugins/echo (Rust). Build it with
//   sdk/js/build.sh plugins/echo-js echo-js.wasm

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
