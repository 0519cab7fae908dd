//! vdevlab's second example device: a sampling sensor (`docs/sensor-spec.md`),
//! written only against the device framework's public API
//! (`vdevlab-device-core`, `docs/device-framework.md`).
//!
//! Its shape differs from the reference qw device on purpose: three queues
//! (samples and alarm events filled on the device's own clock, a
//! request/response control queue), fixed-size records, and a seeded
//! waveform the guest can check sample by sample.
//!
//! - [`ctrl_faults`]: the control queue's injected faults (error statuses,
//!   late and missing answers);
//! - [`device`]: the [`vdevlab_device_core::VirtioDevice`] implementation;
//! - [`sensor`]: the sensor's logic (clock, samples, alarms, commands);
//! - [`wave`]: the seeded waveform;
//! - [`spec`]: the numbers of `docs/sensor-spec.md`.

pub mod ctrl_faults;
pub mod device;
pub mod sensor;
pub mod spec;
pub mod wave;
