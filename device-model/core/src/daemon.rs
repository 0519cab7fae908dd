//! The daemon's main loop: logging, the control plane and the vhost-user
//! socket, for any device. A device's `main.rs` parses its own flags
//! (flattening [`DaemonArgs`]), builds the device and calls [`run`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::backend::{serve, CoreBackend};
use crate::device::VirtioDevice;
use crate::engine::Engine;

/// The flags every device daemon takes (`#[command(flatten)]` them).
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// vhost-user socket to listen on (the VMM connects to it).
    #[arg(long)]
    pub socket: PathBuf,
    /// Control-plane socket to listen on (mode 0600; JSON lines).
    #[arg(long)]
    pub control: PathBuf,
    /// Exit when the first VMM connection ends instead of waiting for the next.
    #[arg(long)]
    pub once: bool,
    /// With --once: keep answering on the control socket for this many
    /// milliseconds after the VMM disconnects, so that a harness can still
    /// read the final counters of a guest that powered off by itself.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub linger_ms: u64,
    /// Record device events from the start (the device trace; read it with
    /// the control plane's `trace_dump`, see docs/device-framework.md,
    /// "Device trace").
    #[arg(long)]
    pub trace: bool,
    /// With --trace: the trace ring's size, in events (the oldest are
    /// dropped, and counted, when it is full).
    #[arg(long, value_name = "EVENTS", default_value_t = crate::trace::DEFAULT_CAPACITY)]
    pub trace_capacity: usize,
}

/// Log to stderr through `tracing`, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Serve `device`: start its control plane on `args.control`, then serve
/// VMM connections on `args.socket` (one at a time; with `args.once`,
/// return after the first ends).
pub fn run<D: VirtioDevice>(args: &DaemonArgs, device: D) -> anyhow::Result<()> {
    crate::sockpath::check(&args.socket, "the vhost-user socket")?;
    crate::sockpath::check(&args.control, "the control socket")?;
    let engine = Engine::new(device);
    if args.trace {
        engine
            .core
            .trace()
            .start(args.trace_capacity)
            .map_err(|e| anyhow::anyhow!("--trace-capacity: {e}"))?;
    }
    let engine = Arc::new(Mutex::new(engine));
    let backend = Arc::new(CoreBackend::new(engine.clone()).context("creating the backend")?);
    crate::control::spawn(args.control.clone(), engine, backend.kicker()?)
        .with_context(|| format!("starting the control plane on {}", args.control.display()))?;
    serve(&args.socket, backend, args.once)?;
    if args.once && args.linger_ms > 0 {
        tracing::info!(
            ms = args.linger_ms,
            "control plane lingers after the VMM left"
        );
        std::thread::sleep(std::time::Duration::from_millis(args.linger_ms));
    }
    Ok(())
}
