//! One module per Linux I/O model. Each has `run(opts, dir)` that opens the
//! device, prints `VDEVLAB-READY`, moves exactly `--bytes` bytes the model's
//! way and returns the fields of the result line (`bytes`, `reads` or
//! `writes`, `sha256`, `head`, then the model's own counters).
//!
//! Every model keeps at most one request in flight per direction (except
//! `posix-aio`'s `lio_listio` step, see there): the device is a byte
//! stream, and two reads in flight at once could complete out of order.
//!
//! The robustness scenarios (`teardown`, `ioctl_stats`, `pm_freeze`,
//! `multi_open`, `needs_reset`, with the driver interface in `qwdev`) have
//! `run(opts) -> Result<Checked, String>`: `Err` when they cannot even
//! start, else every observation and the list of checks that failed.

pub mod blocking;
pub mod echo;
pub mod epoll;
pub mod ioctl_stats;
pub mod linux_aio;
pub mod mixed;
pub mod multi_open;
pub mod needs_reset;
pub mod nonblocking;
pub mod pm_freeze;
pub mod poll;
pub mod posix_aio;
pub mod qwdev;
pub mod select;
pub mod sensor;
pub mod sigio;
pub mod teardown;
pub mod uring;
