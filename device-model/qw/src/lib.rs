//! vdevlab's reference device, "qw": a byte-stream device with a receive
//! queue (device to driver) and a transmit queue (driver to device), written
//! on the device framework [`vdevlab_device_core`] and served as a
//! vhost-user backend. It uses only the framework's public API.
//!
//! Its layers, each using only those before it (the sensor crate has the
//! same shape):
//!
//! - [`spec`]: the numbers of `docs/device-spec.md`;
//! - [`qw`]: the device's state and logic ([`qw::Qw`]: the receive FIFO,
//!   the transmit capture, the counters), free of the framework;
//! - [`config`]: the config space layout, rendered from the state and the
//!   core's;
//! - [`data`]: the data port (the byte stream on a plain Unix socket);
//! - [`control`]: the control-plane protocol as clients see it, and the
//!   counters a `stats` reply carries ([`control::Stats`]);
//! - [`device`]: the [`vdevlab_device_core::VirtioDevice`] glue
//!   ([`device::QwDevice`]): queues, chains, control requests, timer and
//!   data port mapped onto the state.
//!
//! [`irq`], [`faults`] and [`sources`] are the framework's, re-exported for
//! the clients of this crate.
//!
//! The device never knows which VMM or VM it serves.

pub mod config;
pub mod control;
pub mod data;
pub mod device;
pub mod qw;
pub mod spec;

pub use vdevlab_device_core as core;
pub use vdevlab_device_core::{faults, irq, sources};
