//! `vdevlab device ...`: the host control plane of a running device, one
//! subcommand per request of `docs/device-spec.md` ("Host control plane").

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use vdevlab_qw::config;
use vdevlab_qw::control::{ControlClient, Request, Response};
use vdevlab_qw::faults::{Fault, QueueSel};
use vdevlab_qw::irq::IrqMode;
use vdevlab_qw::sources::{PatternStream, SourceConfig};

/// `println!` that tolerates a closed stdout (`... | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Talk to a running device's control socket.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// The device's control socket (`vdevlab-qw --control`).
    #[arg(long, short = 'c')]
    control: PathBuf,
    #[command(subcommand)]
    cmd: DeviceCmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Queue {
    Rx,
    Tx,
    All,
}

#[derive(Debug, Subcommand)]
enum DeviceCmd {
    /// Queue bytes for the driver to read.
    Inject {
        /// The bytes as text.
        #[arg(long, group = "what")]
        text: Option<String>,
        /// The bytes as hex.
        #[arg(long, group = "what")]
        hex: Option<String>,
        /// The bytes of a file.
        #[arg(long, group = "what")]
        file: Option<PathBuf>,
        /// `--bytes` bytes of the seeded pattern stream (what the guest
        /// programs check).
        #[arg(long, group = "what")]
        pattern_seed: Option<u64>,
        /// Length for `--pattern-seed`.
        #[arg(long, default_value_t = 4096)]
        bytes: usize,
    },
    /// Take what the driver wrote.
    Capture {
        /// At most this many bytes.
        #[arg(long)]
        max: Option<usize>,
        /// Write the bytes to this file instead of printing hex.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Counters and buffer levels.
    Stats,
    /// Set a queue's interrupt mode.
    Irq {
        /// Which queue.
        #[arg(long, value_enum, default_value = "all")]
        queue: Queue,
        #[command(subcommand)]
        mode: IrqCmd,
    },
    /// Choose where received data comes from.
    Source {
        #[command(subcommand)]
        source: SourceCmd,
    },
    /// Empty the receive FIFO and the transmit capture.
    Reset,
    /// Declare the device broken (NEEDS_RESET) until the driver resets it.
    NeedsReset,
    /// Show the config space as the driver reads it.
    Config,
    /// Inject a fault, e.g. '{"kind":"drop_interrupts","queue":"rx","count":2}'
    /// (kinds: drop_interrupts, spurious_interrupts, interrupt_storm, stall,
    /// slow, corrupt_rx, truncate_rx, hostile_bogus_id, hostile_overlong,
    /// hostile_index_jump, hostile_double_complete, clear; see
    /// docs/device-spec.md).
    Fault {
        /// The fault, as JSON.
        json: String,
    },
    /// Hostile-device mode: break the virtio contract on the used ring on
    /// purpose (an id never posted, a length larger than the buffer, a used
    /// index jump, a completion twice), once or `--count` times.
    Hostile {
        /// The queue, by name (`rx`, `tx`), or `all`.
        #[arg(long, default_value = "rx")]
        queue: String,
        /// How many completions to break (1: one-shot).
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[command(subcommand)]
        violation: HostileCmd,
    },
    /// Send a raw JSON request and print the raw reply.
    Raw {
        /// e.g. '{"op":"stats"}'
        json: String,
    },
}

#[derive(Debug, Subcommand)]
enum HostileCmd {
    /// Complete a buffer under an id the driver never made available.
    BogusId,
    /// Report a used length larger than the buffer.
    Overlong {
        /// Bytes beyond the buffer.
        #[arg(long, default_value_t = 4096)]
        by: u32,
    },
    /// Move the used index past the entries written.
    IndexJump {
        /// Entries skipped.
        #[arg(long, default_value_t = 1)]
        by: u16,
    },
    /// Put the same head on the used ring twice.
    DoubleComplete,
}

#[derive(Debug, Subcommand)]
enum IrqCmd {
    /// An interrupt after every pass that completed buffers.
    Immediate,
    /// One interrupt per `count` buffers or `usecs` after the first.
    Coalesce {
        #[arg(long)]
        count: u32,
        #[arg(long)]
        usecs: u64,
    },
    /// The interrupt `usecs` (+ seeded jitter) after the first completion.
    Delay {
        #[arg(long)]
        usecs: u64,
        #[arg(long, default_value_t = 0)]
        jitter_usecs: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Debug, Subcommand)]
enum SourceCmd {
    /// Only bytes injected by the host.
    Inject,
    /// `bytes` bytes of the seeded pattern every `period-us` microseconds.
    Generator {
        #[arg(long)]
        bytes: u32,
        #[arg(long)]
        period_us: u64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// A file or pipe on the host, optionally rate-limited.
    File {
        path: PathBuf,
        #[arg(long)]
        rate_bytes_per_sec: Option<u64>,
    },
}

fn checked(resp: Response) -> Result<Response> {
    if resp.ok {
        Ok(resp)
    } else {
        bail!("the device refused: {}", resp.error.unwrap_or_default())
    }
}

/// Run one `vdevlab device` command.
pub fn run(args: DeviceArgs) -> Result<bool> {
    let mut ctl = ControlClient::connect(&args.control)?;
    let req = match args.cmd {
        DeviceCmd::Inject {
            text,
            hex,
            file,
            pattern_seed,
            bytes,
        } => {
            let data = match (text, hex, file, pattern_seed) {
                (Some(t), ..) => t.into_bytes(),
                (_, Some(h), ..) => ::hex::decode(h.trim()).context("--hex is not valid hex")?,
                (_, _, Some(f), _) => {
                    std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?
                }
                (_, _, _, Some(seed)) => PatternStream::new(seed).take(bytes),
                _ => bail!("say what to inject: --text, --hex, --file or --pattern-seed"),
            };
            let accepted = ctl.inject(&data)?;
            say!("accepted {accepted} of {} bytes", data.len());
            return Ok(accepted == data.len());
        }
        DeviceCmd::Capture { max, out } => {
            let data = ctl.capture(max)?;
            match out {
                Some(path) => {
                    std::fs::File::create(&path)
                        .and_then(|mut f| f.write_all(&data))
                        .with_context(|| format!("writing {}", path.display()))?;
                    say!("{} bytes written to {}", data.len(), path.display());
                }
                None => say!("{}", ::hex::encode(&data)),
            }
            return Ok(true);
        }
        // Any device on the framework answers these; its own counters and
        // fields are shown as they come.
        DeviceCmd::Stats => {
            let resp: serde_json::Value = ctl.core().call(&serde_json::json!({"op": "stats"}))?;
            if resp["ok"] != true {
                bail!("the device refused: {}", resp["error"]);
            }
            say!("{}", serde_json::to_string_pretty(&resp)?);
            return Ok(true);
        }
        DeviceCmd::Irq { queue, mode } => Request::InterruptMode {
            queue: format!("{queue:?}").to_lowercase(),
            irq: match mode {
                IrqCmd::Immediate => IrqMode::Immediate,
                IrqCmd::Coalesce { count, usecs } => IrqMode::Coalesce { count, usecs },
                IrqCmd::Delay {
                    usecs,
                    jitter_usecs,
                    seed,
                } => IrqMode::Delay {
                    usecs,
                    jitter_usecs,
                    seed,
                },
            },
        },
        DeviceCmd::Source { source } => Request::Source {
            source: match source {
                SourceCmd::Inject => SourceConfig::Inject,
                SourceCmd::Generator {
                    bytes,
                    period_us,
                    seed,
                } => SourceConfig::Generator {
                    bytes,
                    period_us,
                    seed,
                },
                SourceCmd::File {
                    path,
                    rate_bytes_per_sec,
                } => SourceConfig::File {
                    path: std::path::absolute(&path).unwrap_or(path),
                    rate_bytes_per_sec,
                },
            },
        },
        DeviceCmd::Fault { json } => Request::Fault {
            fault: serde_json::from_str(&json)
                .context("not a valid fault (see docs/device-spec.md, Faults)")?,
        },
        DeviceCmd::Hostile {
            queue,
            count,
            violation,
        } => {
            let queue = QueueSel(queue);
            Request::Fault {
                fault: match violation {
                    HostileCmd::BogusId => Fault::HostileBogusId { queue, count },
                    HostileCmd::Overlong { by } => Fault::HostileOverlong { queue, count, by },
                    HostileCmd::IndexJump { by } => Fault::HostileIndexJump { queue, count, by },
                    HostileCmd::DoubleComplete => Fault::HostileDoubleComplete { queue, count },
                },
            }
        }
        DeviceCmd::Reset => Request::Reset {},
        DeviceCmd::NeedsReset => Request::NeedsReset {},
        DeviceCmd::Config => {
            let resp = checked(ctl.request(&Request::Config {})?)?;
            let bytes = ::hex::decode(resp.data.unwrap_or_default())?;
            print_config(&bytes);
            return Ok(true);
        }
        DeviceCmd::Raw { json } => {
            let req: serde_json::Value =
                serde_json::from_str(&json).context("not a valid control request (JSON)")?;
            let resp: serde_json::Value = ctl.core().call(&req)?;
            say!("{}", serde_json::to_string(&resp)?);
            return Ok(resp["ok"] == true);
        }
    };
    let resp = checked(ctl.request(&req)?)?;
    say!("{}", serde_json::to_string_pretty(&resp)?);
    Ok(true)
}

/// The config space by the layout its magic names (the qw device, the
/// sensor), else as raw words.
fn print_config(b: &[u8]) {
    let magic = vdevlab_device_core::config::get_u32(b, 0);
    let layout: &[vdevlab_device_core::config::Field] = match magic {
        Some(config::MAGIC) => config::FIELDS,
        Some(vdevlab_sensor::spec::MAGIC) => vdevlab_sensor::spec::CONFIG_FIELDS,
        _ => &[],
    };
    for line in vdevlab_device_core::config::describe(b, layout) {
        say!("{line}");
    }
}
