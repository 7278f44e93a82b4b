// chat: rooms chosen by the query string (`/chat?room=lobby&name=ana`).
//
// The JavaScript twin of plugins/chat (Rust), message for message: every
// text message is broadcast to the other members of the sender's room as
// {"from":..,"room":..,"text":..,"type":"message"}; joins and leaves are
// announced to the room as {"name":..,"room":..,"type":"join"|"leave"}. The
// newcomer gets {"members":N,"name":..,"room":..,"type":"welcome"}. Binary
// messages are refused with close code 1003 (unsupported data).
//
// Object keys are written in sorted order because the Rust plugin's
// serde_json objects serialize that way: the messages are byte-identical.
// Nothing is kept in the instance's memory (the name and room are
// connection metadata), so one instance may serve any number of
// connections, and hibernation or migration loses nothing.
//
// Build it with
//   sdk/js/build.sh plugins/chat-js chat-js.wasm

import { definePlugin, room, OpenResponse } from "wasmgate";

const MAX_NAME = 64;
const utf8 = new TextEncoder();

/**
 * 1 to 64 bytes of UTF-8 without control characters (Unicode Cc).
 * @param {string} s
 */
function valid(s) {
  return s.length > 0 && utf8.encode(s).length <= MAX_NAME && !/[\u0000-\u001f\u007f-\u009f]/.test(s);
}

/**
 * The connection's name and room, if both are set (as the Rust `let (Ok(Some(..)), Ok(Some(..)))`).
 * @param {import("wasmgate").Connection} conn
 */
function whoAndWhere(conn) {
  let name, roomName;
  try {
    name = conn.metadata.get("name");
  } catch {}
  try {
    roomName = conn.metadata.get("room");
  } catch {}
  return name === undefined || roomName === undefined ? undefined : { name, roomName };
}

export const { handler, resume } = definePlugin({
  onOpen(conn, req) {
    const roomName = req.queryParam("room") ?? "lobby";
    const name = req.queryParam("name") ?? `guest-${conn.id}`;
    if (!valid(roomName) || !valid(name)) {
      return OpenResponse.reject(400, "room and name must be 1 to 64 printable characters");
    }
    try {
      conn.metadata.set("name", name);
      conn.metadata.set("room", roomName);
      conn.join(roomName);
    } catch {
      return OpenResponse.reject(503, "cannot join the room");
    }
    const r = room(roomName);
    try {
      r.broadcastJson({ name, room: roomName, type: "join" }, conn);
    } catch {}
    try {
      conn.sendJson({ members: r.size(), name, room: roomName, type: "welcome" });
    } catch {}
    return OpenResponse.accept();
  },

  onMessage(conn, message) {
    if (typeof message !== "string") {
      try {
        conn.close(1003, "chat accepts text messages only");
      } catch {}
      return;
    }
    const who = whoAndWhere(conn);
    if (who === undefined) return;
    try {
      room(who.roomName).broadcastJson({ from: who.name, room: who.roomName, text: message, type: "message" }, conn);
    } catch {}
  },

  onClose(conn, _code, _reason) {
    const who = whoAndWhere(conn);
    if (who === undefined) return;
    try {
      room(who.roomName).broadcastJson({ name: who.name, room: who.roomName, type: "leave" }, conn);
    } catch {}
  },
});
