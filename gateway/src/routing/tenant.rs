//! A tenant as it runs: its name, the quotas of the config version that
//! installed it, and its [`Usage`] (open connections, live instances,
//! linear memory, open files, CPU and host-call rates), which is shared by
//! all its routes and kept across reloads, so that a reload never resets
//! what a tenant is using.
//!
//! The top-level `[[route]]`s form the default tenant, named
//! [`DEFAULT_TENANT`], whose only caps are the server's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::{TenantQuotas, TenantSettings, DEFAULT_TENANT};
use crate::quota::{CpuMeter, LogThrottle, SharedLimit};

/// One tenant, as of one config version.
#[derive(Debug)]
pub struct Tenant {
    /// Its name ([`DEFAULT_TENANT`] for the top-level routes).
    pub name: Arc<str>,
    /// Its quotas.
    pub quotas: TenantQuotas,
    /// What it holds now: kept across reloads.
    pub counts: Arc<Counts>,
    /// Its rate meters: kept across reloads that do not change its rates.
    pub meters: Arc<Meters>,
}

/// What a tenant holds, summed over its routes and connections.
#[derive(Debug, Default)]
pub struct Counts {
    /// Open connections (and upgrades in progress).
    pub connections: AtomicUsize,
    /// Live plugin instances.
    pub instances: AtomicUsize,
    /// Linear memory of its live instances, in bytes.
    pub memory: AtomicUsize,
    /// Files and directories its instances hold open (routes with `dirs`),
    /// against `max_open_files`.
    pub files: crate::plugin::filesystem::OpenFiles,
    /// Errors about its instances (refused, failed to start, memory
    /// refused): logged at most once a second.
    pub instance_errors: LogThrottle,
    /// Announcements that its plugins' log lines are being dropped: at most
    /// once a second.
    pub log_drops: LogThrottle,
    /// Counts of dropped log lines: at most once a second.
    pub drop_reports: LogThrottle,
    /// Its plugins' failures (traps, interruptions): at most once a second.
    pub failures: LogThrottle,
    /// Calls not run because they waited `max_call_time` for a place among
    /// long calls: at most once a second.
    pub turn_timeouts: LogThrottle,
    /// Its calls running off the workers now (plugin/deadline.rs).
    pub long_calls: AtomicUsize,
}

/// The log lines a second a tenant's plugins may write in all, unless its
/// `max_log_lines_per_second` says otherwise.
pub const DEFAULT_TENANT_LOG_LINES: u32 = 1000;

/// A tenant's rate meters.
#[derive(Debug)]
pub struct Meters {
    /// Guest CPU time against `cpu_budget`, if it has one.
    pub cpu: Option<CpuMeter>,
    /// New connections against `max_connections_per_second`.
    pub upgrades: SharedLimit,
    /// `send` calls against `max_sends_per_second`.
    pub sends: SharedLimit,
    /// Broadcast deliveries against `max_broadcast_deliveries_per_second`.
    pub deliveries: SharedLimit,
    /// `set-timer` calls against `max_timers_per_second`.
    pub timers: SharedLimit,
    /// Log lines against `max_log_lines_per_second`.
    pub log_lines: SharedLimit,
}

impl Meters {
    fn new(q: &TenantQuotas) -> Meters {
        Meters {
            cpu: q.cpu_budget.map(|b| CpuMeter::new(b.time, b.period)),
            upgrades: SharedLimit::new(q.max_connections_per_second),
            sends: SharedLimit::new(q.max_sends_per_second),
            deliveries: SharedLimit::new(q.max_broadcast_deliveries_per_second),
            timers: SharedLimit::new(q.max_timers_per_second),
            log_lines: SharedLimit::new(
                q.max_log_lines_per_second
                    .or(Some(DEFAULT_TENANT_LOG_LINES)),
            ),
        }
    }

    /// Whether the meters of `a` and `b` would be the same.
    fn same(a: &TenantQuotas, b: &TenantQuotas) -> bool {
        a.cpu_budget == b.cpu_budget
            && a.max_connections_per_second == b.max_connections_per_second
            && a.max_sends_per_second == b.max_sends_per_second
            && a.max_broadcast_deliveries_per_second == b.max_broadcast_deliveries_per_second
            && a.max_timers_per_second == b.max_timers_per_second
            && a.max_log_lines_per_second == b.max_log_lines_per_second
    }
}

impl Tenant {
    /// The default tenant: the top-level routes, no quotas of its own.
    pub fn default_tenant(previous: Option<&Tenant>) -> Arc<Tenant> {
        let quotas = TenantQuotas::default();
        Arc::new(Tenant {
            name: Arc::from(DEFAULT_TENANT),
            counts: previous.map(|p| p.counts.clone()).unwrap_or_default(),
            meters: previous
                .map(|p| p.meters.clone())
                .unwrap_or_else(|| Arc::new(Meters::new(&quotas))),
            quotas,
        })
    }

    /// The tenant of `settings`, continuing `previous` (the same tenant in
    /// the config being replaced) if there is one: its counts carry over,
    /// and so do its rate meters unless their rates changed.
    pub fn from_settings(settings: &TenantSettings, previous: Option<&Tenant>) -> Arc<Tenant> {
        let counts = previous.map(|p| p.counts.clone()).unwrap_or_default();
        let meters = match previous {
            Some(p) if Meters::same(&p.quotas, &settings.quotas) => p.meters.clone(),
            _ => Arc::new(Meters::new(&settings.quotas)),
        };
        Arc::new(Tenant {
            name: Arc::from(settings.name.as_str()),
            quotas: settings.quotas.clone(),
            counts,
            meters,
        })
    }

    /// Whether this is the default tenant.
    pub fn is_default(&self) -> bool {
        &*self.name == DEFAULT_TENANT
    }

    /// When the tenant may run guest code again if it is over its CPU
    /// budget; `None` if it may run now (or has no budget).
    pub fn cpu_ready_at(&self) -> Option<Instant> {
        self.meters.cpu.as_ref().and_then(CpuMeter::ready_at)
    }

    /// Takes an instance slot, or false if `max_instances` are live.
    pub fn acquire_instance(&self) -> bool {
        let max = self.quotas.max_instances.unwrap_or(usize::MAX);
        self.counts
            .instances
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives an instance slot back.
    pub fn release_instance(&self) {
        self.counts.instances.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The tenants of `config` with their host names, the default tenant
/// first, each continuing its namesake in `previous` (the table being
/// replaced) if there is one.
pub fn tenants_of(
    config: &crate::config::Config,
    previous: Option<&crate::routing::router::Table>,
) -> Vec<(Arc<Tenant>, Vec<String>)> {
    let mut all = vec![(
        Tenant::default_tenant(previous.and_then(|t| t.tenant(None)).map(|t| &**t)),
        Vec::new(),
    )];
    for t in &config.tenants {
        let before = previous.and_then(|p| p.tenant(Some(&t.name)));
        all.push((
            Tenant::from_settings(t, before.map(|t| &**t)),
            t.hosts.clone(),
        ));
    }
    all
}

/// The tenant named `name` (`None`: the default one) among `tenants`.
pub fn find(tenants: &[(Arc<Tenant>, Vec<String>)], name: Option<&str>) -> Arc<Tenant> {
    let found = match name {
        None => None,
        Some(n) => tenants
            .iter()
            .skip(1)
            .find(|(t, _)| &*t.name == n)
            .map(|(t, _)| t.clone()),
    };
    // Every route's tenant is in the list (the config checks it); the
    // default tenant is always first.
    found.unwrap_or_else(|| tenants[0].0.clone())
}
