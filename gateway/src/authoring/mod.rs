//! Tools for plugin authors, built into the `wasmgate` command: the WIT
//! contract as the gateway knows it ([`WIT`]), C support ([`c`]: bindings
//! generated from the contract, and turning a C core module into a
//! component) and `wasmgate new` ([`scaffold`]: a plugin project per
//! language that builds and serves as it is).
//!
//! Nothing here runs while the gateway serves.

pub mod c;
pub mod scaffold;

/// The WIT contract (`wit/plugin.wit`), embedded so that projects made by
/// `wasmgate new` carry the contract of the gateway that made them.
pub const WIT: &str = include_str!("../../../wit/plugin.wit");

/// The world a plugin built by the SDKs targets: the handler, plus the
/// optional `on-resume`.
pub const WORLD: &str = "resumable-plugin";

/// What can go wrong preparing or building a plugin project.
#[derive(Debug, thiserror::Error)]
pub enum AuthoringError {
    /// The embedded WIT failed to parse or to generate bindings (a bug in
    /// this build of wasmgate).
    #[error("generating bindings from the WIT contract: {0:#}")]
    Bindings(anyhow::Error),
    /// The input is not a core WebAssembly module that can become a plugin
    /// component; the reason names the missing or extra import or export.
    #[error("{0:#}")]
    Componentize(anyhow::Error),
    /// Writing the project failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The project folder exists already.
    #[error("{0}: already exists (choose another name or remove it)")]
    Exists(std::path::PathBuf),
    /// The project name cannot be a folder and identifier.
    #[error("{0:?}: a project name is 1 to 64 characters: letters, digits, '-' or '_', starting with a letter")]
    BadName(String),
}
