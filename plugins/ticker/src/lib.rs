//! `ticker`: pushes a JSON telemetry message every `interval_ms` milliseconds
//! (route config, default 1000) until the client closes:
//! `{"type":"tick","seq":N,"interval_ms":I,"unix_ms":T}`.
//!
//! The sequence number is kept in the connection's metadata, not in a
//! global: it survives hibernation, a migration to a new plugin version, and
//! a shared instance serving many connections.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use wasmgate_sdk::{config, export, log, Connection, Handler, OpenResponse, Request};

struct Ticker;

fn interval_ms() -> u32 {
    config("interval_ms").and_then(|v| v.parse().ok()).filter(|&v| v > 0).unwrap_or(1000)
}

impl Handler for Ticker {
    fn on_open(conn: Connection, _req: &Request) -> OpenResponse {
        match conn.set_timer(Duration::from_millis(interval_ms().into()), true) {
            Ok(_) => OpenResponse::accept(),
            Err(e) => {
                log::error(&format!("cannot start the ticker: {e}"));
                OpenResponse::reject(503, "cannot start the ticker")
            }
        }
    }

    fn on_timer(conn: Connection, _timer: u64) {
        let seq = match conn.metadata("seq") {
            Ok(v) => v.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1,
            Err(_) => return,
        };
        let _ = conn.set_metadata("seq", &seq.to_string());
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let _ = conn.send_json(&json!({
            "type": "tick",
            "seq": seq,
            "interval_ms": interval_ms(),
            "unix_ms": unix_ms,
        }));
    }
}

export!(Ticker);
