//! One plugin instance serving one connection ([`Guest`]): its store, its
//! bindings, and the calls into it. Every call is synchronous (no fiber),
//! bounded by `max_call_time` through the engine's epoch, and a failure is
//! logged once with the route, the plugin file, the export and the
//! connection; the instance is not entered again after it trapped.

use std::sync::Arc;

use wasmtime::component::{ComponentExportIndex, Instance};
use wasmtime::Store;

use crate::bindings::wasmgate::plugin::types::{self, OpenResponse};
use crate::bindings::Plugin as PluginBindings;
use crate::plugin::host::{HostState, REPEAT_FLAG};
use crate::plugin::request::PackedRequest;
use crate::plugin::{Plugin, Runtime};
use crate::protocol::message::{Fragment, Message};

/// A plugin instance serving one connection: its store, its bindings, and
/// whether it may still be entered. Every call is synchronous, bounded by
/// `max_call_time`, and a failure is logged once with the route, the plugin
/// file, the export and the connection.
pub struct Guest {
    store: Store<HostState>,
    bindings: PluginBindings,
    instance: Instance,
    /// The `on-resume` export, if the plugin has one.
    resume: Option<ComponentExportIndex>,
    runtime: Arc<Runtime>,
    /// The plugin trapped: its instance may not be entered again.
    trapped: bool,
    /// The route grants directories: calls may do file I/O, which
    /// wasmtime-wasi runs by blocking on its async implementation.
    files: bool,
}

/// Runs a guest call; `off_worker`, with the worker handed off first (see
/// [`Guest::before_call`]): outside the async runtime's context, where
/// wasmtime-wasi's synchronous file system calls may block on their async
/// implementation, and where a long call holds no worker.
fn run_call<T>(off_worker: bool, call: impl FnOnce() -> T) -> T {
    let _slice = crate::sched::CallScope::enter();
    if off_worker {
        crate::plugin::deadline::blocking(call)
    } else {
        call()
    }
}

impl Guest {
    /// Arms the time limit of the next call; whether the call is to run
    /// off the worker (handed off before it starts): when the route grants
    /// directories (file I/O blocks), or when one of the route's recent
    /// calls ran long ([`crate::plugin::deadline::LongCallHint`]).
    pub(crate) fn before_call(&mut self) -> bool {
        let state = self.store.data_mut();
        let metered = state.scope().tenant.meters.cpu.is_some();
        let off_worker = self.files || state.scope().long_calls.start_off_worker();
        let first = state
            .call
            .arm(self.runtime.call_deadline(), metered, off_worker);
        self.store.set_epoch_deadline(first);
        off_worker
    }

    /// The tenant whose place among long calls the next call is to wait
    /// for before it starts, if it is to (see
    /// [`crate::plugin::deadline::CallClock::wants_place`]).
    pub(crate) fn wants_long_call_place(&self) -> Option<Arc<crate::routing::tenant::Counts>> {
        let state = self.store.data();
        (!self.trapped && state.call.wants_place(&state.scope().long_calls))
            .then(|| state.scope().tenant.counts.clone())
    }

    /// Holds `place` for the next calls until
    /// [`Guest::release_long_call_place`]; see
    /// [`Guest::wants_long_call_place`].
    pub(crate) fn give_long_call_place(&mut self, place: crate::plugin::deadline::LongCalls) {
        self.store.data_mut().call.give_place(place);
    }

    /// The next call waited `max_call_time` for a place among long calls
    /// without getting one: it will not run (logged at most once a second
    /// per tenant, counted as a `turn_timeout` failure). For an event (`on_close`
    /// false) the connection is then closed with 1011, and unlike an
    /// interrupted call's, the instance is whole: its `on-close` runs
    /// (waiting its turn too); for `on-close` itself, the session skips it.
    pub(crate) fn waited_too_long(&mut self, on_close: bool) {
        let state = self.store.data();
        crate::metrics::Metrics::global().plugin_failed(
            &state.scope().tenant.name,
            state.route_path(),
            "turn_timeout",
        );
        let Some(suppressed) = state.scope().tenant.counts.turn_timeouts.admit() else {
            return;
        };
        tracing::error!(
            tenant = %state.scope().tenant.name,
            route = %state.route_path(),
            plugin = %state.plugin_name(),
            version = state.scope().version,
            suppressed,
            conn = state.conn_id(),
            "plugin call waited max_call_time ({:?}) for its turn among the tenant's long calls and was not run; {}",
            self.runtime.max_call_time(),
            if on_close { "its connection's on-close is skipped" } else { "closing its connection with 1011" }
        );
    }

    /// Gives back a place given with [`Guest::give_long_call_place`], once
    /// the event it was for has been handled (or did not happen).
    pub(crate) fn release_long_call_place(&mut self) {
        self.store.data_mut().call.release_place();
    }

    /// Checks how a call went. A trap or error is logged with the route, the
    /// plugin, the export and the connection, marks the instance dead, and
    /// yields `None`.
    pub(crate) fn after_call<T>(
        &mut self,
        export: &'static str,
        result: wasmtime::Result<T>,
    ) -> Option<T> {
        self.store.data_mut().call_ended();
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.trapped = true;
                let state = self.store.data_mut();
                state.conn().cancel_timers();
                let interrupted = matches!(
                    e.downcast_ref::<wasmtime::Trap>(),
                    Some(wasmtime::Trap::Interrupt)
                );
                crate::metrics::Metrics::global().plugin_failed(
                    &state.scope().tenant.name,
                    state.route_path(),
                    if interrupted { "interrupted" } else { "trap" },
                );
                // At most once a second per tenant: a client can make a
                // plugin fail on every connection it opens.
                let suppressed = state.scope().tenant.counts.failures.admit()?;
                let why = match e.downcast_ref::<wasmtime::Trap>() {
                    Some(wasmtime::Trap::Interrupt) => format!(
                        "exceeded max_call_time ({:?}) and was interrupted",
                        self.runtime.max_call_time()
                    ),
                    _ => e.root_cause().to_string(),
                };
                // The guest's backtrace keeps its lines, after the fields.
                let backtrace = e
                    .downcast_ref::<wasmtime::WasmBacktrace>()
                    .map(|bt| format!("\n{bt}"))
                    .unwrap_or_default();
                tracing::error!(
                    tenant = %state.scope().tenant.name,
                    route = %state.route_path(),
                    plugin = %state.plugin_name(),
                    version = state.scope().version,
                    export,
                    suppressed,
                    conn = state.conn_id(),
                    backtrace = %backtrace,
                    "plugin failed; {}: {why}",
                    if export == "on-open" {
                        "answering the upgrade with 500"
                    } else {
                        "closing its connection with 1011"
                    }
                );
                None
            }
        }
    }

    /// Runs `on-open`; `None` if the plugin failed.
    pub fn on_open(&mut self, id: u64, request: &types::Request) -> Option<OpenResponse> {
        let off_worker = self.before_call();
        let r = run_call(off_worker, || {
            self.bindings
                .wasmgate_plugin_handler()
                .call_on_open(&mut self.store, id, request)
        });
        self.after_call("on-open", r)
    }

    /// Runs `on-message`; false if the plugin failed (now or before).
    pub fn on_message(&mut self, id: u64, msg: Message) -> bool {
        if self.trapped {
            return false;
        }
        let msg = match msg {
            Message::Text(s) => types::Message::Text(s),
            Message::Binary(b) => types::Message::Binary(Vec::from(b)),
        };
        let off_worker = self.before_call();
        let r = run_call(off_worker, || {
            self.bindings
                .wasmgate_plugin_handler()
                .call_on_message(&mut self.store, id, &msg)
        });
        self.after_call("on-message", r).is_some()
    }

    /// Runs `on-fragment`; false if the plugin failed (now or before).
    pub fn on_fragment(&mut self, id: u64, fragment: Fragment) -> bool {
        if self.trapped {
            return false;
        }
        let fragment = types::Fragment {
            text: fragment.text,
            first: fragment.first,
            fin: fragment.fin,
            data: Vec::from(fragment.data),
        };
        let off_worker = self.before_call();
        let r = run_call(off_worker, || {
            self.bindings
                .wasmgate_plugin_handler()
                .call_on_fragment(&mut self.store, id, &fragment)
        });
        self.after_call("on-fragment", r).is_some()
    }

    /// Runs `on-timer` if the timer is still live; false if the plugin
    /// failed (now or before).
    pub fn on_timer(&mut self, id: u64, event: u64) -> bool {
        if self.trapped {
            return false;
        }
        let timer = event & !REPEAT_FLAG;
        let live = self
            .store
            .data()
            .conn()
            .timer_live(timer, event & REPEAT_FLAG != 0);
        if !live {
            return true;
        }
        let off_worker = self.before_call();
        let r = run_call(off_worker, || {
            self.bindings
                .wasmgate_plugin_handler()
                .call_on_timer(&mut self.store, id, timer)
        });
        self.after_call("on-timer", r).is_some()
    }

    /// Runs `on-close` unless the plugin trapped before.
    pub fn on_close(&mut self, id: u64, code: u16, reason: &str) {
        if self.trapped {
            return;
        }
        let off_worker = self.before_call();
        let r = run_call(off_worker, || {
            self.bindings
                .wasmgate_plugin_handler()
                .call_on_close(&mut self.store, id, code, reason)
        });
        self.after_call("on-close", r);
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let state = self.store.data_mut();
        if let Some(m) = &state.scope().metrics {
            m.instances.dec();
        }
        state.flush_guest_time();
        state.scope().tenant.release_instance();
    }
}

impl Guest {
    /// Instantiates `plugin` for the connection whose host state is `state`;
    /// the guest's start functions run within `max_call_time`.
    pub fn new(
        runtime: Arc<Runtime>,
        plugin: &Plugin,
        state: HostState,
    ) -> wasmtime::Result<Guest> {
        let tenant = state.scope().tenant.clone();
        let files = !state.scope().dirs.is_empty();
        if !tenant.acquire_instance() {
            return Err(wasmtime::Error::msg(format!(
                "tenant {} has max_instances ({}) instances live",
                tenant.name,
                tenant.quotas.max_instances.unwrap_or(usize::MAX)
            )));
        }
        let metered = tenant.meters.cpu.is_some();
        let mut store = runtime.store(state);
        let first = store
            .data_mut()
            .call
            // Instantiation runs on the worker: handed off at its first
            // tick if it runs long.
            .arm(runtime.call_deadline(), metered, false);
        store.set_epoch_deadline(first);
        let instantiated = {
            let _slice = crate::sched::CallScope::enter();
            plugin.instantiate(&mut store)
        };
        // Instantiating (start functions included) is the tenant's CPU too.
        store.data_mut().instantiation_ended();
        let (bindings, instance, resume) = match instantiated {
            Ok(parts) => parts,
            Err(e) => {
                store.data_mut().flush_guest_time();
                tenant.release_instance();
                return Err(e);
            }
        };
        if let Some(m) = &store.data().scope().metrics {
            m.instances.inc();
        }
        Ok(Guest {
            store,
            bindings,
            instance,
            resume,
            runtime,
            trapped: false,
            files,
        })
    }

    /// The instance's host state.
    pub fn state_mut(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    /// Whether the instance trapped (it may not be entered again).
    pub fn trapped(&self) -> bool {
        self.trapped
    }

    /// Runs `on-resume` if the plugin exports it, with the request unpacked
    /// (only then); false if it failed.
    pub fn on_resume(&mut self, id: u64, request: &PackedRequest) -> bool {
        let Some(index) = self.resume else {
            return true;
        };
        let request = &request.unpack();
        let off_worker = self.before_call();
        let result = run_call(off_worker, || {
            self.instance
                .get_typed_func::<(u64, &types::Request), ()>(&mut self.store, index)
                .and_then(|f| f.call(&mut self.store, (id, request)))
        });
        self.after_call("on-resume", result).is_some()
    }
}
