//! `vdevlab-device`: serve the qw device as a vhost-user backend.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use vdevlab_device::backend::{serve, QwBackend};
use vdevlab_device::control;
use vdevlab_device::device::{QwDevice, DEFAULT_RX_FIFO_BYTES, DEFAULT_TX_CAPTURE_BYTES};

/// The vdevlab reference device (qw) as a vhost-user backend.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// vhost-user socket to listen on (the VMM connects to it).
    #[arg(long)]
    socket: PathBuf,
    /// Control-plane socket to listen on (mode 0600; JSON lines).
    #[arg(long)]
    control: PathBuf,
    /// Receive FIFO size: bytes the host may inject ahead of the driver.
    #[arg(long, default_value_t = DEFAULT_RX_FIFO_BYTES)]
    rx_fifo_bytes: usize,
    /// Transmit capture size: bytes the driver may write before back-pressure.
    #[arg(long, default_value_t = DEFAULT_TX_CAPTURE_BYTES)]
    tx_capture_bytes: usize,
    /// Exit when the first VMM connection ends instead of waiting for the next.
    #[arg(long)]
    once: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let device = Arc::new(Mutex::new(QwDevice::new(
        args.rx_fifo_bytes,
        args.tx_capture_bytes,
    )));
    let backend = Arc::new(QwBackend::new(device.clone()).context("creating the backend")?);
    control::spawn(args.control.clone(), device, backend.kicker()?)
        .with_context(|| format!("starting the control plane on {}", args.control.display()))?;
    serve(&args.socket, backend, args.once)
}
