//! Epoch interruption against fuel, the two ways wasmtime can stop or meter
//! a guest, on the gateway's hot path: an echo through the built-in echo
//! plugin (`on-message`, then the guest's `send`), with an engine
//! configured like the gateway's and only the interruption mechanism
//! changed; 32 B (the call's fixed costs) and 16 KiB (more guest
//! instructions per call, where fuel's per-instruction cost shows).
//!
//! The gateway uses epochs (a counter the guest checks at loop heads and
//! function entries, advanced by a thread every 10 ms) and measures a
//! tenant's CPU with a clock; fuel would count every instruction instead.
//!
//! Run: `cargo bench -p wasmgate --bench interruption`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use wasmgate::bindings::wasmgate::plugin::host::Host;
use wasmgate::bindings::wasmgate::plugin::types::{self, GatewayError, LogLevel, Message};
use wasmgate::bindings::Plugin;

/// A host that only counts what the echo plugin sends.
struct Bench {
    wasi: WasiCtx,
    table: ResourceTable,
    sent: u64,
}

impl WasiView for Bench {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for Bench {}

impl Host for Bench {
    fn send(&mut self, _: u64, msg: Message) -> Result<(), GatewayError> {
        std::hint::black_box(msg);
        self.sent += 1;
        Ok(())
    }
    fn close(&mut self, _: u64, _: u16, _: String) -> Result<(), GatewayError> {
        Ok(())
    }
    fn join(&mut self, _: u64, _: String) -> Result<(), GatewayError> {
        Ok(())
    }
    fn leave(&mut self, _: u64, _: String) -> Result<bool, GatewayError> {
        Ok(false)
    }
    fn broadcast(&mut self, _: String, _: Message, _: Option<u64>) -> Result<u32, GatewayError> {
        Ok(0)
    }
    fn room_size(&mut self, _: String) -> u32 {
        0
    }
    fn room_members(&mut self, _: String) -> Vec<u64> {
        Vec::new()
    }
    fn rooms_of(&mut self, _: u64) -> Result<Vec<String>, GatewayError> {
        Ok(Vec::new())
    }
    fn metadata_set(&mut self, _: u64, _: String, _: String) -> Result<(), GatewayError> {
        Ok(())
    }
    fn metadata_get(&mut self, _: u64, _: String) -> Result<Option<String>, GatewayError> {
        Ok(None)
    }
    fn metadata_remove(&mut self, _: u64, _: String) -> Result<Option<String>, GatewayError> {
        Ok(None)
    }
    fn config_get(&mut self, _: String) -> Option<String> {
        None
    }
    fn config_all(&mut self) -> Vec<(String, String)> {
        Vec::new()
    }
    fn set_timer(&mut self, _: u64, _: u32, _: bool) -> Result<u64, GatewayError> {
        Ok(1)
    }
    fn cancel_timer(&mut self, _: u64) -> bool {
        false
    }
    fn log(&mut self, _: LogLevel, _: String) {}
}

/// How the engine interrupts guests.
#[derive(Clone, Copy)]
enum Mode {
    Epoch,
    Fuel,
}

/// The echo plugin instantiated on an engine configured like the gateway's
/// (component model, no component-model async) with `mode`.
fn echo(mode: Mode) -> (Store<Bench>, Plugin) {
    let mut config = Config::new();
    config.wasm_component_model(true).concurrency_support(false);
    match mode {
        Mode::Epoch => config.epoch_interruption(true),
        Mode::Fuel => config.consume_fuel(true),
    };
    let engine = Engine::new(&config).expect("engine");
    let bytes = wasmgate::builtin::plugin("echo").expect("built-in echo");
    let component = Component::new(&engine, bytes).expect("component");
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).expect("wasi");
    Plugin::add_to_linker::<Bench, HasSelf<Bench>>(&mut linker, |s| s).expect("host");
    let mut store = Store::new(
        &engine,
        Bench {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            sent: 0,
        },
    );
    match mode {
        Mode::Epoch => store.set_epoch_deadline(u64::MAX / 2),
        Mode::Fuel => store.set_fuel(u64::MAX / 2).expect("fuel"),
    }
    let plugin = Plugin::instantiate(&mut store, &component, &linker).expect("instance");
    (store, plugin)
}

fn interruption(c: &mut Criterion) {
    for (size, name) in [
        (32, "echo round trip, 32 B"),
        (16 << 10, "echo round trip, 16 KiB"),
    ] {
        let mut group = c.benchmark_group(name);
        group.measurement_time(Duration::from_secs(5));
        let text = "a".repeat(size);
        for (mode, label) in [
            (Mode::Epoch, "epoch deadline (the gateway's)"),
            (Mode::Fuel, "fuel"),
        ] {
            let (mut store, plugin) = echo(mode);
            group.bench_function(label, |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        // Re-armed per call, as the gateway does.
                        match mode {
                            Mode::Epoch => store.set_epoch_deadline(1_000),
                            Mode::Fuel => store.set_fuel(10_000_000).expect("fuel"),
                        }
                        plugin
                            .wasmgate_plugin_handler()
                            .call_on_message(&mut store, 1, &Message::Text(text.clone()))
                            .expect("on-message");
                    }
                    start.elapsed()
                })
            });
            assert!(store.data().sent > 0);
        }
        group.finish();
    }
}

criterion_group!(benches, interruption);
criterion_main!(benches);
