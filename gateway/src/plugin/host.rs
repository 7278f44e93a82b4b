//! The host side of the WIT contract: [`HostState`] is the data of one
//! plugin instance's store, and its `Host` implementation answers the calls a
//! plugin makes (send, close, rooms, metadata, config, timers, log), always
//! through the instance's own route's hub, which is what keeps routes apart.
//! An instance holds what it needs of its route (the hub and a [`Scope`]),
//! never the route itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::wasmgate::plugin::host::Host;
use crate::bindings::wasmgate::plugin::types::{self, GatewayError, LogLevel, Message};
use crate::config::{DirGrant, EnvGrant, Limits};
use crate::connection::outbox::Outbound;
use crate::hub::{take, ClosedBy, ConnHandle, Hub};
use crate::plugin::memory::Limiter;
use crate::protocol::frame::is_valid_close_code;
use crate::routing::tenant::Tenant;

/// What a plugin instance knows of its route: names for logs and the
/// `[route.config]` values. One per route version, shared by its instances.
#[derive(Debug)]
pub struct Scope {
    /// The route's path.
    pub route: Arc<str>,
    /// The plugin file (or `builtin:<name>`).
    pub plugin: Arc<str>,
    /// The `[route.config]` values.
    pub config: BTreeMap<String, String>,
    /// The route's tenant, with its quotas.
    pub tenant: Arc<Tenant>,
    /// The route version's number, for logs.
    pub version: u64,
    /// The per-connection limits (counts and rates of host calls).
    pub limits: Limits,
    /// Environment variables granted to the plugin.
    pub env: Vec<EnvGrant>,
    /// Host directories granted to the plugin.
    pub dirs: Vec<DirGrant>,
    /// The files the route's instances hold open, and the route's
    /// `max_open_files` (`None`: no such bound).
    pub files: (Arc<crate::plugin::filesystem::OpenFiles>, Option<usize>),
    /// Whether the route's calls have been running long.
    pub long_calls: crate::plugin::deadline::LongCallHint,
    /// The route's metrics (`None` for a plugin instantiated to check it).
    pub metrics: Option<crate::metrics::RouteMetrics>,
}

impl Scope {
    /// A scope with no config, grants or tenant quotas: for instantiating a
    /// plugin to check it.
    pub fn bare(route: &str, plugin: &str) -> Scope {
        Scope {
            route: Arc::from(route),
            plugin: Arc::from(plugin),
            config: BTreeMap::new(),
            tenant: Tenant::default_tenant(None),
            version: 0,
            limits: Limits::default(),
            env: Vec::new(),
            dirs: Vec::new(),
            files: Default::default(),
            long_calls: Default::default(),
            metrics: None,
        }
    }
}

/// Longest close reason, in bytes (a close frame payload is at most 125).
pub const MAX_CLOSE_REASON: usize = 123;

/// The state of one plugin instance.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// Memory and table limits of the instance.
    pub(crate) limits: Limiter,
    /// The connection whose event the instance is handling: always the same
    /// one for a connection's own instance, set before every call for a
    /// shared one ([`HostState::serve`]).
    own: Arc<ConnHandle>,
    /// The same id, for the instance's output lines.
    output_conn: Arc<AtomicU64>,
    hub: Arc<Hub>,
    scope: Arc<Scope>,
    /// The running call's deadline stages.
    pub(crate) call: crate::plugin::deadline::CallClock,
    /// `[sandbox] max_call_time`: the longest a file operation may wait.
    max_call_time: Duration,
    /// The directory listings and open files the instance holds.
    pub(crate) held: crate::plugin::filesystem::Held,
}

impl HostState {
    /// State for an instance serving connection `own` (first) in `hub`,
    /// seeing its route through `scope`.
    /// `max_memory` is `[sandbox] max_memory`.
    pub(crate) fn new(
        own: Arc<ConnHandle>,
        hub: Arc<Hub>,
        scope: Arc<Scope>,
        max_memory: usize,
        max_call_time: Duration,
    ) -> Self {
        let output_conn = Arc::new(AtomicU64::new(own.id));
        let (wasi, table) = crate::plugin::engine::wasi_ctx(
            crate::plugin::output::Tags {
                scope: scope.clone(),
                hub: hub.clone(),
                conn: output_conn.clone(),
            },
            &scope,
        );
        let limits = Limiter::new(max_memory, scope.tenant.clone());
        HostState {
            wasi,
            table,
            limits,
            own,
            output_conn,
            hub,
            scope,
            call: Default::default(),
            max_call_time,
            held: Default::default(),
        }
    }

    /// Makes `conn` the connection whose event the instance handles next
    /// (a shared instance, before each call).
    pub(crate) fn serve(&mut self, conn: &Arc<ConnHandle>) {
        if !Arc::ptr_eq(&self.own, conn) {
            self.own = conn.clone();
            self.output_conn.store(conn.id, Ordering::Relaxed);
        }
    }

    /// The connection whose event the instance is handling.
    pub(crate) fn conn(&self) -> &Arc<ConnHandle> {
        &self.own
    }

    /// The path of the route this instance serves, for logs.
    pub(crate) fn route_path(&self) -> &str {
        &self.scope.route
    }

    /// The plugin file (or `builtin:<name>`) of this instance, for logs.
    pub(crate) fn plugin_name(&self) -> &str {
        &self.scope.plugin
    }

    /// The connection whose event the instance is handling.
    pub(crate) fn conn_id(&self) -> u64 {
        self.own.id
    }

    /// The non-blocking WASI streams of this instance; they may wait up to
    /// `max_call_time` on a route that grants directories.
    pub(crate) fn non_blocking(&mut self) -> crate::plugin::wasi::NonBlocking<'_> {
        let wait = (!self.scope.dirs.is_empty()).then_some(self.max_call_time);
        crate::plugin::wasi::NonBlocking::new(&mut self.table, wait)
    }

    /// The instance's WASI resources (streams, pollables, descriptors,
    /// directory listings).
    pub(crate) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// The route's scope as this instance sees it.
    pub(crate) fn scope(&self) -> &Arc<Scope> {
        &self.scope
    }

    /// The running call has ended: see [`crate::plugin::deadline::CallClock::ended`].
    /// A handler call that used [`crate::plugin::deadline::LONG_CALL_AT_END`]
    /// of CPU time marks its route's next calls for starting handed off.
    pub(crate) fn call_ended(&mut self) {
        self.ended(true);
    }

    /// The instantiation has ended: as [`HostState::call_ended`], except
    /// that a slow start (a JavaScript or Python component's) does not
    /// mark the route: its handler calls may be short.
    pub(crate) fn instantiation_ended(&mut self) {
        self.ended(false);
    }

    fn ended(&mut self, handler: bool) {
        let took = self.call.ended(self.scope.tenant.meters.cpu.as_ref());
        if handler && took >= crate::plugin::deadline::LONG_CALL_AT_END && self.call.ended_long() {
            tracing::debug!(tenant = %self.scope.tenant.name, route = %self.scope.route, conn = self.conn_id(), ?took, "a call used 1 ms of CPU time: the route's next calls start handed off");
            self.scope.long_calls.ran_long();
        }
        if let Some(m) = &self.scope.metrics {
            m.call_duration.observe(took);
        }
    }

    /// Charges the guest time measured and not yet charged to the tenant's
    /// CPU budget (the instance is ending).
    pub(crate) fn flush_guest_time(&mut self) {
        self.call.flush(self.scope.tenant.meters.cpu.as_ref());
    }

    /// Admits `n` host calls (or deliveries) against the connection's rate
    /// (`rate`, metered by the bucket `bucket` picks) and the tenant's
    /// (`tenant` takes from its meter); `limit-reached` if either is used up.
    fn admit(
        &self,
        rate: Option<u32>,
        bucket: impl FnOnce(&mut crate::hub::ConnRates) -> &mut Option<crate::quota::Bucket>,
        n: u64,
        tenant: impl FnOnce(&Tenant) -> bool,
    ) -> Result<(), GatewayError> {
        if rate.is_some() && !take(bucket(&mut self.own.rates.lock()), rate, n) {
            return Err(GatewayError::LimitReached);
        }
        if !tenant(&self.scope.tenant) {
            return Err(GatewayError::LimitReached);
        }
        Ok(())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Converts a plugin's message into an outbound frame without copying.
pub(crate) fn outbound(msg: Message) -> Outbound {
    match msg {
        Message::Text(s) => Outbound::Text(Bytes::from(s.into_bytes())),
        Message::Binary(b) => Outbound::Binary(Bytes::from(b)),
    }
}

/// Timer events carry a flag in the high bit when the timer repeats.
pub(crate) use crate::hub::TIMER_REPEAT_FLAG as REPEAT_FLAG;

impl types::Host for HostState {}

impl Host for HostState {
    fn send(&mut self, conn: u64, msg: Message) -> Result<(), GatewayError> {
        self.admit(
            self.scope.limits.max_sends_per_second,
            |r| &mut r.sends,
            1,
            |t| t.meters.sends.take(1),
        )?;
        if conn == self.own.id {
            return self.own.deliver(outbound(msg));
        }
        match self.hub.get(conn) {
            Ok(c) => c.deliver(outbound(msg)),
            // Maybe a connection of another node of the cluster.
            Err(_) => self.hub.send_remote(conn, outbound(msg)),
        }
    }

    fn close(&mut self, conn: u64, code: u16, reason: String) -> Result<(), GatewayError> {
        if !is_valid_close_code(code) {
            return Err(GatewayError::InvalidArgument(format!(
                "close code {code} may not be sent: use 1000-1003, 1007-1014 or 3000-4999"
            )));
        }
        if reason.len() > MAX_CLOSE_REASON {
            return Err(GatewayError::TooLarge);
        }
        let handle = match self.hub.get(conn) {
            Ok(h) => h,
            Err(_) => return self.hub.close_remote(conn, code, &reason),
        };
        if handle.outbox.is_closed() {
            return Err(GatewayError::Closed);
        }
        handle.request_close(code, &reason, ClosedBy::Plugin);
        Ok(())
    }

    fn join(&mut self, conn: u64, room: String) -> Result<(), GatewayError> {
        let l = &self.scope.limits;
        self.hub
            .join(conn, &room, l.max_rooms_per_connection, l.max_room_members)
    }

    fn leave(&mut self, conn: u64, room: String) -> Result<bool, GatewayError> {
        self.hub.leave(conn, &room)
    }

    fn broadcast(
        &mut self,
        room: String,
        msg: Message,
        except: Option<u64>,
    ) -> Result<u32, GatewayError> {
        let (text, payload) = match msg {
            Message::Text(s) => (true, Bytes::from(s.into_bytes())),
            Message::Binary(b) => (false, Bytes::from(b)),
        };
        let rate = self.scope.limits.max_broadcast_deliveries_per_second;
        let own = self.own.clone();
        let tenant = self.scope.tenant.clone();
        self.hub.broadcast(&room, text, payload, except, |n| {
            take(&mut own.rates.lock().deliveries, rate, n) && tenant.meters.deliveries.take(n)
        })
    }

    fn room_size(&mut self, room: String) -> u32 {
        self.hub.room_size(&room)
    }

    fn room_members(&mut self, room: String) -> Vec<u64> {
        self.hub.room_members(&room)
    }

    fn rooms_of(&mut self, conn: u64) -> Result<Vec<String>, GatewayError> {
        self.hub.rooms_of(conn)
    }

    fn metadata_set(&mut self, conn: u64, key: String, value: String) -> Result<(), GatewayError> {
        let l = &self.scope.limits;
        self.hub.metadata_set(
            conn,
            &key,
            &value,
            l.max_metadata_entries,
            l.max_metadata_bytes,
        )
    }

    fn metadata_get(&mut self, conn: u64, key: String) -> Result<Option<String>, GatewayError> {
        self.hub.metadata_get(conn, &key)
    }

    fn metadata_remove(&mut self, conn: u64, key: String) -> Result<Option<String>, GatewayError> {
        self.hub.metadata_remove(conn, &key)
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        self.scope.config.get(&key).cloned()
    }

    fn config_all(&mut self) -> Vec<(String, String)> {
        self.scope
            .config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn set_timer(&mut self, conn: u64, delay_ms: u32, repeat: bool) -> Result<u64, GatewayError> {
        if conn != self.own.id {
            self.hub.get(conn)?;
            return Err(GatewayError::NotOwner);
        }
        self.admit(
            self.scope.limits.max_timers_per_second,
            |r| &mut r.timers,
            1,
            |t| t.meters.timers.take(1),
        )?;
        let delay = Duration::from_millis(u64::from(delay_ms.max(1)));
        self.own
            .set_timer(delay, repeat, self.scope.limits.max_timers)
    }

    fn cancel_timer(&mut self, timer: u64) -> bool {
        self.own.cancel_timer(timer)
    }

    fn log(&mut self, level: LogLevel, message: String) {
        if !crate::plugin::output::admit_line(&self.scope, Some(&self.own)) {
            return;
        }
        let (tenant, route) = (&*self.scope.tenant.name, &*self.scope.route);
        let (plugin, version) = (&*self.scope.plugin, self.scope.version);
        let conn = self.own.id;
        let message = crate::plugin::output::printable(message.as_bytes(), false);
        match level {
            LogLevel::Trace => {
                tracing::trace!(tenant = %tenant, route = %route, plugin = %plugin, version, conn, "{message}")
            }
            LogLevel::Debug => {
                tracing::debug!(tenant = %tenant, route = %route, plugin = %plugin, version, conn, "{message}")
            }
            LogLevel::Info => {
                tracing::info!(tenant = %tenant, route = %route, plugin = %plugin, version, conn, "{message}")
            }
            LogLevel::Warn => {
                tracing::warn!(tenant = %tenant, route = %route, plugin = %plugin, version, conn, "{message}")
            }
            LogLevel::Error => {
                tracing::error!(tenant = %tenant, route = %route, plugin = %plugin, version, conn, "{message}")
            }
        }
    }
}
