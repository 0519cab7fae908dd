//! `vdevlab-device`: the qw backend's name before it was `vdevlab-qw`
//! (the package is named after its folder, `device-model/qw`). Kept for a
//! release so that users' scripts go on working: it says so once, then
//! runs `vdevlab-qw` from its own folder with the same arguments.

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vdevlab-device: cannot find its own path: {e}");
            return ExitCode::FAILURE;
        }
    };
    let new = me.with_file_name("vdevlab-qw");
    eprintln!(
        "vdevlab-device is now vdevlab-qw (this name goes away in the next release); running {}",
        new.display()
    );
    let err = Command::new(&new).args(std::env::args_os().skip(1)).exec();
    eprintln!(
        "vdevlab-device: could not run {}: {err} (build it with `cargo build -p vdevlab-qw`)",
        new.display()
    );
    ExitCode::FAILURE
}
