//! What one device-trace event costs on one thread: `Trace::record` with
//! tracing off (one relaxed load) and on (clock, lock, ring push; the ring
//! full, so a pop too, as in a long run), against an empty loop.
//! `docs/benchmarks.md`, "Device trace cost", has figures.
//!
//!     cargo run --release -p vdevlab-device-core --example trace_cost

use std::hint::black_box;
use std::time::Instant;

use vdevlab_device_core::trace::{EventKind, Trace};

const N: u64 = 20_000_000;

/// Nanoseconds per iteration of `f` over `n` iterations.
fn per_call(n: u64, mut f: impl FnMut(u16)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(black_box(i as u16));
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let trace = Trace::default();
    let event = |q: u16| EventKind::UsedPushed {
        queue: q,
        id: q,
        len: 64,
    };
    let empty = per_call(N, |q| {
        black_box(q);
    });
    let off = per_call(N, |q| trace.record(|| event(q)));
    trace.start(65_536).expect("a valid capacity");
    let on = per_call(N / 10, |q| trace.record(|| event(q)));
    let dump = trace.dump();
    assert_eq!(dump.events.len(), 65_536, "the ring filled");
    println!("empty loop      {empty:6.2} ns/iteration");
    println!("trace off       {off:6.2} ns/event");
    println!(
        "trace on (full) {on:6.2} ns/event ({} dropped)",
        dump.dropped
    );
}
