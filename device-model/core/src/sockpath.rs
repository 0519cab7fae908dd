//! Unix socket paths: the kernel's limit, checked before `bind` or
//! `connect`, with an error that says what to do about it.
//!
//! `sun_path` holds 108 bytes with the terminating NUL, so a path of 108
//! bytes or more cannot be bound. The standard library's own error ("path
//! must be shorter than SUN_LEN") names neither the path nor a fix.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The longest socket path, in bytes, that `bind` and `connect` accept.
pub const MAX_SOCKET_PATH: usize = 107;

/// Check that `path` fits in `sun_path`. `what` names the socket in the
/// error ("the vhost-user socket", "the control socket").
pub fn check(path: &Path, what: &str) -> io::Result<()> {
    let len = path.as_os_str().as_bytes().len();
    if len <= MAX_SOCKET_PATH {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{what} path {} is {len} bytes; a Unix socket path holds at most \
             {MAX_SOCKET_PATH} bytes: put the socket in a shorter folder (for \
             example under $XDG_RUNTIME_DIR or /tmp) or pass a relative path",
            path.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn the_limit_is_107_bytes() {
        let ok = PathBuf::from(format!("/{}", "a".repeat(MAX_SOCKET_PATH - 1)));
        assert!(check(&ok, "the test socket").is_ok());
        let long = PathBuf::from(format!("/{}", "a".repeat(MAX_SOCKET_PATH)));
        let err = check(&long, "the test socket").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("108 bytes"), "{msg}");
        assert!(msg.contains("at most 107"), "{msg}");
        assert!(msg.contains("the test socket"), "{msg}");
    }

    #[test]
    fn a_path_that_is_too_long_cannot_be_bound_anyway() {
        // The check matches the kernel's: one byte more does fail to bind.
        let dir = std::env::temp_dir();
        let base = dir.join("vdevlab-sockpath-");
        let pad = MAX_SOCKET_PATH + 1 - base.as_os_str().len();
        let long = PathBuf::from(format!("{}{}", base.display(), "x".repeat(pad)));
        assert!(check(&long, "x").is_err());
        assert!(std::os::unix::net::UnixListener::bind(&long).is_err());
    }
}
