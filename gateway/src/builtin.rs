//! The example plugins compiled into the binary, and the default config
//! that serves them (and the demo page of [`crate::assets`]), so `wasmgate
//! serve` works with no files at all.

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
