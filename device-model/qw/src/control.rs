//! The qw device's control-plane protocol, as clients (the CLI, the lab,
//! the tests) see it: the requests ([`Request`]), the reply ([`Response`])
//! and a typed client ([`ControlClient`]). The server is the core's
//! ([`vdevlab_device_core::control`]): it answers the generic requests and
//! hands `inject`, `capture` and `source` to [`crate::device::QwDevice`].
//! The counters a `stats` reply carries are [`Stats`].
//! The protocol is documented in `docs/device-spec.md` ("Control plane").

use std::io;
use std::ops::Deref;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vdevlab_device_core::control::ControlClient as CoreClient;
pub use vdevlab_device_core::control::{spawn, Plane, Reply, MAX_LINE};
use vdevlab_device_core::faults::Fault;
use vdevlab_device_core::irq::IrqMode;
use vdevlab_device_core::sources::SourceConfig;
use vdevlab_device_core::{CoreCounters, Engine, VirtioDevice};

use crate::qw::QwCounters;

/// A control-plane request of the qw device: the core's requests and qw's
/// own (`inject`, `capture`, `source`, `carrier`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness check.
    Ping {},
    /// Queue bytes (hex) for delivery to the driver.
    Inject {
        /// The bytes, hex encoded.
        data: String,
    },
    /// Take captured transmit bytes (what the driver wrote), oldest first.
    Capture {
        /// At most this many bytes (default: all).
        #[serde(default)]
        max: Option<usize>,
    },
    /// The device's counters and buffer levels.
    Stats {},
    /// Set the interrupt mode of a queue (`rx`, `tx` or `all`).
    InterruptMode {
        /// `rx`, `tx` or `all`.
        queue: String,
        /// The mode, e.g. `{"mode":"coalesce","count":4,"usecs":500}`.
        irq: IrqMode,
    },
    /// Drop the receive FIFO and the transmit capture (counters are kept).
    Reset {},
    /// Choose the receive source: `{"kind":"inject"}` (host injection only),
    /// `{"kind":"generator","bytes":N,"period_us":T,"seed":S}` or
    /// `{"kind":"file","path":P,"rate_bytes_per_sec":R}`.
    Source {
        /// The source.
        source: SourceConfig,
    },
    /// Declare the device broken (status NEEDS_RESET in config space): it
    /// stops serving its queues until the driver resets them.
    NeedsReset {},
    /// The config space as the driver would read it now, hex.
    Config {},
    /// Inject a fault (see [`Fault`]), e.g.
    /// `{"op":"fault","fault":{"kind":"drop_interrupts","queue":"rx","count":2}}`.
    Fault {
        /// The fault.
        fault: Fault,
    },
    /// Plug the cable in (`up`: true) or pull it (false): NO_CARRIER in
    /// the config status word, then a config-change interrupt if it
    /// changed. The reply says `changed` and `notified` (whether the
    /// interrupt went out; `notify_error` says why not).
    Carrier {
        /// The new carrier state.
        up: bool,
    },
}

/// All the counters of a qw device, as the control plane's `stats` request
/// reports them: the device's ([`QwCounters`]) with the core's
/// ([`CoreCounters`]) beside them, in one flat JSON object. This is the
/// clients' view. The core's counters are read by name too
/// (`stats.bad_chains`, through [`Deref`]), or as `stats.core`.
pub type Stats = QwCounters<CoreCounters>;

impl Stats {
    /// The stats of `eng` (the qw device on its core,
    /// [`crate::device::QwDevice`]), merged as the control plane reports
    /// them.
    pub fn of<D: VirtioDevice>(eng: &Engine<D>) -> Self {
        serde_json::from_value(Value::Object(eng.stats_fields())).unwrap_or_default()
    }
}

impl Deref for Stats {
    type Target = CoreCounters;

    fn deref(&self) -> &CoreCounters {
        &self.core
    }
}

/// A control-plane reply. `ok` says whether the request succeeded; the other
/// fields appear when the request produces them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `inject`: bytes accepted (the rest did not fit the receive FIFO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<usize>,
    /// `capture`: the bytes, hex encoded; `config`: the config space, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// `stats`: the counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// Bytes waiting in the receive FIFO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_pending: Option<usize>,
    /// Bytes waiting in the transmit capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_captured: Option<usize>,
}

/// A client of the qw device's control plane, for the CLI and the test
/// harness.
#[derive(Debug)]
pub struct ControlClient {
    inner: CoreClient,
}

impl ControlClient {
    /// Connect to the control socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        CoreClient::connect(path).map(|inner| Self { inner })
    }

    /// Send one request and wait for its reply.
    pub fn request(&mut self, req: &Request) -> io::Result<Response> {
        self.inner.call(req)
    }

    /// The generic client underneath (for requests of another shape).
    pub fn core(&mut self) -> &mut CoreClient {
        &mut self.inner
    }

    fn checked(&mut self, req: &Request) -> io::Result<Response> {
        let resp = self.request(req)?;
        if resp.ok {
            Ok(resp)
        } else {
            Err(io::Error::other(
                resp.error.unwrap_or_else(|| "request failed".into()),
            ))
        }
    }

    /// Queue bytes for the driver; returns how many the device accepted.
    pub fn inject(&mut self, data: &[u8]) -> io::Result<usize> {
        let resp = self.checked(&Request::Inject {
            data: hex::encode(data),
        })?;
        Ok(resp.accepted.unwrap_or(0))
    }

    /// Take up to `max` captured transmit bytes.
    pub fn capture(&mut self, max: Option<usize>) -> io::Result<Vec<u8>> {
        let resp = self.checked(&Request::Capture { max })?;
        hex::decode(resp.data.unwrap_or_default()).map_err(io::Error::other)
    }

    /// Set the interrupt mode of `queue` (`rx`, `tx` or `all`).
    pub fn interrupt_mode(&mut self, queue: &str, irq: IrqMode) -> io::Result<()> {
        self.checked(&Request::InterruptMode {
            queue: queue.into(),
            irq,
        })
        .map(drop)
    }

    /// The device's counters.
    pub fn stats(&mut self) -> io::Result<Response> {
        self.checked(&Request::Stats {})
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The counters of a `stats` reply, by name, as clients have read them
    /// (the CLI, the lab's reports, users' scripts): the wire form of
    /// [`Stats`], which must not change.
    pub(crate) const STATS_FIELDS: [&str; 29] = [
        "injected_bytes",
        "inject_rejected_bytes",
        "rx_bytes",
        "rx_buffers",
        "tx_bytes",
        "tx_buffers",
        "bad_chains",
        "interrupts_raised",
        "interrupts_suppressed",
        "queue_errors",
        "overruns",
        "interrupts_dropped",
        "spurious_interrupts",
        "stalled_passes",
        "corrupted_buffers",
        "truncated_bytes",
        "hostile_bogus_ids",
        "hostile_overlong",
        "hostile_index_jumps",
        "hostile_double_completions",
        "throttled_passes",
        "wrong_used_lens",
        "config_changes_raised",
        "config_changes_sent",
        "config_changes_acked",
        "config_changes_failed",
        "hostile_config_changes",
        "hostile_config_flips",
        "carrier_changes",
    ];

    #[test]
    fn stats_keep_their_wire_form() {
        // Every counter a different value: a field mixed up with another,
        // dropped or renamed shows.
        let raw: serde_json::Map<String, Value> = STATS_FIELDS
            .iter()
            .zip(1u64..)
            .map(|(k, v)| (k.to_string(), v.into()))
            .collect();
        let stats: Stats = serde_json::from_value(Value::Object(raw.clone())).unwrap();
        assert_eq!(serde_json::to_value(stats).unwrap(), Value::Object(raw));
        // The fields clients read by name, the device's and the core's.
        assert_eq!(
            (stats.injected_bytes, stats.rx_bytes, stats.tx_bytes),
            (1, 3, 5)
        );
        assert_eq!(
            (
                stats.bad_chains,
                stats.interrupts_raised,
                stats.queue_errors
            ),
            (7, 8, 10)
        );
        assert_eq!((stats.overruns, stats.hostile_double_completions), (11, 20));
        // Replies of devices older than the fault and hostile counters
        // still parse (those read as 0); the original ten do not go missing.
        let old: serde_json::Map<String, Value> = STATS_FIELDS[..10]
            .iter()
            .map(|k| (k.to_string(), 1.into()))
            .collect();
        let s: Stats = serde_json::from_value(Value::Object(old.clone())).unwrap();
        assert_eq!((s.rx_bytes, s.overruns, s.hostile_overlong), (1, 0, 0));
        for k in STATS_FIELDS[..10].iter() {
            let mut short = old.clone();
            short.remove(*k);
            assert!(
                serde_json::from_value::<Stats>(Value::Object(short)).is_err(),
                "a reply without {k} is refused"
            );
        }
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r: Request = serde_json::from_str(r#"{"op":"inject","data":"6869"}"#).unwrap();
        assert_eq!(
            r,
            Request::Inject {
                data: "6869".into()
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"capture"}"#).unwrap();
        assert_eq!(r, Request::Capture { max: None });
        let r: Request = serde_json::from_str(r#"{"op":"carrier","up":false}"#).unwrap();
        assert_eq!(r, Request::Carrier { up: false });
        assert!(serde_json::from_str::<Request>(r#"{"op":"carrier"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"ping","x":1}"#).is_err());
    }
}
