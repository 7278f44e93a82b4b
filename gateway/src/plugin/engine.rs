//! The WebAssembly engine every route shares ([`Runtime`]), and a route's
//! compiled, pre-linked component ([`Plugin`]) from which connections get
//! their own instances.
//!
//! Loading checks everything that can be checked before a client arrives:
//! the file is a component, every import is one the gateway provides, and
//! the `handler` export has the contract's shape. Each failure is an
//! [`Error::Plugin`] naming the route, the file and the reason.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use wasmtime::component::{
    Component, ComponentExportIndex, HasSelf, Instance, InstancePre, Linker, ResourceTable,
};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

use crate::bindings::{Plugin as PluginBindings, PluginIndices};
use crate::config::SlowConsumer;
use crate::config::{PluginSource, SandboxSettings};
use crate::connection::outbox::Outbox;
use crate::error::Error;
use crate::file::ContentHash;
use crate::hub::{ConnHandle, Hub};
use crate::plugin::cache::{CompileCache, Origin};
use crate::plugin::host::{HostState, Scope};
use crate::plugin::output::{GuestOutput, Stream, Tags};

/// The optional interface a plugin exports to be told of a new instance.
const RESUME_INTERFACE: &str = "wasmgate:plugin/resume@0.1.1";

/// How often the engine's epoch advances; a call's time limit is counted in
/// these ticks.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The engine and linker shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    sandbox: SandboxSettings,
    cache: Option<CompileCache>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("sandbox", &self.sandbox)
            .finish()
    }
}

impl Runtime {
    /// Creates the engine with the sandbox settings, with room for
    /// `max_instances` plugin instances at once and compiled plugins cached
    /// in `cache_dir` (`None`: no cache), and starts its epoch ticker (a
    /// thread that stops when the runtime is dropped).
    pub fn new(
        sandbox: &SandboxSettings,
        max_instances: usize,
        cache_dir: Option<PathBuf>,
    ) -> Result<Arc<Self>, Error> {
        // The CPU-budget meters' clock calibrates itself on first use:
        // here, not in a connection's first call.
        crate::quota::MeterClock::get();
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            // Component-model async is not used: turning it off halves the
            // cost of every guest call.
            .concurrency_support(false)
            .epoch_interruption(true)
            // Instance per connection: keep each memory's address-space
            // reservation at the memory cap instead of the default 4 GiB,
            // with a small guard, so thousands of instances fit.
            .memory_reservation(sandbox.max_memory as u64)
            .memory_guard_size(64 << 10)
            .memory_reservation_for_growth(0)
            // Guest calls run synchronously on the connection task's thread:
            // bound the wasm stack well within a tokio worker's 2 MiB.
            .max_wasm_stack(256 << 10)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool(
                sandbox,
                max_instances,
            )));
        let engine = Engine::new(&config).map_err(|e| {
            Error::Engine(format!(
                "{e:#} (the instance pool reserves address space for [server] max_connections \
                 ({max_instances}) instances of [sandbox] max_memory ({} MiB) each: lower one of them)",
                sandbox.max_memory >> 20
            ))
        })?;
        let mut linker = Linker::new(&engine);
        crate::plugin::wasi::add_to_linker(&mut linker)
            .map_err(|e| Error::Engine(format!("cannot link WASI: {e:#}")))?;
        PluginBindings::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| Error::Engine(format!("cannot link the host interface: {e:#}")))?;
        let cache = cache_dir.map(|dir| CompileCache::new(dir, &engine));
        let runtime = Arc::new(Runtime {
            engine,
            linker,
            sandbox: sandbox.clone(),
            cache,
        });
        let weak: Weak<Runtime> = Arc::downgrade(&runtime);
        std::thread::Builder::new()
            .name("wasmgate-epoch".into())
            .spawn(move || {
                while let Some(rt) = weak.upgrade() {
                    rt.engine.increment_epoch();
                    drop(rt);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| Error::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(runtime)
    }

    /// The epoch ticks a call may run.
    pub(crate) fn call_deadline(&self) -> u64 {
        let ticks = self.sandbox.max_call_time.as_millis() / EPOCH_TICK.as_millis();
        u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
    }

    /// The longest a handler call may run (`[sandbox] max_call_time`).
    pub(crate) fn max_call_time(&self) -> Duration {
        self.sandbox.max_call_time
    }

    /// The most linear memory one instance may have (`[sandbox]
    /// max_memory`), in bytes.
    pub(crate) fn max_memory(&self) -> usize {
        self.sandbox.max_memory
    }

    /// The sandbox settings the engine was built with.
    pub fn sandbox(&self) -> &SandboxSettings {
        &self.sandbox
    }

    /// The compiled-plugin cache folder, if caching is on.
    pub fn cache_dir(&self) -> Option<&std::path::Path> {
        self.cache.as_ref().map(CompileCache::dir)
    }

    /// Reads, compiles and links a route's plugin.
    pub fn load(&self, route: &str, source: &PluginSource) -> Result<Plugin, Error> {
        let bytes = read_source(source).map_err(|reason| plugin_error(route, source, reason))?;
        self.load_bytes(route, source, &bytes)
    }

    /// Compiles (or maps from the cache) and links a plugin from its bytes.
    /// Blocking: compilation can take seconds; call it off the async
    /// runtime's threads when serving.
    pub fn load_bytes(
        &self,
        route: &str,
        source: &PluginSource,
        bytes: &[u8],
    ) -> Result<Plugin, Error> {
        let fail = |reason: String| plugin_error(route, source, reason);
        if !bytes.starts_with(b"\0asm") {
            let head: String = bytes
                .iter()
                .take(8)
                .flat_map(|&b| std::ascii::escape_default(b))
                .map(char::from)
                .collect();
            return Err(fail(if bytes.is_empty() {
                "not a WebAssembly file (it is empty)".to_owned()
            } else {
                format!("not a WebAssembly file (starts with \"{head}\")")
            }));
        }
        if wasmparser_is_core_module(bytes) {
            return Err(fail(
                "is a core WebAssembly module, not a component: build it for wasm32-wasip2 \
                 or wrap it with `wasm-tools component new`"
                    .into(),
            ));
        }
        let started = Instant::now();
        let (component, origin) = match &self.cache {
            Some(cache) => cache.load(&self.engine, bytes, &source.to_string()),
            None => {
                crate::plugin::cache::announce_compile(&source.to_string(), bytes.len());
                Component::new(&self.engine, bytes).map(|c| (c, Origin::Compiled))
            }
        }
        .map_err(|e| fail(compile_error(&e, self.sandbox.max_memory)))?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(|e| {
            fail(format!(
                "imports something the gateway does not provide: {e:#}"
            ))
        })?;
        let indices = PluginIndices::new(&instance_pre).map_err(|e| {
            fail(format!(
                "does not export the `wasmgate:plugin/handler@0.1.1` interface (or 0.1.0) of the plugin world: {e:#}"
            ))
        })?;
        // The optional `resume` interface (0.1.1), found semver-compatibly.
        let resume = match component.get_export_index(None, RESUME_INTERFACE) {
            None => None,
            Some(iface) => Some(
                component
                    .get_export_index(Some(&iface), "on-resume")
                    .ok_or_else(|| {
                        fail(format!(
                            "exports `{RESUME_INTERFACE}` without its `on-resume` function"
                        ))
                    })?,
            ),
        };
        // Instantiate once now: a plugin whose start functions trap (or run
        // past max_call_time) is refused here, where the old version keeps
        // serving, not at each connection.
        self.trial_instance(route, source, &instance_pre)
            .map_err(|e| {
                fail(format!(
                    "fails when instantiated (its start functions): {e}"
                ))
            })?;
        Ok(Plugin {
            name: source.to_string(),
            source: source.clone(),
            hash: ContentHash::of(bytes),
            origin,
            load_time: started.elapsed(),
            instance_pre,
            indices,
            resume,
        })
    }

    /// Instantiates `pre` once in a scratch store (no connection, an empty
    /// hub), to prove that the plugin starts.
    fn trial_instance(
        &self,
        route: &str,
        source: &PluginSource,
        pre: &InstancePre<HostState>,
    ) -> Result<(), String> {
        let conn = ConnHandle::new(0, Outbox::new(0), SlowConsumer::Drop);
        let scope = Arc::new(Scope::bare(route, &source.to_string()));
        let state = HostState::new(
            conn,
            Arc::new(Hub::default()),
            scope,
            self.max_memory(),
            self.max_call_time(),
        );
        let mut store = self.store(state);
        let first = store
            .data_mut()
            .call
            .arm(self.call_deadline(), false, false);
        store.set_epoch_deadline(first);
        let _slice = crate::sched::CallScope::enter();
        match pre.instantiate(&mut store) {
            Ok(_) => Ok(()),
            Err(e) => Err(match e.downcast_ref::<wasmtime::Trap>() {
                Some(wasmtime::Trap::Interrupt) => {
                    format!("ran past max_call_time ({:?})", self.sandbox.max_call_time)
                }
                _ => e.root_cause().to_string(),
            }),
        }
    }

    /// A new store for one connection.
    pub(crate) fn store(&self, state: HostState) -> Store<HostState> {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_max_component_handles(MAX_COMPONENT_HANDLES);
        store.epoch_deadline_callback(crate::plugin::deadline::on_deadline);
        store
    }
}

/// The instance pool: one slot per possible connection, reserved up front
/// (address space only) and reused, so that creating and dropping an
/// instance maps and unmaps nothing and thousands of instances share a few
/// large mappings instead of hitting `vm.max_map_count`.
fn pool(sandbox: &SandboxSettings, max_instances: usize) -> PoolingAllocationConfig {
    let n = u32::try_from(max_instances.max(1)).unwrap_or(u32::MAX / 8);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        // A component is a few core instances (the guest, WASI adapters,
        // shims: 3 for Rust, 14 for Python); these per-component caps leave
        // room for JS and Python guests. The core-instance total is only a
        // counter (no memory is set aside per slot), so it allows every
        // instance the per-component cap; memories and tables are real
        // slots, sized for the typical Rust or C guest.
        .max_core_instances_per_component(16)
        .max_memories_per_component(4)
        .max_tables_per_component(8)
        .total_core_instances(n.saturating_mul(16))
        .total_memories(n.saturating_mul(2))
        .total_tables(n.saturating_mul(4))
        .max_memory_size(sandbox.max_memory)
        // A connection's end returns its slots: batch the page decommits
        // (one flush per batch instead of one madvise per instance). Keeping
        // slots resident instead (memset on reuse) measured slower: a Rust
        // guest rarely touches the low pages that would be reset.
        .decommit_batch_size(64);
    pool
}

/// Why a component did not compile, in the operator's terms: a plugin whose
/// memory starts larger than `[sandbox] max_memory` names that key.
fn compile_error(e: &wasmtime::Error, max_memory: usize) -> String {
    let text = format!("{e:#}");
    let needed = text
        .split("minimum byte size of ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    match needed {
        Some(bytes) if text.contains("exceeds the limit") => format!(
            "needs {} KiB of linear memory at start, more than [sandbox] max_memory ({} KiB): \
             raise max_memory",
            bytes.div_ceil(1024),
            max_memory / 1024
        ),
        _ => format!("not a valid component: {text}"),
    }
}

/// A plugin error for `route` and `source`, on one line: wasmtime's errors
/// (and their causes) can span several.
fn plugin_error(route: &str, source: &PluginSource, reason: String) -> Error {
    Error::Plugin {
        route: route.to_owned(),
        file: source.to_string(),
        reason: reason.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// The bytes of a plugin: its file, or the built-in component.
pub fn read_source(source: &PluginSource) -> Result<Vec<u8>, String> {
    match source {
        PluginSource::File(path) => {
            crate::file::read_regular_file(path).map_err(|e| format!("cannot read: {e}"))
        }
        PluginSource::Builtin(name) => {
            crate::builtin::plugin(name)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| {
                    format!(
                        "no built-in plugin named {name:?} (built-ins: {})",
                        crate::builtin::NAMES.join(", ")
                    )
                })
        }
    }
}

/// Whether `bytes` is a core module (version 1) rather than a component.
fn wasmparser_is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

/// A route's compiled plugin, ready to instantiate. Connections hold an
/// `Arc` to the version they run, so a new version can replace it for new
/// connections while old ones finish on theirs.
pub struct Plugin {
    /// The plugin's file name or `builtin:<name>`, for logs.
    pub name: String,
    /// Where it was loaded from.
    pub source: PluginSource,
    /// The SHA-256 of its bytes.
    pub hash: ContentHash,
    /// Whether it was compiled or mapped from the cache.
    pub origin: Origin,
    /// How long compiling (or mapping) and linking took.
    pub load_time: Duration,
    instance_pre: InstancePre<HostState>,
    indices: PluginIndices,
    /// The `on-resume` export, if the plugin has one.
    resume: Option<ComponentExportIndex>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .finish()
    }
}

impl Plugin {
    /// Instantiates the plugin into `store`: its bindings, the instance, and
    /// its `on-resume` function if it exports one.
    pub(crate) fn instantiate(
        &self,
        store: &mut Store<HostState>,
    ) -> wasmtime::Result<(PluginBindings, Instance, Option<ComponentExportIndex>)> {
        let instance = self.instance_pre.instantiate(&mut *store)?;
        let bindings = self.indices.load(&mut *store, &instance)?;
        Ok((bindings, instance, self.resume))
    }

    /// Whether the plugin exports `on-resume`.
    pub fn has_resume(&self) -> bool {
        self.resume.is_some()
    }
}

/// The WASI context a plugin instance sees: clocks, random, and stdout and
/// stderr (which become log lines tagged with `tags`); random bytes from
/// the calling thread's generator ([`ThreadRandom`]), at most
/// [`MAX_RANDOM_BYTES`] per call; at most [`MAX_RESOURCES`] handles at
/// once; no arguments, no
/// stdin, no sockets or name lookups (every address is refused), and only
/// the environment variables and directories its route grants in `scope`.
/// A grant that cannot be honoured (a directory that cannot be opened) is
/// logged and left out.
pub(crate) fn wasi_ctx(tags: Tags, scope: &Scope) -> (WasiCtx, ResourceTable) {
    let mut b = WasiCtxBuilder::new();
    b.secure_random(ThreadRandom)
        .insecure_random(ThreadRandom)
        .max_random_size(MAX_RANDOM_BYTES)
        .stdout(GuestOutput::new(Stream::Stdout, tags.clone()))
        .stderr(GuestOutput::new(Stream::Stderr, tags))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for grant in &scope.env {
        let value = match &grant.value {
            Some(v) => Some(v.clone()),
            None => std::env::var(&grant.key).ok(),
        };
        if let Some(v) = value {
            b.env(&grant.key, v);
        }
    }
    for dir in &scope.dirs {
        let perms = if dir.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        if let Err(e) = b.preopened_dir(&dir.host, &dir.guest, perms) {
            if scope.tenant.counts.instance_errors.admit().is_none() {
                continue;
            }
            tracing::error!(
                tenant = %scope.tenant.name, route = %scope.route, plugin = %scope.plugin,
                "cannot grant directory {} as {}: {e:#}; the plugin runs without it",
                dir.host.display(), dir.guest
            );
        }
    }
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_RESOURCES);
    (b.build(), table)
}

/// The most WASI resource handles (streams, pollables, descriptors...) one
/// instance may hold at once: 4,096. They are host objects, outside the
/// guest's memory and so outside `max_memory` and `max_memory_total`:
/// measured 2026-12-02, a pollable from `subscribe-duration` is two handles
/// and about 590 bytes of the gateway's memory, so 4,096 handles held as
/// pollables are about 1.2 MiB; held as stdout streams, each with a
/// partial line of up to 4 KiB, up to about 16 MiB; on a route granting
/// `dirs`, file descriptors also take the process's open-file limit.
/// wasmtime's default, a million per table, let one instance that never
/// drops its handles hold about 290 MiB as pollables. A call that would
/// create one more fails (the plugin traps, `resource table has no free
/// keys`), and its connection closes with 1011; on a shared instance
/// (`isolation = "shared"`) the table, and so the bound, is the route's.
/// The runtimes of the guest languages here hold a handful.
pub const MAX_RESOURCES: usize = 4096;

/// The most component-model handles one store may hold at once: 8,192
/// (twice [`MAX_RESOURCES`]). These are wasmtime's own tables of the
/// handles a component holds (an `own` of a WASI stream, a resource the
/// component defines itself, a `borrow` lent for the length of a call),
/// host memory outside the guest's. wasmtime's default, 100,000 per store,
/// is reached without any host call (a component creating resources of its
/// own) or in a single one (a `poll` list naming one pollable 100,000
/// times). An instance's WASI handles stay under [`MAX_RESOURCES`], so this
/// leaves them, and what they lend within a call, room. Past it the call
/// fails (the plugin traps, `store handle limit exceeded`) and its
/// connection closes with 1011.
pub const MAX_COMPONENT_HANDLES: usize = 2 * MAX_RESOURCES;

/// The most bytes one call to `wasi:random/random.get-random-bytes` or
/// `wasi:random/insecure.get-insecure-random-bytes` may ask for: 64 KiB, the
/// limit of the Web Crypto API's `getRandomValues`. The host builds the
/// bytes outside the guest's memory and its time limit (a host call is not
/// interrupted), so wasmtime-wasi's default of 64 MiB let one call hold
/// 64 MiB of the gateway's memory and its thread for a fraction of a second.
/// A call asking for more fails (the plugin traps, `requested len ...
/// exceeds limit 65536`), and its connection closes with 1011.
pub const MAX_RANDOM_BYTES: u64 = 64 * 1024;

/// The random source of every plugin instance's WASI context
/// (`wasi:random/random` and `wasi:random/insecure`): the calling thread's
/// generator, `rand::rng()` (ChaCha12, reseeded from the operating system),
/// which is also what wasmtime-wasi's default seeds its per-instance
/// generators from. Zero-sized, where the default boxes two generators per
/// instance, about 320 bytes held for the life of each connection (the
/// builder still seeds them, and drops them when this one replaces them).
/// `insecure-seed` keeps wasmtime-wasi's per-instance seed.
struct ThreadRandom;

impl rand::TryRng for ThreadRandom {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        rand::rng().try_next_u32()
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        rand::rng().try_next_u64()
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        rand::rng().try_fill_bytes(dst)
    }
}

impl rand::TryCryptoRng for ThreadRandom {}
