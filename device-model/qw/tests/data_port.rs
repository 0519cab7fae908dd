//! The data port (`vdevlab-qw --data PATH`): the real binary, driven
//! over vhost-user by the in-process frontend of the protocol tests, with a
//! host client on the data socket. Bytes written to the socket reach the
//! driver's receive buffers in order; bytes the driver transmits come out of
//! the socket in order; neither side loses a byte when the other is slow.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use support::*;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A device with a data port; the socket's path.
fn spawn(extra: &[&str]) -> (Device, PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "vdevlab-data-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut args = vec!["--data", path.to_str().expect("utf-8 temp path")];
    args.extend_from_slice(extra);
    let dev = Device::spawn(&args);
    assert!(
        wait_until(TIMEOUT, || path.exists()),
        "no data socket; log:\n{}",
        dev.log()
    );
    (dev, path)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n as u32).map(|i| (i * 31 + i / 251) as u8).collect()
}

#[test]
fn socket_bytes_reach_the_receive_buffers_in_order() {
    let (dev, path) = spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let b0 = vmm.post_rx(&[(0x10000, 100)]);
    let b1 = vmm.post_rx(&[(0x11000, 50), (0x12000, 50)]);
    vmm.kick(RX);
    let mut client = UnixStream::connect(&path).expect("connecting to the data port");
    let data = pattern(300);
    client.write_all(&data).unwrap();
    assert!(vmm.wait_used(RX, 2), "used ring: {:?}", vmm.all_used(RX));
    assert_eq!(
        vmm.used_elems(RX, 0, 2),
        vec![(b0.into(), 100), (b1.into(), 100)]
    );
    let mut got = vmm.read(0x10000, 100);
    got.extend(vmm.read(0x11000, 50));
    got.extend(vmm.read(0x12000, 50));
    assert_eq!(got, data[..200]);
    // The rest waits in the FIFO, accepted, not refused.
    let s = ctl.wait_stats(|s| s.injected_bytes == 300);
    assert_eq!(s.inject_rejected_bytes, 0);
    assert_eq!(ctl.rx_pending(), 100);
    let b2 = vmm.post_rx(&[(0x13000, 128)]);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, 3));
    assert_eq!(vmm.used_elem(RX, 2), (b2.into(), 100));
    assert_eq!(vmm.read(0x13000, 100), data[200..]);
}

#[test]
fn transmitted_bytes_come_out_of_the_socket_in_order() {
    let (dev, path) = spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let mut client = UnixStream::connect(&path).expect("connecting to the data port");
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    // Bytes the device takes before it accepted the client wait in the
    // capture and go out on accepting: no need to wait here.
    let h0 = vmm.post_tx(0x10000, b"first,");
    let h1 = vmm.post_tx_chain(&[(0x11000, b"sec"), (0x12000, b"ond,")]);
    let h2 = vmm.post_tx(0x13000, b"third");
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 3), "used ring: {:?}", vmm.all_used(TX));
    assert_eq!(
        vmm.used_elems(TX, 0, 3),
        vec![(h0.into(), 0), (h1.into(), 0), (h2.into(), 0)]
    );
    let mut got = [0u8; 18];
    client.read_exact(&mut got).expect("the transmitted bytes");
    assert_eq!(&got, b"first,second,third");
    assert_eq!(ctl.tx_captured(), 0, "sent, not left in the capture");
}

/// More than the FIFO, the capture and the socket buffers hold, both ways
/// at once, with a small FIFO and capture: back-pressure on every side,
/// and every byte arrives, in order.
#[test]
fn a_slow_side_holds_the_other_back_without_loss() {
    let (dev, path) = spawn(&["--rx-fifo-bytes", "4096", "--tx-capture-bytes", "4096"]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let client = UnixStream::connect(&path).expect("connecting to the data port");
    const TOTAL: usize = 1 << 20;
    const BUF: u32 = 4096;
    let data = pattern(TOTAL);

    // The host writes 1 MiB into the port while the "driver" receives it
    // in 4 KiB buffers, 16 at a time.
    let mut w = client.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut got = Vec::with_capacity(TOTAL);
    let slot = |n: u16| 0x100000 + u64::from(n % 64) * u64::from(BUF);
    let (mut posted, mut used) = (0u16, 0u16);
    while got.len() < TOTAL {
        // Keep 16 buffers posted; buffer n lives in slot n % 64.
        while posted.wrapping_sub(used) < 16 {
            vmm.post_rx(&[(slot(posted), BUF)]);
            posted = posted.wrapping_add(1);
        }
        vmm.kick(RX);
        assert!(
            wait_until(TIMEOUT, || vmm.used_idx(RX) != used),
            "stalled at {} bytes",
            got.len()
        );
        let now = vmm.used_idx(RX);
        while used != now {
            let (_, len) = vmm.used_elem(RX, used);
            got.extend(vmm.read(slot(used), len as usize));
            used = used.wrapping_add(1);
        }
    }
    writer.join().unwrap().expect("writing to the data port");
    assert_eq!(got.len(), TOTAL);
    assert!(got == data, "the received stream differs from the one sent");
    assert_eq!(ctl.stats().inject_rejected_bytes, 0);

    // The "driver" transmits 1 MiB in 4 KiB buffers while the host reads
    // slowly: the capture fills, buffers wait on the ring, nothing is lost.
    let mut r = client.try_clone().unwrap();
    r.set_read_timeout(Some(TIMEOUT)).unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = vec![0u8; TOTAL];
        let mut n = 0;
        while n < TOTAL {
            std::thread::sleep(std::time::Duration::from_millis(1));
            let k = r.read(&mut all[n..(n + 8192).min(TOTAL)])?;
            if k == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            n += k;
        }
        Ok::<_, std::io::Error>(all)
    });
    let mut posted = 0usize;
    let mut done = vmm.used_idx(TX);
    while posted < TOTAL {
        let batch = 16.min((TOTAL - posted) / BUF as usize);
        for i in 0..batch {
            let off = posted + i * BUF as usize;
            vmm.post_tx(
                0x200000 + (i as u64) * u64::from(BUF),
                &data[off..off + BUF as usize],
            );
        }
        vmm.kick(TX);
        done = done.wrapping_add(batch as u16);
        assert!(
            vmm.wait_used(TX, done),
            "transmit stalled at {posted} bytes"
        );
        posted += batch * BUF as usize;
    }
    let back = reader.join().unwrap().expect("reading the data port");
    assert!(
        back == data,
        "the transmitted stream differs from the one read"
    );
    assert_eq!(ctl.stats().tx_bytes, TOTAL as u64);
}
