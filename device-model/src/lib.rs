//! vdevlab's reference device, "qw": a byte-stream device with a receive
//! queue (device to driver) and a transmit queue (driver to device), served
//! as a vhost-user backend.
//!
//! - [`device`]: the device logic, independent of the transport;
//! - [`backend`]: the [`vhost_user_backend::VhostUserBackend`] implementation;
//! - [`config`]: the config space layout;
//! - [`control`]: the host control plane (a Unix socket speaking JSON lines);
//! - [`faults`]: injected faults (lost, spurious interrupts, stalls, damage);
//! - [`irq`]: interrupt policies (immediate, coalesced, delayed);
//! - [`sources`]: receive data sources (generator, file or pipe);
//! - [`spec`]: the numbers of `docs/device-spec.md`.
//!
//! The device never knows which VMM or VM it serves.

pub mod backend;
pub mod config;
pub mod control;
pub mod device;
pub mod faults;
pub mod irq;
pub mod sources;
pub mod spec;
