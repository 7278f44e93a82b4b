//! The files compiled into the binary that `[[static]]` mounts serve with
//! `dir = "builtin:<name>"`: `demo`, the chat page the default config
//! serves at `/`, which talks to the `/chat` route. (Apart from
//! the built-in plugins, which need the build script's output, so that the
//! config parser, fuzzed on its own, can check these names.)

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
