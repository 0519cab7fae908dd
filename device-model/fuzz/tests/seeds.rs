//! The seed corpus of `rx_tx_request_path`, built from readable descriptions.
//!
//! `cargo test` checks that every file in `corpus/rx_tx_request_path/seed-*`
//! is what the description below encodes, and replays each seed through the
//! harness (all invariants checked) with the outcome it is meant to have.
//! `QW_WRITE_SEEDS=1 cargo test` (re)writes the files.

use std::path::PathBuf;

use vdevlab_device_fuzz::{
    encode, run, Header, Op, Outcome, RawDesc, RingLayout, F_INDIRECT, F_NEXT, F_WRITE, RX, TX,
};

const N: u16 = F_NEXT;
const W: u16 = F_WRITE;
const I: u16 = F_INDIRECT;

/// Queue size 16 for both queues; rx rings at 0x0000/0x1000/0x2000, tx rings
/// at 0x3000/0x4000/0x5000; buffers from 0x6000 on.
fn header(tx_capacity: u32) -> Header {
    Header {
        rx: RingLayout {
            size_log2: 4,
            desc: 0x0000,
            avail: 0x1000,
            used: 0x2000,
        },
        tx: RingLayout {
            size_log2: 4,
            desc: 0x3000,
            avail: 0x4000,
            used: 0x5000,
        },
        flags: 0,
        base: 0,
        tx_capacity,
        rx_capacity: 1 << 20,
    }
}

fn desc(queue: u8, index: u16, addr: u64, len: u32, flags: u16, next: u16) -> Op {
    Op::Desc {
        queue,
        index,
        desc: RawDesc::new(addr, len, flags, next),
    }
}

fn desc_at(at: u16, addr: u64, len: u32, flags: u16, next: u16) -> Op {
    Op::DescAt {
        addr: at,
        desc: RawDesc::new(addr, len, flags, next),
    }
}

fn ok(o: &Outcome, i: usize) -> (u32, u64) {
    match &o.passes[i].1 {
        Ok(p) => (p.completed, p.bytes),
        Err(e) => panic!("pass {i} failed: {e}"),
    }
}

struct Seed {
    name: &'static str,
    header: Header,
    ops: Vec<Op>,
    check: fn(&Outcome),
}

/// Every seed of the corpus, in file order.
fn seeds() -> Vec<Seed> {
    [
        well_formed_seeds(),
        malformed_chain_seeds(),
        ring_seeds(),
        regression_seeds(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Chains that are fine: the device moves the bytes.
fn well_formed_seeds() -> Vec<Seed> {
    vec![
        Seed {
            // Two-descriptor device-writable chain; 11 bytes fit in it.
            name: "seed-rx-valid-chain",
            header: header(1 << 20),
            ops: vec![
                desc(RX, 0, 0x6000, 4, W | N, 1),
                desc(RX, 1, 0x9000, 16, W, 0),
                Op::Push { queue: RX, head: 0 },
                Op::Inject { len: 11 },
                Op::RxPass,
            ],
            check: |o| {
                assert_eq!(ok(o, 0), (1, 11));
                assert_eq!(o.stats.rx_bytes, 11);
                assert_eq!(o.stats.bad_chains, 0);
            },
        },
        Seed {
            // A 13-byte tx chain fits the 16-byte capture, the next 10-byte
            // one does not until the host takes the first.
            name: "seed-tx-valid-chain",
            header: header(16),
            ops: vec![
                Op::Write {
                    addr: 0xa000,
                    data: b"hello, ".to_vec(),
                },
                Op::Write {
                    addr: 0xa100,
                    data: b"world!".to_vec(),
                },
                Op::Write {
                    addr: 0xa200,
                    data: b"0123456789".to_vec(),
                },
                desc(TX, 0, 0xa000, 7, N, 1),
                desc(TX, 1, 0xa100, 6, 0, 0),
                desc(TX, 2, 0xa200, 10, 0, 0),
                Op::Push { queue: TX, head: 0 },
                Op::Push { queue: TX, head: 2 },
                Op::TxPass,
                Op::Take { max: 13 },
                Op::TxPass,
            ],
            check: |o| {
                // A transmit pass reports used length 0: nothing written.
                assert_eq!(ok(o, 0), (1, 0), "back-pressure on the second chain");
                assert_eq!(ok(o, 1), (1, 0));
                assert_eq!(o.stats.tx_bytes, 23);
                assert_eq!(o.captured, b"hello, world!0123456789");
            },
        },
        Seed {
            // Indirect tables on both queues.
            name: "seed-indirect-chain",
            header: header(64),
            ops: vec![
                desc(RX, 0, 0xc000, 32, I, 0),
                desc_at(0xc000, 0x6000, 5, W | N, 1),
                desc_at(0xc010, 0x6100, 5, W, 0),
                Op::Push { queue: RX, head: 0 },
                Op::Inject { len: 10 },
                Op::Write {
                    addr: 0xa000,
                    data: b"abcdef".to_vec(),
                },
                desc(TX, 3, 0xc100, 32, I, 0),
                desc_at(0xc100, 0xa000, 3, N, 1),
                desc_at(0xc110, 0xa003, 3, 0, 0),
                Op::Push { queue: TX, head: 3 },
                Op::BothPasses,
            ],
            check: |o| {
                assert_eq!(ok(o, 0), (1, 10));
                assert_eq!(ok(o, 1), (1, 0));
                assert_eq!(o.captured, b"abcdef");
            },
        },
    ]
}

/// Malformed chains: each refused, the queue goes on.
fn malformed_chain_seeds() -> Vec<Seed> {
    vec![
        Seed {
            // Descriptor loops: 0 -> 1 -> 0 in the table, a zero-length loop
            // 2 -> 3 -> 2, and a loop inside an indirect table.
            name: "seed-loop",
            header: header(1 << 20),
            ops: vec![
                desc(RX, 0, 0x6000, 4, W | N, 1),
                desc(RX, 1, 0x6010, 4, W | N, 0),
                desc(RX, 2, 0x6000, 0, W | N, 3),
                desc(RX, 3, 0x6000, 0, W | N, 2),
                desc(RX, 4, 0xc200, 32, I, 0),
                desc_at(0xc200, 0x6200, 4, W | N, 1),
                desc_at(0xc210, 0x6210, 4, W | N, 0),
                Op::Push { queue: RX, head: 0 },
                Op::Push { queue: RX, head: 2 },
                Op::Push { queue: RX, head: 4 },
                Op::Inject { len: 200 },
                Op::RxPass,
            ],
            check: |o| {
                // virtio-queue stops walking a loop after `queue size` (or
                // `table length`) descriptors; the device sees that the last
                // one still has NEXT set and refuses the chain (Runaway).
                assert_eq!(ok(o, 0), (3, 0));
                assert_eq!(o.stats.bad_chains, 3);
                assert_eq!(o.stats.rx_bytes, 0);
            },
        },
        Seed {
            // Addresses at and past the edges of guest memory.
            name: "seed-out-of-memory",
            header: header(1 << 20),
            ops: vec![
                desc(RX, 0, 0xfff8, 16, W, 0),       // runs into the hole
                desc(RX, 1, u64::MAX - 2, 8, W, 0),  // wraps the address space
                desc(RX, 2, 0x1_0000, 8, W, 0),      // inside the hole
                desc(RX, 3, 0x7ff8, 16, W, 0),       // straddles two regions: fine
                desc(RX, 4, 0x1_1ff0, 16, W, 0),     // end of the last region: fine
                desc(RX, 5, 0x1_1ff8, 16, W, 0),     // runs past the last region
                desc(RX, 6, 1 << 40, 16, W, 0),      // far away
                Op::Push { queue: RX, head: 0 },
                Op::Push { queue: RX, head: 1 },
                Op::Push { queue: RX, head: 2 },
                Op::Push { queue: RX, head: 3 },
                Op::Push { queue: RX, head: 4 },
                Op::Push { queue: RX, head: 5 },
                Op::Push { queue: RX, head: 6 },
                Op::Inject { len: 20 },
                desc(TX, 0, 0x1_1ff8, 16, 0, 0),
                desc(TX, 1, 0xa000, 0xffff_ffff, 0, 0),
                Op::Push { queue: TX, head: 0 },
                Op::Push { queue: TX, head: 1 },
                Op::BothPasses,
            ],
            check: |o| {
                // The last two rx chains stay posted: the FIFO is empty by then.
                assert_eq!(ok(o, 0), (5, 20));
                assert_eq!(ok(o, 1), (2, 0));
                assert_eq!(o.stats.bad_chains, 3 + 2);
                assert_eq!(o.stats.rx_buffers, 2);
            },
        },
        Seed {
            // Wrong directions, an empty chain, and an oversized chain (an
            // indirect table of 33 entries whose entry 0 loops onto itself:
            // 33 x 32 KiB > 1 MiB).
            name: "seed-wrong-direction",
            header: header(1 << 20),
            ops: vec![
                desc(RX, 0, 0x6000, 8, 0, 0), // readable on rx
                desc(RX, 1, 0x6000, 8, W | N, 2),
                desc(RX, 2, 0x6100, 8, 0, 0), // readable tail
                desc(RX, 5, 0x6000, 0, W, 0), // empty
                desc(RX, 6, 0x6000, 8, W, 0), // fine
                Op::Push { queue: RX, head: 0 },
                Op::Push { queue: RX, head: 1 },
                Op::Push { queue: RX, head: 5 },
                Op::Push { queue: RX, head: 6 },
                Op::Inject { len: 8 },
                desc(TX, 0, 0xa000, 8, W, 0), // writable on tx
                desc(TX, 1, 0xd000, 33 * 16, I, 0),
                desc_at(0xd000, 0x0, 0x8000, N, 0),
                Op::Push { queue: TX, head: 0 },
                Op::Push { queue: TX, head: 1 },
                Op::BothPasses,
            ],
            check: |o| {
                assert_eq!(ok(o, 0), (4, 8));
                assert_eq!(o.stats.rx_bytes, 8);
                assert_eq!(ok(o, 1), (2, 0));
                assert_eq!(o.stats.bad_chains, 3 + 2);
            },
        },
    ]
}

/// The rings themselves: a broken available index, wrapping indices.
fn ring_seeds() -> Vec<Seed> {
    vec![
        Seed {
            // The available index jumps 100 ahead of a queue of 16: a queue
            // error; once the driver puts it back, the queue works again.
            name: "seed-broken-avail-idx",
            header: header(1 << 20),
            ops: vec![
                desc(RX, 0, 0x6000, 8, W, 0),
                Op::Push { queue: RX, head: 0 },
                Op::Inject { len: 4 },
                Op::AvailIdx { queue: RX, idx: 100 },
                Op::RxPass,
                Op::AvailIdx { queue: RX, idx: 1 },
                Op::RxPass,
            ],
            check: |o| {
                assert!(o.passes[0].1.is_err());
                assert_eq!(ok(o, 1), (1, 4));
                assert_eq!(o.stats.queue_errors, 1);
            },
        },
        Seed {
            // EVENT_IDX, a queue of 4, indices that wrap past 65535, and a
            // used_event written by the driver.
            name: "seed-event-idx-wrap",
            header: Header {
                rx: RingLayout {
                    size_log2: 2,
                    desc: 0x0000,
                    avail: 0x1000,
                    used: 0x2000,
                },
                flags: 1,
                base: 0xfffe,
                ..header(1 << 20)
            },
            ops: vec![
                desc(RX, 0, 0x6000, 3, W, 0),
                desc(RX, 1, 0x6100, 3, W, 0),
                desc(RX, 2, 0x6200, 3, W, 0),
                desc(RX, 3, 0x6300, 3, W, 0),
                Op::Push { queue: RX, head: 0 },
                Op::Push { queue: RX, head: 1 },
                Op::Push { queue: RX, head: 2 },
                // used_event (after the 4 ring entries) = 0
                Op::Write {
                    addr: 0x1000 + 4 + 2 * 4,
                    data: vec![0, 0],
                },
                Op::Inject { len: 7 },
                Op::RxPass,
                Op::Push { queue: RX, head: 3 },
                Op::Push { queue: RX, head: 0 },
                Op::Inject { len: 5 },
                Op::RxPass,
            ],
            check: |o| {
                assert_eq!(ok(o, 0), (3, 7));
                assert_eq!(ok(o, 1), (2, 5));
            },
        },
    ]
}

/// What the fuzzer found.
fn regression_seeds() -> Vec<Seed> {
    vec![
        // Regression seeds for the first thing the fuzzer found (see
        // README, "Findings"): an available entry naming a head outside the
        // descriptor table. The spec now calls that a broken ring: the pass
        // fails, completions made before the fault stay, and no byte goes
        // to the bad entry (the harness checks all of it).
        Seed {
            // The fuzzer's own input, minimized (tx queue of 1, head 1792):
            // here rewritten on the standard layout.
            name: "seed-head-out-of-range",
            header: header(1 << 20),
            ops: vec![Op::Push { queue: TX, head: 16 }, Op::TxPass],
            check: |o| {
                assert!(o.passes[0].1.is_err());
                assert_eq!(o.stats.queue_errors, 1);
            },
        },
        Seed {
            // Bad head first, then a good chain: before the fix the good
            // chain was filled, add_used(16) failed, and its 8 bytes were
            // gone from the FIFO without being counted or completed.
            name: "seed-rx-head-out-of-range-first",
            header: header(1 << 20),
            ops: vec![
                desc(RX, 0, 0x6000, 8, W, 0),
                Op::Push { queue: RX, head: 16 },
                Op::Push { queue: RX, head: 0 },
                Op::Inject { len: 8 },
                Op::RxPass,
            ],
            check: |o| {
                assert!(o.passes[0].1.is_err());
                assert_eq!(o.stats.queue_errors, 1);
            },
        },
        Seed {
            // Good chain, then a bad head: the completion before the fault
            // stays on the used ring and is counted.
            name: "seed-rx-head-out-of-range-after-good",
            header: header(1 << 20),
            ops: vec![
                desc(RX, 0, 0x6000, 8, W, 0),
                Op::Push { queue: RX, head: 0 },
                Op::Push { queue: RX, head: 16 },
                Op::Inject { len: 20 },
                Op::RxPass,
            ],
            check: |o| {
                assert!(o.passes[0].1.is_err());
                assert_eq!(o.stats.queue_errors, 1);
                assert_eq!((o.stats.rx_bytes, o.stats.rx_buffers), (8, 1));
            },
        },
        Seed {
            // Same on tx, bad head 0xffff first: before the fix the good
            // chain's 6 bytes reached the capture uncounted and uncompleted.
            name: "seed-tx-head-out-of-range",
            header: header(1 << 20),
            ops: vec![
                Op::Write {
                    addr: 0xa000,
                    data: b"abcdef".to_vec(),
                },
                desc(TX, 0, 0xa000, 6, 0, 0),
                Op::Push { queue: TX, head: 0xffff },
                Op::Push { queue: TX, head: 0 },
                Op::TxPass,
            ],
            check: |o| {
                assert!(o.passes[0].1.is_err());
                assert_eq!(o.stats.queue_errors, 1);
            },
        },
    ]
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/rx_tx_request_path")
}

#[test]
fn seed_files_match_their_descriptions() {
    let dir = corpus_dir();
    let write = std::env::var("QW_WRITE_SEEDS").is_ok_and(|v| v == "1");
    for s in seeds() {
        let bytes = encode(&s.header, &s.ops);
        let path = dir.join(s.name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        } else {
            let on_disk = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (run with QW_WRITE_SEEDS=1)", path.display()));
            assert_eq!(on_disk, bytes, "{} is stale (run with QW_WRITE_SEEDS=1)", s.name);
        }
    }
}

#[test]
fn seeds_replay_with_their_intended_outcome() {
    for s in seeds() {
        let bytes = encode(&s.header, &s.ops);
        let (h, ops) = vdevlab_device_fuzz::decode(&bytes);
        assert_eq!(h, s.header, "{}: header round-trips", s.name);
        assert_eq!(ops, s.ops, "{}: ops round-trip", s.name);
        let out = run(&bytes);
        eprintln!("{}: {:?} {:?}", s.name, out.passes, out.stats);
        (s.check)(&out);
    }
}
