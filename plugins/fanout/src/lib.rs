//! `fanout`: publish/subscribe in one room. Each connection joins the room
//! named by `?room=` (default `all`); every message it sends, text or binary,
//! is delivered unchanged to every other member.

use wasmgate_sdk::{export, log, room, Connection, Handler, Message, OpenResponse, Request};

struct Fanout;

fn room_of(req: &Request) -> String {
    req.query_param("room").unwrap_or_else(|| "all".into())
}

impl Handler for Fanout {
    fn on_open(conn: Connection, req: &Request) -> OpenResponse {
        let name = room_of(req);
        match conn.join(&name).and_then(|_| conn.set_metadata("room", &name)) {
            Ok(()) => OpenResponse::accept(),
            Err(e) => OpenResponse::reject(400, &format!("cannot join room: {e}")),
        }
    }

    fn on_message(conn: Connection, msg: Message) {
        let Ok(Some(name)) = conn.metadata("room") else {
            return;
        };
        if let Err(e) = room(&name).broadcast(&msg, Some(conn)) {
            log::warn(&format!("broadcast to {name} failed: {e}"));
        }
    }
}

export!(Fanout);
