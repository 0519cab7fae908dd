//! `vdevlab-sensor`: serve the sampling sensor as a vhost-user backend.

use clap::Parser;
use vdevlab_device_core::daemon::{init_logging, run, DaemonArgs};
use vdevlab_sensor::device::SensorDevice;
use vdevlab_sensor::wave::Wave;

/// The vdevlab sampling sensor (docs/sensor-spec.md) as a vhost-user backend.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Seed of the waveform's noise.
    #[arg(long, default_value_t = Wave::default().seed)]
    seed: u64,
    /// Waveform amplitude (1..=1000000).
    #[arg(long, default_value_t = Wave::default().amplitude)]
    amplitude: u32,
    /// Waveform period in samples (4..=65536).
    #[arg(long, default_value_t = Wave::default().wave_period)]
    wave_period: u32,
    /// Noise amplitude (0..=amplitude).
    #[arg(long, default_value_t = Wave::default().noise)]
    noise: u32,
}

fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    let device = SensorDevice::new(Wave {
        seed: args.seed,
        amplitude: args.amplitude,
        wave_period: args.wave_period,
        noise: args.noise,
    })
    .map_err(anyhow::Error::msg)?;
    run(&args.daemon, device)
}
