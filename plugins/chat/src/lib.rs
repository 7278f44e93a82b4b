//! `chat`: rooms chosen by the query string (`/chat?room=lobby&name=ana`).
//!
//! Every text message is broadcast to the other members of the sender's room
//! as `{"type":"message","room":..,"from":..,"text":..}`; joins and leaves are
//! announced to the room as `{"type":"join"|"leave","room":..,"name":..}`. The
//! newcomer gets `{"type":"welcome","room":..,"name":..,"members":N}`. Binary
//! messages are refused with close code 1003 (unsupported data).

use serde_json::json;
use wasmgate_sdk::{export, room, Connection, Handler, Message, OpenResponse, Request};

struct Chat;

const MAX_NAME: usize = 64;

fn valid(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && !s.chars().any(char::is_control)
}

impl Handler for Chat {
    fn on_open(conn: Connection, req: &Request) -> OpenResponse {
        let room_name = req.query_param("room").unwrap_or_else(|| "lobby".into());
        let name = req
            .query_param("name")
            .unwrap_or_else(|| format!("guest-{}", conn.id()));
        if !valid(&room_name) || !valid(&name) {
            return OpenResponse::reject(400, "room and name must be 1 to 64 printable characters");
        }
        if conn.set_metadata("name", &name).is_err()
            || conn.set_metadata("room", &room_name).is_err()
            || conn.join(&room_name).is_err()
        {
            return OpenResponse::reject(503, "cannot join the room");
        }
        let r = room(&room_name);
        let _ = r.broadcast_json(
            &json!({"type": "join", "room": room_name, "name": name}),
            Some(conn),
        );
        let _ = conn.send_json(
            &json!({"type": "welcome", "room": room_name, "name": name, "members": r.size()}),
        );
        OpenResponse::accept()
    }

    fn on_message(conn: Connection, msg: Message) {
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(_) => {
                let _ = conn.close(1003, "chat accepts text messages only");
                return;
            }
        };
        let (Ok(Some(name)), Ok(Some(room_name))) = (conn.metadata("name"), conn.metadata("room"))
        else {
            return;
        };
        let _ = room(&room_name).broadcast_json(
            &json!({"type": "message", "room": room_name, "from": name, "text": text}),
            Some(conn),
        );
    }

    fn on_close(conn: Connection, _code: u16, _reason: String) {
        if let (Ok(Some(name)), Ok(Some(room_name))) = (conn.metadata("name"), conn.metadata("room")) {
            let _ = room(&room_name).broadcast_json(
                &json!({"type": "leave", "room": room_name, "name": name}),
                Some(conn),
            );
        }
    }
}

export!(Chat);
