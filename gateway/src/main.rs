//! The `wasmgate` command: `serve` runs the gateway, `check` validates a
//! config and every plugin it names, `default-config` prints the built-in
//! config as a starting point.

mod allocator;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use wasmgate::config::ListenAddr;
use wasmgate::reload::Reloader;
use wasmgate::{builtin, Config, Errors, Gateway};

/// A WebSocket gateway whose route handlers are WebAssembly components.
#[derive(Parser)]
#[command(name = "wasmgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written to stderr: `text` (for people) or `json`
    /// (one JSON object per line, for log shippers). Levels and targets
    /// are chosen with RUST_LOG either way (default `info`).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// The log output formats of `--log-format`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Text,
    /// One JSON object per event: `timestamp`, `level`, `target`,
    /// `fields` (the message and the event's fields) and `span` data.
    Json,
}

/// Whether logs are JSON (`--log-format json`): errors that end the
/// command are then logged as JSON events too.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes an error that ends the command to stderr: `error: ...`, or a JSON
/// log event with `--log-format json`.
fn report_error(e: impl std::fmt::Display) {
    if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::error!("{e}");
    } else {
        eprintln!("error: {e}");
    }
}

/// Sends `tracing` events to stderr in `format`, filtered by RUST_LOG.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The Redis client's own warnings repeat what the cluster link
        // logs once, in its terms (`cluster: degraded`, ...).
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fred=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
            builder.json().with_current_span(false).init()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The config file; without it, the built-in default (the example
        /// plugins on 127.0.0.1:8080).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen on this address instead of `[server] listen`: host:port
        /// such as 127.0.0.1:8080, [::1]:8080 or localhost:8080.
        #[arg(long, short)]
        listen: Option<ListenAddr>,
        /// Do not watch the config and plugin files (SIGHUP still reloads).
        #[arg(long)]
        no_watch: bool,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Parse a config and load every plugin it names; print every error,
    /// in file order.
    Check {
        /// The config file.
        file: PathBuf,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Print the built-in default config.
    DefaultConfig,
    /// Create a plugin project NAME/ in the current folder: an echo handler
    /// in LANG, its SDK, the contract, build.sh and a gateway.toml that
    /// serves it.
    New {
        /// The project's name: its folder, route path and plugin file.
        name: String,
        /// The plugin's language.
        #[arg(long, value_enum)]
        lang: wasmgate::authoring::scaffold::Lang,
    },
    /// Write the C bindings of the plugin contract (plugin.h, plugin.c,
    /// plugin_component_type.o) into DIR, for C plugins.
    Bindings {
        /// The language: only `c` (Rust, JavaScript and Python generate
        /// their own from the WIT).
        #[arg(value_parser = ["c"])]
        lang: String,
        /// The folder to write into (created if missing).
        dir: PathBuf,
    },
    /// Turn a core WebAssembly module (a C plugin built by clang for
    /// wasm32-wasi with the bindings from `wasmgate bindings c`) into a
    /// plugin component.
    Componentize {
        /// The core module.
        module: PathBuf,
        /// Where to write the component.
        #[arg(long, short)]
        output: PathBuf,
    },
}

/// Where compiled plugins are cached.
#[derive(clap::Args)]
struct CacheArgs {
    /// Do not cache compiled plugins (each start compiles every plugin).
    #[arg(long)]
    no_cache: bool,
    /// The compiled-plugin cache folder [default: $XDG_CACHE_HOME/wasmgate/compiled,
    /// else ~/.cache/wasmgate/compiled].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

impl CacheArgs {
    fn dir(&self) -> Option<PathBuf> {
        if self.no_cache {
            return None;
        }
        self.cache_dir
            .clone()
            .or_else(wasmgate::plugin::cache::CompileCache::default_dir)
    }
}

/// `wasmgate new NAME --lang LANG`.
fn new_project(name: &str, lang: wasmgate::authoring::scaffold::Lang) -> anyhow::Result<ExitCode> {
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("wasmgate"));
    let root = wasmgate::authoring::scaffold::create(Path::new("."), name, lang, &me)?;
    println!("created {}/", root.display());
    println!("next:  cd {name} && ./build.sh && wasmgate serve --config gateway.toml");
    println!("then connect to ws://127.0.0.1:8080/{name}");
    Ok(ExitCode::SUCCESS)
}

/// `wasmgate bindings c DIR`.
fn write_c_bindings(dir: &Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    for (name, bytes) in wasmgate::authoring::c::bindings()? {
        let path = dir.join(&name);
        std::fs::write(&path, bytes).with_context(|| format!("{}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `wasmgate componentize MODULE -o OUTPUT`.
fn componentize(module: &Path, output: &Path) -> anyhow::Result<ExitCode> {
    let core = std::fs::read(module).with_context(|| format!("{}", module.display()))?;
    let component = wasmgate::authoring::c::componentize(&core)
        .with_context(|| format!("{}: cannot make a plugin component of it", module.display()))?;
    std::fs::write(output, component).with_context(|| format!("{}", output.display()))?;
    println!("wrote {}", output.display());
    Ok(ExitCode::SUCCESS)
}

fn load_config(file: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match file {
        Some(f) => Config::load(f)?,
        None => Config::parse(builtin::DEFAULT_CONFIG, Path::new("<embedded>"))?,
    })
}

fn main() -> ExitCode {
    allocator::configure();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            no_watch,
            cache,
        } => serve(config.as_deref(), listen, !no_watch, cache.dir()),
        Command::Check { file, cache } => check(&file, cache.dir()),
        Command::DefaultConfig => {
            print!("{}", builtin::DEFAULT_CONFIG);
            Ok(ExitCode::SUCCESS)
        }
        Command::New { name, lang } => new_project(&name, lang),
        Command::Bindings { lang: _, dir } => write_c_bindings(&dir),
        Command::Componentize { module, output } => componentize(&module, &output),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Each of several errors on its own line; the gateway's own
            // errors already say everything (their source included).
            if let Some(errors) = e.downcast_ref::<Errors>() {
                for e in &errors.0 {
                    report_error(e);
                }
            } else if let Some(e) = e.downcast_ref::<wasmgate::Error>() {
                report_error(e);
            } else {
                report_error(format_args!("{e:#}"));
            }
            ExitCode::FAILURE
        }
    }
}

fn check(file: &Path, cache_dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let (config, errors) = every_error(file, cache_dir);
    if !errors.0.is_empty() {
        for e in &errors.0 {
            report_error(e);
        }
        return Ok(ExitCode::FAILURE);
    }
    for r in config.iter().flat_map(|c| &c.routes) {
        println!("ok: route {} -> {}", r.label(), r.plugin);
    }
    Ok(ExitCode::SUCCESS)
}

/// Every error in a config file and the plugins it names, in file order,
/// and the config if it parsed.
fn every_error(file: &Path, cache_dir: Option<PathBuf>) -> (Option<Config>, Errors) {
    let (config, errors) = match Config::read_text(file) {
        Ok(text) => Config::parse_partial(&text, file),
        Err(e) => (None, vec![e]),
    };
    let mut errors = Errors(errors);
    // The plugins of every route whose path and plugin are usable are loaded
    // even when other keys are wrong, so that one run reports everything.
    if let Some(config) = &config {
        if let Err(plugin_errors) = Gateway::new(config, cache_dir) {
            errors.0.extend(plugin_errors.0);
        }
    }
    errors.sort();
    (config, errors)
}

fn serve(
    config_file: Option<&Path>,
    listen: Option<ListenAddr>,
    watch: bool,
    cache_dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let config = match config_file {
        // A bad config file: report everything `check` would, plugins too.
        Some(file) => match Config::load(file) {
            Ok(c) => c,
            Err(_) => return Err(every_error(file, cache_dir).1.into()),
        },
        None => load_config(None)?,
    };
    // This thread runs the runtime's main future (the accept loop; with
    // `threads = 1`, everything): it serves like a worker.
    wasmgate::sched::serving();
    let runtime = match config.server.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_start(wasmgate::sched::serving)
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .on_thread_start(wasmgate::sched::serving)
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .on_thread_start(wasmgate::sched::serving)
            .build(),
    }
    .context("cannot start the async runtime")?;
    let exit = runtime.block_on(async move {
        // Catch SIGHUP before the (possibly slow) plugin loading: its default
        // action would kill the gateway. Tokio keeps the handler installed;
        // the reloader listens from when it starts.
        #[cfg(unix)]
        drop(tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::hangup(),
        ));
        let gateway = Gateway::new(&config, cache_dir)?;
        gateway.log_routes();
        let listener = gateway.bind(listen).await?;
        let addr = listener.local_addr().context("listener address")?;
        // The admin listener, if configured (page, metrics, health), bound
        // before the gateway says it listens: a gateway that cannot bind it
        // does not start.
        let admin = gateway.bind_admin().await?;
        // `[cluster]`: joined once both ports are bound (a node that cannot
        // start leaves nothing in Redis), and before the first connection
        // is accepted (its id carries the node number).
        let cluster = match &config.cluster {
            Some(c) => Some(wasmgate::cluster::Cluster::start(c).await?),
            None => None,
        };
        if let Some(cluster) = &cluster {
            gateway.attach_cluster(cluster);
        }
        {
            // The routes only for this line: holding them would keep a
            // route removed by a later reload (and its shared instance) alive.
            let routes = gateway.routes();
            let paths: Vec<String> = routes.iter().map(|r| r.label.clone()).collect();
            let scheme = if gateway.is_tls() { "wss" } else { "ws" };
            tracing::info!(routes = ?paths, config = %config.file.display(), "wasmgate listening on {addr} ({scheme}://)");
        }
        // A line on stdout for scripts and tests that start the gateway on
        // port 0; on a terminal the log line above already says it.
        if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            println!("wasmgate listening on {addr}");
        }
        if let Some(admin) = admin {
            let at = admin.local_addr().context("admin listener address")?;
            tracing::info!("admin listening on {at}: / (admin page), /events, /state, /metrics, /healthz, /readyz");
            gateway.spawn_admin(admin);
        }
        // Hot reload: file changes (unless --no-watch) and SIGHUP.
        let reloader = Reloader::new(gateway.clone(), config_file.map(Path::to_owned), watch)
            .context("cannot start hot reload")?;
        tokio::spawn(reloader.run());
        let drained = gateway.serve(listener, shutdown_signal()).await;
        if let Some(cluster) = &cluster {
            cluster.leave().await;
        }
        Ok(if drained { ExitCode::SUCCESS } else { ExitCode::from(2) })
    });
    // Dropping the runtime would wait, without end, for work still running
    // on its blocking pool (a plugin's file operation that does not return,
    // on a route with `dirs`); the drain is over, so it is given a second.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    exit
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits at once.
async fn shutdown_signal() {
    wait_signal().await;
    tracing::info!("signal received: draining (send it again to exit at once)");
    tokio::spawn(async {
        wait_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

#[cfg(unix)]
async fn wait_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
