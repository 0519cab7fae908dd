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
