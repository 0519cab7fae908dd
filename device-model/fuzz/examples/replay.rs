//! Decode and replay fuzz inputs without libFuzzer or sanitizers (stable
//! toolchain): `cargo run --example replay -- FILE...`. Prints the decoded
//! header and operations, then runs the harness (which panics on the first
//! broken invariant). Set `RUST_LOG=debug` to see the device's log.

fn main() {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        eprintln!("usage: replay FILE...");
        std::process::exit(2);
    }
    for f in files {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{f}: {e}"));
        let (h, ops) = vdevlab_device_fuzz::decode(&data);
        println!("== {f} ({} bytes)", data.len());
        println!("header: {h:?}");
        println!("rx rings: {:?}", h.rx.resolve());
        println!("tx rings: {:?}", h.tx.resolve());
        for op in &ops {
            println!("  {op:?}");
        }
        let out = vdevlab_device_fuzz::run(&data);
        for (q, r) in &out.passes {
            println!("pass {}: {r:?}", if *q == 0 { "rx" } else { "tx" });
        }
        println!("stats: {:?}", out.stats);
        println!("captured: {} bytes", out.captured.len());
    }
}
