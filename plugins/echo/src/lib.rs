//! `echo`: sends every text and binary message back to its sender.

use wasmgate_sdk::{export, log, Connection, Handler, Message};

struct Echo;

impl Handler for Echo {
    fn on_message(conn: Connection, msg: Message) {
        if let Err(e) = conn.send(&msg) {
            log::warn(&format!("echo to {} failed: {e}", conn.id()));
        }
    }
}

export!(Echo);
