//! Helpers shared by the integration tests. Every test boots through
//! `vdevlab_lab` (the same harness as the `vdevlab` command), so a test
//! failure reproduces with the CLI.

use vdevlab_lab::scenario::Outcome;
use vdevlab_lab::Lab;

/// The provisioned lab with its artifacts; panics with the reason (what to
/// install or fix) when the lab cannot be set up.
pub fn lab() -> Lab {
    match Lab::get() {
        Ok(lab) => lab,
        Err(e) => panic!("the lab could not be set up: {e:#}"),
    }
}

/// Fail the test with the record's reason and console when the run failed.
pub fn assert_passed(out: &Outcome) {
    assert!(
        out.passed(),
        "{} failed: {}\nconsole: {}",
        out.record.scenario,
        out.record.reason.as_deref().unwrap_or("(no reason)"),
        out.record
            .console
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
}

/// The `vdevlab` command of this checkout (built on first use), for tests
/// that drive the CLI as a user would.
pub fn vdevlab_command() -> std::process::Command {
    use std::sync::OnceLock;
    static BIN: OnceLock<std::path::PathBuf> = OnceLock::new();
    let bin = BIN.get_or_init(|| {
        let status =
            std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
                .current_dir(vdevlab_lab::env::workspace_root())
                .args(["build", "--quiet", "-p", "vdevlab", "--bin", "vdevlab"])
                .status()
                .expect("running cargo build -p vdevlab");
        assert!(status.success(), "cargo build -p vdevlab failed");
        vdevlab_lab::env::target_dir().join("debug/vdevlab")
    });
    let mut cmd = std::process::Command::new(bin);
    cmd.current_dir(vdevlab_lab::env::workspace_root());
    cmd
}
