//! One WebSocket connection from upgrade to close, as one state machine.
//!
//! A session is created by [`Session::open`] while the HTTP upgrade is still
//! pending (the plugin's `on-open` may choose a subprotocol or refuse), and
//! runs with [`Session::run`] once the upgrade completes. Its [`Stage`] is
//! what keeps the contract's promise: once `on-open` has accepted, `on-close`
//! runs exactly once however the connection ends: the upgrade failing (the
//! client reset during the 101), a close handshake, a protocol error, the
//! peer vanishing, shutdown, or the session being dropped (the runtime
//! stopping). Only a plugin that trapped is not called again, and an
//! `on-close` that waited `max_call_time` for its turn behind its tenant's
//! long calls is skipped (logged; see [`Session::turn`]).
//!
//! The run loop is split into named parts: [`Keepalive`] (pings, pong and
//! idle deadlines), [`Phase`] (open, or closing with the code that
//! `on-close` will report), plugin delivery through [`Guest`], and the
//! connection's writes through its [`Outbox`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::Instant;

use crate::bindings::wasmgate::plugin::types::{self, OpenResponse};
use crate::config::{Deliver, Limits, OnReload, RateExceeded};
use crate::connection::keepalive::{Due, Keepalive};
use crate::connection::outbox::{Outbound, Outbox, Writer};
use crate::hub::{ClosedBy, ConnHandle};
use crate::metrics::RouteMetrics;
use crate::plugin::deadline::LongCalls;
use crate::plugin::host::{HostState, MAX_CLOSE_REASON};
use crate::plugin::instance::Guest;
use crate::plugin::request::PackedRequest;
use crate::plugin::shared::{Seen, SharedInstance, SharedTurn};
use crate::plugin::Runtime;
use crate::protocol::deflate::{Agreed, Inflater};
use crate::protocol::frame::{
    parse_close, Frame, FrameReader, OpCode, ProtocolError, ReadError, Utf8Stream,
};
use crate::protocol::message::{Assembler, Fragment, Message, Streamer};
use crate::quota::Bucket;
use crate::routing::route::{Route, RouteVersion, Slot};

/// Where a session is in its life; decides what ending it owes the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// `on-open` has not accepted (yet): ending runs no `on-close`.
    Opening,
    /// `on-open` accepted: ending must run `on-close` exactly once.
    Accepted,
    /// Ended: `on-close` ran (or was not owed) and the connection left its
    /// route.
    Ended,
}

/// Where a connection's events go: its own instance, or its route
/// version's shared one.
enum Instance {
    /// `isolation = "connection"`: the connection's own instance; `None`
    /// while hibernated (the next event gets a fresh one).
    Own(Option<Guest>),
    /// `isolation = "shared"`.
    Shared {
        shared: Arc<SharedInstance>,
        /// The shared instance generation that last saw this connection.
        seen: Seen,
        /// Hibernated: there is nothing to release, but the connection may
        /// be parked.
        asleep: bool,
        /// One of this connection's events trapped: it is closing, and its
        /// plugin is not called again.
        failed: bool,
    },
}

impl Instance {
    /// A connection's place on `version`, with no instance yet.
    fn on(version: &RouteVersion) -> Instance {
        match &version.shared {
            Some(shared) => Instance::Shared {
                shared: shared.clone(),
                seen: 0,
                asleep: false,
                failed: false,
            },
            None => Instance::Own(None),
        }
    }

    /// Whether a call failed: the plugin may not be called again for this
    /// connection.
    fn failed(&self) -> bool {
        match self {
            Instance::Own(guest) => guest.as_ref().is_some_and(Guest::trapped),
            Instance::Shared { failed, .. } => *failed,
        }
    }

    /// Not hibernated.
    fn awake(&self) -> bool {
        match self {
            Instance::Own(guest) => guest.is_some(),
            Instance::Shared { asleep, .. } => !asleep,
        }
    }
}

/// A connection's plugin instance and everything needed to run it.
pub struct Session {
    id: u64,
    route: Arc<Route>,
    /// The route's version when the connection opened: its settings and
    /// plugin, kept for the connection's life.
    version: Arc<RouteVersion>,
    conn: Arc<ConnHandle>,
    runtime: Arc<Runtime>,
    /// Where the connection's events go.
    instance: Instance,
    /// The newest route version this connection has looked at.
    seen_version: u64,
    /// The upgrade request, packed, for `on-resume`.
    request: PackedRequest,
    stage: Stage,
    /// When `on-open` accepted, for the closing log line.
    opened_at: Instant,
    /// Messages delivered to the plugin, and written to the peer.
    messages: (u64, u64),
    /// The close frame we sent, if any: what `on-close` reports if the
    /// session is dropped before the peer answers.
    sent_close: Option<(u16, String)>,
    /// permessage-deflate, when the handshake agreed on it.
    compression: Option<Agreed>,
    /// This connection's turn at its route's shared instance, while an
    /// event of it is being handled ([`Session::turn`]).
    shared_turn: Option<SharedTurn>,
    /// A place among long calls taken while hibernated, for the instance
    /// the event resumes ([`Session::resume`] gives it to it).
    pending_place: Option<LongCalls>,
    /// `on-close` waited `max_call_time` for its turn and is not run
    /// ([`Session::turn`]).
    skip_on_close: bool,
    _slot: Slot,
}

/// How `on-open` went.
pub enum Opened {
    /// Accepted: run the session once the upgrade completes (or drop it,
    /// which still runs `on-close`).
    Accept(Box<Session>, types::Accept),
    /// Rejected by the plugin with an HTTP response.
    Reject(types::Reject),
    /// The plugin trapped in `on-open`.
    Failed,
    /// No instance could be created (resources exhausted: memory, maps).
    Unavailable,
}

impl Session {
    /// Registers connection `id` on its route, instantiates the plugin (or
    /// takes the route's shared instance) and runs `on-open`. A rejected or
    /// failed open leaves nothing behind.
    pub fn open(
        id: u64,
        route: Arc<Route>,
        version: Arc<RouteVersion>,
        runtime: Arc<Runtime>,
        slot: Slot,
        request: Arc<types::Request>,
    ) -> Opened {
        let limits = &version.settings.limits;
        let outbox = Outbox::new(limits.max_outbound_buffer);
        let conn = ConnHandle::new(id, outbox, limits.slow_consumer);
        route.hub.insert(conn.clone());
        let mut instance = Instance::on(&version);
        if let Instance::Shared { shared, .. } = &instance {
            if !shared.available(&runtime, &conn) {
                route.hub.remove(id);
                return Opened::Unavailable;
            }
        }
        if let Instance::Own(guest) = &mut instance {
            let state = HostState::new(
                conn.clone(),
                route.hub.clone(),
                version.scope.clone(),
                runtime.max_memory(),
                runtime.max_call_time(),
            );
            match Guest::new(runtime.clone(), &version.plugin, state) {
                Ok(g) => *guest = Some(g),
                Err(e) => {
                    if let Some(suppressed) = version.tenant.counts.instance_errors.admit() {
                        tracing::error!(
                            tenant = %version.tenant.name, route = %route.path,
                            plugin = %version.plugin.name, conn = id, suppressed,
                            "cannot instantiate the plugin; answering 503: {e:#}"
                        );
                    }
                    route.hub.remove(id);
                    return Opened::Unavailable;
                }
            }
        }
        let mut session = Session {
            id,
            seen_version: version.version,
            route,
            version,
            conn,
            runtime,
            instance,
            request: PackedRequest::pack(&request),
            stage: Stage::Opening,
            opened_at: Instant::now(),
            messages: (0, 0),
            sent_close: None,
            compression: None,
            shared_turn: None,
            pending_place: None,
            skip_on_close: false,
            _slot: slot,
        };
        let response = match &mut session.instance {
            Instance::Own(guest) => guest.as_mut().and_then(|g| g.on_open(id, &request)),
            Instance::Shared {
                shared,
                seen,
                failed,
                ..
            } => {
                let r = shared.call(&session.runtime, &session.conn, seen, None, |g| {
                    g.on_open(id, &request)
                });
                *failed = r.is_none();
                r
            }
        };
        match response {
            Some(OpenResponse::Accept(accept)) => {
                session.stage = Stage::Accepted;
                session.opened_at = Instant::now();
                Opened::Accept(Box::new(session), accept)
            }
            Some(OpenResponse::Reject(reject)) => {
                session.end(1006, "", ClosedBy::Gateway);
                Opened::Reject(reject)
            }
            None => {
                session.end(1006, "", ClosedBy::Gateway);
                Opened::Failed
            }
        }
    }

    /// The connection's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The connection's outbound queue.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.conn.outbox
    }

    /// Asks the session to close with 1001 as soon as it runs (the gateway
    /// began shutting down during the upgrade).
    pub fn request_shutdown(&self) {
        self.conn
            .request_close(1001, "going away", ClosedBy::Gateway);
    }

    /// Ends the connection: runs `on-close` with `code` and `reason` if
    /// `on-open` accepted and the plugin has not failed, then takes the
    /// connection off its route (rooms, metadata, timers) and logs the
    /// closing line (debug). Does nothing the second time.
    fn end(&mut self, code: u16, reason: &str, by: ClosedBy) {
        if self.stage == Stage::Ended {
            return;
        }
        self.conn.outbox.finish();
        let accepted = self.stage == Stage::Accepted;
        // Timers stop first: none fires into on-close, and any it sets is
        // cancelled below. A hibernated connection gets an instance back
        // for its on-close (of the version it runs: a closing connection is
        // not migrated).
        self.conn.cancel_timers();
        if accepted && !self.skip_on_close && self.prepare(false) {
            self.invoke(|guest, id| {
                guest.on_close(id, code, reason);
                true
            });
        }
        self.conn.cancel_timers();
        self.stage = Stage::Ended;
        self.route.hub.remove(self.id);
        if accepted {
            crate::metrics::Metrics::global().closed(&self.route.metrics, code);
            tracing::debug!(
                tenant = %self.version.tenant.name, route = %self.route.path,
                conn = self.id,
                code,
                reason,
                closed_by = by.as_str(),
                duration_ms = u64::try_from(self.opened_at.elapsed().as_millis()).unwrap_or(u64::MAX),
                messages_in = self.messages.0,
                messages_out = self.messages.1,
                "connection closed"
            );
        }
    }

    /// Delivers a message to the plugin as if it had arrived from the peer
    /// (the session loop does this for every message; the benchmarks call it
    /// directly). Returns false if the plugin failed.
    pub fn deliver(&mut self, msg: Message) -> bool {
        self.call(true, |guest, id| guest.on_message(id, msg))
    }

    /// Delivers one event: [`Session::prepare`], then [`Session::invoke`].
    fn call(&mut self, at_boundary: bool, event: impl FnOnce(&mut Guest, u64) -> bool) -> bool {
        self.prepare(at_boundary) && self.invoke(event)
    }

    /// Runs `event` on the connection's instance (its own, or the shared
    /// one, which is told of the connection with `on-resume` first if it is
    /// a generation that has not seen it). False if the plugin failed; a
    /// failure is logged where it happens.
    fn invoke(&mut self, event: impl FnOnce(&mut Guest, u64) -> bool) -> bool {
        let id = self.id;
        match &mut self.instance {
            Instance::Own(guest) => guest.as_mut().is_some_and(|g| event(g, id)),
            Instance::Shared {
                shared,
                seen,
                failed,
                ..
            } => {
                let ok = shared
                    .call(&self.runtime, &self.conn, seen, Some(&self.request), |g| {
                        event(g, id).then_some(())
                    })
                    .is_some();
                *failed |= !ok;
                ok
            }
        }
    }

    /// Makes sure the connection is ready for an event on the version it
    /// should run: moves it to the route's newest version when that version
    /// says `on_reload = "migrate"`, and wakes it from hibernation. A new
    /// instance of its own gets `on-resume` here; a shared instance calls it
    /// before the event. A connection moves only `at_boundary`: between
    /// messages, never while a streamed message's fragments are arriving.
    /// False if the plugin failed (now or before): the caller closes with
    /// 1011.
    fn prepare(&mut self, at_boundary: bool) -> bool {
        let newest = self.route.version_number();
        if at_boundary && newest != self.seen_version {
            self.seen_version = newest;
            let latest = self.route.current();
            if latest.version != self.version.version
                && latest.settings.on_reload == OnReload::Migrate
            {
                // A failed plugin is not migrated: the connection is closing.
                if self.instance.failed() {
                    return false;
                }
                let from = self.version.version;
                self.version = latest;
                self.instance = Instance::on(&self.version);
                // A place taken while hibernated goes to the new version's
                // own instance (same tenant); a shared one has its turns.
                if !matches!(self.instance, Instance::Own(_)) {
                    self.pending_place = None;
                }
                if let Instance::Own(_) = self.instance {
                    if !self.resume() {
                        return false;
                    }
                }
                tracing::debug!(
                    tenant = %self.version.tenant.name, route = %self.route.path, conn = self.id, from, to = self.version.version,
                    "connection migrated to the new plugin version"
                );
                return true;
            }
        }
        match &mut self.instance {
            Instance::Own(Some(guest)) => !guest.trapped(),
            Instance::Own(None) => {
                let ok = self.resume();
                if ok {
                    tracing::debug!(tenant = %self.version.tenant.name, route = %self.route.path, conn = self.id, "connection resumed from hibernation");
                }
                ok
            }
            Instance::Shared { asleep, failed, .. } => {
                if std::mem::take(asleep) {
                    tracing::debug!(tenant = %self.version.tenant.name, route = %self.route.path, conn = self.id, "connection resumed from hibernation");
                }
                !*failed
            }
        }
    }

    /// Gives the connection a fresh instance of its own of its version and
    /// runs `on-resume`; false if that failed (logged).
    fn resume(&mut self) -> bool {
        let mut state = HostState::new(
            self.conn.clone(),
            self.route.hub.clone(),
            self.version.scope.clone(),
            self.runtime.max_memory(),
            self.runtime.max_call_time(),
        );
        // A place taken while hibernated: kept for the instantiation,
        // `on-resume` and the event that woke the connection, which runs
        // next (each may run long; none may wait for a second place while
        // this connection holds one).
        if let Some(place) = self.pending_place.take() {
            state.call.give_place(place);
        }
        match Guest::new(self.runtime.clone(), &self.version.plugin, state) {
            Ok(mut guest) => {
                let ok = guest.on_resume(self.id, &self.request);
                self.instance = Instance::Own(Some(guest));
                ok
            }
            Err(e) => {
                if let Some(suppressed) = self.version.tenant.counts.instance_errors.admit() {
                    tracing::error!(
                        tenant = %self.version.tenant.name, route = %self.route.path,
                        plugin = %self.version.plugin.name, conn = self.id, suppressed,
                        "cannot instantiate the plugin to resume the connection; closing it with 1011: {e:#}"
                    );
                }
                false
            }
        }
    }

    /// Hibernates a connection that has had no event for `hibernate_after`:
    /// releases its own instance (its next event gets a fresh one), or with
    /// a shared instance only marks it, so that it can be parked. A failed
    /// plugin's connection is closing and is left as it is.
    fn hibernate(&mut self) {
        let released = match &mut self.instance {
            Instance::Own(guest) if guest.as_ref().is_some_and(|g| !g.trapped()) => {
                *guest = None;
                true
            }
            Instance::Shared { asleep, failed, .. } if !*asleep && !*failed => {
                *asleep = true;
                true
            }
            _ => false,
        };
        if released {
            tracing::debug!(tenant = %self.version.tenant.name, route = %self.route.path, conn = self.id, "connection hibernated: instance released");
        }
    }

    /// Runs the connection over the two halves of its socket (`initial`
    /// holds bytes the client sent right after its request) until it closes,
    /// then runs `on-close` and writes out what is queued.
    ///
    /// The event loop ([`Session::live`]) runs in its own allocation. A
    /// hibernated connection with nothing to read, write or deliver leaves
    /// it and waits in [`Session::park`], which holds only what it needs to
    /// wake (about a quarter of the loop's size), with its read and write
    /// buffers released.
    pub async fn run<R, W>(self: Box<Self>, mut rd: R, mut wr: W, initial: Bytes)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        // The session stays in its box: the task holds a pointer, not a
        // copy (an async fn's arguments are stored twice in its future).
        let mut this = self;
        let mut link = this.link(initial);
        let ending = loop {
            let stop = Box::pin(this.live(&mut rd, &mut wr, &mut link)).await;
            link.report(&this.route.metrics);
            if let Stop::Ended(ending) = stop {
                break ending;
            }
            link.reader.release_buffer();
            link.out.release_buffers();
            if let Some(ending) = Session::park(&this.conn, &mut rd, &mut link).await {
                break ending;
            }
        };

        // Nothing more is accepted; `on-close` runs; what is queued is
        // written, then the TCP connection is closed.
        this.messages = (link.inbound.messages, link.out.messages_sent());
        // `on-close` too waits its turn as this task rather than on a
        // thread (and is not run if it waits `max_call_time`).
        if this.stage == Stage::Accepted {
            // Nothing more is queued and no timer fires while it waits.
            this.conn.outbox.finish();
            this.conn.cancel_timers();
            let conn = this.conn.clone();
            this.turn(&conn, true).await;
        }
        this.end(ending.code, &ending.reason, ending.by);
        this.end_turn();
        drop(rd);
        let conn = this.conn.clone();
        let _ = tokio::time::timeout(
            link.limits.close_timeout,
            link.out.finish(&conn.outbox, &mut wr),
        )
        .await;
        link.report(&this.route.metrics);
        let dropped = conn.outbox.dropped();
        this.route.metrics.dropped.inc_by(dropped);
        if dropped > 0 {
            tracing::info!(tenant = %this.version.tenant.name, route = %this.route.path, conn = this.id, dropped, "messages dropped for a slow consumer");
        }
        if let Some(rates) = link.inbound.rates.as_ref().filter(|r| r.dropped > 0) {
            tracing::info!(
                tenant = %this.version.tenant.name, route = %this.route.path, conn = this.id,
                dropped = rates.dropped, "messages from the client dropped over its inbound rate"
            );
        }
    }

    /// Ends a session whose upgrade did not complete (the client went away
    /// during the 101): `on-close` with 1006, after waiting its turn as a
    /// task ([`Session::turn`]), as [`Session::run`] does.
    pub async fn abandon(mut self: Box<Self>) {
        if self.stage == Stage::Accepted {
            self.conn.outbox.finish();
            self.conn.cancel_timers();
            let conn = self.conn.clone();
            self.turn(&conn, true).await;
        }
        self.end(1006, "", ClosedBy::Abnormal);
        self.end_turn();
    }

    /// Compresses and decompresses messages as `agreed` in the opening
    /// handshake (permessage-deflate, RFC 7692); before [`Session::run`].
    pub fn set_compression(&mut self, agreed: Agreed) {
        self.compression = Some(agreed);
    }

    /// The state that outlives one run of the event loop; `initial` holds
    /// bytes the client sent right after its request.
    fn link(&self, initial: Bytes) -> Link {
        let started = self.opened_at;
        let limits = self.version.settings.limits.clone();
        // `initial` is a slice of hyper's whole read buffer: it is copied
        // here and dropped, as holding it would keep that buffer alive for
        // the life of the connection.
        let mut link = Link {
            reader: FrameReader::new(&initial, limits.max_frame_size),
            // This task writes too: no writer task to wake per message.
            out: Writer::default(),
            inbound: Inbound::new(&self.version, started),
            keepalive: Keepalive::new(started),
            hibernate_after: self.version.settings.hibernate_after,
            limits,
            tally: Tally::default(),
        };
        if let Some(agreed) = self.compression {
            link.reader.allow_compressed();
            link.out.compress(agreed);
            link.inbound.inflate = Some(Box::new(InboundDeflate::new(agreed)));
        }
        link
    }

    /// The event loop: reads frames and delivers them, writes what is
    /// queued, runs timers, keepalive, the closing handshake and
    /// hibernation. Returns when the connection has ended, or when it is
    /// hibernated with nothing in flight (no instance, nothing to write, no
    /// partial frame or message, not closing) and can be parked.
    async fn live<R, W>(&mut self, rd: &mut R, wr: &mut W, link: &mut Link) -> Stop
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let Link {
            reader,
            out,
            inbound,
            keepalive,
            limits,
            hibernate_after,
            tally,
        } = link;
        let hibernate_after = *hibernate_after;
        let conn = self.conn.clone();
        let outbox = &conn.outbox;
        let mut phase = Phase::Open;
        // A close request or a timer may be what woke a parked connection
        // (the park consumed the wake-up): look before waiting.
        self.on_close_request(&mut phase);
        self.on_timers_in_turn(&conn, &mut phase, inbound).await;
        // When the session must next wake with no I/O: the end of the
        // closing handshake, a keepalive deadline, or hibernation.
        let next_wake = |phase: &Phase, keepalive: &Keepalive, live: bool, last_event, now| {
            let mut at = phase
                .deadline()
                .unwrap_or_else(|| keepalive.next_deadline(limits, now));
            if let (Some(after), true, true) = (hibernate_after, live, phase.is_open()) {
                at = at.min(last_event + after);
            }
            at
        };
        let now = Instant::now();
        let wake = tokio::time::sleep_until(next_wake(
            &phase,
            keepalive,
            self.instance.awake(),
            inbound.last_event,
            now,
        ));
        tokio::pin!(wake);
        // Waiting for a close request and for queued frames: created once and
        // kept across iterations (a new `Notified` per frame would register
        // and unregister a waiter each time).
        let close_requested = conn.close_notify.notified();
        tokio::pin!(close_requested);
        let out_ready = outbox.ready();
        tokio::pin!(out_ready);
        let timer_ready = conn.timer_notify.notified();
        tokio::pin!(timer_ready);

        loop {
            // Whatever the last step queued (an echo, a pong, a close) is
            // encoded now and written below as soon as the socket takes it.
            let sent = out.messages_sent();
            out.fill(outbox);
            if out.messages_sent() != sent {
                keepalive.data(Instant::now());
            }
            let now = Instant::now();
            tally.report_due(now, inbound, out, &self.route.metrics);
            // Parked only with nothing due: a keepalive deadline that woke
            // the park is handled here first.
            if !self.instance.awake()
                && phase.is_open()
                && out.is_empty()
                && reader.is_idle()
                && inbound.is_idle()
                && wake.deadline() > Instant::now()
            {
                return Stop::Parked;
            }
            // The timer is only moved earlier here (a close or a ping is now
            // due sooner); activity that moves it later is seen when it fires,
            // so a busy connection does not re-register a timer per frame.
            let mut deadline = next_wake(
                &phase,
                keepalive,
                self.instance.awake(),
                inbound.last_event,
                now,
            );
            // Counts not yet in the metrics get there within a period.
            if let Some(due) = tally.due(inbound, out) {
                deadline = deadline.min(due);
            }
            if deadline < wake.deadline() {
                wake.as_mut().reset(deadline);
            }
            // A tenant over its CPU budget gets no new events until the
            // budget allows: frames wait unread (TCP pushes back on the
            // client), timers wait queued; writes, close requests and
            // keepalive go on.
            let throttled = self.version.tenant.cpu_ready_at().map(Instant::from_std);
            tokio::select! {
                biased;
                _ = &mut close_requested, if phase.is_open() => {
                    close_requested.set(conn.close_notify.notified());
                    self.on_close_request(&mut phase);
                }
                _ = tokio::time::sleep_until(throttled.unwrap_or(now)), if throttled.is_some() => {
                    self.on_timers_in_turn(&conn, &mut phase, inbound).await;
                }
                _ = &mut timer_ready, if phase.is_open() && throttled.is_none() => {
                    timer_ready.set(conn.timer_notify.notified());
                    self.on_timers_in_turn(&conn, &mut phase, inbound).await;
                }
                read = reader.read_frame(rd), if throttled.is_none() => {
                    let now = Instant::now();
                    keepalive.received(now);
                    match read {
                        Ok(frame) => {
                            let mut deliver = true;
                            if !frame.opcode.is_control() {
                                keepalive.data(now);
                                // The tenant may have gone over its CPU
                                // budget while this connection waited: wait
                                // until it is back within it, unless the
                                // connection is being closed meanwhile (the
                                // frame is then dropped with it).
                                while let Some(at) = self.version.tenant.cpu_ready_at() {
                                    if conn.close_pending() {
                                        deliver = false;
                                        break;
                                    }
                                    let at = Instant::from_std(at).min(Instant::now() + CLOSE_CHECK);
                                    tokio::time::sleep_until(at).await;
                                }
                            }
                            // The call waits its turn here, as a task
                            // (Session::turn): a place among its tenant's
                            // long calls, or the route's shared instance.
                            // Only for a frame that makes a call: a whole
                            // message's last frame, or any fragment of a
                            // route that takes fragments, on an open
                            // connection that is not skipping a message.
                            let makes_call = deliver
                                && !frame.opcode.is_control()
                                && phase.is_open()
                                && !inbound.skipping
                                && (frame.fin || inbound.streaming);
                            if makes_call {
                                match self.turn(&conn, false).await {
                                    Turn::Go { .. } => {}
                                    Turn::Closing => deliver = false,
                                    Turn::TimedOut => {
                                        deliver = false;
                                        phase = self.plugin_failed();
                                    }
                                }
                            }
                            if deliver {
                                let end = self.on_frame(frame, now, &mut phase, inbound);
                                // A place not used (the frame made no call), or
                                // the turn at a shared instance, is given
                                // back now, not held while idle.
                                self.end_turn();
                                if let Some(end) = end {
                                    return Stop::Ended(end);
                                }
                            }
                        }
                        Err(ReadError::Protocol(e)) => {
                            if let Phase::Closing(c) = phase {
                                return Stop::Ended(c.into_ending());
                            }
                            tracing::debug!(tenant = %self.version.tenant.name, route = %self.route.path, conn = self.id, "protocol error: {e}");
                            phase = self.fail(&e);
                        }
                        Err(ReadError::Eof | ReadError::Io(_)) => return Stop::Ended(phase.ending_on_eof()),
                    }
                }
                _ = &mut out_ready, if out.is_empty() => out_ready.set(outbox.ready()),
                w = out.write_to(wr), if !out.is_empty() => match w {
                    Ok(n) if n > 0 => {}
                    _ => return Stop::Ended(phase.ending_on_eof()),
                },
                _ = &mut wake => {
                    let now = Instant::now();
                    // Woken for the counts (or a keepalive deadline): they
                    // reach the metrics now.
                    tally.report(now, inbound, out, &self.route.metrics);
                    match &phase {
                        Phase::Closing(c) if now >= c.until => return Stop::Ended(c.clone().into_ending()),
                        Phase::Closing(_) => {}
                        Phase::Open => match keepalive.due(limits, now) {
                            Due::Nothing => {}
                            Due::Ping => outbox.push_control(Outbound::Ping(Bytes::new())),
                            Due::NoPong => {
                                tracing::debug!(tenant = %self.version.tenant.name, route = %self.route.path, conn = self.id, "no pong: dropping the connection");
                                return Stop::Ended(Ending::abnormal());
                            }
                            Due::Idle => {
                                phase = self.start_close(1001, "idle timeout".into(), ClosedBy::Gateway);
                            }
                        },
                    }
                    if let Some(after) = hibernate_after {
                        // Not in the middle of a streamed message: the
                        // plugin may be holding its first fragments.
                        if phase.is_open()
                            && now >= inbound.last_event + after
                            && !inbound.streamer.in_message()
                        {
                            self.hibernate();
                        }
                    }
                    // Re-arm for whatever is due next (activity since the
                    // timer was set may have moved it later).
                    let next = next_wake(&phase, keepalive, self.instance.awake(), inbound.last_event, now);
                    wake.as_mut().reset(next.max(now + Duration::from_millis(1)));
                }
            }
        }
    }

    /// Waits, holding as little as possible, until a parked connection has
    /// something to do: bytes from the peer (handed to the frame reader), a
    /// close request, a timer, something queued for it, or a keepalive
    /// deadline. `Some` if the peer went away meanwhile.
    async fn park<R: AsyncRead + Unpin>(
        conn: &ConnHandle,
        rd: &mut R,
        link: &mut Link,
    ) -> Option<Ending> {
        let deadline = link.keepalive.next_deadline(&link.limits, Instant::now());
        let mut first = [0u8; PARKED_READ];
        tokio::select! {
            biased;
            _ = conn.close_notify.notified() => None,
            _ = conn.timer_notify.notified() => None,
            _ = conn.outbox.ready() => None,
            read = rd.read(&mut first) => match read {
                Ok(n) if n > 0 => {
                    link.reader.feed(&first[..n]);
                    None
                }
                _ => Some(Ending::abnormal()),
            },
            _ = tokio::time::sleep_until(deadline) => None,
        }
    }

    /// Starts the closing handshake if a close was requested (by a plugin,
    /// a reload or shutdown) and the connection is open.
    fn on_close_request(&mut self, phase: &mut Phase) {
        if phase.is_open() {
            if let Some((code, reason, by)) = self.conn.take_close_request() {
                *phase = self.start_close(code, reason, by);
            }
        }
    }

    /// Delivers the timers that have fired, in order; a plugin failure
    /// starts closing with 1011. Before each event the connection's task
    /// waits its turn ([`Session::turn`]), holding no thread.
    async fn on_timers_in_turn(
        &mut self,
        conn: &ConnHandle,
        phase: &mut Phase,
        inbound: &mut Inbound,
    ) {
        while self.timer_may_run(phase) {
            let waited = match self.turn(conn, false).await {
                Turn::Go { waited } => waited,
                // Timers are cancelled when the connection ends.
                Turn::Closing => return,
                Turn::TimedOut => {
                    *phase = self.plugin_failed();
                    return;
                }
            };
            let more = self.on_next_timer(phase, inbound);
            // A place the event did not use (its timer was cancelled
            // meanwhile), or the turn at a shared instance, is given back.
            self.end_turn();
            if !more {
                return;
            }
            // After a wait, the event loop runs (writes, the peer's frames,
            // keepalive) before the next event waits in turn.
            if waited && self.conn.has_timer_event() {
                self.conn.timer_notify.notify_one();
                return;
            }
        }
    }

    /// Whether a queued timer event may run now: the connection is open,
    /// its tenant within its CPU budget, and an event is queued.
    fn timer_may_run(&self, phase: &Phase) -> bool {
        phase.is_open()
            && self.version.tenant.cpu_ready_at().is_none()
            && self.conn.has_timer_event()
    }

    /// Runs the next queued timer event, if any; false when there was none
    /// or the plugin failed (`phase` is then closing).
    fn on_next_timer(&mut self, phase: &mut Phase, inbound: &mut Inbound) -> bool {
        let Some(event) = self.conn.next_timer_event() else {
            return false;
        };
        inbound.last_event = Instant::now();
        let ok = self.call(!inbound.streamer.in_message(), |g, id| {
            g.on_timer(id, event)
        });
        if !ok {
            *phase = self.plugin_failed();
        }
        ok
    }

    /// Waits, as the connection's task, for whatever the next call into
    /// the plugin must wait for, so that a queue of calls is a queue of
    /// tasks, not of threads:
    /// - with its own instance (or hibernated), on a route whose recent
    ///   calls ran long (plugin/deadline.rs, `LongCallHint`), a place among
    ///   the tenant's long calls, which the instance holds for the event's
    ///   calls (with `on-resume`, if the event resumes it);
    /// - on a shared instance, its turn to enter the instance
    ///   (plugin/shared.rs), behind calls that may each run up to
    ///   `max_call_time`.
    ///
    /// Anything else is ready at once (no timer is set). Call
    /// [`Session::end_turn`] after the event: it gives back either.
    ///
    /// A place is waited for at most `max_call_time`. [`Turn::TimedOut`]:
    /// the call is not to run; the wait is logged (at most once a second
    /// per tenant) and counted as a `turn_timeout` failure, and the caller
    /// closes the connection with 1011, as when a started call waits for a
    /// place until its deadline. A shared instance's turn has no bound of
    /// its own (each call ahead has one). [`Turn::Closing`]: a close was
    /// requested meanwhile (checked every 100 ms).
    ///
    /// For `on-close` (`closing`) a close request does not end the wait,
    /// and after `max_call_time` the session skips `on-close` (logged the
    /// same way): running it then would only make it wait again, on a
    /// thread. Otherwise every accepted connection gets its `on-close`.
    async fn turn(&mut self, conn: &ConnHandle, closing: bool) -> Turn {
        use futures_util::future::Either;
        use futures_util::FutureExt;
        // An event that moves the connection to a new version (once per
        // reload, `on_reload = "migrate"`) does not wait here: what it must
        // wait for is the new version's, known only once it has moved.
        // (`on-close` never moves a connection.)
        if !closing && self.route.version_number() != self.seen_version {
            let latest = self.route.current();
            if latest.version != self.version.version
                && latest.settings.on_reload == OnReload::Migrate
            {
                return Turn::Go { waited: false };
            }
        }
        let (place, shared) = match &self.instance {
            Instance::Own(Some(g)) => (g.wants_long_call_place(), None),
            // Hibernated: the instance the event resumes needs the place.
            Instance::Own(None) if self.version.scope.long_calls.calls_wait_for_places() => {
                (Some(self.version.tenant.counts.clone()), None)
            }
            Instance::Shared {
                shared,
                failed: false,
                ..
            } => (None, Some(shared.turn())),
            _ => (None, None),
        };
        // A place among long calls is waited for at most max_call_time; a
        // shared instance's turn as long as the calls ahead take (each at
        // most max_call_time), as the instance's lock was.
        let bounded = place.is_some();
        let wait = match (place, shared) {
            (Some(tenant), _) => {
                Either::Left(async move { LongCalls::wait(tenant).await.map(Held::Place) })
            }
            (None, Some(turn)) => Either::Right(async move { turn.await.map(Held::Shared) }),
            (None, None) => return Turn::Go { waited: false },
        };
        tokio::pin!(wait);
        // Nearly always ready at once: no timer then.
        if let Some(held) = (&mut wait).now_or_never() {
            self.hold(held);
            return Turn::Go { waited: false };
        }
        let give_up = Instant::now() + self.runtime.max_call_time();
        loop {
            // Look for a close request every CLOSE_CHECK; a bounded wait
            // also wakes at its end (an unbounded one must not spin past it).
            let step = if bounded {
                CLOSE_CHECK.min(give_up.saturating_duration_since(Instant::now()))
            } else {
                CLOSE_CHECK
            };
            tokio::select! {
                held = &mut wait => {
                    self.hold(held);
                    return Turn::Go { waited: true };
                }
                _ = tokio::time::sleep(step) => {
                    if !closing && conn.close_pending() {
                        return Turn::Closing;
                    }
                    if bounded && Instant::now() >= give_up {
                        self.waited_too_long(closing);
                        return Turn::TimedOut;
                    }
                }
            }
        }
    }

    /// Keeps what [`Session::turn`] waited for until the event's call.
    fn hold(&mut self, held: Option<Held>) {
        match (held, &mut self.instance) {
            (Some(Held::Place(p)), Instance::Own(Some(g))) => g.give_long_call_place(p),
            (Some(Held::Place(p)), Instance::Own(None)) => self.pending_place = Some(p),
            (Some(Held::Shared(t)), _) => self.shared_turn = Some(t),
            _ => {}
        }
    }

    /// Gives back what [`Session::turn`] waited for, once the event it was
    /// for has been handled (a place its call did not use, the turn at a
    /// shared instance).
    fn end_turn(&mut self) {
        if let Instance::Own(Some(g)) = &mut self.instance {
            g.release_long_call_place();
        }
        self.shared_turn = None;
        self.pending_place = None;
    }

    /// The next call waited `max_call_time` in [`Session::turn`]: logged
    /// and counted; for `on-close` (`closing`) the plugin is not called
    /// again for this connection.
    fn waited_too_long(&mut self, closing: bool) {
        self.skip_on_close |= closing;
        match &mut self.instance {
            Instance::Own(Some(g)) => g.waited_too_long(closing),
            // Hibernated: the instance the event would resume is not
            // created, and there is none to log through.
            Instance::Own(None) => {
                let tenant = &self.version.tenant;
                crate::metrics::Metrics::global().plugin_failed(
                    &tenant.name,
                    &self.route.path,
                    "turn_timeout",
                );
                if let Some(suppressed) = tenant.counts.turn_timeouts.admit() {
                    tracing::error!(
                        tenant = %tenant.name, route = %self.route.path,
                        plugin = %self.version.plugin.name, version = self.version.version,
                        suppressed, conn = self.id,
                        "plugin call waited max_call_time ({:?}) for its turn among the tenant's long calls and was not run; {}",
                        self.runtime.max_call_time(),
                        if closing { "its connection's on-close is skipped" } else { "closing its connection with 1011" }
                    );
                }
            }
            // Not reached: a shared instance's turn has no bound of its own.
            Instance::Shared { .. } => {}
        }
    }

    /// Handles one frame from the peer; `Some` when the connection has ended.
    fn on_frame(
        &mut self,
        frame: Frame,
        now: Instant,
        phase: &mut Phase,
        inbound: &mut Inbound,
    ) -> Option<Ending> {
        match frame.opcode {
            // Pings and pongs count against the inbound rates like
            // messages, so that a client cannot make the gateway answer
            // pings without limit where its messages are limited; one over
            // the rate gets no pong (dropped) or closes the connection.
            // (Not while closing: then only the close handshake matters.)
            OpCode::Ping | OpCode::Pong => {
                let admit = if phase.is_open() {
                    self.admit(inbound, Unit::Control, frame.payload.len())
                } else {
                    Admit::Deliver
                };
                match admit {
                    Admit::Deliver if frame.opcode == OpCode::Ping => {
                        self.conn
                            .outbox
                            .push_control(Outbound::Pong(frame.payload.freeze()));
                    }
                    Admit::Deliver | Admit::Drop => {}
                    Admit::Close => *phase = self.rate_exceeded(),
                }
            }
            OpCode::Close => {
                if let Phase::Closing(c) = phase {
                    // The peer answered our close: the handshake is done.
                    return Some(c.clone().into_ending());
                }
                match parse_close(&frame.payload) {
                    Ok(close) => {
                        self.conn.outbox.push_close(close.clone());
                        let (code, reason) = close.unwrap_or((1005, String::new()));
                        return Some(Ending {
                            code,
                            reason,
                            by: ClosedBy::Peer,
                        });
                    }
                    // The peer has sent its close frame, if a malformed
                    // one: answer and end at once.
                    Err(e) => {
                        if let Phase::Closing(c) = self.fail(&e) {
                            return Some(c.into_ending());
                        }
                    }
                }
            }
            // Data after a close frame was sent is ignored (section 5.5.1).
            _ if !phase.is_open() => {}
            // The rest of a compressed message skipped over the rate.
            _ if inbound.skipping => inbound.skipping = !frame.fin,
            // A compressed message is checked against the inbound rates
            // before it is decompressed, where its cost is: a client over
            // its rate must not make the gateway inflate what it then drops
            // (a frame of a kilobyte can inflate to a megabyte).
            OpCode::Text | OpCode::Binary if frame.rsv1 && self.over_rate_already(inbound) => {
                let keeps_window = inbound
                    .inflate
                    .as_ref()
                    .is_some_and(|z| !z.agreed.client_no_context_takeover);
                let policy = self.version.settings.limits.rate_exceeded;
                if policy == RateExceeded::Close || keeps_window {
                    // With context takeover, skipping a message would leave
                    // the decompressor's window behind the client's.
                    *phase = self.rate_exceeded();
                } else {
                    if let Some(rates) = inbound.rates.as_mut() {
                        rates.dropped += 1;
                        if rates.dropped == 1 {
                            tracing::info!(
                                tenant = %self.version.tenant.name, route = %self.route.path, conn = self.id,
                                "client over its inbound rate (max_messages_per_second / max_bytes_per_second): dropping its messages over the rate, compressed ones unread, counted at close"
                            );
                        }
                    }
                    inbound.skipping = !frame.fin;
                }
            }
            _ => match inbound.push(frame, now) {
                Ok(Some(Delivery::Message(msg))) => {
                    inbound.messages += 1;
                    let len = match &msg {
                        Message::Text(t) => t.len(),
                        Message::Binary(b) => b.len(),
                    };
                    inbound.bytes += len as u64;
                    match self.admit(inbound, Unit::Starts, len) {
                        Admit::Deliver => {
                            if !self.deliver(msg) {
                                *phase = self.plugin_failed();
                            }
                        }
                        Admit::Drop => {}
                        Admit::Close => *phase = self.rate_exceeded(),
                    }
                }
                Ok(Some(Delivery::Fragment(fragment))) => {
                    if fragment.fin {
                        inbound.messages += 1;
                    }
                    inbound.bytes += fragment.data.len() as u64;
                    let unit = if fragment.first {
                        Unit::Starts
                    } else {
                        Unit::Continues
                    };
                    match self.admit(inbound, unit, fragment.data.len()) {
                        Admit::Deliver => {
                            let ok = self.call(fragment.first, |g, id| g.on_fragment(id, fragment));
                            if !ok {
                                *phase = self.plugin_failed();
                            }
                        }
                        Admit::Drop => {}
                        Admit::Close => *phase = self.rate_exceeded(),
                    }
                }
                Ok(None) => {}
                Err(e) => *phase = self.fail(&e),
            },
        }
        None
    }

    /// Sends our close frame and waits for the peer's.
    fn start_close(&mut self, code: u16, reason: String, by: ClosedBy) -> Phase {
        self.conn.outbox.push_close(Some((code, reason.clone())));
        Phase::Closing(Closing {
            code,
            reason,
            by,
            until: Instant::now() + self.version.settings.limits.close_timeout,
        })
    }

    /// Meters an inbound message, fragment, ping or pong against the
    /// route's rates; the first one dropped on a connection is logged.
    fn admit(&self, inbound: &mut Inbound, unit: Unit, len: usize) -> Admit {
        let Some(rates) = &mut inbound.rates else {
            return Admit::Deliver;
        };
        let policy = self.version.settings.limits.rate_exceeded;
        let admit = rates.admit(unit, len, policy);
        if admit == Admit::Drop && rates.dropped == 1 {
            tracing::info!(
                tenant = %self.version.tenant.name, route = %self.route.path, conn = self.id,
                "client over its inbound rate (max_messages_per_second / max_bytes_per_second): dropping its messages and pings over the rate, counted at close"
            );
        }
        admit
    }

    /// Whether the connection's inbound rates are used up already (no
    /// message token, or no byte left), before a message is decompressed.
    fn over_rate_already(&self, inbound: &mut Inbound) -> bool {
        let Some(rates) = inbound.rates.as_mut() else {
            return false;
        };
        let now = std::time::Instant::now();
        let messages = rates
            .messages
            .as_mut()
            .is_some_and(|(b, rate)| b.short_of(1, *rate, now));
        let bytes = rates
            .bytes
            .as_mut()
            .is_some_and(|(b, rate)| b.short_of(1, *rate, now));
        messages || bytes
    }

    /// Closes with 1008 a client over its inbound rate.
    fn rate_exceeded(&mut self) -> Phase {
        tracing::info!(
            tenant = %self.version.tenant.name, route = %self.route.path, conn = self.id,
            "client over its inbound rate (max_messages_per_second / max_bytes_per_second): closing with 1008"
        );
        self.start_close(1008, "message rate exceeded".into(), ClosedBy::Gateway)
    }

    /// Closes with 1011 after the plugin failed (the failure is logged).
    fn plugin_failed(&mut self) -> Phase {
        self.start_close(1011, "internal error".into(), ClosedBy::Gateway)
    }

    /// Fails the connection for a protocol error with its close code.
    fn fail(&mut self, e: &ProtocolError) -> Phase {
        let mut reason = e.to_string();
        reason.truncate(MAX_CLOSE_REASON);
        self.start_close(e.close_code(), reason, ClosedBy::Gateway)
    }
}

impl Drop for Session {
    /// A session dropped before it ended (its upgrade failed, or the runtime
    /// is stopping at the end of a drain) still owes its plugin `on-close`:
    /// with the code of the close frame we sent, as when `close_timeout`
    /// passes, or 1006 if we sent none.
    fn drop(&mut self) {
        if self.stage != Stage::Ended {
            match self.sent_close.take() {
                Some((code, reason)) => self.end(code, &reason, ClosedBy::Gateway),
                None => self.end(1006, "", ClosedBy::Abnormal),
            }
        }
    }
}

/// While a connection waits for its tenant's CPU budget, how often it looks
/// for a close request.
const CLOSE_CHECK: Duration = Duration::from_millis(100);

/// What [`Session::turn`] waited for.
enum Held {
    /// A place among the tenant's long calls.
    Place(LongCalls),
    /// The turn at a shared instance.
    Shared(SharedTurn),
}

/// What came of [`Session::turn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// The call may start (holding what it waited for, if anything;
    /// `waited`: not at once).
    Go {
        /// The call had to wait.
        waited: bool,
    },
    /// A close was requested while the call waited: it is not to run.
    Closing,
    /// The call waited `max_call_time` for its turn: it is not to run,
    /// and the connection is to close with 1011.
    TimedOut,
}

/// How many bytes a parked connection reads when the peer sends: enough for
/// a small frame; the frame reader reads the rest.
const PARKED_READ: usize = 64;

/// The connection's state that outlives one run of the event loop.
struct Link {
    reader: FrameReader,
    out: Writer,
    inbound: Inbound,
    keepalive: Keepalive,
    /// The limits of the version the connection opened with.
    limits: Limits,
    hibernate_after: Option<Duration>,
    /// What of the message and byte counts the route's metrics have.
    tally: Tally,
}

impl Link {
    /// Adds the messages and bytes not yet counted to the route's metrics.
    fn report(&mut self, metrics: &RouteMetrics) {
        self.tally
            .report(Instant::now(), &self.inbound, &self.out, metrics);
    }
}

/// The message and byte counts of a connection already added to its
/// route's metrics. The session counts in plain integers and adds to the
/// shared counters (atomics every connection of the route writes) once per
/// [`Tally::BATCH`] messages or [`Tally::PERIOD`], whichever comes first,
/// and when it parks or ends, rather than per message: the metrics (and the
/// admin page's rates) are at most a period behind.
#[derive(Debug)]
struct Tally {
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// When the counts were last added.
    reported_at: Instant,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            messages_in: 0,
            messages_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            reported_at: Instant::now(),
        }
    }
}

impl Tally {
    /// Messages (in and out together) that are reported at once.
    const BATCH: u64 = 64;
    /// The longest counts wait to be reported.
    const PERIOD: Duration = Duration::from_secs(1);

    /// Whether `inbound` and `out` have counts not reported yet.
    fn pending(&self, inbound: &Inbound, out: &Writer) -> bool {
        inbound.messages != self.messages_in
            || out.messages_sent() != self.messages_out
            || inbound.bytes != self.bytes_in
            || out.bytes_sent() != self.bytes_out
    }

    /// When the pending counts are due (`None`: nothing pending).
    fn due(&self, inbound: &Inbound, out: &Writer) -> Option<Instant> {
        self.pending(inbound, out)
            .then(|| self.reported_at + Self::PERIOD)
    }

    /// Reports the counts if [`Tally::BATCH`] messages are pending, or
    /// some have been for [`Tally::PERIOD`].
    fn report_due(
        &mut self,
        now: Instant,
        inbound: &Inbound,
        out: &Writer,
        metrics: &RouteMetrics,
    ) {
        let new = (inbound.messages - self.messages_in) + (out.messages_sent() - self.messages_out);
        if new >= Self::BATCH
            || (now >= self.reported_at + Self::PERIOD && self.pending(inbound, out))
        {
            self.report(now, inbound, out, metrics);
        }
    }

    /// Adds the pending counts of `inbound` and `out` to `metrics`.
    fn report(&mut self, now: Instant, inbound: &Inbound, out: &Writer, metrics: &RouteMetrics) {
        self.reported_at = now;
        if !self.pending(inbound, out) {
            return;
        }
        let (msgs_in, msgs_out) = (inbound.messages, out.messages_sent());
        metrics.messages_in.inc_by(msgs_in - self.messages_in);
        metrics.messages_out.inc_by(msgs_out - self.messages_out);
        metrics.bytes_in.inc_by(inbound.bytes - self.bytes_in);
        metrics.bytes_out.inc_by(out.bytes_sent() - self.bytes_out);
        self.messages_in = msgs_in;
        self.messages_out = msgs_out;
        self.bytes_in = inbound.bytes;
        self.bytes_out = out.bytes_sent();
    }
}

/// Why the event loop returned.
enum Stop {
    /// The connection ended.
    Ended(Ending),
    /// Hibernated with nothing in flight: park it.
    Parked,
}

/// How a connection ended: what `on-close` is told, and who closed.
#[derive(Debug, Clone)]
struct Ending {
    code: u16,
    reason: String,
    by: ClosedBy,
}

impl Ending {
    /// The peer vanished without a closing handshake.
    fn abnormal() -> Ending {
        Ending {
            code: 1006,
            reason: String::new(),
            by: ClosedBy::Abnormal,
        }
    }
}

/// Our close frame is sent; we wait for the peer's until `until`.
#[derive(Debug, Clone)]
struct Closing {
    code: u16,
    reason: String,
    by: ClosedBy,
    until: Instant,
}

impl Closing {
    fn into_ending(self) -> Ending {
        Ending {
            code: self.code,
            reason: self.reason,
            by: self.by,
        }
    }
}

/// The connection's phase in the closing handshake (RFC 6455 section 7).
#[derive(Debug)]
enum Phase {
    /// Data flows both ways.
    Open,
    /// We sent a close frame: `on-close` will report its code.
    Closing(Closing),
}

impl Phase {
    fn is_open(&self) -> bool {
        matches!(self, Phase::Open)
    }

    /// While closing, when we stop waiting for the peer's close frame.
    fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Open => None,
            Phase::Closing(c) => Some(c.until),
        }
    }

    /// The TCP connection ended: after our close frame, the handshake is as
    /// done as it will be; before it, the peer vanished (1006).
    fn ending_on_eof(&self) -> Ending {
        match self {
            Phase::Closing(c) => c.clone().into_ending(),
            Phase::Open => Ending::abnormal(),
        }
    }
}

/// Data frames on their way to the plugin: whole messages or fragments,
/// per the route's `deliver`.
struct Inbound {
    assembler: Assembler,
    streamer: Streamer,
    streaming: bool,
    /// Messages delivered (or whose final fragment was).
    messages: u64,
    /// Their payload bytes (after decompression), fragments included.
    bytes: u64,
    /// When the plugin last had an event (a data frame or a timer), for
    /// hibernation.
    last_event: Instant,
    /// The inbound rate meters, if the route has a rate limit.
    rates: Option<Box<InboundRates>>,
    /// Decompression, when permessage-deflate was agreed.
    inflate: Option<Box<InboundDeflate>>,
    /// The compressed message in progress is being skipped, unread: it
    /// started over the inbound rate.
    skipping: bool,
    /// `max_message_size` and `max_frame_size`: what a decompressed message
    /// (or streamed fragment) may grow to.
    max_message_size: usize,
    max_frame_size: usize,
}

/// A connection's inbound permessage-deflate state.
#[derive(Debug)]
struct InboundDeflate {
    agreed: Agreed,
    /// The connection's own decompressor: kept between messages when the
    /// client takes its context over, and during a compressed message that
    /// comes in several frames; otherwise a whole message is decompressed
    /// with the thread's shared one.
    own: Option<Box<Inflater>>,
    /// Whether the message in progress is compressed (its first frame had
    /// RSV1).
    compressed: bool,
    /// Decompressed bytes of the message in progress.
    produced: usize,
    /// UTF-8 state of a compressed text message streamed as fragments.
    utf8: Utf8Stream,
    /// Whether the message in progress is text.
    utf8_text: bool,
}

impl InboundDeflate {
    fn new(agreed: Agreed) -> InboundDeflate {
        InboundDeflate {
            agreed,
            own: None,
            compressed: false,
            produced: 0,
            utf8: Utf8Stream::default(),
            utf8_text: false,
        }
    }

    /// Decompresses `frame` if it belongs to a compressed message. The
    /// output may grow to `limit` bytes (the message's remaining
    /// allowance, or a streamed fragment's); text streamed as fragments is
    /// validated as UTF-8 here, once decompressed (`stream_text`).
    fn decompress(
        &mut self,
        frame: Frame,
        limit: usize,
        streaming: bool,
    ) -> Result<Frame, ProtocolError> {
        let first = matches!(frame.opcode, OpCode::Text | OpCode::Binary);
        if first {
            self.compressed = frame.rsv1;
            self.produced = 0;
            self.utf8 = Utf8Stream::default();
        }
        if !self.compressed {
            return Ok(frame);
        }
        let limit = if streaming {
            limit
        } else {
            limit.saturating_sub(self.produced)
        };
        let keep = !self.agreed.client_no_context_takeover;
        let mut out = Vec::new();
        if first && frame.fin && !keep {
            // A whole message, nothing to keep: the thread's decompressor.
            Inflater::shared(|z| z.inflate(&frame.payload, true, &mut out, limit))?;
        } else {
            let z = self.own.get_or_insert_with(Default::default);
            let inflated = z.inflate(&frame.payload, frame.fin, &mut out, limit);
            if frame.fin && !keep {
                self.own = None;
            }
            inflated?;
        }
        self.produced += out.len();
        if streaming && self.text_message(&frame) {
            self.utf8.feed(&out)?;
            if frame.fin {
                self.utf8.finish()?;
            }
        }
        Ok(Frame {
            fin: frame.fin,
            rsv1: false,
            opcode: frame.opcode,
            payload: bytes::BytesMut::from(Bytes::from(out)),
        })
    }

    /// Whether `frame` belongs to a text message (tracked from the first
    /// frame's opcode).
    fn text_message(&mut self, frame: &Frame) -> bool {
        if frame.opcode == OpCode::Text {
            self.utf8_text = true;
        } else if frame.opcode == OpCode::Binary {
            self.utf8_text = false;
        }
        self.utf8_text
    }
}

/// A connection's inbound rate meters (`max_messages_per_second`,
/// `max_bytes_per_second`).
#[derive(Debug)]
struct InboundRates {
    messages: Option<(Bucket, u64)>,
    bytes: Option<(Bucket, u64)>,
    /// Messages dropped (`rate_exceeded = "drop"`).
    dropped: u64,
    /// The message whose fragments are arriving is being dropped.
    dropping: bool,
}

/// What an inbound rate meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// A message, or the first fragment of one.
    Starts,
    /// A later fragment of a message.
    Continues,
    /// A ping or a pong.
    Control,
}

/// What the inbound rate says of a message or fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Deliver it.
    Deliver,
    /// Drop it (and count it).
    Drop,
    /// Close the connection with 1008.
    Close,
}

impl InboundRates {
    fn new(limits: &Limits) -> Option<Box<InboundRates>> {
        let messages = limits.max_messages_per_second.map(u64::from);
        let bytes = limits.max_bytes_per_second.map(|b| b as u64);
        if messages.is_none() && bytes.is_none() {
            return None;
        }
        Some(Box::new(InboundRates {
            messages: messages.map(|r| (Bucket::new(r), r)),
            bytes: bytes.map(|r| (Bucket::new(r), r)),
            dropped: 0,
            dropping: false,
        }))
    }

    /// Meters `unit` of `len` payload bytes. A message start, ping or pong
    /// takes one message token; a fragment after the first of a message
    /// only counts its bytes, and is dropped with its message. A message
    /// over the byte rate is let through when a full second's allowance is
    /// saved up (so messages larger than the rate still pass, at that
    /// pace). A ping or pong leaves a fragmented message in progress as it
    /// is.
    fn admit(&mut self, unit: Unit, len: usize, policy: RateExceeded) -> Admit {
        let now = std::time::Instant::now();
        if unit == Unit::Continues && self.dropping {
            return Admit::Drop;
        }
        let mut ok = true;
        if unit != Unit::Continues {
            if let Some((b, rate)) = &mut self.messages {
                ok &= b.take(1, *rate, now);
            }
        }
        if ok {
            if let Some((b, rate)) = &mut self.bytes {
                let n = (len as u64).min(*rate);
                ok &= b.take(n, *rate, now);
            }
        }
        match (ok, policy, unit) {
            (true, _, Unit::Control) => Admit::Deliver,
            (true, _, _) => {
                self.dropping = false;
                Admit::Deliver
            }
            (false, RateExceeded::Close, _) => Admit::Close,
            // Part of a message already delivered cannot be taken back.
            (false, RateExceeded::Drop, Unit::Continues) => Admit::Close,
            (false, RateExceeded::Drop, unit) => {
                self.dropping |= unit == Unit::Starts;
                self.dropped += 1;
                Admit::Drop
            }
        }
    }
}

/// What one data frame yields for the plugin.
enum Delivery {
    Message(Message),
    Fragment(Fragment),
}

impl Inbound {
    fn new(version: &RouteVersion, now: Instant) -> Inbound {
        let settings = &version.settings;
        Inbound {
            assembler: Assembler::new(settings.limits.max_message_size),
            streamer: Streamer::default(),
            streaming: settings.deliver == Deliver::Fragments,
            messages: 0,
            bytes: 0,
            last_event: now,
            rates: InboundRates::new(&settings.limits),
            inflate: None,
            skipping: false,
            max_message_size: settings.limits.max_message_size,
            max_frame_size: settings.limits.max_frame_size,
        }
    }

    /// Whether no message is part-way through (nothing held between frames).
    fn is_idle(&self) -> bool {
        !self.streamer.in_message() && !self.assembler.in_message() && !self.skipping
    }

    /// Takes a data frame that arrived at `now`.
    fn push(&mut self, frame: Frame, now: Instant) -> Result<Option<Delivery>, ProtocolError> {
        self.last_event = now;
        let frame = match &mut self.inflate {
            Some(z) => {
                let limit = if self.streaming {
                    self.max_frame_size
                } else {
                    self.max_message_size
                };
                z.decompress(frame, limit, self.streaming)
                    .map_err(|e| match e {
                        ProtocolError::MessageTooLarge { limit } if self.streaming => {
                            ProtocolError::InflatedFragmentTooLarge { limit }
                        }
                        e => e,
                    })?
            }
            None => frame,
        };
        if self.streaming {
            self.streamer
                .push(frame)
                .map(|f| Some(Delivery::Fragment(f)))
        } else {
            Ok(self.assembler.push(frame)?.map(Delivery::Message))
        }
    }
}
