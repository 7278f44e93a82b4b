//! Hot reload: deploying a plugin or a config without a restart.
//!
//! - [`watch`]: which watched files changed, once their writes have
//!   settled, with their new bytes and content hash.
//! - [`Reloader`]: the task that turns those changes, and SIGHUP, into
//!   reloads that the server applies ([`crate::server::Gateway::apply_config`]
//!   and [`crate::server::Gateway::apply_plugin_change`]): a plugin file that
//!   changed is loaded for the routes that serve it; the config file (on a
//!   change, or on SIGHUP) is parsed, validated and applied as a whole, or not
//!   at all. After each config reload the set of watched files follows the
//!   new config.

pub mod watch;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::{Config, PluginSource};
use crate::server::Gateway;
use watch::{FileChange, FileWatcher, WatchError};

/// How long a file must stay unchanged before it is read: long enough for
/// a compiler or a copy to finish writing it.
pub const SETTLE: Duration = Duration::from_millis(50);

/// Watches the config file and every plugin file it names (unless watching
/// is off), listens for SIGHUP, and applies what changed.
pub struct Reloader {
    gateway: Gateway,
    /// The config file (`None`: the built-in config, which never changes).
    config_file: Option<PathBuf>,
    watcher: Option<(FileWatcher, UnboundedReceiver<FileChange>)>,
    /// Caught from construction on, so that a SIGHUP never kills the
    /// gateway.
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
    #[cfg(not(unix))]
    hangup: Option<()>,
}

impl Reloader {
    /// A reloader for `gateway`, whose config came from `config_file`;
    /// `watch` turns file watching on (SIGHUP reloads either way). Must be
    /// called within the async runtime.
    pub fn new(
        gateway: Gateway,
        config_file: Option<PathBuf>,
        watch: bool,
    ) -> Result<Reloader, WatchError> {
        let watcher = if watch {
            let (w, rx) = FileWatcher::new(SETTLE)?;
            Some((w, rx))
        } else {
            None
        };
        let r = Reloader {
            gateway,
            config_file,
            watcher,
            hangup: hangup_signal(),
        };
        r.watch_files(&r.gateway.config());
        Ok(r)
    }

    /// Points the watcher at the config file and the plugin files of
    /// `config`.
    fn watch_files(&self, config: &Config) {
        let Some((watcher, _)) = &self.watcher else {
            return;
        };
        let mut files: Vec<PathBuf> = config
            .routes
            .iter()
            .filter_map(|r| match &r.plugin {
                PluginSource::File(p) => Some(p.clone()),
                PluginSource::Builtin(_) => None,
            })
            .collect();
        files.extend(self.config_file.clone());
        // The certificates the TLS listener serves (after a reload that
        // turns TLS off, still those, until the restart it needs).
        files.extend(self.gateway.tls_files());
        files.sort();
        files.dedup();
        tracing::info!(
            "hot reload: watching {} files (the config, plugins and certificates)",
            files.len()
        );
        if let Err(e) = watcher.set_files(files) {
            tracing::warn!("hot reload: {e}");
        }
    }

    /// Runs until the gateway stops: applies file changes and SIGHUPs.
    pub async fn run(mut self) {
        let mut hangup = self.hangup.take();
        if self.watcher.is_some() {
            self.catch_up().await;
        }
        loop {
            let change = async {
                match &mut self.watcher {
                    Some((_, rx)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                change = change => match change {
                    Some(change) => self.on_change(change).await,
                    None => {
                        tracing::warn!("hot reload: the file watcher stopped; SIGHUP still reloads");
                        self.watcher = None;
                    }
                },
                Some(()) = recv(&mut hangup) => {
                    tracing::info!("SIGHUP: reloading the config and every plugin");
                    self.reload_config(None).await;
                }
            }
        }
    }

    /// Applies plugin files that changed between their loading and the
    /// start of watching (the watcher only reports changes after that).
    async fn catch_up(&self) {
        for route in self.gateway.routes() {
            let current = route.current();
            let PluginSource::File(path) = &current.plugin.source else {
                continue;
            };
            let content = match watch::read_regular_file(path) {
                Ok(bytes) => {
                    let hash = watch::ContentHash::of(&bytes);
                    if hash == current.plugin.hash {
                        continue;
                    }
                    Ok((bytes, hash))
                }
                Err(e) => Err(format!("cannot read: {e}")),
            };
            self.gateway.apply_plugin_change(path, content).await;
        }
    }

    async fn on_change(&mut self, change: FileChange) {
        if self.config_file.as_deref() == Some(change.path.as_path()) {
            match change.content {
                Ok((bytes, _)) => match String::from_utf8(bytes) {
                    Ok(text) => self.reload_config(Some(text)).await,
                    Err(_) => tracing::error!(
                        "config reload: {}: not UTF-8 text; the old config keeps serving",
                        change.path.display()
                    ),
                },
                Err(reason) => tracing::error!(
                    "config reload: {}: {reason}; the old config keeps serving",
                    change.path.display()
                ),
            }
            return;
        }
        let config = self.gateway.config();
        if self.gateway.tls_files().contains(&change.path) {
            self.gateway.reload_tls_files();
            // A file can be a certificate and a plugin only by mistake; a
            // plugin file that is not one fails to load and is reported.
            if !config
                .routes
                .iter()
                .any(|r| r.plugin == PluginSource::File(change.path.clone()))
            {
                return;
            }
        }
        self.gateway
            .apply_plugin_change(&change.path, change.content)
            .await;
    }

    /// Reloads the config from `text` (or from its file), then every plugin
    /// whose bytes changed. Errors are logged and nothing is applied.
    async fn reload_config(&mut self, text: Option<String>) {
        let parsed = match (&self.config_file, text) {
            (Some(file), Some(text)) => Config::parse(&text, file),
            (Some(file), None) => Config::load(file),
            // The built-in config: only its plugins can have changed (none
            // of its built-ins can), so apply it again as it is.
            (None, _) => Ok((*self.gateway.config()).clone()),
        };
        let config = match parsed {
            Ok(c) => c,
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!("config reload: {e}");
                }
                tracing::error!("config reload: the old config keeps serving");
                crate::metrics::Metrics::global().reload_failed("config", errors.to_string());
                return;
            }
        };
        match self.gateway.apply_config(config).await {
            Ok(()) => {
                crate::metrics::Metrics::global().reloaded("config", true);
                let config = self.gateway.config();
                tracing::info!(
                    routes = config.routes.len(),
                    "config reloaded from {}",
                    config.file.display()
                );
                self.watch_files(&config);
            }
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!("config reload: {e}");
                }
                tracing::error!("config reload: the old config keeps serving");
                crate::metrics::Metrics::global().reload_failed("config", errors.to_string());
            }
        }
    }
}

/// SIGHUP as a stream (none where there is no SIGHUP).
#[cfg(unix)]
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot catch SIGHUP: {e}");
            None
        }
    }
}

#[cfg(unix)]
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Option<()> {
    None
}

#[cfg(not(unix))]
async fn recv(_: &mut Option<()>) -> Option<()> {
    std::future::pending().await
}
