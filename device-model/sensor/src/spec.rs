//! Numbers from `docs/sensor-spec.md`, the contract that this backend and
//! the guest driver (`guest-driver/sensor/`) both follow. Change them there
//! first.

/// Default virtio device id: 10, reserved by the virtio specification
/// ("mac80211 wlan") but never specified, with no Linux driver and no other
/// device model, and named by QEMU (ids it cannot name abort
/// `vhost-user-test-device-pci`). The VMM configuration and the driver's
/// `virtio_id` parameter can both change it.
pub const DEFAULT_VIRTIO_ID: u16 = 10;

/// Queue 0: sample buffers, device to driver.
pub const SAMPLES_QUEUE: u16 = 0;
/// Queue 1: alarm events, device to driver.
pub const EVENTS_QUEUE: u16 = 1;
/// Queue 2: control requests and their status.
pub const CTRL_QUEUE: u16 = 2;
/// Number of queues.
pub const NUM_QUEUES: usize = 3;
/// Largest queue size the device accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Bytes of one sample record.
pub const SAMPLE_BYTES: usize = 16;
/// Bytes of one alarm record.
pub const ALARM_BYTES: usize = 24;
/// Bytes of a control request.
pub const CTRL_REQ_BYTES: usize = 16;
/// Bytes of a control status.
pub const CTRL_STATUS_BYTES: usize = 8;
/// Longest control chain accepted (a request is 16 bytes, a status 8).
pub const MAX_CTRL_CHAIN_BYTES: u64 = 4096;

/// `SET_RATE`: `arg0` = Hz (0 stops).
pub const CMD_SET_RATE: u32 = 1;
/// `SET_THRESHOLD`: `arg0` = threshold (i32), `arg1` = mode.
pub const CMD_SET_THRESHOLD: u32 = 2;

/// Status: done.
pub const STATUS_OK: u32 = 0;
/// Status: an argument is out of range.
pub const STATUS_INVALID: u32 = 1;
/// Status: unknown command.
pub const STATUS_UNSUPPORTED: u32 = 2;
/// Status: short request or non-zero reserved field.
pub const STATUS_MALFORMED: u32 = 3;

/// Alarm kind and mode bit: rising crossing.
pub const ALARM_RISING: u32 = 1;
/// Alarm kind and mode bit: falling crossing.
pub const ALARM_FALLING: u32 = 2;

/// Highest rate the device samples at.
pub const MAX_RATE_HZ: u32 = 10_000;
/// Samples the device holds for the driver.
pub const SAMPLE_FIFO: usize = 256;
/// Alarms the device holds for the driver.
pub const ALARM_FIFO: usize = 64;
/// Longest period of the device's timer: above 1 kHz samples come in
/// batches.
pub const MAX_TICK_NS: u64 = 1_000_000;

/// Config space size in bytes (QEMU's `config_size`).
pub const CONFIG_SIZE: usize = 64;
/// Config magic, `"SNSR"`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"SNSR");
/// Config layout version.
pub const VERSION: u32 = 1;
/// Config status bit: the device needs a reset.
pub const STATUS_NEEDS_RESET: u32 = 1 << 0;
/// Config status bit: sampling (rate > 0).
pub const STATUS_SAMPLING: u32 = 1 << 1;
/// Config status bits 16-31: alarms raised since the last reset, modulo
/// 65536 (dropped ones included). A change of them comes with a
/// config-change interrupt (docs/sensor-spec.md, "Alarms, two ways").
pub const STATUS_ALARM_COUNT_SHIFT: u32 = 16;

/// The config layout of `docs/sensor-spec.md` by name, for `vdevlab device
/// ... config`.
pub const CONFIG_FIELDS: &[vdevlab_device_core::config::Field] = {
    use vdevlab_device_core::config::Field;
    &[
        Field::word(0x00, "magic"),
        Field::word(0x04, "version"),
        Field::word(0x08, "sample_bytes"),
        Field::word(0x0c, "alarm_bytes"),
        Field::word(0x10, "max_rate_hz"),
        Field::word(0x14, "rate_hz"),
        Field::word(0x18, "threshold"),
        Field::word(0x1c, "alarm_mode"),
        Field::word(0x20, "seed_lo"),
        Field::word(0x24, "seed_hi"),
        Field::word(0x28, "amplitude"),
        Field::word(0x2c, "wave_period"),
        Field::word(0x30, "noise"),
        Field {
            offset: 0x34,
            name: "status",
            bits: &[
                (STATUS_NEEDS_RESET, "NEEDS_RESET"),
                (STATUS_SAMPLING, "SAMPLING"),
            ],
        },
        Field::word(0x38, "samples_dropped"),
        Field::word(0x3c, "alarms_dropped"),
    ]
};

/// Largest amplitude.
pub const MAX_AMPLITUDE: u32 = 1_000_000;
/// Shortest and longest waveform period, in samples.
pub const WAVE_PERIOD_RANGE: std::ops::RangeInclusive<u32> = 4..=65536;
