//! `{{name}}-device`: the {{name}} device as a vhost-user backend. The
//! device's logic is in `lib.rs`; the framework does the rest.

use clap::Parser;
use vdevlab_device_core::daemon::{init_logging, run, DaemonArgs};
use {{crate}}::{ {{Name}}Device, DEFAULT_FIFO_BYTES};

/// The {{name}} device (vdevlab) as a vhost-user backend.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// --socket (vhost-user), --control (the host control plane), --once.
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Bytes the device holds between a write (or a host injection) and
    /// the driver's read.
    #[arg(long, default_value_t = DEFAULT_FIFO_BYTES)]
    fifo_bytes: usize,
}

fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    run(&args.daemon, {{Name}}Device::new(args.fifo_bytes))
}
