//! vdevlab's reference device, "qw": a byte-stream device with a receive
//! queue (device to driver) and a transmit queue (driver to device), written
//! on the device framework [`vdevlab_device_core`] and served as a
//! vhost-user backend. It uses only the framework's public API.
//!
//! - [`device`]: the device ([`device::QwDevice`], a
//!   [`vdevlab_device_core::VirtioDevice`]);
//! - [`config`]: the config space layout;
//! - [`control`]: the control-plane protocol as clients see it;
//! - [`data`]: the data port (the byte stream on a plain Unix socket);
//! - [`spec`]: the numbers of `docs/device-spec.md`.
//!
//! [`irq`], [`faults`] and [`sources`] are the framework's, re-exported for
//! the clients of this crate.
//!
//! The device never knows which VMM or VM it serves.

pub mod config;
pub mod control;
pub mod data;
pub mod device;
pub mod spec;

pub use vdevlab_device_core as core;
pub use vdevlab_device_core::{faults, irq, sources};
