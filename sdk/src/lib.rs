//! # wasmgate-sdk: WebSocket handlers for wasmgate, in Rust
//!
//! A wasmgate plugin is a WebAssembly component that handles the events of
//! one route: a connection opens, a message arrives, a timer fires, the
//! connection closes. This crate turns the WIT contract (`wit/plugin.wit`)
//! into a small Rust API: implement [`Handler`] (every method has a no-op
//! default) and call [`export!`] once.
//!
//! Each connection runs in its own instance of the plugin, so `static` and
//! `thread_local!` state is per connection. State the gateway should keep for
//! you (and that other connections of the route may read) goes in
//! [`Connection::set_metadata`].
//!
//! ## Example: a room-based chat in 30 lines
//!
//! ```no_run
//! use wasmgate_sdk::{export, Connection, Handler, Message, OpenResponse, Request, room};
//!
//! struct Chat;
//!
//! impl Handler for Chat {
//!     fn on_open(conn: Connection, req: &Request) -> OpenResponse {
//!         let name = req.query_param("name").unwrap_or_else(|| format!("guest-{}", conn.id()));
//!         if name.len() > 32 {
//!             return OpenResponse::reject(400, "name too long");
//!         }
//!         let _ = conn.set_metadata("name", &name);
//!         let _ = conn.join("lobby");
//!         OpenResponse::accept()
//!     }
//!
//!     fn on_message(conn: Connection, msg: Message) {
//!         if let Message::Text(text) = msg {
//!             let name = conn.metadata("name").ok().flatten().unwrap_or_default();
//!             let body = serde_json::json!({ "from": name, "text": text });
//!             let _ = room("lobby").broadcast_json(&body, Some(conn));
//!         }
//!     }
//!
//!     fn on_close(conn: Connection, _code: u16, _reason: String) {
//!         wasmgate_sdk::log::info(&format!("{} left", conn.id()));
//!     }
//! }
//!
//! export!(Chat);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release` (crate type
//! `cdylib`) and point a route's `plugin` at the `.wasm` file.

#![warn(missing_docs)]

use std::time::Duration;

/// The raw bindings generated from the WIT contract. Prefer the wrappers in
/// this crate; these are public for plugins that need the contract as is.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "resumable-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_bindings",
    });
}

use bindings::wasmgate::plugin::host;
pub use bindings::wasmgate::plugin::types::{
    Accept, Fragment, GatewayError, Header, LogLevel, Message, OpenResponse, Reject, Request,
};

/// Identifies a timer started with [`Connection::set_timer`].
pub type TimerId = u64;

/// The event handlers of a plugin. Every method has a default: accept every
/// connection and ignore every event.
pub trait Handler {
    /// A client asks to open a connection; accept or reject it.
    fn on_open(conn: Connection, req: &Request) -> OpenResponse {
        let _ = (conn, req);
        OpenResponse::accept()
    }

    /// A complete message arrived.
    fn on_message(conn: Connection, msg: Message) {
        let _ = (conn, msg);
    }

    /// On routes with `deliver = "fragments"`: a fragment of a message
    /// arrived (instead of [`Handler::on_message`]).
    fn on_fragment(conn: Connection, fragment: Fragment) {
        let _ = (conn, fragment);
    }

    /// The connection closed (exactly once per accepted connection).
    fn on_close(conn: Connection, code: u16, reason: String) {
        let _ = (conn, code, reason);
    }

    /// A timer set with [`Connection::set_timer`] fired.
    fn on_timer(conn: Connection, timer: TimerId) {
        let _ = (conn, timer);
    }

    /// The connection continues on a new instance of the plugin: after a
    /// reload on a route with `on_reload = "migrate"`, or when a hibernated
    /// connection wakes (`hibernate_after`). This instance has none of the
    /// previous one's memory (globals start fresh); the connection's rooms,
    /// metadata and timers are intact, so rebuild what you need from
    /// [`Connection::metadata`] here. `req` is the original upgrade request.
    /// Runs before the event that woke the connection.
    fn on_resume(conn: Connection, req: &Request) {
        let _ = (conn, req);
    }
}

/// Exports a [`Handler`] implementation as the plugin's `handler` and
/// `resume` interfaces (the `resumable-plugin` world of `wit/plugin.wit`).
/// Call it exactly once per plugin crate.
#[macro_export]
macro_rules! export {
    ($handler:ty) => {
        const _: () = {
            struct __WasmgateExport;
            impl $crate::bindings::exports::wasmgate::plugin::handler::Guest for __WasmgateExport {
                fn on_open(conn: u64, req: $crate::Request) -> $crate::OpenResponse {
                    <$handler as $crate::Handler>::on_open($crate::Connection::from_id(conn), &req)
                }
                fn on_message(conn: u64, msg: $crate::Message) {
                    <$handler as $crate::Handler>::on_message($crate::Connection::from_id(conn), msg)
                }
                fn on_fragment(conn: u64, fragment: $crate::Fragment) {
                    <$handler as $crate::Handler>::on_fragment($crate::Connection::from_id(conn), fragment)
                }
                fn on_close(conn: u64, code: u16, reason: ::std::string::String) {
                    <$handler as $crate::Handler>::on_close(
                        $crate::Connection::from_id(conn),
                        code,
                        reason,
                    )
                }
                fn on_timer(conn: u64, timer: u64) {
                    <$handler as $crate::Handler>::on_timer($crate::Connection::from_id(conn), timer)
                }
            }
            impl $crate::bindings::exports::wasmgate::plugin::resume::Guest for __WasmgateExport {
                fn on_resume(conn: u64, req: $crate::Request) {
                    <$handler as $crate::Handler>::on_resume($crate::Connection::from_id(conn), &req)
                }
            }
            $crate::bindings::__export_plugin_bindings!(__WasmgateExport with_types_in $crate::bindings);
        };
    };
}

/// A handle to one connection of this route. Cheap to copy; holding it does
/// not keep the connection open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connection(u64);

impl Connection {
    /// Wraps a raw connection id (as received in an event or from
    /// [`Room::members`]).
    pub fn from_id(id: u64) -> Self {
        Connection(id)
    }

    /// The connection's id, unique within the gateway's lifetime.
    pub fn id(self) -> u64 {
        self.0
    }

    /// Queues any message.
    pub fn send(self, msg: &Message) -> Result<(), GatewayError> {
        host::send(self.0, msg)
    }

    /// Queues a text message.
    pub fn send_text(self, text: &str) -> Result<(), GatewayError> {
        host::send(self.0, &Message::Text(text.to_owned()))
    }

    /// Queues a binary message.
    pub fn send_binary(self, data: &[u8]) -> Result<(), GatewayError> {
        host::send(self.0, &Message::Binary(data.to_vec()))
    }

    /// Serializes `value` as JSON and queues it as a text message.
    pub fn send_json<T: serde::Serialize + ?Sized>(self, value: &T) -> Result<(), GatewayError> {
        host::send(self.0, &json_message(value)?)
    }

    /// Starts the closing handshake with `code` and `reason`.
    pub fn close(self, code: u16, reason: &str) -> Result<(), GatewayError> {
        host::close(self.0, code, reason)
    }

    /// Joins a room of this route.
    pub fn join(self, room: &str) -> Result<(), GatewayError> {
        host::join(self.0, room)
    }

    /// Leaves a room; returns whether the connection was in it.
    pub fn leave(self, room: &str) -> Result<bool, GatewayError> {
        host::leave(self.0, room)
    }

    /// The rooms this connection is in.
    pub fn rooms(self) -> Result<Vec<String>, GatewayError> {
        host::rooms_of(self.0)
    }

    /// Sets a metadata entry kept by the gateway.
    pub fn set_metadata(self, key: &str, value: &str) -> Result<(), GatewayError> {
        host::metadata_set(self.0, key, value)
    }

    /// Reads a metadata entry.
    pub fn metadata(self, key: &str) -> Result<Option<String>, GatewayError> {
        host::metadata_get(self.0, key)
    }

    /// Removes a metadata entry, returning its old value.
    pub fn remove_metadata(self, key: &str) -> Result<Option<String>, GatewayError> {
        host::metadata_remove(self.0, key)
    }

    /// Starts a timer: [`Handler::on_timer`] runs after `delay`, and then
    /// every `delay` if `repeat` is set. Delays are rounded to milliseconds
    /// (at least 1 ms, at most `u32::MAX` ms).
    pub fn set_timer(self, delay: Duration, repeat: bool) -> Result<TimerId, GatewayError> {
        let ms = delay.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
        host::set_timer(self.0, ms, repeat)
    }
}

/// Cancels a timer; returns whether it was still pending.
pub fn cancel_timer(timer: TimerId) -> bool {
    host::cancel_timer(timer)
}

/// A room of this route, by name.
#[derive(Debug, Clone, Copy)]
pub struct Room<'a>(&'a str);

/// A handle to the room called `name` (rooms exist while they have members).
pub fn room(name: &str) -> Room<'_> {
    Room(name)
}

impl Room<'_> {
    /// Queues `msg` to every member except `except`; returns how many got it.
    pub fn broadcast(self, msg: &Message, except: Option<Connection>) -> Result<u32, GatewayError> {
        host::broadcast(self.0, msg, except.map(Connection::id))
    }

    /// Broadcasts a text message.
    pub fn broadcast_text(
        self,
        text: &str,
        except: Option<Connection>,
    ) -> Result<u32, GatewayError> {
        self.broadcast(&Message::Text(text.to_owned()), except)
    }

    /// Serializes `value` as JSON and broadcasts it as a text message.
    pub fn broadcast_json<T: serde::Serialize + ?Sized>(
        self,
        value: &T,
        except: Option<Connection>,
    ) -> Result<u32, GatewayError> {
        self.broadcast(&json_message(value)?, except)
    }

    /// How many connections are in the room.
    pub fn size(self) -> u32 {
        host::room_size(self.0)
    }

    /// The connections in the room.
    pub fn members(self) -> Vec<Connection> {
        host::room_members(self.0)
            .into_iter()
            .map(Connection)
            .collect()
    }
}

/// One value of the route's `[route.config]` table.
pub fn config(key: &str) -> Option<String> {
    host::config_get(key)
}

/// The whole `[route.config]` table, sorted by key.
pub fn config_all() -> Vec<(String, String)> {
    host::config_all()
}

fn json_message<T: serde::Serialize + ?Sized>(value: &T) -> Result<Message, GatewayError> {
    serde_json::to_string(value)
        .map(Message::Text)
        .map_err(|e| GatewayError::InvalidArgument(format!("cannot serialize JSON: {e}")))
}

/// Writing to the gateway's log, tagged with the route and the plugin.
pub mod log {
    use super::{host, LogLevel};

    /// Logs at debug level.
    pub fn debug(msg: &str) {
        host::log(LogLevel::Debug, msg);
    }
    /// Logs at info level.
    pub fn info(msg: &str) {
        host::log(LogLevel::Info, msg);
    }
    /// Logs at warn level.
    pub fn warn(msg: &str) {
        host::log(LogLevel::Warn, msg);
    }
    /// Logs at error level.
    pub fn error(msg: &str) {
        host::log(LogLevel::Error, msg);
    }
}

impl OpenResponse {
    /// Accept the connection without a subprotocol.
    pub fn accept() -> Self {
        OpenResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    /// Accept the connection selecting `subprotocol` (one the client offered).
    pub fn accept_with(subprotocol: &str) -> Self {
        OpenResponse::Accept(Accept {
            subprotocol: Some(subprotocol.to_owned()),
            headers: Vec::new(),
        })
    }

    /// Reject the upgrade with an HTTP `status` and a plain-text `body`.
    pub fn reject(status: u16, body: &str) -> Self {
        OpenResponse::Reject(Reject {
            status,
            headers: vec![Header {
                name: "content-type".into(),
                value: "text/plain; charset=utf-8".into(),
            }],
            body: body.as_bytes().to_vec(),
        })
    }
}

impl Request {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// The first value of a query parameter, percent-decoded (`+` is a space).
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }
}

/// Decodes `%XX` escapes and `+` in a query component; invalid escapes are
/// kept as they are, invalid UTF-8 becomes U+FFFD.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
