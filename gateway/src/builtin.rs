//! The example plugins compiled into the binary, the demo page, and the
//! default config that serves them, so `wasmgate serve` works with no files
//! at all.

/// The names of the built-in plugins (`plugin = "builtin:<name>"`).
pub const NAMES: [&str; 5] = ["echo", "chat", "auth", "ticker", "fanout"];

/// The bytes of a built-in plugin.
pub fn plugin(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "echo" => include_bytes!(concat!(env!("WASMGATE_PLUGIN_DIR"), "/echo.wasm")),
        "chat" => include_bytes!(concat!(env!("WASMGATE_PLUGIN_DIR"), "/chat.wasm")),
        "auth" => include_bytes!(concat!(env!("WASMGATE_PLUGIN_DIR"), "/auth.wasm")),
        "ticker" => include_bytes!(concat!(env!("WASMGATE_PLUGIN_DIR"), "/ticker.wasm")),
        "fanout" => include_bytes!(concat!(env!("WASMGATE_PLUGIN_DIR"), "/fanout.wasm")),
        _ => return None,
    })
}

/// Where the build put every plugin of `plugins/` (the test plugins too).
pub const PLUGIN_DIR: &str = env!("WASMGATE_PLUGIN_DIR");

/// The config used when none is given (`wasmgate default-config` prints it).
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// The built-in static folders (`[[static]] dir = "builtin:<name>"`).
pub const STATIC_FOLDERS: [&str; 1] = ["demo"];

/// A file of the built-in static folder `folder`, by its path inside it
/// (`index.html`): its bytes. `demo` holds the chat page the default config
/// serves at `/`, which talks to the `/chat` route.
pub fn static_file(folder: &str, path: &str) -> Option<&'static [u8]> {
    match (folder, path) {
        ("demo", "index.html") => Some(include_bytes!("demo/index.html")),
        _ => None,
    }
}
