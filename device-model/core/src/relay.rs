//! The relay between the VMM and vhost-user-backend's daemon, which gives
//! the core its own handle on the backend channel
//! ([`crate::config_change`]).
//!
//! The daemon accepts the VMM itself (on vhost's `Listener`) and starts
//! vhost-user-backend's daemon as a client of a private socket: a fresh
//! folder of mode 0700 under the temporary folder, whose one connection
//! must come from this process (`SO_PEERCRED`); the folder is removed once
//! the daemon is connected. Two threads then copy whole vhost-user
//! messages (header, body and the descriptors passed with them,
//! `SCM_RIGHTS`) both ways, unchanged. On the way to the backend the relay
//! reads two messages: `SET_PROTOCOL_FEATURES` (which features the VMM
//! acknowledged) and `SET_BACKEND_REQ_FD` (whose descriptor it duplicates
//! for [`ConfigChanges`]). When either side hangs up, both connections are
//! shut down, so the VMM and the daemon each see the other leave as before.
//!
//! Only the control path goes through the relay: guest memory, kicks and
//! calls are descriptors passed once, which the backend then uses directly.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserProtocolFeatures, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::tempdir::TempDir;

use crate::config_change::ConfigChanges;

const HEADER: usize = 12;

/// One message as it crossed the relay.
struct Message {
    header: [u8; HEADER],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn word(&self, i: usize) -> u32 {
        let h = &self.header;
        u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]])
    }
    fn request(&self) -> u32 {
        self.word(0)
    }
}

/// Read one whole message from `from`: `Ok(None)` at a clean end of stream.
fn recv_message(from: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER];
    let mut fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points into `header`, which lives through the call
    // and may hold any bytes.
    let (n, nfds) = unsafe { from.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: recv_with_fds returned `nfds` descriptors that we now own.
    let fds: Vec<OwnedFd> = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    // The rest of the header (a stream socket may split it); descriptors
    // come only with the first byte of a message.
    (&*from).read_exact(&mut header[n..])?;
    let mut msg = Message {
        header,
        body: Vec::new(),
        fds,
    };
    let size = msg.word(8) as usize;
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a vhost-user message of {size} bytes (at most {MAX_MSG_SIZE})"),
        ));
    }
    msg.body = vec![0u8; size];
    (&*from).read_exact(&mut msg.body)?;
    Ok(Some(msg))
}

fn send_message(to: &UnixStream, msg: &Message) -> io::Result<()> {
    let raw: Vec<RawFd> = msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let all: Vec<u8> = msg.header.iter().chain(&msg.body).copied().collect();
    let sent = to
        .send_with_fds(&[all.as_slice()], &raw)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < all.len() {
        // The descriptors went with the first part; the rest is plain data.
        io::Write::write_all(&mut &*to, &all[sent..])?;
    }
    Ok(())
}

/// Look at a message on its way from the VMM to the backend.
fn watch(msg: &Message, cc: &ConfigChanges) {
    let request = msg.request();
    if request == u32::from(FrontendReq::SET_PROTOCOL_FEATURES) && msg.body.len() >= 8 {
        let mut v = [0u8; 8];
        v.copy_from_slice(&msg.body[..8]);
        cc.set_protocol_features(VhostUserProtocolFeatures::from_bits_truncate(
            u64::from_ne_bytes(v),
        ));
    } else if request == u32::from(FrontendReq::SET_BACKEND_REQ_FD) {
        match msg.fds.first().map(OwnedFd::try_clone) {
            Some(Ok(fd)) => cc.set_channel(UnixStream::from(fd)),
            Some(Err(e)) => warn!(error = %e, "could not keep a handle on the backend channel"),
            None => warn!("SET_BACKEND_REQ_FD without a descriptor"),
        }
    }
}

/// Copy messages from `from` to `to` until either fails or ends, then shut
/// both down (so the other direction ends too).
fn pump(from: &UnixStream, to: &UnixStream, cc: Option<&ConfigChanges>, dir: &str) {
    loop {
        match recv_message(from) {
            Ok(Some(msg)) => {
                if let Some(cc) = cc {
                    watch(&msg, cc);
                }
                if let Err(e) = send_message(to, &msg) {
                    debug!(dir, error = %e, "relay: forwarding failed");
                    break;
                }
            }
            Ok(None) => {
                debug!(dir, "relay: end of stream");
                break;
            }
            Err(e) => {
                debug!(dir, error = %e, "relay: receive failed");
                break;
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A private socket for vhost-user-backend's daemon to connect to.
#[derive(Debug)]
pub struct PrivateSocket {
    dir: TempDir,
    listener: UnixListener,
    path: String,
}

impl PrivateSocket {
    /// A fresh 0700 folder under the temporary folder (`TMPDIR`), with a
    /// listening socket in it.
    pub fn new() -> io::Result<Self> {
        let prefix = std::env::temp_dir().join("vdevlab-relay-");
        let dir = TempDir::new_with_prefix(&prefix).map_err(|e| {
            io::Error::other(format!(
                "creating the relay's private folder (named {}<random>): {e} (set TMPDIR to a writable folder)",
                prefix.display()
            ))
        })?;
        let path = dir.as_path().join("backend.sock");
        crate::sockpath::check(
            &path,
            "the relay's private socket (set TMPDIR to a shorter folder)",
        )
        .map_err(io::Error::other)?;
        let listener = UnixListener::bind(&path)?;
        let path = path
            .to_str()
            .ok_or_else(|| io::Error::other("TMPDIR is not valid UTF-8; set it to a plain path"))?
            .to_owned();
        Ok(Self {
            dir,
            listener,
            path,
        })
    }

    /// The socket's path (vhost-user-backend takes a `&str`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Accept the one connection, which must come from this process, and
    /// remove the folder.
    pub fn accept_own(self) -> io::Result<UnixStream> {
        let (stream, _) = self.listener.accept()?;
        let pid = peer_pid(&stream)?;
        if pid != std::process::id() as libc::pid_t {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the relay's private socket was connected by process {pid}, not by this one"
                ),
            ));
        }
        if let Err(e) = self.dir.remove() {
            debug!(error = %e, "could not remove the relay's private folder");
        }
        Ok(stream)
    }
}

fn peer_pid(stream: &UnixStream) -> io::Result<libc::pid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is
    // a ucred as SO_PEERCRED expects.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// A running relay for one VMM connection.
#[derive(Debug)]
pub struct Relay {
    vmm: UnixStream,
    backend: UnixStream,
    threads: Vec<JoinHandle<()>>,
    cc: Arc<ConfigChanges>,
}

impl Relay {
    /// Relay between `vmm` and `backend` (the daemon's connection).
    pub fn start(vmm: UnixStream, backend: UnixStream, cc: Arc<ConfigChanges>) -> io::Result<Self> {
        cc.vmm_connected();
        let spawn =
            |name: &str, from: UnixStream, to: UnixStream, watch: Option<Arc<ConfigChanges>>| {
                let dir = name.to_owned();
                std::thread::Builder::new()
                    .name(format!("vdevlab-relay-{name}"))
                    .spawn(move || pump(&from, &to, watch.as_deref(), &dir))
            };
        let threads = vec![
            spawn(
                "to-backend",
                vmm.try_clone()?,
                backend.try_clone()?,
                Some(cc.clone()),
            )?,
            spawn("to-vmm", backend.try_clone()?, vmm.try_clone()?, None)?,
        ];
        info!("relaying the VMM connection to the vhost-user daemon");
        Ok(Self {
            vmm,
            backend,
            threads,
            cc,
        })
    }

    /// End the relay (both connections shut down) and wait for its threads.
    pub fn finish(mut self) {
        let _ = self.vmm.shutdown(Shutdown::Both);
        let _ = self.backend.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.cc.vmm_disconnected();
    }
}
