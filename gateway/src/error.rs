//! The gateway's error type: everything that can stop it from starting (a
//! bad config file, a plugin that fails to load, a listener that cannot bind).
//!
//! Errors on live connections never surface here: a protocol error closes its
//! connection with a close code (see [`crate::protocol::frame::ProtocolError`]) and a
//! plugin failure closes its connection with 1011.

use std::path::PathBuf;

/// Why the gateway could not load its configuration or start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("{file}: cannot read: {source}")]
    ConfigRead {
        /// The config file.
        file: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// The config file is not valid: bad TOML, an unknown key, a bad value.
    #[error("{file}:{line}: {message}")]
    Config {
        /// The config file (`<embedded>` for the built-in default).
        file: PathBuf,
        /// The 1-based line the problem is on.
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },

    /// A route's plugin cannot be used.
    #[error("route {route}: plugin {file}: {reason}")]
    Plugin {
        /// The route's path.
        route: String,
        /// The plugin file (or `builtin:<name>`).
        file: String,
        /// What is wrong: unreadable, not a component, a missing export, an
        /// import the gateway does not provide...
        reason: String,
    },

    /// An error tied to a place in the config file: a plugin error at the
    /// line of the route's `plugin` key.
    #[error("{file}:{line}: {error}")]
    Located {
        /// The config file.
        file: PathBuf,
        /// The 1-based line.
        line: usize,
        /// The error.
        error: Box<Error>,
    },

    /// The WebAssembly engine could not be created with the configured
    /// sandbox settings.
    #[error("cannot create the WebAssembly engine: {0}")]
    Engine(String),

    /// The host name of the listen address could not be resolved.
    #[error("{origin}: cannot resolve host name {host:?}: {reason}")]
    Resolve {
        /// Where the address was given: `gateway.toml:2: listen`, or
        /// `--listen`.
        origin: String,
        /// The host name.
        host: String,
        /// Why it could not be resolved.
        reason: String,
    },

    /// The listener could not be bound.
    #[error("{origin}: cannot listen on {addr}: {source}")]
    Bind {
        /// Where the address was given: `gateway.toml:2: listen`,
        /// `gateway.toml:9: [admin] listen`, or `--listen`.
        origin: String,
        /// The address from `[server] listen`.
        addr: std::net::SocketAddr,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

impl Error {
    /// The config file line the error is on, if it has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            Error::Config { line, .. } | Error::Located { line, .. } => Some(*line),
            _ => None,
        }
    }

    /// This error, tied to `line` of the config `file`.
    pub fn located(self, file: &std::path::Path, line: usize) -> Error {
        Error::Located {
            file: file.to_owned(),
            line,
            error: Box::new(self),
        }
    }
}

/// A list of errors found while checking a config: `wasmgate check` prints
/// them all rather than stopping at the first.
#[derive(Debug)]
pub struct Errors(pub Vec<Error>);

impl std::fmt::Display for Errors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Errors {}

impl Errors {
    /// Puts the errors in file order: by line, those without a line first,
    /// errors on the same line in the order they were found.
    pub fn sort(&mut self) {
        self.0.sort_by_key(Error::line);
    }
}

impl From<Error> for Errors {
    fn from(e: Error) -> Self {
        Errors(vec![e])
    }
}
