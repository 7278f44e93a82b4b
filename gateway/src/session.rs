//! One WebSocket connection from upgrade to close: the plugin instance that
//! serves it, and the task that reads frames, delivers events to the
//! plugin, answers pings, keeps the connection alive, and runs the closing
//! handshake. Its writes go through the connection's [`Outbox`].
//!
//! The plugin is opened by [`Session::open`] while the HTTP upgrade is still
//! pending (so it can choose a subprotocol or refuse), and runs with
//! [`Session::run`] once the upgrade completes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use wasmtime::Store;

use crate::bindings::wasmgate::plugin::types::{self, OpenResponse};
use crate::bindings::Plugin as PluginBindings;
use crate::config::Deliver;
use crate::frame::{parse_close, FrameReader, OpCode, ProtocolError, ReadError};
use crate::host::{HostState, REPEAT_FLAG};
use crate::hub::ConnHandle;
use crate::message::{Assembler, Fragment, Message, Streamer};
use crate::outbox::{Outbound, Outbox, Writer};
use crate::plugin::Runtime;
use crate::route::{Route, Slot};

/// Timer events queued for a connection before ticks are skipped.
const TIMER_QUEUE: usize = 64;

/// A connection's plugin instance and everything needed to run it.
pub struct Session {
    id: u64,
    route: Arc<Route>,
    runtime: Arc<Runtime>,
    conn: Arc<ConnHandle>,
    store: Store<HostState>,
    plugin: PluginBindings,
    timer_rx: mpsc::Receiver<u64>,
    /// The plugin trapped: its instance may not be entered again.
    trapped: bool,
    _slot: Slot,
}

/// How `on-open` went.
pub enum Opened {
    /// Accepted: run the session once the upgrade completes.
    Accept(Box<Session>, types::Accept),
    /// Rejected by the plugin with an HTTP response.
    Reject(types::Reject),
    /// The plugin trapped in `on-open`.
    Failed,
    /// No instance could be created (resources exhausted: memory, maps).
    Unavailable,
}

impl Session {
    /// Registers connection `id` on its route, instantiates the plugin and
    /// runs `on-open`. A rejected or failed open leaves nothing behind.
    pub fn open(
        id: u64,
        route: Arc<Route>,
        runtime: Arc<Runtime>,
        slot: Slot,
        request: &types::Request,
    ) -> Opened {
        let outbox = Outbox::new(route.limits.max_outbound_buffer);
        let conn = ConnHandle::new(id, outbox, route.limits.slow_consumer);
        route.hub.insert(conn.clone());
        let (timer_tx, timer_rx) = mpsc::channel(TIMER_QUEUE);
        let state = HostState::new(
            conn.clone(),
            route.clone(),
            runtime.store_limits(),
            timer_tx,
        );
        let mut store = runtime.store(state);
        store.set_epoch_deadline(runtime.call_deadline());
        let plugin = match route.plugin.instantiate(&mut store) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(
                    route = %route.path, plugin = %route.plugin.name, conn = id,
                    "cannot instantiate the plugin: {e:#}"
                );
                route.hub.remove(id);
                return Opened::Unavailable;
            }
        };
        let mut session = Session {
            id,
            route,
            runtime,
            conn,
            store,
            plugin,
            timer_rx,
            trapped: false,
            _slot: slot,
        };
        session.before_call();
        let response =
            session
                .plugin
                .wasmgate_plugin_handler()
                .call_on_open(&mut session.store, id, request);
        let response = session.after_call("on-open", response);
        match response {
            Some(OpenResponse::Accept(accept)) => Opened::Accept(Box::new(session), accept),
            Some(OpenResponse::Reject(reject)) => {
                session.discard();
                Opened::Reject(reject)
            }
            None => {
                session.discard();
                Opened::Failed
            }
        }
    }

    /// Drops a connection that never opened: its rooms, metadata and timers
    /// go, and the plugin's `on-close` does not run.
    pub fn discard(mut self) {
        self.store.data_mut().cancel_all_timers();
        self.conn.outbox.finish();
        self.route.hub.remove(self.id);
    }

    /// The connection's outbound queue.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.conn.outbox
    }

    /// Asks the session to close with 1001 as soon as it runs (the gateway
    /// began shutting down during the upgrade).
    pub fn request_shutdown(&self) {
        self.conn.request_close(1001, "going away");
    }

    /// Arms the time limit of the next call into the plugin.
    fn before_call(&mut self) {
        self.store.set_epoch_deadline(self.runtime.call_deadline());
    }

    /// Checks how a call into the plugin went. A trap or error is logged
    /// with the route, the plugin and the export, marks the instance dead
    /// (it may not be entered again), and yields `None`.
    fn after_call<T>(&mut self, export: &'static str, result: wasmtime::Result<T>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.trapped = true;
                self.store.data_mut().cancel_all_timers();
                tracing::error!(
                    route = %self.route.path,
                    plugin = %self.route.plugin.name,
                    export,
                    conn = self.id,
                    error = %format!("{e:?}").replace('\n', " | "),
                    "plugin failed; closing its connection with 1011"
                );
                None
            }
        }
    }

    /// Runs `on-timer`; false if the plugin failed.
    fn on_timer(&mut self, timer: u64) -> bool {
        if self.trapped {
            return false;
        }
        self.before_call();
        let r =
            self.plugin
                .wasmgate_plugin_handler()
                .call_on_timer(&mut self.store, self.id, timer);
        self.after_call("on-timer", r).is_some()
    }

    /// Runs `on-close` (unless the plugin trapped before).
    fn on_close(&mut self, code: u16, reason: &str) {
        if self.trapped {
            return;
        }
        self.before_call();
        let r = self.plugin.wasmgate_plugin_handler().call_on_close(
            &mut self.store,
            self.id,
            code,
            reason,
        );
        self.after_call("on-close", r);
    }

    /// Runs the connection over the two halves of its socket (`initial`
    /// holds bytes the client sent right after its request) until it closes.
    pub async fn run<R, W>(mut self, mut rd: R, mut wr: W, initial: Bytes)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let outbox = self.conn.outbox.clone();
        // This task writes too: no writer task to wake per message.
        let mut out = Writer::default();
        let limits = self.route.limits.clone();
        let mut reader = FrameReader::new(&initial, limits.max_frame_size);
        // `initial` is a slice of hyper's whole read buffer: holding it would
        // keep that buffer alive for the life of the connection.
        drop(initial);
        let mut assembler = Assembler::new(limits.max_message_size);
        let mut streamer = Streamer::default();
        let streaming = self.route.deliver == Deliver::Fragments;
        let conn = self.conn.clone();

        // Set once we have sent a close frame: the code and reason `on-close`
        // reports, and when we stop waiting for the peer's answer.
        let mut closing: Option<(u16, String, Instant)> = None;
        let mut last_rx = Instant::now();
        let mut last_tx = last_rx;
        let mut wrote = false;
        let mut ping_sent: Option<Instant> = None;
        let wake = tokio::time::sleep_until(next_deadline(
            &limits, &closing, last_rx, last_tx, ping_sent, last_rx,
        ));
        tokio::pin!(wake);
        // Waiting for a close request and for queued frames: created once and
        // kept across iterations (a new `Notified` per frame would register
        // and unregister a waiter each time).
        let close_requested = conn.close_notify.notified();
        tokio::pin!(close_requested);
        let out_ready = outbox.ready();
        tokio::pin!(out_ready);

        let (code, reason) = loop {
            // Whatever the last step queued (an echo, a pong, a close) is
            // encoded now and written below as soon as the socket takes it.
            out.fill(&outbox);
            // The timer is only moved earlier here (a close or a ping is now
            // due sooner); activity that moves it later is seen when it fires,
            // so a busy connection does not re-register a timer per frame.
            let deadline = next_deadline(
                &limits,
                &closing,
                last_rx,
                last_tx,
                ping_sent,
                Instant::now(),
            );
            if deadline < wake.deadline() {
                wake.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                _ = &mut close_requested, if closing.is_none() => {
                    close_requested.set(conn.close_notify.notified());
                    if let Some((code, reason)) = conn.take_close_request() {
                        closing = self.start_close(code, reason);
                    }
                }
                Some(timer) = self.timer_rx.recv(), if closing.is_none() => {
                    let id = timer & !REPEAT_FLAG;
                    let live = self.store.data_mut().timer_fired(id, timer & REPEAT_FLAG != 0);
                    if live && !self.on_timer(id) {
                        closing = self.start_close(1011, "internal error".into());
                    }
                }
                read = reader.read_frame(&mut rd) => {
                    last_rx = Instant::now();
                    ping_sent = None;
                    let frame = match read {
                        Ok(frame) => frame,
                        Err(ReadError::Protocol(e)) => {
                            if let Some((code, reason, _)) = closing {
                                break (code, reason);
                            }
                            tracing::debug!(route = %self.route.path, conn = self.id, "protocol error: {e}");
                            closing = self.fail(&e);
                            continue;
                        }
                        Err(ReadError::Eof | ReadError::Io(_)) => match closing {
                            Some((code, reason, _)) => break (code, reason),
                            None => break (1006, String::new()),
                        },
                    };
                    match frame.opcode {
                        OpCode::Ping => outbox.push_control(Outbound::Pong(frame.payload.freeze())),
                        OpCode::Pong => {}
                        OpCode::Close => {
                            if let Some((code, reason, _)) = closing {
                                break (code, reason);
                            }
                            match parse_close(&frame.payload) {
                                Ok(close) => {
                                    outbox.push_close(close.clone());
                                    break close.unwrap_or((1005, String::new()));
                                }
                                Err(e) => {
                                    // The peer has sent its close frame, if a
                                    // malformed one: answer and end at once.
                                    if let Some((code, reason, _)) = self.fail(&e) {
                                        break (code, reason);
                                    }
                                }
                            }
                        }
                        _ if closing.is_some() => {}
                        _ if streaming => match streamer.push(frame) {
                            Ok(fragment) => {
                                if !self.deliver_fragment(fragment) {
                                    closing = self.start_close(1011, "internal error".into());
                                }
                            }
                            Err(e) => closing = self.fail(&e),
                        },
                        _ => match assembler.push(frame) {
                            Ok(Some(msg)) => {
                                if !self.deliver(msg) {
                                    closing = self.start_close(1011, "internal error".into());
                                }
                            }
                            Ok(None) => {}
                            Err(e) => closing = self.fail(&e),
                        },
                    }
                }
                _ = &mut out_ready, if out.is_empty() => out_ready.set(outbox.ready()),
                w = wr.write(out.pending()), if !out.is_empty() => match w {
                    Ok(n) if n > 0 => {
                        out.advance(n);
                        wrote = true;
                    }
                    _ => match closing {
                        Some((code, reason, _)) => break (code, reason),
                        None => break (1006, String::new()),
                    },
                },
                _ = &mut wake => {
                    let now = Instant::now();
                    if let Some((code, reason, until)) = &closing {
                        if now >= *until {
                            break (*code, reason.clone());
                        }
                    } else {
                        if std::mem::take(&mut wrote) {
                            last_tx = now;
                        }
                        if let Some(sent) = ping_sent {
                            if now >= sent + limits.pong_timeout {
                                tracing::debug!(route = %self.route.path, conn = self.id, "no pong: dropping the connection");
                                break (1006, String::new());
                            }
                        } else if let Some(every) = limits.ping_interval {
                            if now >= last_rx + every {
                                outbox.push_control(Outbound::Ping(Bytes::new()));
                                ping_sent = Some(now);
                            }
                        }
                        if let Some(idle) = limits.idle_timeout {
                            if now >= last_rx.max(last_tx) + idle {
                                closing = self.start_close(1001, "idle timeout".into());
                            }
                        }
                    }
                    // Re-arm for whatever is due next (activity since the
                    // timer was set may have moved it later).
                    let next = next_deadline(&limits, &closing, last_rx, last_tx, ping_sent, now);
                    wake.as_mut().reset(next.max(now + Duration::from_millis(1)));
                }
            }
        };

        // Nothing more is accepted; what is queued is written, then the TCP
        // connection is closed.
        outbox.finish();
        self.store.data_mut().cancel_all_timers();
        self.on_close(code, &reason);
        self.route.hub.remove(self.id);
        drop(rd);
        let _ = tokio::time::timeout(limits.close_timeout, out.finish(&outbox, &mut wr)).await;
        let dropped = outbox.dropped();
        if dropped > 0 {
            tracing::info!(route = %self.route.path, conn = self.id, dropped, "messages dropped for a slow consumer");
        }
    }

    /// Delivers a message to the plugin as if it had arrived from the peer
    /// (the session loop does this for every message; the benchmarks call it
    /// directly). Returns false if the plugin failed.
    pub fn deliver(&mut self, msg: Message) -> bool {
        if self.trapped {
            return false;
        }
        let msg = match msg {
            Message::Text(s) => types::Message::Text(s),
            Message::Binary(b) => types::Message::Binary(Vec::from(b)),
        };
        self.before_call();
        let r =
            self.plugin
                .wasmgate_plugin_handler()
                .call_on_message(&mut self.store, self.id, &msg);
        self.after_call("on-message", r).is_some()
    }

    /// Delivers a fragment to the plugin; false if the plugin failed.
    fn deliver_fragment(&mut self, fragment: Fragment) -> bool {
        if self.trapped {
            return false;
        }
        let fragment = types::Fragment {
            text: fragment.text,
            first: fragment.first,
            fin: fragment.fin,
            data: Vec::from(fragment.data),
        };
        self.before_call();
        let r = self.plugin.wasmgate_plugin_handler().call_on_fragment(
            &mut self.store,
            self.id,
            &fragment,
        );
        self.after_call("on-fragment", r).is_some()
    }

    /// Sends our close frame and waits for the peer's.
    fn start_close(&mut self, code: u16, reason: String) -> Option<(u16, String, Instant)> {
        self.conn.outbox.push_close(Some((code, reason.clone())));
        Some((
            code,
            reason,
            Instant::now() + self.route.limits.close_timeout,
        ))
    }

    /// Fails the connection for a protocol error with its close code.
    fn fail(&mut self, e: &ProtocolError) -> Option<(u16, String, Instant)> {
        let mut reason = e.to_string();
        reason.truncate(crate::host::MAX_CLOSE_REASON);
        self.start_close(e.close_code(), reason)
    }
}

/// When the session must next wake up with no I/O: the end of the closing
/// handshake, a ping, a pong deadline or the idle timeout.
fn next_deadline(
    limits: &crate::config::Limits,
    closing: &Option<(u16, String, Instant)>,
    last_rx: Instant,
    last_tx: Instant,
    ping_sent: Option<Instant>,
    now: Instant,
) -> Instant {
    if let Some((_, _, until)) = closing {
        return *until;
    }
    let far = now + Duration::from_secs(3600);
    let mut next = far;
    match ping_sent {
        Some(sent) => next = next.min(sent + limits.pong_timeout),
        None => {
            if let Some(every) = limits.ping_interval {
                next = next.min(last_rx + every);
            }
        }
    }
    if let Some(idle) = limits.idle_timeout {
        // Wake at the idle deadline by what we know was received; writes
        // are checked when we wake.
        next = next.min(last_rx.max(last_tx) + idle);
    }
    next
}
