//! Where a run's Unix sockets live: a short private folder, never the run
//! folder.
//!
//! A socket path holds at most 107 bytes
//! ([`vdevlab_device_core::sockpath::MAX_SOCKET_PATH`]), and the run folder
//! (`<target>/lab-runs/<scenario>-<stamp>-<pid>/`) is as deep as the
//! checkout or `CARGO_TARGET_DIR`. So each run gets a folder of its own
//! under `$XDG_RUNTIME_DIR/vdevlab/` (or `<temp>/vdevlab-<uid>/` where
//! there is no runtime folder), mode 0700, removed when the run ends; the
//! run folder keeps a symbolic link to each socket (`vu.sock` and so on),
//! so it stays the one place to look. Connect through the real path
//! ([`SocketDir::path`]): a link's own path may be too long to connect by.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};
use vdevlab_device_core::sockpath::MAX_SOCKET_PATH;

/// The longest socket name the harness puts in a run's folder
/// (`bench.sock`, `data15.sock`): what must fit after the folder's path.
const LONGEST_NAME: usize = "data99.sock".len();

/// A run's private socket folder; removed (with what is in it) on drop.
#[derive(Debug)]
pub struct SocketDir {
    path: PathBuf,
}

impl SocketDir {
    /// Make a new, empty socket folder for one run.
    pub fn create() -> Result<SocketDir> {
        let base = base_dir()?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        for _ in 0..1000 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{:x}-{n}", std::process::id()));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(SocketDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            }
        }
        bail!("no free socket folder name under {}", base.display())
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket `name` in this folder.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Put a link `run_dir/name` to the socket `name`, so the run folder
    /// shows where its sockets are (replacing an old link).
    pub fn link_into(&self, run_dir: &Path, name: &str) -> Result<()> {
        let link = run_dir.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(self.socket(name), &link)
            .with_context(|| format!("linking {}", link.display()))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The folder that holds the runs' socket folders, made (mode 0700) if
/// needed: `$XDG_RUNTIME_DIR/vdevlab`, else `<temp>/vdevlab-<uid>`, else
/// `/tmp/vdevlab-<uid>` when those are too deep for a socket path.
fn base_dir() -> Result<PathBuf> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut candidates = Vec::new();
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        if xdg.is_absolute() && xdg.is_dir() {
            candidates.push(xdg.join("vdevlab"));
        }
    }
    candidates.push(std::env::temp_dir().join(format!("vdevlab-{uid}")));
    candidates.push(PathBuf::from(format!("/tmp/vdevlab-{uid}")));
    let mut why = Vec::new();
    for base in candidates {
        // "<base>/<pid in hex>-<n>/<name>": leave room for the run's part.
        let room = base.as_os_str().len() + 1 + 16 + 1 + LONGEST_NAME;
        if room > MAX_SOCKET_PATH {
            why.push(format!("{} is too deep for socket paths", base.display()));
            continue;
        }
        match private_dir(&base, uid) {
            Ok(()) => return Ok(base),
            Err(e) => why.push(format!("{e:#}")),
        }
    }
    bail!(
        "no folder for the run's sockets: {}; set XDG_RUNTIME_DIR to a short private folder",
        why.join("; ")
    )
}

/// Make `dir` if missing, and check that it is a real folder of ours that
/// nobody else can enter (a shared temp folder could hold someone else's).
fn private_dir(dir: &Path, uid: u32) -> Result<()> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let meta = fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    if meta.uid() != uid {
        bail!(
            "{} belongs to uid {}, not to this user ({uid})",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_folders_are_short_private_and_go_away() {
        let a = SocketDir::create().unwrap();
        let b = SocketDir::create().unwrap();
        assert_ne!(a.path(), b.path());
        for d in [&a, &b] {
            let meta = fs::metadata(d.path()).unwrap();
            assert_eq!(meta.mode() & 0o777, 0o700);
            assert!(d.socket("data99.sock").as_os_str().len() <= MAX_SOCKET_PATH);
        }
        let run = std::env::temp_dir().join(format!("vdevlab-link-test-{}", std::process::id()));
        fs::create_dir_all(&run).unwrap();
        a.link_into(&run, "vu.sock").unwrap();
        assert_eq!(
            fs::read_link(run.join("vu.sock")).unwrap(),
            a.socket("vu.sock")
        );
        let gone = a.path().to_path_buf();
        drop(a);
        assert!(!gone.exists());
        fs::remove_dir_all(&run).unwrap();
    }
}
