"""`chat-py`: rooms chosen by the query string (`/chat?room=lobby&name=ana`).

The Python twin of plugins/chat (Rust), message for message. Every text
message is broadcast to the other members of the sender's room as
`{"from":..,"room":..,"text":..,"type":"message"}`; joins and leaves are
announced to the room as `{"name":..,"room":..,"type":"join"|"leave"}`. The
newcomer gets `{"members":N,"name":..,"room":..,"type":"welcome"}` (keys
sorted, as serde_json writes the Rust plugin's `json!` values). Binary
messages are refused with close code 1003 (unsupported data).

All state is in connection metadata (the gateway keeps it), so this plugin
works unchanged with one instance per connection, a shared instance,
hibernation and migration.

Build: sdk/python/build.sh plugins/chat-py target/python/chat-py.wasm
"""

from contextlib import suppress
from typing import Optional, Tuple

import wasmgate
from wasmgate import Connection, GatewayError, Message, OpenResponse, Request, room

MAX_NAME = 64


def valid(s: str) -> bool:
    """1 to 64 bytes of UTF-8 without control characters (Unicode Cc), like
    the Rust plugin's `char::is_control` check."""
    return 0 < len(s.encode("utf-8")) <= MAX_NAME and not any(
        c < "\x20" or "\x7f" <= c <= "\x9f" for c in s
    )


def name_and_room(conn: Connection) -> Optional[Tuple[str, str]]:
    """The sender's name and room from its metadata, or None."""
    try:
        name, room_name = conn.metadata("name"), conn.metadata("room")
    except GatewayError:
        return None
    if name is None or room_name is None:
        return None
    return name, room_name


class Chat(wasmgate.Handler):
    def on_open(self, conn: Connection, request: Request) -> OpenResponse:
        room_name = request.query_param("room")
        if room_name is None:
            room_name = "lobby"
        name = request.query_param("name")
        if name is None:
            name = f"guest-{conn.id}"
        if not valid(room_name) or not valid(name):
            return OpenResponse.reject(400, "room and name must be 1 to 64 printable characters")
        try:
            conn.set_metadata("name", name)
            conn.set_metadata("room", room_name)
            conn.join(room_name)
        except GatewayError:
            return OpenResponse.reject(503, "cannot join the room")
        r = room(room_name)
        with suppress(GatewayError):
            r.broadcast_json({"type": "join", "room": room_name, "name": name}, exclude=conn)
        with suppress(GatewayError):
            conn.send_json({"type": "welcome", "room": room_name, "name": name, "members": r.size()})
        return OpenResponse.accept()

    def on_message(self, conn: Connection, message: Message) -> None:
        if not isinstance(message, str):
            with suppress(GatewayError):
                conn.close(1003, "chat accepts text messages only")
            return
        found = name_and_room(conn)
        if found is None:
            return
        name, room_name = found
        with suppress(GatewayError):
            room(room_name).broadcast_json(
                {"type": "message", "room": room_name, "from": name, "text": message},
                exclude=conn,
            )

    def on_close(self, conn: Connection, code: int, reason: str) -> None:
        found = name_and_room(conn)
        if found is not None:
            name, room_name = found
            with suppress(GatewayError):
                room(room_name).broadcast_json(
                    {"type": "leave", "room": room_name, "name": name}, exclude=conn
                )


wasmgate.export(Chat)
