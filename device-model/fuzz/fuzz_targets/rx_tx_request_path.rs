//! Fuzz target: the qw device's request path under a hostile driver.
//!
//! The input format, the driver model and the invariants live in the
//! `vdevlab_device_fuzz` library (`src/lib.rs`); see `README.md`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vdevlab_device_fuzz::run(data);
});
