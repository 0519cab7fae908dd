//! The device's config space: what the driver can read about the device.
//! Capabilities live here rather than in feature bits, because Cloud
//! Hypervisor's generic vhost-user frontend never passes device feature
//! bits to the guest. Layout (all little-endian u32, read-only):
//!
//! | offset | field |
//! | --- | --- |
//! | 0x00 | magic, `"QWDV"` |
//! | 0x04 | layout version (1) |
//! | 0x08 | capabilities ([`CAP_RX`] ...) |
//! | 0x0c | receive FIFO size, bytes |
//! | 0x10 | transmit capture size, bytes |
//! | 0x14 | status ([`STATUS_NEEDS_RESET`], [`STATUS_SOURCE_ACTIVE`], [`STATUS_NO_CARRIER`]) |
//! | 0x18 | errors: refused chains + ring faults (saturating) |
//! | 0x1c | drops: injected bytes refused + generator overruns (saturating) |
//! | 0x20 | receive source: 0 host injection, 1 generator, 2 file or pipe |
//! | 0x24 | generator bytes per sample (0 otherwise) |
//! | 0x28 | generator period, microseconds (0 otherwise) |
//! | 0x2c | interrupt modes: bits 0-3 rx, 4-7 tx (0 immediate, 1 coalesce, 2 delay) |

use vdevlab_device_core::config::{le_words, sat_u32 as sat};
use vdevlab_device_core::irq::IrqMode;
use vdevlab_device_core::sources::SourceConfig;
use vdevlab_device_core::{Core, Engine, VirtioDevice};

use crate::qw::Qw;
use crate::spec::{RX_QUEUE, TX_QUEUE};

/// Config space size in bytes.
pub const CONFIG_SIZE: usize = 48;
/// `"QWDV"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"QWDV");
/// Layout version.
pub const VERSION: u32 = 1;

/// The device delivers data to the driver (queue 0).
pub const CAP_RX: u32 = 1 << 0;
/// The device takes data from the driver (queue 1).
pub const CAP_TX: u32 = 1 << 1;
/// Interrupt coalescing and delay can be set by the host.
pub const CAP_IRQ_MODES: u32 = 1 << 2;
/// The device has a periodic generator (sampling sensor) source.
pub const CAP_GENERATOR: u32 = 1 << 3;
/// The status word is live (re-read it after an error).
pub const CAP_STATUS: u32 = 1 << 4;
/// The carrier can change at run time ([`STATUS_NO_CARRIER`]), and every
/// change is signalled with a config-change interrupt.
pub const CAP_CARRIER: u32 = 1 << 5;

/// The device is broken and must be reset by the driver.
pub const STATUS_NEEDS_RESET: u32 = 1 << 0;
/// A generator or file source is feeding the receive FIFO.
pub const STATUS_SOURCE_ACTIVE: u32 = 1 << 1;
/// The carrier is down (host `{"op":"carrier","up":false}`); a change of
/// it comes with a config-change interrupt.
pub const STATUS_NO_CARRIER: u32 = 1 << 2;

fn irq_code(mode: Option<IrqMode>) -> u32 {
    match mode {
        Some(IrqMode::Coalesce { .. }) => 1,
        Some(IrqMode::Delay { .. }) => 2,
        _ => 0,
    }
}

/// The layout above by name, for `vdevlab device ... config`.
pub const FIELDS: &[vdevlab_device_core::config::Field] = {
    use vdevlab_device_core::config::Field;
    &[
        Field::word(0x00, "magic"),
        Field::word(0x04, "version"),
        Field {
            offset: 0x08,
            name: "capabilities",
            bits: &[
                (CAP_RX, "RX"),
                (CAP_TX, "TX"),
                (CAP_IRQ_MODES, "IRQ_MODES"),
                (CAP_GENERATOR, "GENERATOR"),
                (CAP_STATUS, "STATUS"),
                (CAP_CARRIER, "CARRIER"),
            ],
        },
        Field::word(0x0c, "rx_fifo_bytes"),
        Field::word(0x10, "tx_capture_bytes"),
        Field {
            offset: 0x14,
            name: "status",
            bits: &[
                (STATUS_NEEDS_RESET, "NEEDS_RESET"),
                (STATUS_SOURCE_ACTIVE, "SOURCE_ACTIVE"),
                (STATUS_NO_CARRIER, "NO_CARRIER"),
            ],
        },
        Field::word(0x18, "errors"),
        Field::word(0x1c, "drops"),
        Field::word(0x20, "source"),
        Field::word(0x24, "sample_bytes"),
        Field::word(0x28, "period_us"),
        Field::word(0x2c, "irq_modes"),
    ]
};

/// The config space as the driver sees it now: the device's state `qw`, its
/// receive source `source`, and the core's state (needs-reset, error
/// counts, interrupt modes) in `core`.
pub fn render(qw: &Qw, source: &SourceConfig, core: &Core) -> [u8; CONFIG_SIZE] {
    let st = qw.counters();
    let cc = core.counters();
    let mut status = 0;
    if core.needs_reset() {
        status |= STATUS_NEEDS_RESET;
    }
    let (source, gen_bytes, gen_period) = match source {
        SourceConfig::Inject => (0, 0, 0),
        SourceConfig::Generator {
            bytes, period_us, ..
        } => (1, *bytes, sat(*period_us)),
        SourceConfig::File { .. } => (2, 0, 0),
    };
    if source != 0 {
        status |= STATUS_SOURCE_ACTIVE;
    }
    if !qw.carrier() {
        status |= STATUS_NO_CARRIER;
    }
    let words = [
        MAGIC,
        VERSION,
        CAP_RX | CAP_TX | CAP_IRQ_MODES | CAP_GENERATOR | CAP_STATUS | CAP_CARRIER,
        sat(qw.rx_capacity() as u64),
        sat(qw.tx_capacity() as u64),
        status,
        sat(cc.bad_chains + cc.queue_errors),
        sat(st.inject_rejected_bytes + st.overruns),
        source,
        gen_bytes,
        gen_period,
        irq_code(core.irq_mode(RX_QUEUE)) | irq_code(core.irq_mode(TX_QUEUE)) << 4,
    ];
    let mut out = [0u8; CONFIG_SIZE];
    out.copy_from_slice(&le_words(&words));
    out
}

/// Bytes `offset..offset+size` of the config space of `eng` (the qw device
/// on its core, [`crate::device::QwDevice`]); reads past the end return
/// zeros (a frontend may ask for a larger window than the layout).
pub fn read<D: VirtioDevice>(eng: &Engine<D>, offset: u32, size: u32) -> Vec<u8> {
    eng.read_config(offset, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdevlab_device_core::chain::{Direction, QueueSpec};

    fn word(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// A core with qw's two queues.
    fn core() -> Core {
        Core::new(vec![
            QueueSpec::new("rx", 16, Direction::DeviceWrites),
            QueueSpec::new("tx", 16, Direction::DeviceReads),
        ])
    }

    #[test]
    fn layout_reports_identity_capacities_and_state() {
        let mut qw = Qw::new(1000, 2000);
        let mut core = core();
        let b = render(&qw, &SourceConfig::Inject, &core);
        assert_eq!(&b[0..4], b"QWDV");
        assert_eq!(word(&b, 4), 1);
        assert_eq!(word(&b, 0x0c), 1000);
        assert_eq!(word(&b, 0x10), 2000);
        assert_eq!(word(&b, 0x14), 0);
        core.set_needs_reset(true);
        core.set_irq_mode(
            TX_QUEUE,
            IrqMode::Delay {
                usecs: 1,
                jitter_usecs: 0,
                seed: 0,
            },
        )
        .unwrap();
        let source = SourceConfig::Generator {
            bytes: 16,
            period_us: 1000,
            seed: 1,
        };
        qw.inject(&[0u8; 1200]);
        let b = render(&qw, &source, &core);
        assert_eq!(word(&b, 0x14), STATUS_NEEDS_RESET | STATUS_SOURCE_ACTIVE);
        assert_eq!(word(&b, 0x1c), 200, "refused injection counts as drops");
        assert_eq!(
            (word(&b, 0x20), word(&b, 0x24), word(&b, 0x28)),
            (1, 16, 1000)
        );
        assert_eq!(word(&b, 0x2c), 2 << 4);
        assert_ne!(word(&b, 0x08) & CAP_CARRIER, 0);
        qw.set_carrier(false);
        let b = render(&qw, &SourceConfig::Inject, &core);
        assert_eq!(word(&b, 0x14), STATUS_NEEDS_RESET | STATUS_NO_CARRIER);
    }
}
