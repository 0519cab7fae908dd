//! vdevlab's device framework: the generic half of a vhost-user device model.
//!
//! A device implements [`VirtioDevice`] (its queues, config space, how it
//! handles a descriptor chain, reset, its own control requests and
//! counters); the core does the rest:
//!
//! - [`backend`]: the [`vhost_user_backend::VhostUserBackend`] transport;
//! - [`chain`]: queue helpers: every chain validated before a device sees it;
//! - [`state`]: the device's generic state ([`Core`], [`CoreCounters`]);
//! - [`device`]: the trait a device implements ([`VirtioDevice`]);
//! - [`engine`]: a device and its core ([`Engine`]), and the pass over a
//!   queue ([`Engine::process`]);
//! - [`irq`]: interrupt policies (immediate, coalesced, delayed);
//! - [`control`]: the host control plane (a Unix socket speaking JSON lines);
//! - [`faults`]: injected faults (lost and spurious interrupts, storms,
//!   stalls, slowness, damaged data);
//! - [`hostile`]: hostile-device mode (virtio contract violations);
//! - [`sources`]: data sources (a seeded generator, a file or pipe);
//! - [`config`]: config-space helpers;
//! - [`config_change`]: config-change interrupts (the backend channel, the
//!   sender thread, the config-change faults);
//! - [`relay`]: the relay between the VMM and the vhost-user daemon that
//!   gives the core its handle on the backend channel;
//! - [`daemon`]: the daemon's flags and main loop;
//! - [`sockpath`]: the Unix socket path limit, checked with an error that
//!   names the fix;
//! - [`trace`]: the device trace (a bounded ring of timestamped events).
//!
//! A device never knows which VMM or VM it serves. See
//! `docs/device-framework.md` for how to write one.

pub mod backend;
pub mod chain;
pub mod config;
pub mod config_change;
pub mod control;
pub mod daemon;
pub mod device;
pub mod engine;
pub mod faults;
pub mod hostile;
pub mod irq;
pub mod relay;
pub mod sockpath;
pub mod sources;
pub mod state;
#[cfg(test)]
mod testing;
pub mod trace;

pub use chain::{Chain, ChainError, Direction, QueueError, QueueSpec};
pub use config_change::{ConfigChangeError, Delivery};
pub use device::{to_fields, Fields, Outcome, VirtioDevice};
pub use engine::{Engine, Pass, MAX_PASS_ROUNDS};
pub use state::{Core, CoreCounters};
