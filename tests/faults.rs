//! The fast subset of the fault-injection campaign (`faults/*.toml` with
//! `fast = true`), on every change: the shipped driver must hold up with no
//! kernel splat. The full campaign: `./vdevlab faults`.

use vdevlab_lab::campaign;
use vdevlab_lab::cell::Cell;
use vdevlab_tests::lab;

/// The fast subset on the default kernel, in one cell.
fn fast_fault_campaign(cell: Cell) {
    let lab = lab();
    let kernel = lab.env.default_kernel().clone();
    let fast: Vec<_> = campaign::shipped()
        .expect("the shipped scenarios load")
        .into_iter()
        .filter(|s| s.fast)
        .collect();
    assert!(fast.len() >= 4, "the fast subset shrank to {}", fast.len());
    let verdicts = campaign::run(&lab, &kernel, cell, &fast).expect("the campaign could run");
    eprintln!("{}", campaign::table(&verdicts));
    let failed: Vec<_> = verdicts.iter().filter(|v| !v.pass).collect();
    assert!(
        failed.is_empty(),
        "fault scenarios failed:\n{}",
        campaign::table(&verdicts)
    );
}

vdevlab_tests::cell_tests!(fast_fault_campaign);
