//! `vdevlab-qw`: serve the qw device as a vhost-user backend.

use anyhow::Context;
use clap::Parser;
use vdevlab_device_core::daemon::{init_logging, run, DaemonArgs};
use vdevlab_qw::data::DataPort;
use vdevlab_qw::device::QwDevice;
use vdevlab_qw::qw::{DEFAULT_RX_FIFO_BYTES, DEFAULT_TX_CAPTURE_BYTES};

/// The vdevlab reference device (qw) as a vhost-user backend.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Data port: a Unix socket (mode 0600) carrying the byte stream
    /// itself, like a chardev socket: what a client writes is delivered to
    /// the driver, what the driver writes is sent to the client.
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Receive FIFO size: bytes the host may inject ahead of the driver.
    #[arg(long, default_value_t = DEFAULT_RX_FIFO_BYTES)]
    rx_fifo_bytes: usize,
    /// Transmit capture size: bytes the driver may write before back-pressure.
    #[arg(long, default_value_t = DEFAULT_TX_CAPTURE_BYTES)]
    tx_capture_bytes: usize,
}

fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    let mut device = QwDevice::new(args.rx_fifo_bytes, args.tx_capture_bytes);
    if let Some(path) = &args.data {
        let port = DataPort::bind(path)
            .with_context(|| format!("starting the data port on {}", path.display()))?;
        device = device.with_data_port(port);
    }
    run(&args.daemon, device)
}
