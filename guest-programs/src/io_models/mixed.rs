//! `mixed`: one blocking reader thread and one blocking writer thread on
//! the same open device (`O_RDWR`, one file shared by both) at the same
//! time: `--bytes` each way, the transmitted stream from `--seed`.
//!
//! Reports `rx_bytes`, `rx_sha256`, `reads`, `tx_bytes`, `tx_sha256` and
//! `writes`. If one side fails the run ends at once with its error, without
//! waiting for the other side (which may be blocked for good).

use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};

use crate::common::{open_device, Access, Rx, Step, Tx};
use crate::{ready, Dir, Opts, Report};

/// Run `mixed`.
pub fn run(o: &Opts) -> Result<Report, String> {
    let mut rx = Rx::new(o);
    let mut tx = Tx::new(o)?;
    let fd = Arc::new(open_device(&o.device, Access::ReadWrite, false)?);
    ready(&o.scenario);
    let (send, recv) = mpsc::channel::<(Dir, Result<Report, String>)>();

    let (rfd, rsend) = (Arc::clone(&fd), send.clone());
    let reader = std::thread::Builder::new()
        .name("rx".into())
        .spawn(move || {
            let mut res = Ok(());
            while !rx.done() {
                match rx.read_once(rfd.as_raw_fd()) {
                    Ok(Step::Moved(_)) => {}
                    Ok(Step::WouldBlock) => res = Err("EAGAIN from a blocking descriptor".into()),
                    Err(e) => res = Err(e),
                }
                if res.is_err() {
                    break;
                }
            }
            let _ = rsend.send((Dir::Rx, res.map(|()| rx.report())));
        });
    let wfd = Arc::clone(&fd);
    let writer = std::thread::Builder::new()
        .name("tx".into())
        .spawn(move || {
            let mut res = Ok(());
            while !tx.done() {
                match tx.write_once(wfd.as_raw_fd()) {
                    Ok(Step::Moved(_)) => {}
                    Ok(Step::WouldBlock) => res = Err("EAGAIN from a blocking descriptor".into()),
                    Err(e) => res = Err(e),
                }
                if res.is_err() {
                    break;
                }
            }
            let _ = send.send((Dir::Tx, res.map(|()| tx.report())));
        });
    reader.map_err(|e| format!("spawning the reader: {e}"))?;
    writer.map_err(|e| format!("spawning the writer: {e}"))?;

    let (mut rx_report, mut tx_report) = (None, None);
    for _ in 0..2 {
        let (dir, res) = recv
            .recv()
            .map_err(|_| "a worker thread ended without a result".to_string())?;
        match (dir, res) {
            (Dir::Rx, Ok(r)) => rx_report = Some(r),
            (Dir::Tx, Ok(r)) => tx_report = Some(r),
            (Dir::Rx, Err(e)) => return Err(format!("reader: {e}")),
            (Dir::Tx, Err(e)) => return Err(format!("writer: {e}")),
        }
    }
    let (rx_r, tx_r) = (rx_report.unwrap_or_default(), tx_report.unwrap_or_default());
    let mut r = Report::new();
    for (key, from, name) in [
        ("rx_bytes", &rx_r, "bytes"),
        ("reads", &rx_r, "reads"),
        ("rx_sha256", &rx_r, "sha256"),
        ("rx_head", &rx_r, "head"),
        ("tx_bytes", &tx_r, "bytes"),
        ("writes", &tx_r, "writes"),
        ("tx_sha256", &tx_r, "sha256"),
        ("tx_head", &tx_r, "head"),
    ] {
        r.raw(key, from.get(name).unwrap_or("null"));
    }
    Ok(r)
}
