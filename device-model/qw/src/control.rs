//! The qw device's control-plane protocol, as clients (the CLI, the lab,
//! the tests) see it: the requests ([`Request`]), the reply ([`Response`])
//! and a typed client ([`ControlClient`]). The server is the core's
//! ([`vdevlab_device_core::control`]): it answers the generic requests and
//! hands `inject`, `capture` and `source` to [`crate::device::QwDevice`].
//! The protocol is documented in `docs/device-spec.md` ("Control plane").

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vdevlab_device_core::control::ControlClient as CoreClient;
pub use vdevlab_device_core::control::{spawn, Plane, Reply, MAX_LINE};
use vdevlab_device_core::faults::Fault;
use vdevlab_device_core::irq::IrqMode;
use vdevlab_device_core::sources::SourceConfig;

use crate::device::Stats;

/// A control-plane request of the qw device: the core's requests and qw's
/// own (`inject`, `capture`, `source`).
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
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use vdevlab_device_core::Engine;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use crate::device::QwDevice;
    use crate::spec::TX_QUEUE;

    fn plane(dev: QwDevice) -> Plane<QwDevice> {
        Plane::new(
            Arc::new(Mutex::new(Engine::new(dev))),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap()
    }

    /// Answer `req` as the server does, parsed as a client would.
    fn handle_request(plane: &Plane<QwDevice>, req: Request) -> Response {
        let reply = plane.handle(&serde_json::to_value(req).unwrap());
        serde_json::from_value(serde_json::to_value(reply).unwrap()).unwrap()
    }

    #[test]
    fn generator_source_ticks_into_the_fifo_and_config_shows_it() {
        let plane = plane(QwDevice::default());
        let req: Request = serde_json::from_str(
            r#"{"op":"source","source":{"kind":"generator","bytes":100,"period_us":1000,"seed":9}}"#,
        )
        .unwrap();
        assert!(handle_request(&plane, req).ok);
        std::thread::sleep(Duration::from_millis(20));
        plane.tick();
        let pending = plane.engine.lock().unwrap().device.rx_pending();
        assert!(
            pending >= 1000 && pending.is_multiple_of(100),
            "late ticks keep the rate: {pending}"
        );
        assert!(plane.kick.read().unwrap() >= 1);
        let config = handle_request(&plane, Request::Config {}).data.unwrap();
        let config = hex::decode(config).unwrap();
        assert_eq!(&config[0..4], b"QWDV");
        assert_eq!(config[0x20], 1, "source: generator");
        let bad: Request = serde_json::from_str(
            r#"{"op":"source","source":{"kind":"generator","bytes":0,"period_us":1000}}"#,
        )
        .unwrap();
        assert!(handle_request(&plane, bad).error.unwrap().contains("bytes"));
        let off: Request =
            serde_json::from_str(r#"{"op":"source","source":{"kind":"inject"}}"#).unwrap();
        assert!(handle_request(&plane, off).ok);
        assert!(handle_request(&plane, Request::NeedsReset {}).ok);
        assert!(plane.engine.lock().unwrap().core.needs_reset());
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
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"ping","x":1}"#).is_err());
        // The server refuses the same.
        let plane = plane(QwDevice::default());
        let bad = plane.handle_line(br#"{"op":"explode"}"#);
        assert!(!bad.ok && bad.error.unwrap().contains("unknown op"));
        assert!(!plane.handle_line(br#"{"op":"ping","x":1}"#).ok);
        assert!(
            !plane
                .handle_line(br#"{"op":"inject","data":"00","x":1}"#)
                .ok
        );
        assert!(!plane.handle_line(b"[1]").ok);
    }

    #[test]
    fn inject_and_stats_through_handle_request() {
        let plane = plane(QwDevice::new(4, 4));
        let resp = handle_request(
            &plane,
            Request::Inject {
                data: "0102030405".into(),
            },
        );
        assert!(resp.ok);
        assert_eq!(resp.accepted, Some(4));
        assert_eq!(resp.rx_pending, Some(4));
        assert_eq!(plane.kick.read().unwrap(), 1, "the worker is kicked");
        let resp = handle_request(&plane, Request::Inject { data: "zz".into() });
        assert!(!resp.ok);
        assert!(resp.error.unwrap().contains("hex"));
        let stats = handle_request(&plane, Request::Stats {}).stats.unwrap();
        assert_eq!(stats.injected_bytes, 4);
        assert_eq!(stats.inject_rejected_bytes, 1);
    }

    #[test]
    fn every_counter_reaches_the_typed_stats() {
        // The clients' flat Stats must name every counter the core and the
        // device report, or a counter would be silently invisible.
        let plane = plane(QwDevice::default());
        let reply = plane.handle_line(br#"{"op":"stats"}"#);
        let serde_json::Value::Object(raw) = reply.fields["stats"].clone() else {
            panic!("stats is not an object")
        };
        let typed = serde_json::to_value(Stats::default()).unwrap();
        for key in raw.keys() {
            assert!(typed.get(key).is_some(), "Stats lacks the counter {key}");
        }
        assert_eq!(raw.len(), typed.as_object().unwrap().len());
    }

    #[test]
    fn interrupt_mode_and_reset() {
        let plane = plane(QwDevice::default());
        let req: Request = serde_json::from_str(
            r#"{"op":"interrupt_mode","queue":"all","irq":{"mode":"coalesce","count":4,"usecs":500}}"#,
        )
        .unwrap();
        assert!(handle_request(&plane, req).ok);
        let want = IrqMode::Coalesce {
            count: 4,
            usecs: 500,
        };
        assert_eq!(
            plane.engine.lock().unwrap().core.irq_mode(TX_QUEUE),
            Some(want)
        );
        let bad = Request::InterruptMode {
            queue: "middle".into(),
            irq: IrqMode::Immediate,
        };
        assert!(handle_request(&plane, bad)
            .error
            .unwrap()
            .contains("rx, tx or all"));
        let bad = Request::InterruptMode {
            queue: "rx".into(),
            irq: IrqMode::Coalesce { count: 0, usecs: 1 },
        };
        assert!(!handle_request(&plane, bad).ok);
        handle_request(
            &plane,
            Request::Inject {
                data: "0102".into(),
            },
        );
        let resp = handle_request(&plane, Request::Reset {});
        assert_eq!(resp.rx_pending, Some(0));
    }

    #[test]
    fn socket_serves_several_clients_and_is_private() {
        let dir = std::env::temp_dir().join(format!("vdevlab-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let eng = Arc::new(Mutex::new(Engine::new(QwDevice::default())));
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        spawn(path.clone(), eng.clone(), kick).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut a = ControlClient::connect(&path).unwrap();
        let mut b = ControlClient::connect(&path).unwrap();
        assert_eq!(a.inject(b"abc").unwrap(), 3);
        assert_eq!(b.inject(b"de").unwrap(), 2);
        assert_eq!(a.stats().unwrap().rx_pending, Some(5));
        let bad = b.request(&Request::Inject { data: "q".into() }).unwrap();
        assert!(!bad.ok);
        assert_eq!(eng.lock().unwrap().device.rx_pending(), 5);
        std::fs::remove_dir_all(&dir).ok();
    }
}
