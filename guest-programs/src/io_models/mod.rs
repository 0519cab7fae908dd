//! One module per Linux I/O model. Each has `run(opts, dir)` (or `rx`/`tx`)
//! that opens the device, prints `VDEVLAB-READY`, moves exactly `--bytes`
//! bytes the model's way and returns the fields of the result line
//! (`bytes`, `reads` or `writes`, `sha256`, `head`, then the model's own
//! counters).
//!
//! Every model keeps at most one request in flight per direction (except
//! `posix-aio`'s `lio_listio` step, see there): the device is a byte
//! stream, and two reads in flight at once could complete out of order.
//!
//! | module | scenarios |
//! | --- | --- |
//! | [`blocking`] | `blocking-rx`, `blocking-tx` |
//! | [`nonblocking`] | `nonblocking-rx`, `nonblocking-tx` |
//! | [`select`] | `select-rx`, `select-tx` |
//! | [`poll`] | `poll-rx`, `poll-tx` |
//! | [`epoll`] | `epoll-lt-*`, `epoll-et-*` |
//! | [`sigio`] | `sigio-rx`, `sigio-tx` |
//! | [`posix_aio`] | `posix-aio-rx`, `posix-aio-tx` |
//! | [`linux_aio`] | `linux-aio-rx`, `linux-aio-tx` (native AIO, ABI in [`crate::uapi::aio_abi`]) |
//! | [`uring`] | `io-uring-rx`, `io-uring-tx` |
//! | [`mixed`] | `mixed`: a blocking reader and writer at once |
//!
//! The other programs (robustness, sensor and echo scenarios) are in
//! [`crate::scenarios`].

pub mod blocking;
pub mod epoll;
pub mod linux_aio;
pub mod mixed;
pub mod nonblocking;
pub mod poll;
pub mod posix_aio;
pub mod select;
pub mod sigio;
pub mod uring;
