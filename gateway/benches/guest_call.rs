//! The host↔guest path in isolation: one echo round trip through the echo
//! plugin (the message lowered into guest memory, `on-message`, the guest's
//! `send` lifted back out and queued), against the same message queued by
//! native code, measured in the same run.
//!
//! Criterion's figures for one variant and the next are minutes apart,
//! and on a shared machine the echo alone moves by 30% between such runs;
//! so the cost of a tenant's quotas is also measured by alternating short
//! blocks of both sessions and comparing their medians (printed last, as
//! "quota overhead").
//!
//! Run: `cargo bench -p wasmgate --bench guest_call`

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use wasmgate::connection::outbox::Outbound;
use wasmgate::connection::session::{Opened, Session};
use wasmgate::plugin::Runtime;
use wasmgate::protocol::message::Message;
use wasmgate::routing::route::{Route, Slot};
use wasmgate::routing::tenant::Tenant;
use wasmgate::Config;

const CONFIG: &str = "[[route]]\npath = \"/echo\"\nplugin = \"builtin:echo\"\n\n\
    [[tenant]]\nname = \"budget\"\nhosts = [\"b.test\"]\ncpu_budget = \"1s/s\"\n\n\
    [[tenant.route]]\npath = \"/echo\"\nplugin = \"builtin:echo\"\n\n\
    [[tenant]]\nname = \"metered\"\nhosts = [\"m.test\"]\ncpu_budget = \"1s/s\"\n\
    max_sends_per_second = 1000000000\n\n\
    [[tenant.route]]\npath = \"/echo\"\nplugin = \"builtin:echo\"\n";

/// A connection of the route `config.routes[index]` of `tenant`.
fn open_session(
    config: &Config,
    runtime: &Arc<Runtime>,
    index: usize,
    tenant: Arc<Tenant>,
) -> Box<Session> {
    let plugin = runtime
        .load("/echo", &config.routes[index].plugin)
        .expect("echo plugin");
    let route = Arc::new(Route::new(
        config.routes[index].clone(),
        Arc::new(plugin),
        tenant,
    ));
    let active = Arc::new(AtomicUsize::new(0));
    let version = route.current();
    let slot = Slot::acquire(&route, &version, &active, 16).expect("slot");
    match Session::open(
        1,
        route,
        version,
        runtime.clone(),
        slot,
        Arc::new(request()),
    ) {
        Opened::Accept(session, _) => session,
        _ => panic!("echo refused the connection"),
    }
}

fn request() -> wasmgate::bindings::wasmgate::plugin::types::Request {
    wasmgate::bindings::wasmgate::plugin::types::Request {
        method: "GET".into(),
        path: "/echo".into(),
        query: None,
        headers: Vec::new(),
        remote_addr: "127.0.0.1:1".into(),
        subprotocols: Vec::new(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A connection of each route of [`CONFIG`]: no quotas, a `cpu_budget`,
/// and a `cpu_budget` with a send rate.
fn sessions() -> [Box<Session>; 3] {
    let config = Config::parse(CONFIG, Path::new("<bench>")).expect("config");
    let runtime = Runtime::new(&config.sandbox, 16, None).expect("engine");
    let tenant = |i: usize| Tenant::from_settings(&config.tenants[i], None);
    [
        open_session(&config, &runtime, 0, Tenant::default_tenant(None)),
        open_session(&config, &runtime, 1, tenant(0)),
        open_session(&config, &runtime, 2, tenant(1)),
    ]
}

fn round_trip(c: &mut Criterion) {
    let rt = runtime();
    // Host calls may spawn tasks (timers), as inside the gateway.
    let _guard = rt.enter();
    let [mut session, _, mut metered] = sessions();
    let metered_outbox = metered.outbox().clone();
    let outbox = session.outbox().clone();

    let mut group = c.benchmark_group("echo round trip, 32 B text");
    group.measurement_time(Duration::from_secs(5));
    let text = "a".repeat(32);
    group.bench_function("native: queue the reply", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let msg = Message::Text(text.clone());
                let Message::Text(s) = msg else {
                    unreachable!()
                };
                outbox
                    .push_data(Outbound::Text(bytes::Bytes::from(s.into_bytes())))
                    .expect("queued");
                assert_eq!(outbox.drain().len(), 1);
            }
            start.elapsed()
        })
    });
    group.bench_function("wasm: echo plugin", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                assert!(session.deliver(Message::Text(text.clone())));
                assert_eq!(outbox.drain().len(), 1);
            }
            start.elapsed()
        })
    });
    // The same with the costs a tenant's quotas add on this path: guest
    // time measured for a CPU budget, and a tenant-wide send rate.
    group.bench_function(
        "wasm: echo plugin, tenant with cpu_budget and a send rate",
        |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    assert!(metered.deliver(Message::Text(text.clone())));
                    assert_eq!(metered_outbox.drain().len(), 1);
                }
                start.elapsed()
            })
        },
    );
    group.finish();
}

/// The echo with and without a tenant's quotas, in alternating blocks of
/// 20,000 calls for about 15 s: median nanoseconds per call of each, and
/// their ratios to the echo without quotas.
fn quota_overhead() {
    let rt = runtime();
    let _guard = rt.enter();
    let [mut plain, mut budget, mut metered] = sessions();
    let text = "a".repeat(32);
    let block = |session: &mut Box<Session>| {
        let outbox = session.outbox().clone();
        let start = Instant::now();
        for _ in 0..20_000 {
            assert!(session.deliver(Message::Text(text.clone())));
            assert_eq!(outbox.drain().len(), 1);
        }
        start.elapsed().as_nanos() as f64 / 20_000.0
    };
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        a.push(block(&mut plain));
        b.push(block(&mut budget));
        c.push(block(&mut metered));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b, c) = (median(&mut a), median(&mut b), median(&mut c));
    println!(
        "quota overhead (echo 32 B, alternating blocks): plain {a:.0} ns; \
         tenant with a cpu_budget {b:.0} ns ({:.3}x); \
         with a cpu_budget and a send rate {c:.0} ns ({:.3}x)",
        b / a,
        c / a
    );
}

criterion_group!(benches, round_trip);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // Skipped when a filter names only other benchmarks.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_none_or(|f| "quota overhead".contains(&f)) {
        quota_overhead();
    }
}
