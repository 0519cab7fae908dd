//! `vdevlab doctor`: what this host can run, and for each thing it cannot,
//! why and the fix. It checks, without provisioning or booting anything:
//! the host (x86_64, root or the user-namespace prerequisites of rootless
//! mode, mmdebstrap and Debian's keyring), the provisioned lab, KVM and
//! Cloud Hypervisor, then says which cells of the matrix (VMM and
//! accelerator) can run here.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cell::Cell;
use crate::env::{cache_dir, cloud_hypervisor_status, kvm_status, LabEnv};

/// One finding.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked ("user namespaces", "KVM", ...).
    pub what: String,
    /// Whether it is fine.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do when it is not fine.
    pub fix: Option<String>,
}

impl Check {
    fn ok(what: &str, detail: impl Into<String>) -> Check {
        Check {
            what: what.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(what: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            what: what.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// A cell of the matrix and whether it can run here.
#[derive(Debug, Clone)]
pub struct CellStatus {
    /// The cell.
    pub cell: Cell,
    /// `None`: it runs; else why not.
    pub blocked_by: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct Report {
    /// Host, lab, KVM and VMM findings, in that order.
    pub checks: Vec<Check>,
    /// The cells.
    pub cells: Vec<CellStatus>,
}

/// Look at this host.
pub fn examine() -> Report {
    let mut checks = host_checks();
    let host_ok = checks.iter().all(|c| c.ok);
    let cache = cache_dir();
    let lab = LabEnv::load(&cache);
    checks.push(match &lab {
        Ok(env) => Check::ok(
            "provisioned lab",
            format!(
                "{} (kernels: {}; {})",
                cache.display(),
                env.kernel_names().join(", "),
                env.qemu_version
            ),
        ),
        Err(_) => Check::bad(
            "provisioned lab",
            format!("nothing provisioned in {} yet", cache.display()),
            "./vdevlab demo (or images/provision.sh) provisions it, about a quarter of an hour once",
        ),
    });
    let kvm = kvm_status();
    checks.push(match &kvm {
        Ok(()) => Check::ok("KVM", "/dev/kvm opens and is not PVM"),
        Err(p) => Check::bad("KVM", p.to_string(), p.fix()),
    });
    let ch = cloud_hypervisor_status();
    checks.push(match &ch {
        Ok((bin, line)) => Check::ok("Cloud Hypervisor", format!("{line} ({})", bin.display())),
        Err(p) => Check::bad("Cloud Hypervisor", p.to_string(), p.fix()),
    });

    let tcg = match (&lab, host_ok) {
        (Ok(_), _) => None,
        (Err(_), true) => Some("the lab is not provisioned yet (the first run does it)".into()),
        (Err(_), false) => {
            Some("the host checks above fail, so the lab cannot be provisioned".into())
        }
    };
    // The host's findings for each cell, behind the lab's own.
    let cells = Cell::ALL
        .into_iter()
        .map(|cell| CellStatus {
            cell,
            blocked_by: cell.blocked_by().or(tcg.clone()),
        })
        .collect();
    Report { checks, cells }
}

/// x86_64, then root or rootless mode's prerequisites, mmdebstrap and
/// Debian's keyring.
fn host_checks() -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(if std::env::consts::ARCH == "x86_64" {
        Check::ok("x86_64 host", "yes")
    } else {
        Check::bad(
            "x86_64 host",
            std::env::consts::ARCH,
            "the lab's guests and Debian roots are x86_64: use an x86_64 machine",
        )
    });
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        checks.push(Check::ok(
            "privileges",
            "root: the lab uses chroot and mount namespaces directly",
        ));
    } else {
        checks.extend(rootless_checks(uid));
    }
    checks.push(match find_program("mmdebstrap") {
        Some(p) => Check::ok("mmdebstrap", p.display().to_string()),
        None => Check::bad(
            "mmdebstrap",
            "not on PATH",
            "install it (Debian/Ubuntu: apt-get install mmdebstrap; Fedora: dnf install mmdebstrap; Arch: mmdebstrap from the AUR); the README lists every host prerequisite",
        ),
    });
    let keyrings = [
        "/usr/share/keyrings/debian-archive-keyring.gpg",
        "/usr/share/keyrings/debian-archive-keyring.pgp",
        "/usr/share/distribution-gpg-keys/debian",
    ];
    checks.push(match keyrings.iter().find(|k| Path::new(k).exists()) {
        Some(k) => Check::ok("Debian archive keyring", *k),
        None => Check::bad(
            "Debian archive keyring",
            "not found",
            "install debian-archive-keyring (Fedora: debian-keyring)",
        ),
    });
    checks
}

/// As an ordinary user: a user namespace, newuidmap and subordinate ids
/// (mmdebstrap --mode=unshare).
fn rootless_checks(uid: u32) -> Vec<Check> {
    let mut checks = Vec::new();
    let userns = Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .output();
    checks.push(match userns {
        Ok(o) if o.status.success() => Check::ok("user namespaces", "this user can make one (rootless mode)"),
        Ok(o) => Check::bad(
            "user namespaces",
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
            "allow unprivileged user namespaces: sysctl user.max_user_namespaces=10000; on older Debian kernels kernel.unprivileged_userns_clone=1; on Ubuntu 24.04+ kernel.apparmor_restrict_unprivileged_userns=0",
        ),
        Err(e) => Check::bad(
            "user namespaces",
            format!("cannot run unshare: {e}"),
            "install util-linux",
        ),
    });
    checks.push(match find_program("newuidmap") {
        Some(p) => Check::ok("newuidmap", p.display().to_string()),
        None => Check::bad(
            "newuidmap",
            "not found",
            "install uidmap (Debian/Ubuntu), shadow-utils (Fedora) or shadow (Arch)",
        ),
    });
    let name = user_name(uid).unwrap_or_else(|| uid.to_string());
    for file in ["/etc/subuid", "/etc/subgid"] {
        let listed = std::fs::read_to_string(file).is_ok_and(|t| {
            t.lines().any(|l| {
                let owner = l.split(':').next().unwrap_or("");
                owner == name || owner == uid.to_string()
            })
        });
        checks.push(if listed {
            Check::ok(file, format!("{name} has a range"))
        } else {
            Check::bad(
                file,
                format!("no range for {name}"),
                format!(
                    "sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}"
                ),
            )
        });
    }
    checks
}

/// The login name of `uid`, from /etc/passwd.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
    })
}

/// `name` on PATH, or in the sbin folders an ordinary user's PATH lacks.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failed_check_names_a_fix_and_cells_say_why() {
        let report = examine();
        assert!(report.checks.iter().any(|c| c.what == "KVM"));
        for c in &report.checks {
            assert_eq!(c.ok, c.fix.is_none(), "{c:?}");
            assert!(!c.detail.contains('\n'), "{c:?}");
        }
        assert_eq!(
            report
                .cells
                .iter()
                .map(|c| c.cell.name())
                .collect::<Vec<_>>(),
            [
                "qemu-tcg",
                "qemu-kvm",
                "cloud-hypervisor-kvm",
                "qemu-tcg-smp",
                "qemu-kvm-smp",
                "cloud-hypervisor-kvm-smp"
            ]
        );
        // Cloud Hypervisor needs KVM: it cannot run where QEMU/KVM cannot.
        if report.cells[1].blocked_by.is_some() {
            assert!(report.cells[2].blocked_by.is_some());
        }
    }
}
