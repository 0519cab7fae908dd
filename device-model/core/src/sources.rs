//! Data sources: where the bytes a device delivers to the driver come from,
//! besides host injection. A device keeps a [`Source`], pumps it from its
//! timer ([`crate::VirtioDevice::tick`], period [`SourceConfig::tick`]) into
//! whatever implements [`Sink`] (a FIFO, a sample buffer).
//!
//! - a **generator**: `bytes` bytes every `period_us` microseconds, like a
//!   sensor sampling at a fixed rate. Samples that find the receive FIFO
//!   full are dropped and counted (an overrun, as real hardware would).
//! - a **file or pipe**: read at up to `rate_bytes_per_sec` (or as fast as
//!   the FIFO drains), never more than the FIFO has room for, so nothing is
//!   lost. End of file ends the source.
//!
//! Both are pumped by the device's timer on the control-plane thread; the
//! pump only touches the sink, and the core then kicks the vhost-user worker.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a source puts its bytes.
pub trait Sink {
    /// Bytes the sink can take now.
    fn room(&self) -> usize;
    /// Take `data` (at most [`Sink::room`] bytes are offered); returns how
    /// many were taken.
    fn push(&mut self, data: &[u8]) -> usize;
}

/// What one pump did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pumped {
    /// Bytes put into the sink.
    pub bytes: usize,
    /// A generator sample was lost because the sink was full.
    pub overrun: bool,
}

/// The pattern stream: xorshift64* from a seed, 8 bytes per step, little
/// endian. Identical to `vdevlab_guest::pattern`, so a guest program can
/// check generator data byte for byte.
#[derive(Debug, Clone)]
pub struct PatternStream {
    state: u64,
    spare: Vec<u8>,
}

impl PatternStream {
    /// A stream starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed | 1,
            spare: Vec::new(),
        }
    }

    /// The next `n` bytes of the stream.
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.spare);
        while out.len() < n {
            let x = &mut self.state;
            *x ^= *x >> 12;
            *x ^= *x << 25;
            *x ^= *x >> 27;
            out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        self.spare = out.split_off(n);
        out
    }
}

/// A receive source, as set through the control plane.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Only what the host injects (the default).
    #[default]
    Inject,
    /// `bytes` bytes every `period_us` microseconds of the seeded pattern.
    Generator {
        /// Bytes per sample.
        bytes: u32,
        /// Sampling period in microseconds.
        period_us: u64,
        /// Pattern seed.
        #[serde(default)]
        seed: u64,
    },
    /// A file or pipe on the host.
    File {
        /// Its path.
        path: PathBuf,
        /// Rate limit in bytes per second (absent: as fast as the FIFO drains).
        #[serde(default)]
        rate_bytes_per_sec: Option<u64>,
    },
}

/// Longest generator sample and shortest period accepted.
const MAX_SAMPLE_BYTES: u32 = 1 << 20;
const MIN_PERIOD_US: u64 = 10;
/// How often a file source is pumped.
const FILE_TICK: Duration = Duration::from_millis(1);

impl SourceConfig {
    /// The timer period this source needs (None: no timer).
    pub fn tick(&self) -> Option<Duration> {
        match self {
            SourceConfig::Inject => None,
            SourceConfig::Generator { period_us, .. } => Some(Duration::from_micros(*period_us)),
            SourceConfig::File { .. } => Some(FILE_TICK),
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            SourceConfig::Generator {
                bytes, period_us, ..
            } => {
                if *bytes == 0 || *bytes > MAX_SAMPLE_BYTES {
                    return Err(format!(
                        "generator: bytes must be 1..={MAX_SAMPLE_BYTES}, not {bytes}"
                    ));
                }
                if *period_us < MIN_PERIOD_US {
                    return Err(format!(
                        "generator: period_us must be at least {MIN_PERIOD_US}, not {period_us}"
                    ));
                }
                Ok(())
            }
            SourceConfig::File {
                rate_bytes_per_sec: Some(0),
                ..
            } => Err("file: rate_bytes_per_sec must be at least 1 (or absent)".into()),
            _ => Ok(()),
        }
    }
}

/// The running source.
#[derive(Debug, Default)]
pub struct Source {
    config: SourceConfig,
    pattern: Option<PatternStream>,
    file: Option<File>,
    /// Bytes allowed but not yet read (file rate limiting).
    credit: u64,
    /// Generator samples dropped because the FIFO was full.
    pub overruns: u64,
    /// Bytes this source put into the FIFO.
    pub produced: u64,
}

impl Source {
    /// Switch to `config`. Opens a file source (non-blocking, so a pipe with
    /// no writer cannot stall the control plane).
    pub fn set(&mut self, config: SourceConfig) -> Result<(), String> {
        config.validate()?;
        let mut next = Source {
            config: config.clone(),
            ..Source::default()
        };
        match &config {
            SourceConfig::Inject => {}
            SourceConfig::Generator { seed, .. } => next.pattern = Some(PatternStream::new(*seed)),
            SourceConfig::File { path, .. } => {
                let f = File::open(path)
                    .map_err(|e| format!("file: cannot open {}: {e}", path.display()))?;
                set_nonblocking(&f).map_err(|e| format!("file: {e}"))?;
                next.file = Some(f);
            }
        }
        *self = next;
        Ok(())
    }

    /// The current configuration.
    pub fn config(&self) -> &SourceConfig {
        &self.config
    }

    /// One timer tick: move data into `sink`.
    pub fn pump(&mut self, sink: &mut dyn Sink) -> Pumped {
        match self.config.clone() {
            SourceConfig::Inject => Pumped::default(),
            SourceConfig::Generator { bytes, .. } => {
                let sample = self
                    .pattern
                    .get_or_insert_with(|| PatternStream::new(0))
                    .take(bytes as usize);
                if sink.room() < sample.len() {
                    // A sensor does not wait for its reader: the sample is
                    // lost, and counted, rather than queued without bound.
                    self.overruns += 1;
                    return Pumped {
                        bytes: 0,
                        overrun: true,
                    };
                }
                let n = sink.push(&sample);
                self.produced += n as u64;
                Pumped {
                    bytes: n,
                    overrun: false,
                }
            }
            SourceConfig::File {
                rate_bytes_per_sec, ..
            } => {
                let allowed = match rate_bytes_per_sec {
                    Some(rate) => {
                        self.credit = (self.credit
                            + rate * FILE_TICK.as_micros() as u64 / 1_000_000)
                            .min(rate.max(1));
                        self.credit as usize
                    }
                    None => usize::MAX,
                };
                let want = sink.room().min(allowed).min(256 * 1024);
                if want == 0 {
                    return Pumped::default();
                }
                let Some(f) = self.file.as_mut() else {
                    return Pumped::default();
                };
                let mut buf = vec![0u8; want];
                match f.read(&mut buf) {
                    Ok(0) => {
                        // End of file: the source is done.
                        tracing::info!(produced = self.produced, "file source reached its end");
                        self.config = SourceConfig::Inject;
                        self.file = None;
                        Pumped::default()
                    }
                    Ok(n) => {
                        let n = sink.push(&buf[..n]);
                        self.produced += n as u64;
                        self.credit = self.credit.saturating_sub(n as u64);
                        Pumped {
                            bytes: n,
                            overrun: false,
                        }
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        Pumped::default()
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "file source read failed; source stopped");
                        self.config = SourceConfig::Inject;
                        self.file = None;
                        Pumped::default()
                    }
                }
            }
        }
    }
}

fn set_nonblocking(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor owned by `f`, reading its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above, adding O_NONBLOCK to the flags just read.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bounded FIFO, as a device would keep.
    struct Fifo {
        data: Vec<u8>,
        cap: usize,
    }

    impl Sink for Fifo {
        fn room(&self) -> usize {
            self.cap - self.data.len()
        }
        fn push(&mut self, data: &[u8]) -> usize {
            let n = data.len().min(self.room());
            self.data.extend_from_slice(&data[..n]);
            n
        }
    }

    impl Fifo {
        fn new(cap: usize) -> Self {
            Self {
                data: Vec::new(),
                cap,
            }
        }
        fn take(&mut self, n: usize) -> Vec<u8> {
            let n = n.min(self.data.len());
            self.data.drain(..n).collect()
        }
    }

    #[test]
    fn pattern_stream_is_chunking_independent() {
        let whole = PatternStream::new(7).take(1000);
        let mut s = PatternStream::new(7);
        let mut parts = Vec::new();
        for n in [1, 7, 8, 9, 100, 875] {
            parts.extend(s.take(n));
        }
        assert_eq!(parts, whole);
        // Pinned: the guest programs' pattern() gives the same first bytes.
        assert_eq!(
            PatternStream::new(0).take(8),
            [0x1d, 0xdd, 0x6c, 0x89, 0x4b, 0xce, 0xe4, 0x47]
        );
    }

    #[test]
    fn generator_fills_then_overruns() {
        let mut dev = Fifo::new(10);
        let mut src = Source::default();
        src.set(SourceConfig::Generator {
            bytes: 4,
            period_us: 100,
            seed: 3,
        })
        .unwrap();
        assert_eq!(src.pump(&mut dev).bytes, 4);
        assert_eq!(src.pump(&mut dev).bytes, 4);
        let p = src.pump(&mut dev);
        assert!(p.overrun && p.bytes == 0, "only 2 bytes of room left");
        assert_eq!(src.overruns, 1);
        assert_eq!(dev.data.len(), 8);
    }

    #[test]
    fn file_source_respects_room_and_ends() {
        let dir = std::env::temp_dir().join(format!("vdevlab-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data");
        std::fs::write(&path, b"0123456789").unwrap();
        let mut dev = Fifo::new(4);
        let mut src = Source::default();
        src.set(SourceConfig::File {
            path: path.clone(),
            rate_bytes_per_sec: None,
        })
        .unwrap();
        assert_eq!(src.pump(&mut dev).bytes, 4);
        assert_eq!(
            src.pump(&mut dev),
            Pumped::default(),
            "no room: nothing read, nothing lost"
        );
        let mut got = dev.take(4);
        for _ in 0..10 {
            src.pump(&mut dev);
            got.extend(dev.take(4));
        }
        assert_eq!(
            src.config(),
            &SourceConfig::Inject,
            "end of file ends the source"
        );
        assert_eq!(got, b"0123456789");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_sources_are_explained() {
        let mut src = Source::default();
        assert!(src
            .set(SourceConfig::Generator {
                bytes: 0,
                period_us: 100,
                seed: 0
            })
            .unwrap_err()
            .contains("bytes"));
        assert!(src
            .set(SourceConfig::Generator {
                bytes: 1,
                period_us: 1,
                seed: 0
            })
            .unwrap_err()
            .contains("period_us"));
        assert!(src
            .set(SourceConfig::File {
                path: "/nonexistent/x".into(),
                rate_bytes_per_sec: None
            })
            .unwrap_err()
            .contains("cannot open"));
    }
}
