//! What the vhost-user control path and the data path cost, measured
//! against a qw backend binary: a `GET_CONFIG` round trip (what every guest
//! config read is under QEMU), and bytes per second from qw's data port
//! through the receive queue into the frontend. Used to price the relay
//! that config-change interrupts need (`docs/device-framework.md`,
//! "Config-change interrupts"): run it against a binary with the relay and
//! one without.
//!
//!     cargo run --release -p vdevlab-device-testkit --example vhost_user_cost -- \
//!         target/release/vdevlab-qw [seconds]

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vdevlab_device_testkit::{Config, Desc, Device, Layout};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

const LAYOUT: Layout = Layout {
    queues: 2,
    queue_size: 256,
    mem_size: 4 << 20,
    data_base: 0x10000,
};
const RX: usize = 0;
const BUFS: u64 = 128;
const BUF_LEN: u32 = 16 * 1024;
const ROUND_TRIPS: usize = 5000;

fn main() {
    let mut args = std::env::args().skip(1);
    let binary = args
        .next()
        .expect("usage: vhost_user_cost <vdevlab-qw binary> [seconds]");
    let secs: u64 = args.next().map_or(3, |s| s.parse().expect("seconds"));
    let dir = std::env::temp_dir().join(format!("vu-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data.sock");
    let dev = Device::spawn(&binary, &["--data", data.to_str().unwrap()]);
    let mut vmm = dev.vmm(Config {
        layout: LAYOUT,
        features: 0,
    });

    // The control path: GET_CONFIG round trips.
    let mut rtt: Vec<Duration> = (0..ROUND_TRIPS)
        .map(|_| {
            let t = Instant::now();
            vmm.fe
                .get_config(0, 48, VhostUserConfigFlags::empty(), &[0u8; 48])
                .expect("GET_CONFIG");
            t.elapsed()
        })
        .collect();
    rtt.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = rtt.iter().sum::<Duration>() / ROUND_TRIPS as u32;

    // The data path: the data port into the receive queue, buffers
    // re-posted as they come back.
    let stop = Arc::new(AtomicBool::new(false));
    let port = UnixStream::connect(&data).expect("the data port");
    let writer = {
        let stop = stop.clone();
        let mut s = port.try_clone().expect("the data port");
        std::thread::spawn(move || {
            let chunk = vec![0x5au8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let mut owner: HashMap<u16, u64> = HashMap::new();
    for i in 0..BUFS {
        let addr = LAYOUT.data_base + i * u64::from(BUF_LEN);
        let head = vmm.post_chain(RX, &[Desc::writable(addr, BUF_LEN)]);
        owner.insert(head, addr);
    }
    vmm.kick(RX);
    let (mut seen, mut bytes) = (vmm.used_idx(RX), 0u64);
    let start = Instant::now();
    let run = Duration::from_secs(secs);
    while start.elapsed() < run {
        let now = vmm.used_idx(RX);
        if now == seen {
            std::thread::yield_now();
            continue;
        }
        while seen != now {
            let (id, len) = vmm.used_elem(RX, seen);
            bytes += u64::from(len);
            let addr = owner.remove(&(id as u16)).expect("a posted head");
            let head = vmm.post_chain(RX, &[Desc::writable(addr, BUF_LEN)]);
            owner.insert(head, addr);
            seen = seen.wrapping_add(1);
        }
        vmm.kick(RX);
    }
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    // The writer may be blocked on a full FIFO.
    let _ = port.shutdown(std::net::Shutdown::Both);
    drop(vmm);
    let _ = writer.join();
    println!(
        "{{\"binary\":{:?},\"get_config_round_trips\":{ROUND_TRIPS},\"get_config_mean_us\":{:.1},\"get_config_p50_us\":{:.1},\"get_config_p99_us\":{:.1},\"rx_mib_per_s\":{:.1},\"rx_seconds\":{:.1}}}",
        binary,
        us(mean),
        us(rtt[ROUND_TRIPS / 2]),
        us(rtt[ROUND_TRIPS * 99 / 100]),
        bytes as f64 / took.as_secs_f64() / (1 << 20) as f64,
        took.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
