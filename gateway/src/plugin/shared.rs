//! One plugin instance serving every connection of a route version
//! (`isolation = "shared"`).
//!
//! A [`SharedInstance`] belongs to a route version. Its instance is created
//! on the first event that needs it and entered by one connection's task at
//! a time (a lock: events for the instance are delivered one at a time, and
//! each connection's in its order). Before each call the instance's host
//! state is pointed at the connection whose event it handles, so replies,
//! timers, `not-owner` checks and output lines are that connection's.
//!
//! Connections' tasks take turns at the instance ([`SharedInstance::turn`]),
//! first come, first served, waiting as tasks: while one connection's call
//! runs long (up to `max_call_time`), the events queued behind it hold no
//! threads. The upgrade takes a turn for `on-open`, and a session for each
//! message, timer event and `on-close`. A call made without one (a session
//! dropped without ending, as at the end of a shutdown's drain) waits for
//! the instance's lock on its worker for up to a millisecond, then hands
//! the worker's other tasks to another thread and waits on.
//!
//! A call that traps poisons only the instance: it is dropped, the
//! connection whose event trapped is closed with 1011 by its session, and
//! the next event of any other connection starts a fresh instance (a new
//! *generation*). Host-side state (rooms, metadata, timers, queued
//! messages) lives in the hub and survives; guest memory does not, so each
//! connection's first event on a new generation is preceded by `on-resume`,
//! exactly as after a migration or hibernation.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::hub::{ConnHandle, Hub};
use crate::plugin::host::{HostState, Scope};
use crate::plugin::instance::Guest;
use crate::plugin::request::PackedRequest;
use crate::plugin::{Plugin, Runtime};

/// How long a call waits for the instance on its worker before handing the
/// worker's other tasks to another thread and waiting on.
const LOCK_SPIN: std::time::Duration = std::time::Duration::from_millis(1);

/// The one instance of a route version with `isolation = "shared"`.
pub struct SharedInstance {
    plugin: Arc<Plugin>,
    scope: Arc<Scope>,
    hub: Arc<Hub>,
    current: Mutex<Current>,
    /// One permit: the turn to enter the instance (FIFO, see
    /// [`SharedInstance::turn`]).
    turns: Arc<tokio::sync::Semaphore>,
}

/// A connection's turn to enter a shared instance, from
/// [`SharedInstance::turn`]; the next waiting connection's when dropped.
pub type SharedTurn = tokio::sync::OwnedSemaphorePermit;

/// The live instance, if any, and its generation.
struct Current {
    guest: Option<Guest>,
    /// Counts instances created: 1 for the first.
    generation: u64,
}

impl std::fmt::Debug for SharedInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedInstance")
            .field("plugin", &self.plugin.name)
            .field("generation", &self.current.lock().generation)
            .finish()
    }
}

/// What a connection remembers of a shared instance: the generation that
/// last saw it. Zero means none has: its next event is preceded by
/// `on-resume` (unless that event is `on-open`).
pub type Seen = u64;

impl SharedInstance {
    /// A shared instance of `plugin` for the route whose hub and scope are
    /// given; nothing is instantiated until the first call.
    pub fn new(plugin: Arc<Plugin>, scope: Arc<Scope>, hub: Arc<Hub>) -> SharedInstance {
        SharedInstance {
            plugin,
            scope,
            hub,
            current: Mutex::new(Current {
                guest: None,
                generation: 0,
            }),
            turns: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Waits, as the caller's task, for its turn to enter the instance,
    /// behind the connections that asked first; hold the turn over the
    /// call ([`SharedInstance::call`]) and drop it right after. Cancelled
    /// by dropping the future. Ready at once when no other connection's
    /// call is running or waiting.
    pub fn turn(&self) -> impl std::future::Future<Output = Option<SharedTurn>> + Send + 'static {
        let turns = self.turns.clone();
        // The semaphore is never closed: `None` does not happen.
        async move { turns.acquire_owned().await.ok() }
    }

    /// Runs `call` on the instance for connection `conn`, creating the
    /// instance first if there is none. If the instance generation differs
    /// from `seen` and `resume` is given, `on-resume` runs first with that
    /// request (`None`: this is the connection's `on-open`). `None` if the
    /// instance could not be created or a call failed; a failed instance is
    /// dropped, and the next call starts a fresh one. Failures are logged.
    pub fn call<T>(
        &self,
        runtime: &Arc<Runtime>,
        conn: &Arc<ConnHandle>,
        seen: &mut Seen,
        resume: Option<&PackedRequest>,
        call: impl FnOnce(&mut Guest) -> Option<T>,
    ) -> Option<T> {
        // Another connection's event may be running on the instance, for
        // up to max_call_time: a longer wait hands this worker's other tasks
        // to another thread first.
        let mut current = match self.current.try_lock_for(LOCK_SPIN) {
            Some(guard) => guard,
            None => crate::plugin::deadline::blocking(|| self.current.lock()),
        };
        let current = &mut *current;
        if current.guest.is_none() && !self.create(current, runtime, conn) {
            return None;
        }
        let generation = current.generation;
        let guest = current.guest.as_mut()?;
        guest.state_mut().serve(conn);
        let mut resumed = true;
        if *seen != generation {
            if let Some(request) = resume {
                resumed = guest.on_resume(conn.id, request);
            }
            *seen = generation;
        }
        let result = if resumed { call(guest) } else { None };
        if guest.trapped() {
            current.guest = None;
        }
        result
    }

    /// Whether the instance exists or can be created now (for connection
    /// `conn`); false (logged) if it cannot: the route has no instance to
    /// offer a new connection.
    pub fn available(&self, runtime: &Arc<Runtime>, conn: &Arc<ConnHandle>) -> bool {
        let mut current = match self.current.try_lock_for(LOCK_SPIN) {
            Some(guard) => guard,
            None => crate::plugin::deadline::blocking(|| self.current.lock()),
        };
        current.guest.is_some() || self.create(&mut current, runtime, conn)
    }

    /// Creates the instance (a new generation); false (logged) if it
    /// cannot be.
    fn create(
        &self,
        current: &mut Current,
        runtime: &Arc<Runtime>,
        conn: &Arc<ConnHandle>,
    ) -> bool {
        let state = HostState::new(
            conn.clone(),
            self.hub.clone(),
            self.scope.clone(),
            runtime.max_memory(),
            runtime.max_call_time(),
        );
        match Guest::new(runtime.clone(), &self.plugin, state) {
            Ok(guest) => {
                current.guest = Some(guest);
                current.generation += 1;
                if current.generation > 1 {
                    tracing::info!(
                        tenant = %self.scope.tenant.name, route = %self.scope.route,
                        plugin = %self.plugin.name, generation = current.generation,
                        "shared instance replaced by a fresh one; each connection gets on-resume at its next event"
                    );
                }
                true
            }
            Err(e) => {
                if let Some(suppressed) = self.scope.tenant.counts.instance_errors.admit() {
                    tracing::error!(
                        tenant = %self.scope.tenant.name, route = %self.scope.route,
                        plugin = %self.plugin.name, conn = conn.id, suppressed,
                        "cannot instantiate the route's shared plugin instance: {e:#}"
                    );
                }
                false
            }
        }
    }

    /// The current instance generation (0: none created yet).
    pub fn generation(&self) -> u64 {
        self.current.lock().generation
    }
}
